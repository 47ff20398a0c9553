//! Frames: JSON text frames, one object each.
//!
//! Decoding is lenient about what it does not know (unknown fields are ignored) and strict about
//! what it does: a wrong type for a known field is `bad_request`, an unknown `type` is
//! `unknown_type`. `data` is kept as raw JSON and never re-serialised: the `message` frame that
//! carries it is built once, by [`encode_message`], and its bytes are shared by every subscriber.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::codes::ErrorCode;

/// A point in a channel's stream: the channel's epoch and an offset in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub epoch: String,
    pub offset: u64,
}

/// A decoded client → server frame. Borrows from the frame text.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Subscribe {
        id: Option<u64>,
        channel: Cow<'a, str>,
        recover: Option<StreamPosition>,
    },
    Unsubscribe {
        id: Option<u64>,
        channel: Cow<'a, str>,
    },
    /// `idempotency_key`: a repeated publish with the same key on the same channel within the
    /// idempotency window gets the first one's ack and is not delivered again (1-256 bytes).
    Publish {
        id: Option<u64>,
        channel: Cow<'a, str>,
        data: &'a RawValue,
        idempotency_key: Option<Cow<'a, str>>,
    },
    Ping {
        id: Option<u64>,
    },
    Refresh {
        id: Option<u64>,
        token: Cow<'a, str>,
    },
    Presence {
        id: Option<u64>,
        channel: Cow<'a, str>,
    },
    /// How many clients and distinct users are in a channel's presence.
    PresenceStats {
        id: Option<u64>,
        channel: Cow<'a, str>,
    },
    History {
        id: Option<u64>,
        channel: Cow<'a, str>,
        since: Option<StreamPosition>,
        limit: Option<usize>,
    },
}

impl ClientFrame<'_> {
    pub fn id(&self) -> Option<u64> {
        match self {
            ClientFrame::Subscribe { id, .. }
            | ClientFrame::Unsubscribe { id, .. }
            | ClientFrame::Publish { id, .. }
            | ClientFrame::Ping { id }
            | ClientFrame::Refresh { id, .. }
            | ClientFrame::Presence { id, .. }
            | ClientFrame::PresenceStats { id, .. }
            | ClientFrame::History { id, .. } => *id,
        }
    }

    /// The frame's `type`, as a static string (for logs and metric labels).
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::Ping { .. } => "ping",
            ClientFrame::Refresh { .. } => "refresh",
            ClientFrame::Presence { .. } => "presence",
            ClientFrame::PresenceStats { .. } => "presence_stats",
            ClientFrame::History { .. } => "history",
        }
    }
}

/// Why a frame could not be decoded; becomes an `error` frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    pub id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
}

impl FrameError {
    pub fn new(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        FrameError { id, code, message: message.into() }
    }
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(default)]
    id: Option<u64>,
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
    #[serde(default)]
    recover: Option<StreamPosition>,
    #[serde(default)]
    since: Option<StreamPosition>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    token: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// Largest `idempotency_key` of a publish, in bytes (the REST API's bound too).
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 256;

/// Decodes one client frame.
pub fn decode<'a>(text: &'a str) -> Result<ClientFrame<'a>, FrameError> {
    let env: Envelope<'a> = serde_json::from_str(text).map_err(|e| {
        // The frame as a whole is malformed; its `id` may still be fine, and the reply carries it.
        // (Objects only: serde would also read a struct from an array such as `[1]`.)
        let object = text.trim_start().starts_with('{');
        let id = if object { serde_json::from_str::<IdOnly>(text).ok().and_then(|i| i.id) } else { None };
        FrameError::new(id, ErrorCode::BadRequest, format!("malformed frame: {}", cut(&e.to_string())))
    })?;
    let id = env.id;
    let channel = |c: Option<Cow<'a, str>>| -> Result<Cow<'a, str>, FrameError> {
        c.ok_or_else(|| FrameError::new(id, ErrorCode::BadRequest, "missing field `channel`"))
    };
    let Some(kind) = env.kind else {
        return Err(FrameError::new(id, ErrorCode::BadRequest, "missing field `type`"));
    };
    Ok(match kind.as_ref() {
        "subscribe" => ClientFrame::Subscribe { id, channel: channel(env.channel)?, recover: env.recover },
        "unsubscribe" => ClientFrame::Unsubscribe { id, channel: channel(env.channel)? },
        "publish" => {
            let channel = channel(env.channel)?;
            let Some(data) = env.data else {
                return Err(FrameError::new(id, ErrorCode::BadRequest, "missing field `data`"));
            };
            check_data(data.get()).map_err(|m| FrameError::new(id, ErrorCode::BadRequest, m))?;
            let idempotency_key = env.idempotency_key;
            if idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES) {
                let why = format!("idempotency_key must be 1-{MAX_IDEMPOTENCY_KEY_BYTES} bytes");
                return Err(FrameError::new(id, ErrorCode::BadRequest, why));
            }
            ClientFrame::Publish { id, channel, data, idempotency_key }
        }
        "ping" => ClientFrame::Ping { id },
        "refresh" => match env.token {
            Some(token) => ClientFrame::Refresh { id, token },
            None => return Err(FrameError::new(id, ErrorCode::BadRequest, "missing field `token`")),
        },
        "presence" => ClientFrame::Presence { id, channel: channel(env.channel)? },
        "presence_stats" => ClientFrame::PresenceStats { id, channel: channel(env.channel)? },
        "history" => ClientFrame::History { id, channel: channel(env.channel)?, since: env.since, limit: env.limit },
        other => {
            let shown: String = other.chars().take(32).collect();
            return Err(FrameError::new(id, ErrorCode::UnknownType, format!("unknown frame type `{shown}`")));
        }
    })
}

/// Only the `id` of a frame, everything else ignored: recovers the id of a malformed frame.
#[derive(Deserialize)]
struct IdOnly {
    #[serde(default)]
    id: Option<u64>,
}

/// Longest part of an error message built from a serde_json error (which quotes client input).
const MAX_ERROR_MESSAGE: usize = 160;

fn cut(message: &str) -> String {
    if message.len() <= MAX_ERROR_MESSAGE {
        return message.to_owned();
    }
    let mut end = MAX_ERROR_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &message[..end])
}

/// Checks published `data` (already valid JSON grammar): nesting depth, then a strict parse that
/// refuses what strict parsers refuse (lone surrogate escapes, numbers beyond f64), so that no
/// subscriber is sent a message it cannot parse.
pub fn check_data(raw: &str) -> Result<(), String> {
    check_depth(raw)?;
    serde_json::from_str::<Strict>(raw).map(|_| ()).map_err(|e| format!("invalid `data`: {}", cut(&e.to_string())))
}

/// Parses any JSON value completely (decoding strings and numbers) and keeps nothing.
struct Strict;

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Strict;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_str<E>(self, _: &str) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        while seq.next_element::<Strict>()?.is_some() {}
        Ok(Strict)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        while map.next_entry::<Strict, Strict>()?.is_some() {}
        Ok(Strict)
    }
}

/// Deepest nesting of arrays and objects accepted in `data`.
pub const MAX_DATA_DEPTH: usize = 64;

/// Refuses JSON nested deeper than [`MAX_DATA_DEPTH`] (subscribers' parsers may recurse).
/// `raw` must already be valid JSON.
pub fn check_depth(raw: &str) -> Result<(), String> {
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    for b in raw.bytes() {
        if in_str {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DATA_DEPTH {
                    return Err(format!("`data` is nested deeper than {MAX_DATA_DEPTH} levels"));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Builds the `message` frame for a publication. Called once per message per cluster; the
/// result is shared by every subscriber and every history read.
///
/// `data` must be valid JSON (it is, when it comes from a parsed frame or request body).
pub fn encode_message(channel: &str, epoch: &str, offset: u64, data: &str) -> Bytes {
    let mut out = Vec::with_capacity(64 + channel.len() + epoch.len() + data.len());
    out.extend_from_slice(br#"{"type":"message","channel":"#);
    push_json_str(&mut out, channel);
    out.extend_from_slice(br#","epoch":"#);
    push_json_str(&mut out, epoch);
    out.extend_from_slice(br#","offset":"#);
    out.extend_from_slice(offset.to_string().as_bytes());
    out.extend_from_slice(br#","data":"#);
    out.extend_from_slice(data.as_bytes());
    out.push(b'}');
    Bytes::from(out)
}

/// Builds a `join` or `leave` frame (`kind`) from a presence entry's JSON (`entry_json`, an
/// object such as `{"client":"..","user":"..","node":".."}`): `{"type":<kind>,"channel":<c>,`
/// followed by the entry's fields. Join/leave frames are not messages: no offset, no history.
/// The Redis broker builds the same bytes in Lua (its presence scripts), so both brokers send
/// identical frames.
pub fn encode_presence_event(kind: &str, channel: &str, entry_json: &str) -> Bytes {
    let fields = entry_json.strip_prefix('{').unwrap_or("}");
    let mut out = Vec::with_capacity(32 + channel.len() + entry_json.len());
    out.extend_from_slice(br#"{"type":""#);
    out.extend_from_slice(kind.as_bytes());
    out.extend_from_slice(br#"","channel":"#);
    push_json_str(&mut out, channel);
    if fields != "}" {
        out.push(b',');
    }
    out.extend_from_slice(fields.as_bytes());
    Bytes::from(out)
}

fn push_json_str(out: &mut Vec<u8>, s: &str) {
    // Serialising a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A server → client frame other than `message` (see [`encode_message`]).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ServerFrame<'a> {
    Welcome {
        client: &'a str,
        user: &'a str,
        node: &'a str,
        ping_interval_ms: u64,
    },
    Ack {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        epoch: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        offset: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
    },
    /// An `ack` that says why (channel namespaces): a subscribe asking to `recover` in a
    /// namespace without history (or with `recovery = false`) is acked `recovered: false` with
    /// `reason: "no_history"`.
    #[serde(rename = "ack")]
    AckWithReason {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: &'a str,
        epoch: &'a str,
        offset: u64,
        recovered: bool,
        reason: &'a str,
    },
    Pong {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
    },
    Error {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        code: &'a str,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        channel: Option<&'a str>,
    },
    /// Reply to `presence`.
    Presence {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: &'a str,
        clients: &'a [PresenceEntry],
    },
    /// Reply to `presence_stats`: clients in the channel's presence and their distinct users.
    #[serde(rename = "presence_stats")]
    PresenceStats {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<u64>,
        channel: &'a str,
        clients: u64,
        users: u64,
    },
    /// Pushed when messages of a subscribed channel were lost and cannot be recovered (a broker
    /// outage longer than the history, or the history itself lost): live messages continue at
    /// `epoch`/`offset`; the client should resync the channel from its source of truth.
    Gap {
        channel: &'a str,
        epoch: &'a str,
        offset: u64,
    },
    /// Pushed when the server ends a subscription by itself (e.g. a refreshed token no longer
    /// covers the channel).
    Unsubscribed {
        channel: &'a str,
        reason: &'a str,
        /// `Some(true)` when the backend ended it (REST `unsubscribe`).
        #[serde(skip_serializing_if = "Option::is_none")]
        server: Option<bool>,
    },
    /// Pushed when the server subscribes the connection by itself (REST `subscribe`, the token's
    /// `subs` claim): the channel's position as a subscribe `ack` gives it, `server: true`.
    Subscribed {
        channel: &'a str,
        epoch: &'a str,
        offset: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        recovered: Option<bool>,
        server: bool,
    },
}

impl ServerFrame<'_> {
    pub fn encode(&self) -> Bytes {
        // Serialising these plain structs cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }
}

/// One client in a channel's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEntry {
    pub client: String,
    pub user: String,
    pub node: String,
}

/// Builds the reply to a `history` frame: the channel's position and the `message` frames
/// (already encoded) after the requested offset. A reply cut short (by the connection's queue
/// size) has a `next`: `"more":true,"next":{"epoch":<epoch>,"offset":<next>}` — the position to
/// ask from (`since`) for the rest.
pub fn encode_history(
    id: Option<u64>,
    channel: &str,
    epoch: &str,
    offset: u64,
    messages: &[Bytes],
    next: Option<u64>,
) -> Bytes {
    let mut out = Vec::with_capacity(96 + messages.iter().map(|m| m.len() + 1).sum::<usize>());
    out.extend_from_slice(br#"{"type":"history","#);
    if let Some(id) = id {
        out.extend_from_slice(format!(r#""id":{id},"#).as_bytes());
    }
    out.extend_from_slice(br#""channel":"#);
    push_json_str(&mut out, channel);
    out.extend_from_slice(br#","epoch":"#);
    push_json_str(&mut out, epoch);
    out.extend_from_slice(format!(r#","offset":{offset},"messages":["#).as_bytes());
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(m);
    }
    out.push(b']');
    if let Some(next) = next {
        out.extend_from_slice(br#","more":true,"next":{"epoch":"#);
        push_json_str(&mut out, epoch);
        out.extend_from_slice(format!(r#","offset":{next}}}"#).as_bytes());
    }
    out.push(b'}');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn v(b: &Bytes) -> Value {
        serde_json::from_slice(b).unwrap_or(Value::Null)
    }

    #[test]
    fn an_ack_with_a_reason_is_an_ack() {
        let f = ServerFrame::AckWithReason {
            id: Some(4),
            channel: "live:a",
            epoch: "e",
            offset: 9,
            recovered: false,
            reason: "no_history",
        };
        assert_eq!(
            v(&f.encode()),
            json!({"type":"ack","id":4,"channel":"live:a","epoch":"e","offset":9,"recovered":false,"reason":"no_history"})
        );
    }

    #[test]
    fn decodes_every_type() {
        let f = decode(r#"{"type":"subscribe","id":1,"channel":"chat:lobby"}"#);
        assert!(
            matches!(f, Ok(ClientFrame::Subscribe { id: Some(1), ref channel, recover: None }) if channel == "chat:lobby")
        );
        let f = decode(r#"{"type":"subscribe","id":2,"channel":"c","recover":{"epoch":"x1","offset":41}}"#);
        assert!(matches!(f, Ok(ClientFrame::Subscribe { recover: Some(StreamPosition { offset: 41, .. }), .. })));
        let f = decode(r#"{"type":"publish","id":4,"channel":"c","data":{"a":[1,2]}}"#);
        assert!(matches!(f, Ok(ClientFrame::Publish { data, .. }) if data.get() == r#"{"a":[1,2]}"#));
        assert!(matches!(decode(r#"{"type":"ping"}"#), Ok(ClientFrame::Ping { id: None })));
        assert!(matches!(decode(r#"{"type":"refresh","token":"t"}"#), Ok(ClientFrame::Refresh { .. })));
        assert!(matches!(decode(r#"{"type":"presence","channel":"c"}"#), Ok(ClientFrame::Presence { .. })));
        let f = decode(r#"{"type":"presence_stats","id":7,"channel":"c"}"#);
        assert!(matches!(f, Ok(ClientFrame::PresenceStats { id: Some(7), .. })));
        assert_eq!(decode(r#"{"type":"presence_stats"}"#).map(|_| ()).map_err(|e| e.code), Err(ErrorCode::BadRequest));
        let f = decode(r#"{"type":"history","channel":"c","since":{"epoch":"e","offset":3},"limit":5,"extra":true}"#);
        assert!(matches!(f, Ok(ClientFrame::History { limit: Some(5), since: Some(_), .. })));
    }

    #[test]
    fn refuses_bad_frames_with_codes() {
        let code = |t: &str| decode(t).map(|_| ()).map_err(|e| e.code);
        assert_eq!(code("nope"), Err(ErrorCode::BadRequest));
        assert_eq!(code("[]"), Err(ErrorCode::BadRequest));
        assert_eq!(code(r#"{"id":1}"#), Err(ErrorCode::BadRequest));
        assert_eq!(code(r#"{"type":"subscribe"}"#), Err(ErrorCode::BadRequest));
        assert_eq!(code(r#"{"type":"subscribe","channel":5}"#), Err(ErrorCode::BadRequest));
        assert_eq!(code(r#"{"type":"publish","channel":"c"}"#), Err(ErrorCode::BadRequest));
        assert_eq!(code(r#"{"type":"dance","id":9}"#), Err(ErrorCode::UnknownType));
        assert_eq!(decode(r#"{"type":"dance","id":9}"#).err().and_then(|e| e.id), Some(9));
        let deep = "[".repeat(10_000) + &"]".repeat(10_000);
        let deep = format!(r#"{{"type":"publish","channel":"c","data":{deep}}}"#);
        assert_eq!(code(&deep), Err(ErrorCode::BadRequest));
        let ok = "[".repeat(64) + &"]".repeat(64);
        assert!(check_depth(&ok).is_ok());
        assert!(
            check_depth(r#"["[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\"["]"#).is_ok()
        );
    }

    #[test]
    fn message_frame_is_valid_json() {
        let b = encode_message("chat:lobby", "x1", 58, r#"{"text":"hi \"there\""}"#);
        assert_eq!(
            v(&b),
            json!({"type":"message","channel":"chat:lobby","epoch":"x1","offset":58,"data":{"text":"hi \"there\""}})
        );
    }

    #[test]
    fn server_frames() {
        let ack = ServerFrame::Ack {
            id: Some(2),
            channel: Some("c"),
            epoch: Some("e"),
            offset: Some(3),
            recovered: Some(true),
        };
        assert_eq!(
            v(&ack.encode()),
            json!({"type":"ack","id":2,"channel":"c","epoch":"e","offset":3,"recovered":true})
        );
        assert_eq!(v(&ServerFrame::Pong { id: None }.encode()), json!({"type":"pong"}));
        let m = encode_message("c", "e", 1, "1");
        let page = encode_history(Some(9), "c", "e", 7, std::slice::from_ref(&m), Some(3));
        assert_eq!(v(&page)["more"], json!(true));
        assert_eq!(v(&page)["next"], json!({"epoch":"e","offset":3}));
        assert_eq!(v(&page)["messages"].as_array().map(Vec::len), Some(1));
        let h = encode_history(Some(8), "c", "e", 1, &[m.clone(), m], None);
        assert_eq!(v(&h)["messages"].as_array().map(|a| a.len()), Some(2));
        assert_eq!(v(&h)["id"], json!(8));
        assert_eq!(
            v(&encode_history(None, "c", "e", 0, &[], None)),
            json!({"type":"history","channel":"c","epoch":"e","offset":0,"messages":[]})
        );
    }

    #[test]
    fn presence_events_and_stats_frames() {
        let entry = PresenceEntry { client: "n-1-2".into(), user: "u\"1".into(), node: "n".into() };
        let json = serde_json::to_string(&entry).unwrap_or_default();
        let f = encode_presence_event("join", "chat:lobby", &json);
        assert_eq!(
            std::str::from_utf8(&f).unwrap_or_default(),
            r#"{"type":"join","channel":"chat:lobby","client":"n-1-2","user":"u\"1","node":"n"}"#
        );
        let v: serde_json::Value =
            serde_json::from_slice(&encode_presence_event("leave", "c", "{}")).unwrap_or_default();
        assert_eq!(v, serde_json::json!({"type":"leave","channel":"c"}));
        let stats = ServerFrame::PresenceStats { id: Some(7), channel: "c", clients: 3, users: 2 }.encode();
        assert_eq!(&stats[..], br#"{"type":"presence_stats","id":7,"channel":"c","clients":3,"users":2}"#);
    }
}
