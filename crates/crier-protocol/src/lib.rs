//! crier's wire format, shared by the server, the client and the benchmark.
//!
//! - [`channel`]: channel-name rules and the permission patterns of JWT claims.
//! - [`frames`]: client → server frames (decoding) and server → client frames (encoding),
//!   including [`frames::encode_message`], the one place a `message` frame is built.
//! - [`codes`]: error codes of `error` frames and WebSocket close codes.
//! - [`ws`]: WebSocket framing (RFC 6455), server side: the reader and the frame encoder.
//!
//! Architecture invariant: no tokio, no I/O. Everything here is a pure function of its input.

pub mod channel;
pub mod codes;
pub mod frames;
pub mod ws;

pub use channel::{ChannelError, channel_matches, namespace, validate_channel};
pub use codes::{CloseCode, ErrorCode};
pub use frames::{ClientFrame, FrameError, StreamPosition};
