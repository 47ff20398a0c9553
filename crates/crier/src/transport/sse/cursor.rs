//! The SSE cursor: the `id:` of an event, sent back as `Last-Event-ID` by a reconnecting
//! `EventSource`. It holds every channel's position (epoch and the offset of the last message the
//! stream delivered), so any node of the cluster can resume the stream.
//!
//! Format (opaque to clients, documented in docs/protocol.md): base64url without padding of the
//! compact JSON object `{"<channel>":["<epoch>",<offset>],...}`, channels in subscription order.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use crier_protocol::StreamPosition;

/// Longest `Last-Event-ID` accepted, in bytes (the request head is bounded at 16 KiB anyway).
pub const MAX_CURSOR_BYTES: usize = 12 * 1024;

/// A stream's position in each of its channels.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// (channel, epoch, offset), in subscription order. A handful of entries: searched linearly.
    entries: Vec<(Box<str>, Box<str>, u64)>,
}

impl Cursor {
    /// Parses a `Last-Event-ID`; an empty one is no cursor at all (what the SSE spec's "reset the
    /// last event ID" sends). The error names what is wrong, for a `400 bad_request`.
    pub fn parse(id: &str) -> Result<Cursor, String> {
        let id = id.trim();
        if id.len() > MAX_CURSOR_BYTES {
            return Err(format!("Last-Event-ID is longer than {MAX_CURSOR_BYTES} bytes"));
        }
        if id.is_empty() {
            return Ok(Cursor::default());
        }
        let json = URL_SAFE_NO_PAD
            .decode(id)
            .map_err(|_| "malformed Last-Event-ID: not a cursor this server issued (bad base64url)".to_owned())?;
        let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&json)
            .map_err(|_| "malformed Last-Event-ID: not a cursor this server issued (bad JSON)".to_owned())?;
        let mut entries = Vec::with_capacity(map.len());
        for (channel, position) in map {
            let (epoch, offset) = match position.as_array().map(Vec::as_slice) {
                Some([serde_json::Value::String(e), o]) if o.is_u64() => (e.clone(), o.as_u64().unwrap_or(0)),
                _ => {
                    return Err(
                        "malformed Last-Event-ID: each channel's position must be [\"epoch\", offset]".to_owned()
                    );
                }
            };
            entries.push((channel.into_boxed_str(), epoch.into_boxed_str(), offset));
        }
        Ok(Cursor { entries })
    }

    /// The position of `channel`, if the cursor has one.
    pub fn get(&self, channel: &str) -> Option<StreamPosition> {
        self.entries
            .iter()
            .find(|(c, _, _)| &**c == channel)
            .map(|(_, e, o)| StreamPosition { epoch: e.to_string(), offset: *o })
    }

    /// Records `channel`'s position (the last message delivered).
    pub fn set(&mut self, channel: &str, epoch: &str, offset: u64) {
        match self.entries.iter_mut().find(|(c, _, _)| &**c == channel) {
            Some(entry) => {
                if *entry.1 != *epoch {
                    entry.1 = epoch.into();
                }
                entry.2 = offset;
            }
            None => {
                // One entry at a time (a push would reserve four): it lives as long as the stream.
                self.entries.reserve_exact(1);
                self.entries.push((channel.into(), epoch.into(), offset))
            }
        }
    }

    /// The epoch recorded for `channel`.
    pub fn epoch(&self, channel: &str) -> Option<&str> {
        self.entries.iter().find(|(c, _, _)| &**c == channel).map(|(_, e, _)| &**e)
    }

    /// Keeps only these channels, in this order (a cursor from another stream may name others).
    pub fn restrict(self, channels: &[String]) -> Cursor {
        let mut entries = Vec::with_capacity(channels.len().min(self.entries.len()));
        for ch in channels {
            if let Some(e) = self.entries.iter().find(|(c, _, _)| **c == **ch) {
                entries.push(e.clone());
            }
        }
        Cursor { entries }
    }

    /// Appends the encoded cursor to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let mut json =
            Vec::with_capacity(2 + self.entries.iter().map(|(c, e, _)| c.len() + e.len() + 30).sum::<usize>());
        json.push(b'{');
        for (i, (channel, epoch, offset)) in self.entries.iter().enumerate() {
            if i > 0 {
                json.push(b',');
            }
            // Serialising a &str into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut json, &**channel);
            json.extend_from_slice(b":[");
            let _ = serde_json::to_writer(&mut json, &**epoch);
            json.push(b',');
            json.extend_from_slice(offset.to_string().as_bytes());
            json.push(b']');
        }
        json.push(b'}');
        let start = out.len();
        out.resize(start + base64::encoded_len(json.len(), false).unwrap_or(0), 0);
        let written = URL_SAFE_NO_PAD.encode_slice(&json, &mut out[start..]).unwrap_or(0);
        out.truncate(start + written);
    }

    #[cfg(test)]
    pub fn encode(&self) -> String {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_restricts() {
        let mut c = Cursor::default();
        c.set("chat:lobby", "x1", 58);
        c.set("news", "e\"2", 3);
        c.set("chat:lobby", "x1", 59);
        let id = c.encode();
        assert!(id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{id}");
        let back = Cursor::parse(&id);
        assert_eq!(back.as_ref().ok().and_then(|c| c.get("chat:lobby")).map(|p| p.offset), Some(59));
        assert_eq!(back.as_ref().ok().and_then(|c| c.get("news")).map(|p| p.epoch), Some("e\"2".to_owned()));
        let only = back.unwrap_or_default().restrict(&["news".to_owned(), "other".to_owned()]);
        assert!(only.get("chat:lobby").is_none());
        assert_eq!(only.get("news").map(|p| p.offset), Some(3));
    }

    #[test]
    fn refuses_hostile_ids() {
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        for bad in [
            "!!!".to_owned(),
            "a".repeat(MAX_CURSOR_BYTES + 1),
            b64("[1,2]"),
            b64("{\"c\":5}"),
            b64("{\"c\":[\"e\",-1]}"),
            b64("{\"c\":[\"e\",1.5]}"),
            b64("{\"c\":[1,1]}"),
            b64("{\"c\":[\"e\",1,2]}"),
            b64("{\"c\":"),
        ] {
            assert!(Cursor::parse(&bad).is_err(), "{bad:?} is refused");
        }
        assert_eq!(Cursor::parse(""), Ok(Cursor::default()));
        assert_eq!(Cursor::parse(&b64("{}")), Ok(Cursor::default()));
    }
}
