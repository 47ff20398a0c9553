//! The encodings a connection may speak, chosen per connection at the handshake.
//!
//! The session works with [`ClientFrame`]s and [`ServerFrame`]s only; the connection's
//! [`Encoding`] turns client bytes into the first and the second into bytes. A transport asks the
//! encoding whether its frames travel as text ([`Encoding::is_text`]). `message` frames are not
//! encoded per connection: the broker builds each publication's frame once per cluster (JSON,
//! [`crate::frames::encode_message`]) and the hub shares it; for another encoding the hub builds
//! that encoding's frame from it once per node ([`Encoding::frame_from_json`]) and shares that.
//!
//! - JSON text (`crier.v1`, the default): docs/protocol.md, *Frames*.
//! - MessagePack binary (`crier.v1.msgpack`): each frame one MessagePack map with exactly the
//!   JSON frame's fields and values ([`crate::msgpack`] transcodes). Client frames are transcoded
//!   to JSON and decoded by the JSON decoder, so the rules (unknown fields ignored, wrong types
//!   `bad_request`, `data` checks) are the same.

use bytes::Bytes;

use crate::codes::ErrorCode;
use crate::frames::{self, ClientFrame, FrameError, ServerFrame};
use crate::msgpack;

/// See the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// JSON text frames, one object each (docs/protocol.md, *Frames*).
    #[default]
    Json,
    /// MessagePack binary frames, one map each (docs/protocol.md, *MessagePack*).
    MsgPack,
}

impl Encoding {
    /// Whether this encoding's frames are text (WebSocket opcode 1) rather than binary.
    pub fn is_text(self) -> bool {
        match self {
            Encoding::Json => true,
            Encoding::MsgPack => false,
        }
    }

    /// Decodes a client frame that arrived as text.
    pub fn decode_text(self, text: &str) -> Result<ClientFrame<'_>, FrameError> {
        match self {
            Encoding::Json => frames::decode(text),
            Encoding::MsgPack => Err(FrameError::new(
                None,
                ErrorCode::BadRequest,
                "text frames are not accepted on a crier.v1.msgpack connection; send MessagePack binary frames",
            )),
        }
    }

    /// Decodes a client frame that arrived as binary data. `scratch` holds what the frame
    /// borrows from (its JSON transcoding).
    pub fn decode_binary<'a>(self, bytes: &[u8], scratch: &'a mut String) -> Result<ClientFrame<'a>, FrameError> {
        match self {
            Encoding::Json => Err(FrameError::new(
                None,
                ErrorCode::BadRequest,
                "binary frames are not supported; send JSON text frames",
            )),
            Encoding::MsgPack => {
                scratch.clear();
                msgpack::to_json(bytes, scratch).map_err(|e| {
                    FrameError::new(None, ErrorCode::BadRequest, format!("malformed MessagePack frame: {e}"))
                })?;
                frames::decode(scratch)
            }
        }
    }

    /// Encodes a server frame other than `message`.
    pub fn encode(self, frame: &ServerFrame<'_>) -> Bytes {
        self.frame_from_json(&frame.encode())
    }

    /// This encoding's form of a frame built as JSON (a `message` frame from the broker, a `gap`
    /// notice): the same bytes for JSON, transcoded otherwise.
    pub fn frame_from_json(self, json: &Bytes) -> Bytes {
        match self {
            Encoding::Json => json.clone(),
            // The frames crier builds are valid JSON: a failure would be a bug, answered with an
            // empty map rather than a panic.
            Encoding::MsgPack => Bytes::from(msgpack::from_json(json).unwrap_or_else(|_| vec![0x80])),
        }
    }

    /// Encodes the reply to a `history` frame around the already-encoded (JSON) `message` frames;
    /// `next`: the position to continue from, for a reply cut short ([`frames::encode_history`]).
    pub fn encode_history(
        self,
        id: Option<u64>,
        channel: &str,
        epoch: &str,
        offset: u64,
        messages: &[Bytes],
        next: Option<u64>,
    ) -> Bytes {
        self.frame_from_json(&frames::encode_history(id, channel, epoch, offset, messages, next))
    }
}
