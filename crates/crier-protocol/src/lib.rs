//! crier's wire format, shared by the server, the client and the benchmark.
//!
//! - [`channel`]: channel-name rules and the permission patterns of JWT claims.
//! - [`frames`]: client → server frames (decoding) and server → client frames (encoding),
//!   including [`frames::encode_message`], which builds a `message` frame in Rust (the Redis
//!   broker's publish script builds the same bytes in Lua; crier-redis's tests keep the two
//!   identical).
//! - [`encoding`]: the per-connection encoding of frames (JSON text, or MessagePack binary).
//! - [`msgpack`]: MessagePack ⇄ JSON transcoding for the MessagePack encoding.
//! - [`codes`]: error codes of `error` frames, and the table of WebSocket close codes (reason,
//!   what the client should do).
//! - [`ws`]: WebSocket framing (RFC 6455), server side: the reader and the frame encoder.
//! - [`backoff`]: the reconnect backoff both sides use (crier-client's, crier-redis's pub/sub).
//!
//! Architecture invariant: no tokio, no I/O. Everything here is a pure function of its input,
//! but [`backoff`]'s random draws.

pub mod backoff;
pub mod channel;
pub mod codes;
pub mod encoding;
pub mod frames;
pub mod msgpack;
pub mod ws;

pub use channel::{ChannelError, channel_matches, namespace, validate_channel};
pub use codes::{ClientAction, CloseCode, ErrorCode};
pub use encoding::Encoding;
pub use frames::{ClientFrame, FrameError, StreamPosition};
