//! The encodings a connection may speak, chosen per connection at the handshake.
//!
//! The session works with [`ClientFrame`]s and [`ServerFrame`]s only; the connection's
//! [`Encoding`] turns client bytes into the first and the second into bytes. A transport asks the
//! encoding whether its frames travel as text ([`Encoding::is_text`]). `message` frames are not
//! encoded per connection: the broker builds each publication's frame once per cluster (JSON,
//! [`crate::frames::encode_message`]) and the hub shares it; an encoding other than JSON adds
//! its own once-per-node frame beside it.
//!
//! Today there is one encoding, JSON text (`crier.v1`); MessagePack (`crier.v1.msgpack`) is the
//! next one planned.

use bytes::Bytes;

use crate::codes::ErrorCode;
use crate::frames::{self, ClientFrame, FrameError, ServerFrame};

/// See the module docs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Encoding {
    /// JSON text frames, one object each (the contract's §4).
    #[default]
    Json,
}

impl Encoding {
    /// Whether this encoding's frames are text (WebSocket opcode 1) rather than binary.
    pub fn is_text(self) -> bool {
        match self {
            Encoding::Json => true,
        }
    }

    /// Decodes a client frame that arrived as text.
    pub fn decode_text(self, text: &str) -> Result<ClientFrame<'_>, FrameError> {
        match self {
            Encoding::Json => frames::decode(text),
        }
    }

    /// Decodes a client frame that arrived as binary data.
    pub fn decode_binary(self, _bytes: &[u8]) -> Result<ClientFrame<'_>, FrameError> {
        match self {
            Encoding::Json => Err(FrameError::new(
                None,
                ErrorCode::BadRequest,
                "binary frames are not supported; send JSON text frames",
            )),
        }
    }

    /// Encodes a server frame other than `message`.
    pub fn encode(self, frame: &ServerFrame<'_>) -> Bytes {
        match self {
            Encoding::Json => frame.encode(),
        }
    }

    /// Encodes the reply to a `history` frame around the already-encoded `message` frames.
    pub fn encode_history(self, id: Option<u64>, channel: &str, epoch: &str, offset: u64, messages: &[Bytes]) -> Bytes {
        match self {
            Encoding::Json => frames::encode_history(id, channel, epoch, offset, messages),
        }
    }
}
