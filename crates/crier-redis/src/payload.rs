//! The publication payload: what the publish script PUBLISHes and stores in the history list.
//!
//! `<offset>:<epoch>:<published_at_us>:<message frame>` — a small ASCII header, then the complete
//! `message` frame, byte-identical to `crier_protocol::frames::encode_message`. A receiving node
//! parses the header (no JSON parsing) and slices the frame out of the payload [`Bytes`], so the
//! frame handed to every local subscriber shares the one buffer Redis delivered.

use std::sync::Arc;

use bytes::Bytes;
use crier_core::Publication;

/// A `join`/`leave` payload (`e:<frame>`, published by the presence scripts): its client and
/// frame, sliced from the payload. `None` when the payload is not an event.
pub(crate) fn presence_event(payload: &Bytes) -> Option<crier_core::PresenceEvent> {
    let frame = payload.strip_prefix(b"e:")?;
    #[derive(serde::Deserialize)]
    struct Client<'a> {
        #[serde(borrow)]
        client: std::borrow::Cow<'a, str>,
    }
    let c: Client<'_> = serde_json::from_slice(frame).ok()?;
    Some(crier_core::PresenceEvent { client: c.client.into_owned(), frame: payload.slice(2..) })
}

/// The parsed header of a payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Header<'a> {
    pub offset: u64,
    pub epoch: &'a str,
    pub published_at_us: u64,
    /// Where the frame starts in the payload.
    pub frame_start: usize,
}

/// Parses the header; `None` when the payload is not one of ours.
pub(crate) fn header(payload: &[u8]) -> Option<Header<'_>> {
    let mut parts = payload.splitn(4, |b| *b == b':');
    let offset = parse_u64(parts.next()?)?;
    let epoch = parts.next()?;
    let ts = parse_u64(parts.next()?)?;
    let frame = parts.next()?;
    if epoch.is_empty() || !epoch.iter().all(u8::is_ascii_alphanumeric) || frame.first() != Some(&b'{') {
        return None;
    }
    let epoch = std::str::from_utf8(epoch).ok()?;
    Some(Header { offset, epoch, published_at_us: ts, frame_start: payload.len() - frame.len() })
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Turns a payload into a [`Publication`], reusing `epoch` when it is the payload's epoch (no
/// allocation per message in the common case).
pub(crate) fn publication(payload: Bytes, epoch: Option<&Arc<str>>) -> Option<Publication> {
    let h = header(&payload)?;
    let epoch = match epoch {
        Some(e) if **e == *h.epoch => e.clone(),
        _ => Arc::from(h.epoch),
    };
    let (offset, published_at_us, start) = (h.offset, h.published_at_us, h.frame_start);
    Some(Publication { offset, epoch, frame: payload.slice(start..), published_at_us })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_slices() {
        let frame = crier_protocol::frames::encode_message("a:b", "Ep0ch123", 42, "{\"x\":\"1:2\"}");
        let mut raw = b"42:Ep0ch123:1700000000123456:".to_vec();
        raw.extend_from_slice(&frame);
        let p = publication(Bytes::from(raw), None).unwrap_or_else(|| panic!("parses"));
        assert_eq!((p.offset, &*p.epoch, p.published_at_us), (42, "Ep0ch123", 1_700_000_000_123_456));
        assert_eq!(p.frame, frame);
        let known: Arc<str> = Arc::from("Ep0ch123");
        let mut raw = b"43:Ep0ch123:1:".to_vec();
        raw.extend_from_slice(&frame);
        let p = publication(Bytes::from(raw), Some(&known)).unwrap_or_else(|| panic!("parses"));
        assert!(Arc::ptr_eq(&p.epoch, &known), "the known epoch is reused");
    }

    #[test]
    fn presence_events_are_told_apart_from_publications() {
        let raw = Bytes::from_static(br#"e:{"type":"join","channel":"c","client":"n-1-2","user":"u","node":"n"}"#);
        let e = presence_event(&raw).unwrap_or_else(|| panic!("an event"));
        assert_eq!(e.client, "n-1-2");
        assert_eq!(&e.frame[..], &raw[2..]);
        assert!(header(&raw).is_none(), "never taken for a publication");
        assert!(presence_event(&Bytes::from_static(b"e:{}")).is_none());
        assert!(presence_event(&Bytes::from_static(b"1:e:1:{}")).is_none());
    }

    #[test]
    fn refuses_garbage() {
        for bad in [&b""[..], b"x:e:1:{}", b"1:e:1", b"1::1:{}", b"1:e-1:1:{}", b"1:e:x:{}", b"1:e:1:[]", b"-1:e:1:{}"]
        {
            assert!(header(bad).is_none(), "{:?}", String::from_utf8_lossy(bad));
        }
        assert!(header(b"99999999999999999999999:e:1:{}").is_none(), "offset overflow");
    }
}
