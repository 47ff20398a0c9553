//! Server frames as SSE events (`text/event-stream`).
//!
//! The transport reads a frame's *envelope* — `type`, `channel`, `epoch`, `offset`, `recovered`,
//! never `data` — to name the event and keep the stream's [`Cursor`]; the event's `data` is the
//! frame's JSON as it is. `message` frames (built by `encode_message` in Rust or Lua, always
//! with the same field order) are read by a prefix scan without parsing their payload; anything
//! else goes through serde_json.

use std::borrow::Cow;

use crier_core::{Close, Out};
use serde::Deserialize;

use super::cursor::Cursor;

/// What the transport reads of a frame.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
pub struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    pub kind: Cow<'a, str>,
    #[serde(borrow, default)]
    pub channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    pub epoch: Option<Cow<'a, str>>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub recovered: Option<bool>,
}

const MESSAGE_PREFIX: &[u8] = br#"{"type":"message","channel":""#;

/// Reads a frame's envelope (None: not a JSON object).
pub fn envelope(frame: &[u8]) -> Option<Envelope<'_>> {
    message_envelope(frame).or_else(|| serde_json::from_slice(frame).ok())
}

/// The fast path for `message` frames: `{"type":"message","channel":"..","epoch":"..","offset":N,`.
/// Channel names never need escapes; an epoch that does falls back to serde_json.
fn message_envelope(frame: &[u8]) -> Option<Envelope<'_>> {
    let rest = frame.strip_prefix(MESSAGE_PREFIX)?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    let (channel, rest) = (std::str::from_utf8(&rest[..end]).ok()?, &rest[end..]);
    let rest = rest.strip_prefix(br#"","epoch":""#)?;
    let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
    let (epoch, rest) = (std::str::from_utf8(&rest[..end]).ok()?, &rest[end..]);
    let rest = rest.strip_prefix(br#"","offset":"#)?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || rest.get(digits) != Some(&b',') {
        return None;
    }
    let offset = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    Some(Envelope {
        kind: Cow::Borrowed("message"),
        channel: Some(Cow::Borrowed(channel)),
        epoch: Some(Cow::Borrowed(epoch)),
        offset: Some(offset),
        recovered: None,
    })
}

/// Appends `data` as `data:` lines: a line break inside the JSON (whitespace a publisher left
/// between tokens; never inside a string) starts a new `data:` line, and `EventSource` joins
/// them back with `\n`.
fn push_data(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(b"data: ");
    let mut i = 0;
    while i < data.len() {
        match data[i] {
            b'\r' => {
                out.extend_from_slice(b"\ndata: ");
                if data.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b'\n' => out.extend_from_slice(b"\ndata: "),
            b => out.push(b),
        }
        i += 1;
    }
    out.extend_from_slice(b"\n\n");
}

/// Appends the event for one outbox item and updates the cursor.
pub fn push_event(out: &mut Vec<u8>, item: &Out, cursor: &mut Cursor) {
    let frame = match item {
        Out::Ping => return out.extend_from_slice(b": ping\n\n"),
        Out::Frame(frame) => frame,
        // Only WebSocket connections negotiate permessage-deflate.
        Out::Deflated(_) => return,
    };
    let env = envelope(frame).unwrap_or_default();
    let with_id = match (&*env.kind, &env.channel, &env.epoch, env.offset) {
        ("message", Some(channel), Some(epoch), Some(offset)) => {
            cursor.set(channel, epoch, offset);
            true
        }
        // The subscribe ack gives the channel's position. When resuming with `recovered:true`,
        // the missed messages follow it: the cursor keeps the position resumed from until they
        // arrive, so a stream cut in between resumes from there again.
        ("ack" | "subscribed", Some(channel), Some(epoch), Some(offset)) => {
            if env.recovered != Some(true) {
                cursor.set(channel, epoch, offset);
            }
            true
        }
        // Messages were lost. In a new epoch, the messages that follow may start anywhere in it:
        // a cut stream resumes from the epoch's start (what its history still holds).
        ("gap", Some(channel), Some(epoch), _) => {
            if cursor.epoch(channel) != Some(&**epoch) {
                cursor.set(channel, epoch, 0);
            }
            false
        }
        _ => false,
    };
    if with_id {
        out.extend_from_slice(b"id: ");
        cursor.encode_into(out);
        out.push(b'\n');
    }
    let name: &str = match &*env.kind {
        "ack" => "subscribed",
        "" => "frame",
        kind => kind,
    };
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.push(b'\n');
    push_data(out, frame);
}

/// Appends the `close` event: `{"code":..,"reason":".."}`, with a `retry:` (the delay before an
/// `EventSource` reconnects by itself) following the close code's advice: at once (1001), after a
/// jittered delay (1012), with backoff (1011, 4008, 4009: 1–5 s); codes that say "stop" leave the
/// browser's default. For 1012 the delay is `drain_ms` (`shutdown_drain`) plus 0.5–3 s: an
/// `EventSource` that reached the draining node again would get its 503 and, per the SSE spec,
/// give up for good; after the drain the node is gone (a refused connection, which EventSource
/// retries) or the balancer has moved on.
pub fn push_close(out: &mut Vec<u8>, close: &Close, drain_ms: u64) {
    use crier_protocol::ClientAction;
    use rand::Rng;
    let retry_ms = match close.code.action() {
        ClientAction::ReconnectNow => Some(rand::rng().random_range(50..300)),
        ClientAction::ReconnectAfterJitter => Some(drain_ms + rand::rng().random_range(500..3000)),
        ClientAction::ReconnectWithBackoff => Some(rand::rng().random_range(1000..5000)),
        ClientAction::Stop | ClientAction::RefreshToken => None,
    };
    if let Some(ms) = retry_ms {
        out.extend_from_slice(format!("retry: {ms}\n").as_bytes());
    }
    let data = serde_json::json!({"code": close.code.0, "reason": close.reason}).to_string();
    out.extend_from_slice(b"event: close\n");
    push_data(out, data.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use crier_protocol::frames::encode_message;

    #[test]
    fn message_fast_path_agrees_with_serde() {
        for (ch, ep, off, data) in
            [("chat:lobby", "x1", 58u64, r#"{"a":"\"x\""}"#), ("c", "e", 0, "1"), ("a/b=c", "7f3a", u64::MAX, "[]")]
        {
            let f = encode_message(ch, ep, off, data);
            let fast = message_envelope(&f);
            let slow: Option<Envelope<'_>> = serde_json::from_slice(&f).ok();
            assert!(fast.is_some(), "fast path taken for {ch}");
            assert_eq!(fast, slow);
        }
        let escaped = encode_message("c", "e\"1", 3, "1");
        assert!(message_envelope(&escaped).is_none());
        assert_eq!(envelope(&escaped).and_then(|e| e.epoch).as_deref(), Some("e\"1"));
        assert!(envelope(b"not json").is_none());
    }

    #[test]
    fn events_carry_ids_and_split_lines() {
        let mut cursor = Cursor::default();
        let mut out = Vec::new();
        let ack = Bytes::from_static(br#"{"type":"ack","channel":"c","epoch":"e","offset":4}"#);
        push_event(&mut out, &Out::Frame(ack), &mut cursor);
        push_event(&mut out, &Out::Frame(encode_message("c", "e", 5, "{\r\n\"a\":\n1}")), &mut cursor);
        push_event(&mut out, &Out::Ping, &mut cursor);
        let text = String::from_utf8(out).unwrap_or_default();
        let id4 = {
            let mut c = Cursor::default();
            c.set("c", "e", 4);
            c.encode()
        };
        let id5 = {
            let mut c = Cursor::default();
            c.set("c", "e", 5);
            c.encode()
        };
        assert_eq!(
            text,
            format!(
                "id: {id4}\nevent: subscribed\ndata: {{\"type\":\"ack\",\"channel\":\"c\",\"epoch\":\"e\",\"offset\":4}}\n\n\
                 id: {id5}\nevent: message\ndata: {{\"type\":\"message\",\"channel\":\"c\",\"epoch\":\"e\",\"offset\":5,\"data\":{{\ndata: \"a\":\ndata: 1}}}}\n\n\
                 : ping\n\n"
            )
        );
    }

    #[test]
    fn recovering_ack_keeps_the_resumed_position() {
        let mut cursor = Cursor::default();
        cursor.set("c", "e", 2);
        let ack = Bytes::from_static(br#"{"type":"ack","channel":"c","epoch":"e","offset":9,"recovered":true}"#);
        push_event(&mut Vec::new(), &Out::Frame(ack), &mut cursor);
        assert_eq!(cursor.get("c").map(|p| p.offset), Some(2));
        let gap = Bytes::from_static(br#"{"type":"gap","channel":"c","epoch":"f","offset":9}"#);
        push_event(&mut Vec::new(), &Out::Frame(gap), &mut cursor);
        assert_eq!(cursor.get("c").map(|p| (p.epoch, p.offset)), Some(("f".to_owned(), 0)));
    }
}
