//! History, offsets and epochs in JetStream: the streams' policies, a channel's subjects, its
//! last stored message, the epoch marker, and history reads along the chain of stored messages.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use async_nats::HeaderMap;
use async_nats::jetstream::{context::PublishErrorKind, message::PublishMessage, stream};
use bytes::Bytes;
use crier_core::Namespaces;
use crier_core::broker::{BrokerError, History, Publication};
use crier_protocol::StreamPosition;

use crate::{H_CLIENT, H_EPOCH, H_KIND, H_LENS, H_OFFSET, H_PREV, H_TS, Inner, token, unavailable};

/// A channel's history policy, as the streams are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct HistPolicy {
    pub(crate) size: usize,
    pub(crate) ttl_ms: u64,
}

impl HistPolicy {
    pub(crate) fn id(&self) -> String {
        format!("{}_{}", self.size, self.ttl_ms)
    }
}

/// One stored message of a channel, decoded: the publications `first..=offset` (one, or a batch
/// of a node's publishes that queued while its previous store was out).
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub seq: u64,
    pub epoch: Arc<str>,
    /// The first offset it holds (0: the epoch marker).
    pub first: u64,
    /// The last offset it holds.
    pub offset: u64,
    pub prev: u64,
    pub ts: u64,
    /// Byte lengths of the batch's publications in `data` (empty: one publication).
    pub lens: Vec<usize>,
    pub data: Bytes,
}

/// Read access to a message's headers: async-nats's map (JetStream reads), or the block the
/// subscriber connection received, read in place (live messages: no allocation per header).
pub(crate) trait Headers {
    /// Calls `f` with each (name, value), in order.
    fn each<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a str));

    fn value(&self, name: &str) -> Option<&str> {
        let mut found = None;
        self.each(&mut |k, v| {
            if found.is_none() && k.eq_ignore_ascii_case(name) {
                found = Some(v);
            }
        });
        found
    }
}

impl Headers for HeaderMap {
    fn each<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a str)) {
        for (k, vs) in self.iter() {
            for v in vs {
                f(k.as_ref(), v.as_str());
            }
        }
    }
}

/// A header block as received (`NATS/1.0[ status]\r\nName: value\r\n...`).
#[derive(Debug, Clone)]
pub(crate) struct RawHeaders(pub Bytes);

impl Headers for RawHeaders {
    fn each<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a str)) {
        let Ok(text) = std::str::from_utf8(&self.0) else { return };
        for line in text.split("\r\n").skip(1) {
            if let Some((k, v)) = line.split_once(':') {
                f(k.trim(), v.trim());
            }
        }
    }
}

/// The crier headers of a message, read in one pass.
#[derive(Debug, Default)]
pub(crate) struct Fields<'a> {
    pub kind: Option<&'a str>,
    pub client: Option<&'a str>,
    epoch: Option<&'a str>,
    offset: Option<&'a str>,
    prev: Option<&'a str>,
    ts: Option<&'a str>,
    lens: Option<&'a str>,
    /// `Nats-Sequence`: the stream sequence, on a republished message.
    nats_seq: Option<&'a str>,
}

impl<'a> Fields<'a> {
    /// The stream sequence of a republished message (0: not one).
    pub(crate) fn stream_seq(&self) -> u64 {
        parse_u64(self.nats_seq)
    }

    pub(crate) fn of<H: Headers>(h: Option<&'a H>) -> Fields<'a> {
        let mut f = Fields::default();
        if let Some(h) = h {
            h.each(&mut |k, v| {
                let slot = match k {
                    H_EPOCH => &mut f.epoch,
                    H_OFFSET => &mut f.offset,
                    H_PREV => &mut f.prev,
                    H_TS => &mut f.ts,
                    H_LENS => &mut f.lens,
                    H_KIND => &mut f.kind,
                    H_CLIENT => &mut f.client,
                    "Nats-Sequence" => &mut f.nats_seq,
                    _ => return,
                };
                slot.get_or_insert(v);
            });
        }
        f
    }
}

fn parse_u64(v: Option<&str>) -> u64 {
    v.and_then(|v| v.parse().ok()).unwrap_or(0)
}

pub(crate) fn header<'a, H: Headers>(h: Option<&'a H>, name: &str) -> Option<&'a str> {
    h.and_then(|h| h.value(name))
}

impl Stored {
    /// Decodes a stored message; `known` is an epoch already held (shared when it is the
    /// message's, instead of allocated again).
    pub(crate) fn from_headers<H: Headers>(
        seq: u64,
        h: Option<&H>,
        data: Bytes,
        known: Option<&Arc<str>>,
    ) -> Option<Stored> {
        Stored::from_fields(seq, &Fields::of(h), data, known)
    }

    pub(crate) fn from_fields(seq: u64, f: &Fields<'_>, data: Bytes, known: Option<&Arc<str>>) -> Option<Stored> {
        let epoch = f.epoch?;
        let epoch: Arc<str> = match known {
            Some(k) if **k == *epoch => k.clone(),
            _ => epoch.into(),
        };
        let first = parse_u64(f.offset);
        let lens: Vec<usize> =
            f.lens.map(|l| l.split(',').filter_map(|n| n.parse().ok()).collect()).unwrap_or_default();
        if lens.iter().sum::<usize>() > data.len() {
            return None;
        }
        let count = lens.len().max(1) as u64;
        Some(Stored {
            seq,
            epoch,
            first,
            offset: if first == 0 { 0 } else { first + count - 1 },
            prev: parse_u64(f.prev),
            ts: parse_u64(f.ts),
            lens,
            data,
        })
    }

    /// Its publications, oldest first (none for the epoch marker).
    pub(crate) fn publications(&self, channel: &str) -> Vec<Publication> {
        if self.first == 0 {
            return Vec::new();
        }
        let one = |offset: u64, data: &[u8]| {
            let data = std::str::from_utf8(data).unwrap_or("null");
            Publication {
                offset,
                epoch: self.epoch.clone(),
                frame: crier_protocol::frames::encode_message(channel, &self.epoch, offset, data),
                published_at_us: self.ts,
            }
        };
        if self.lens.is_empty() {
            return vec![one(self.first, &self.data)];
        }
        let mut at = 0;
        self.lens
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let p = one(self.first + i as u64, &self.data[at..at + n]);
                at += n;
                p
            })
            .collect()
    }
}

/// Lock stripes of history walks ([`Inner::history`]).
pub(crate) const WALK_STRIPES: usize = 64;

fn walk_stripe(channel: &str) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(channel) as usize % WALK_STRIPES
}

pub(crate) fn new_epoch() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{:08x}", n as u32)
}

impl Inner {
    pub(crate) fn policy(&self, channel: &str) -> HistPolicy {
        Namespaces::namespace_of(channel).and_then(|ns| self.policies.get(ns)).copied().unwrap_or(self.default_policy)
    }

    pub(crate) fn hist_subject(&self, channel: &str) -> String {
        format!("{}.h.{}.{}", self.opts.prefix, self.policy(channel).id(), token(channel))
    }

    pub(crate) fn live_subject(&self, channel: &str) -> String {
        format!("{}.l.{}.{}", self.opts.prefix, self.policy(channel).id(), token(channel))
    }

    pub(crate) fn stream(&self, channel: &str) -> Result<&stream::Stream, BrokerError> {
        self.laid()?
            .streams
            .get(&self.policy(channel))
            .ok_or_else(|| BrokerError::Internal("no stream for the policy".into()))
    }

    /// The channel's last stored message (marker included), `None` when it has none: through
    /// the JetStream API (answered by the stream's leader), or a direct get when the stream has
    /// one replica (answered by its only server: as exact, and cheaper for it).
    pub(crate) async fn last(&self, channel: &str) -> Result<Option<Stored>, BrokerError> {
        if self.opts.replicas <= 1 {
            let got = self.last_direct(channel).await?;
            return Ok(self.cached(channel, got));
        }
        let s = self.stream(channel)?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        let got = match s.get_last_raw_message_by_subject(&self.hist_subject(channel)).await {
            Ok(m) => Stored::from_headers(m.sequence, Some(&m.headers), m.payload, None),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => None,
            Err(e) => return Err(unavailable(e)),
        };
        Ok(self.cached(channel, got))
    }

    /// [`Inner::last`] through a direct get (no JetStream API request: cheaper for the server;
    /// on a replicated stream possibly answered by a replica a little behind — for a
    /// publisher, whose expected-sequence check catches that, not for history reads). Not
    /// kept in the read cache (a publisher's read: nothing on the publish path is cached).
    pub(crate) async fn last_direct(&self, channel: &str) -> Result<Option<Stored>, BrokerError> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        let s = self.stream(channel)?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        match s.direct_get_last_for_subject(self.hist_subject(channel)).await {
            Ok(m) => Ok(Stored::from_headers(m.sequence, Some(&m.headers), m.payload, None)),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Keeps a message read from JetStream in the read cache.
    fn cached(&self, channel: &str, s: Option<Stored>) -> Option<Stored> {
        if let Some(s) = &s {
            self.cache.put(self.policy(channel), s);
        }
        s
    }

    /// The stored message at stream sequence `seq`, `None` when gone: from the read cache when
    /// it holds a message of `epoch` there (a walk's epoch: an entry left from a store the
    /// server lost has another one) not past the history TTL, else a direct get — on a
    /// replicated stream a replica a little behind may not hold it yet, so "not found" is asked
    /// again of the leader through the JetStream API.
    pub(crate) async fn at(&self, channel: &str, seq: u64, epoch: Option<&str>) -> Result<Option<Stored>, BrokerError> {
        use async_nats::jetstream::stream::DirectGetErrorKind;
        let policy = self.policy(channel);
        if let Some(epoch) = epoch
            && let Some(m) = self.cache.get(policy, seq)
            && *m.epoch == *epoch
            && (m.ts == 0 || crate::now_us() <= m.ts.saturating_add(policy.ttl_ms.saturating_mul(1000)))
        {
            return Ok(Some(m));
        }
        let s = self.stream(channel)?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        match s.direct_get(seq).await {
            Ok(m) => {
                return Ok(self.cached(channel, Stored::from_headers(m.sequence, Some(&m.headers), m.payload, None)));
            }
            Err(e) if e.kind() == DirectGetErrorKind::NotFound && self.opts.replicas > 1 => {}
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        }
        self.reads.fetch_add(1, Ordering::Relaxed);
        match s.get_raw_message(seq).await {
            Ok(m) => Ok(self.cached(channel, Stored::from_headers(m.sequence, Some(&m.headers), m.payload, None))),
            Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// The channel's last message, writing an epoch marker when it has none.
    pub(crate) async fn last_or_marker(&self, channel: &str) -> Result<Stored, BrokerError> {
        for _ in 0..5 {
            if let Some(s) = self.last(channel).await? {
                return Ok(s);
            }
            let epoch = new_epoch();
            let msg = PublishMessage::build()
                .payload(Bytes::new())
                .header(H_EPOCH, epoch.as_str())
                .header(H_OFFSET, "0")
                .header(H_PREV, "0")
                .expected_last_subject_sequence(0);
            match self.js.send_publish(self.hist_subject(channel), msg).await {
                Ok(f) => match f.await {
                    Ok(ack) => {
                        return Ok(Stored {
                            seq: ack.sequence,
                            epoch: epoch.into(),
                            first: 0,
                            offset: 0,
                            prev: 0,
                            ts: 0,
                            lens: Vec::new(),
                            data: Bytes::new(),
                        });
                    }
                    Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => continue,
                    Err(e) => return Err(unavailable(e)),
                },
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(BrokerError::Unavailable("could not settle the channel's epoch".into()))
    }

    pub(crate) async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let last = self.last_or_marker(channel).await?;
        let (epoch, top) = (last.epoch.to_string(), last.offset);
        let size = self.policy(channel).size as u64;
        // The offsets the policy keeps: the last `history_size`.
        let kept = top.saturating_sub(size) + 1;
        let lower = match since {
            Some(p) if p.epoch != epoch || p.offset > top => {
                return Ok(History { epoch, offset: top, publications: Vec::new(), gap: true });
            }
            Some(p) => (p.offset + 1).max(kept),
            None => (top + 1).saturating_sub(limit as u64).max(kept),
        };
        // Walk back along the channel's chain of stream sequences until `lower` is covered. One
        // walk of a channel at a time (of channels sharing a lock stripe): readers of the same
        // channel arriving together (a failover's recoveries) find what the first one read in
        // the read cache instead of each reading it from JetStream.
        let _walk = self.walks[walk_stripe(channel)].lock().await;
        let mut got: Vec<Stored> = Vec::new();
        let mut cur = Some(last);
        while let Some(m) = cur.take() {
            if m.offset == 0 || m.offset < lower {
                break;
            }
            let (prev, first) = (m.prev, m.first);
            got.push(m);
            if prev == 0 || first <= lower || got.len() as u64 > size + 1 {
                break;
            }
            cur = self.at(channel, prev, Some(&epoch)).await?;
        }
        got.reverse();
        let mut publications: Vec<Publication> =
            got.iter().flat_map(|m| m.publications(channel)).filter(|p| p.offset >= lower).collect();
        let mut gap = false;
        if let Some(p) = since {
            let first = publications.first().map_or(top + 1, |m| m.offset);
            gap = top > p.offset && first != p.offset + 1;
            publications.truncate(limit);
        }
        Ok(History { epoch, offset: top, publications, gap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_header_block_reads_like_the_map_it_came_from() {
        let raw = RawHeaders(Bytes::from_static(
            b"NATS/1.0\r\nCrier-Epoch: 0a1b2c3d\r\nCrier-Offset: 17\r\nNats-Sequence:  5 \r\n\r\n",
        ));
        assert_eq!(header(Some(&raw), H_EPOCH), Some("0a1b2c3d"));
        assert_eq!(header(Some(&raw), H_OFFSET), Some("17"));
        assert_eq!(header(Some(&raw), "nats-sequence"), Some("5"));
        assert_eq!(header(Some(&raw), H_PREV), None);
        assert_eq!(header::<RawHeaders>(None, H_EPOCH), None);
        let mut map = HeaderMap::new();
        map.insert(H_EPOCH, "e1");
        map.insert(H_OFFSET, "3");
        assert_eq!(header(Some(&map), H_EPOCH), Some("e1"));
        assert_eq!(Fields::of(Some(&map)).offset, Some("3"));
        let known: Arc<str> = "e1".into();
        let s = Stored::from_headers(9, Some(&map), Bytes::from_static(b"x"), Some(&known));
        assert!(s.is_some_and(|s| Arc::ptr_eq(&s.epoch, &known) && s.first == 3 && s.seq == 9));
    }
}
