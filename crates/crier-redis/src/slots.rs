//! Redis Cluster: the slot map (which master serves which hash slot), read with `CLUSTER SLOTS`
//! from the first seed that answers, and the hash slot of a key (CRC16/XMODEM of its hash tag,
//! mod 16384, as Redis computes it).
//!
//! The pub/sub task keeps one connection per master (shard) and subscribes each channel's shard
//! channel on the master of its slot; commands go through the redis crate's cluster connection,
//! which routes by key and follows `MOVED`/`ASK` by itself.

use redis::{ConnectionAddr, ConnectionInfo, Value};

use crate::error::Fault;
use crate::scripts::{bulk, int};

pub(crate) const SLOTS: u16 = 16384;

/// Slot ranges → master index, and the masters' connection infos.
#[derive(Debug, Clone)]
pub(crate) struct SlotMap {
    /// (first slot, last slot, master index), sorted.
    ranges: Vec<(u16, u16, usize)>,
    pub masters: Vec<ConnectionInfo>,
}

impl SlotMap {
    /// Parses a `CLUSTER SLOTS` reply; the masters get `seed`'s scheme and credentials.
    /// Fails when a slot is served by nobody (the cluster is not ready).
    pub(crate) fn parse(reply: &Value, seed: &ConnectionInfo) -> Result<SlotMap, Fault> {
        let Value::Array(entries) = reply else {
            return Err(Fault::Reply(format!("unexpected CLUSTER SLOTS reply {reply:?}")));
        };
        let mut ranges = Vec::new();
        let mut masters: Vec<ConnectionInfo> = Vec::new();
        let seed_host = match seed.addr() {
            ConnectionAddr::Tcp(h, _) | ConnectionAddr::TcpTls { host: h, .. } => h.clone(),
            _ => "127.0.0.1".to_owned(),
        };
        for entry in entries {
            let Value::Array(fields) = entry else { return Err(Fault::Reply("CLUSTER SLOTS: entry".into())) };
            let (Some(start), Some(end), Some(Value::Array(node))) =
                (fields.first().and_then(int), fields.get(1).and_then(int), fields.get(2))
            else {
                return Err(Fault::Reply("CLUSTER SLOTS: fields".into()));
            };
            let host = node.first().and_then(bulk).map(|h| String::from_utf8_lossy(h).into_owned());
            let host = host.filter(|h| !h.is_empty() && h != "?").unwrap_or_else(|| seed_host.clone());
            let port = node
                .get(1)
                .and_then(int)
                .and_then(|p| u16::try_from(p).ok())
                .ok_or_else(|| Fault::Reply("CLUSTER SLOTS: port".into()))?;
            let addr = match seed.addr() {
                ConnectionAddr::TcpTls { .. } => {
                    ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None }
                }
                _ => ConnectionAddr::Tcp(host, port),
            };
            let key = addr.to_string();
            let index = match masters.iter().position(|m| m.addr().to_string() == key) {
                Some(i) => i,
                None => {
                    masters.push(seed.clone().set_addr(addr));
                    masters.len() - 1
                }
            };
            let (Ok(start), Ok(end)) = (u16::try_from(start), u16::try_from(end)) else {
                return Err(Fault::Reply("CLUSTER SLOTS: slot out of range".into()));
            };
            ranges.push((start, end, index));
        }
        ranges.sort_unstable();
        let mut next = 0u32;
        let mut holes = Vec::new();
        for &(start, end, _) in &ranges {
            if u32::from(start) > next {
                holes.push(format!("{next}-{}", start - 1));
            }
            next = next.max(u32::from(end) + 1);
        }
        if next < u32::from(SLOTS) {
            holes.push(format!("{next}-{}", SLOTS - 1));
        }
        if !holes.is_empty() {
            return Err(Fault::Reply(format!(
                "the cluster does not serve slots {} (is it fully set up?)",
                holes.join(", ")
            )));
        }
        Ok(SlotMap { ranges, masters })
    }

    /// The master serving `slot`.
    pub(crate) fn master_of(&self, slot: u16) -> usize {
        let i = self.ranges.partition_point(|&(start, _, _)| start <= slot);
        i.checked_sub(1).and_then(|i| self.ranges.get(i)).map_or(0, |&(_, _, m)| m)
    }
}

/// The hash slot of `key` (its `{tag}` if it has a non-empty one).
pub(crate) fn slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter().position(|&b| b == b'}').filter(|&close| close > 0).map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16(tagged) % SLOTS
}

/// CRC16/XMODEM (polynomial 0x1021, initial 0), Redis Cluster's key hash.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::IntoConnectionInfo;

    #[test]
    fn slots_as_redis_computes_them() {
        // Known values (redis-cli CLUSTER KEYSLOT).
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"crier:{chat:lobby}:meta"), slot(b"crier:ch:{chat:lobby}"));
        assert_eq!(slot(b"foo{}{bar}"), slot(b"foo{}{bar}"), "an empty tag hashes the whole key");
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn parses_slot_maps_and_refuses_holes() {
        let seed = "redis://127.0.0.1:7000/".into_connection_info().unwrap_or_else(|e| panic!("{e}"));
        let node = |port: i64| Value::Array(vec![Value::BulkString(b"127.0.0.1".to_vec()), Value::Int(port)]);
        let entry = |a: i64, b: i64, port: i64| Value::Array(vec![Value::Int(a), Value::Int(b), node(port)]);
        let full = Value::Array(vec![entry(0, 5460, 7000), entry(5461, 10922, 7001), entry(10923, 16383, 7002)]);
        let map = SlotMap::parse(&full, &seed).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(map.masters.len(), 3);
        assert_eq!((map.master_of(0), map.master_of(5461), map.master_of(16383)), (0, 1, 2));
        let holed = Value::Array(vec![entry(0, 5460, 7000), entry(10923, 16383, 7002)]);
        let err = SlotMap::parse(&holed, &seed).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("5461-10922"), "{err}");
    }
}
