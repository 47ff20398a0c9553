//! The client's side of the wire format: client → server frames (encoding) and server → client
//! frames (decoding).
//!
//! `crier-protocol` holds the server's side (it decodes client frames and encodes server frames
//! without ever re-serialising `data`); the types both sides share ([`StreamPosition`],
//! [`PresenceEntry`], error codes) come from there. Decoding here is lenient like the server's:
//! unknown fields are ignored and an unknown frame `type` is skipped, so a newer server can add
//! frames and fields without breaking an older client.

use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A client → server frame.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum ClientFrame<'a> {
    Subscribe {
        id: u64,
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        recover: Option<&'a StreamPosition>,
    },
    Unsubscribe {
        id: u64,
        channel: &'a str,
    },
    Publish {
        id: u64,
        channel: &'a str,
        data: &'a Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<&'a str>,
    },
    Ping {
        id: u64,
    },
    Refresh {
        id: u64,
        token: &'a str,
    },
    Presence {
        id: u64,
        channel: &'a str,
    },
    #[serde(rename = "presence_stats")]
    PresenceStats {
        id: u64,
        channel: &'a str,
    },
    History {
        id: u64,
        channel: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        since: Option<&'a StreamPosition>,
        #[serde(skip_serializing_if = "Option::is_none")]
        limit: Option<usize>,
    },
}

impl ClientFrame<'_> {
    pub(crate) fn encode(&self) -> String {
        // Plain structs and an already-parsed `Value`: serialising cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A `message` frame: one publication on a channel.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct MessageFrame {
    pub channel: String,
    pub epoch: String,
    pub offset: u64,
    #[serde(default)]
    pub data: Value,
}

/// A `join` or `leave` frame: a client entered or left a channel's presence.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub(crate) struct PresenceEventFrame {
    pub channel: String,
    #[serde(default)]
    pub client: String,
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub node: String,
}

/// A server → client frame.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub(crate) enum ServerFrame {
    Welcome {
        #[serde(default)]
        client: String,
        #[serde(default)]
        user: String,
        #[serde(default)]
        node: String,
        #[serde(default)]
        ping_interval_ms: Option<u64>,
    },
    Ack {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        epoch: Option<String>,
        #[serde(default)]
        offset: Option<u64>,
        #[serde(default)]
        recovered: Option<bool>,
    },
    Pong {},
    Message(MessageFrame),
    Error {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
        #[serde(default)]
        channel: Option<String>,
    },
    Presence {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        clients: Vec<PresenceEntry>,
    },
    History {
        #[serde(default)]
        id: Option<u64>,
        epoch: String,
        offset: u64,
        #[serde(default)]
        messages: Vec<MessageFrame>,
        /// The reply was cut short (by the connection's queue size): ask again from `next`.
        #[serde(default)]
        next: Option<StreamPosition>,
    },
    Gap {
        channel: String,
        epoch: String,
        offset: u64,
    },
    Unsubscribed {
        channel: String,
        #[serde(default)]
        reason: String,
    },
    #[serde(rename = "presence_stats")]
    PresenceStats {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        clients: u64,
        #[serde(default)]
        users: u64,
    },
    Join(PresenceEventFrame),
    Leave(PresenceEventFrame),
    /// The server subscribed the connection (REST `subscribe`, the token's `subs` claim).
    Subscribed {
        channel: String,
        epoch: String,
        offset: u64,
        #[serde(default)]
        recovered: Option<bool>,
    },
    #[serde(other)]
    Unknown,
}

/// Decodes one server frame; `None` for text that is not a frame object this client reads.
pub(crate) fn decode(text: &str) -> Option<ServerFrame> {
    serde_json::from_str(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v(s: &str) -> Value {
        serde_json::from_str(s).unwrap_or(Value::Null)
    }

    #[test]
    fn encodes_client_frames_as_the_contract_writes_them() {
        let pos = StreamPosition { epoch: "x1".into(), offset: 41 };
        let f = ClientFrame::Subscribe { id: 2, channel: "chat:lobby", recover: Some(&pos) };
        assert_eq!(
            v(&f.encode()),
            json!({"type":"subscribe","id":2,"channel":"chat:lobby","recover":{"epoch":"x1","offset":41}})
        );
        let f = ClientFrame::Subscribe { id: 1, channel: "c", recover: None };
        assert_eq!(v(&f.encode()), json!({"type":"subscribe","id":1,"channel":"c"}));
        let data = json!({"text":"hi"});
        let f = ClientFrame::Publish { id: 4, channel: "c", data: &data, idempotency_key: None };
        assert_eq!(v(&f.encode()), json!({"type":"publish","id":4,"channel":"c","data":{"text":"hi"}}));
        let f = ClientFrame::Publish { id: 5, channel: "c", data: &data, idempotency_key: Some("k1") };
        assert_eq!(
            v(&f.encode()),
            json!({"type":"publish","id":5,"channel":"c","data":{"text":"hi"},"idempotency_key":"k1"})
        );
        let f = ClientFrame::History { id: 8, channel: "c", since: Some(&pos), limit: Some(50) };
        assert_eq!(
            v(&f.encode()),
            json!({"type":"history","id":8,"channel":"c","since":{"epoch":"x1","offset":41},"limit":50})
        );
        assert_eq!(v(&ClientFrame::Ping { id: 5 }.encode()), json!({"type":"ping","id":5}));
        assert_eq!(
            v(&ClientFrame::Refresh { id: 6, token: "t" }.encode()),
            json!({"type":"refresh","id":6,"token":"t"})
        );
    }

    #[test]
    fn decodes_server_frames_and_skips_what_it_does_not_know() {
        let f = decode(r#"{"type":"welcome","client":"n-1","user":"u","node":"n","ping_interval_ms":25000}"#);
        assert!(matches!(f, Some(ServerFrame::Welcome { ping_interval_ms: Some(25000), .. })));
        let f = decode(r#"{"type":"ack","id":2,"channel":"c","epoch":"x1","offset":57,"recovered":true}"#);
        assert!(matches!(f, Some(ServerFrame::Ack { id: Some(2), offset: Some(57), recovered: Some(true), .. })));
        let f = decode(r#"{"type":"message","channel":"c","epoch":"e","offset":58,"data":[1]}"#);
        assert!(matches!(f, Some(ServerFrame::Message(MessageFrame { offset: 58, .. }))));
        let f = decode(r#"{"type":"error","id":4,"code":"forbidden","message":"no","channel":"c","new":1}"#);
        assert!(matches!(f, Some(ServerFrame::Error { id: Some(4), ref code, .. }) if code == "forbidden"));
        let f = decode(
            r#"{"type":"history","id":8,"channel":"c","epoch":"e","offset":2,"messages":[{"type":"message","channel":"c","epoch":"e","offset":2,"data":"x"}]}"#,
        );
        assert!(matches!(f, Some(ServerFrame::History { ref messages, .. }) if messages.len() == 1));
        assert!(matches!(
            decode(r#"{"type":"gap","channel":"c","epoch":"e","offset":9}"#),
            Some(ServerFrame::Gap { .. })
        ));
        assert!(matches!(decode(r#"{"type":"from-the-future","x":1}"#), Some(ServerFrame::Unknown)));
        assert!(decode("not json").is_none());
        assert!(decode(r#"{"type":"message","channel":"c"}"#).is_none());
    }
}
