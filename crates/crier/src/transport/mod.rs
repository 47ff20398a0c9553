//! Transports: how a session's frames travel to and from a client.
//!
//! A transport owns the bytes: it runs the handshake checks ([`crate::handshake`]) plus its
//! own, builds a [`Session`](crate::session::Session) with the connection's
//! [`Encoding`](crier_protocol::Encoding), and then, in one task per connection, decodes what the
//! client sends into client frames for [`Session::on_frame`](crate::session::Session::on_frame),
//! writes what the session's outbox holds in its own framing, turns the outbox's keep-alive
//! ([`Out::Ping`](crier_core::Out::Ping)) and close ([`Close`](crier_core::Close)) into its own
//! signals, touches the outbox whenever the client is heard from, and calls
//! [`Session::close`](crate::session::Session::close) when the connection ends.
//!
//! *Invariant:* the session never sees transport bytes and the transport never interprets a
//! frame beyond its envelope (`type`, `channel`, `epoch`, `offset`, `recovered` — never `data`;
//! SSE reads it to name events and keep its cursor): everything the server sends goes through the
//! outbox (so its byte bound covers replies as well as messages), and every client frame goes
//! through `Session::on_frame` (channels named by a transport's handshake: `subscribe_named`;
//! a `ping` frame arriving while a WebSocket request is in flight: the session's
//! [`Pinger`](crate::session::Pinger)).
//!
//! - [`ws`]: WebSocket (RFC 6455), crier's own framing over the upgraded TCP stream.
//! - [`sse`]: Server-Sent Events (`GET /sse`), receive only: the request names the channels.

pub mod sse;
pub mod ws;

use std::io;
use std::task::{Context, Poll, ready};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Runs a non-blocking socket call once the socket is ready for it; `Pending` (with the waker
/// registered) while it would block. Both transports read and write their raw socket through it.
pub(crate) fn poll_io<T>(
    io: &TcpStream,
    cx: &mut Context<'_>,
    interest: Interest,
    mut call: impl FnMut(&TcpStream) -> io::Result<T>,
) -> Poll<io::Result<T>> {
    loop {
        if interest.is_readable() {
            ready!(io.poll_read_ready(cx))?;
        } else {
            ready!(io.poll_write_ready(cx))?;
        }
        match io.try_io(interest, || call(io)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return Poll::Ready(result),
        }
    }
}
