//! A WebSocket connection's one task: it waits for hyper to hand over the upgraded socket, then
//! reads client messages into the session, writes what the session's outbox holds (everything
//! queued is taken in one go and written with one `sendmsg`), and ends with a close frame.
//!
//! A client frame becomes a *request*: a future that owns the session while it runs (a publish
//! waiting for the broker, a subscribe pacing its recovery by the outbox's drain). While one is
//! in flight the task keeps writing the outbox, keeps reading, answers `ping` frames at once
//! ([`Pinger`]) and WebSocket Pings; other frames wait in order in a small queue
//! ([`MAX_WAITING`]), and once it is full the socket is not read (backpressure). An idle
//! connection holds no request and no queue: the session sits in the task.
//!
//! Heartbeats and token expiry are checked by the node's sweep ([`crate::heartbeat`]), which
//! acts through the outbox: an [`Out::Ping`](crier_core::Out::Ping) becomes a WebSocket Ping, an
//! outbox close becomes a close frame. A write stuck on a socket that does not drain is
//! abandoned as soon as the outbox is aborted (slow consumer, heartbeat timeout). Framing
//! violations close with the code RFC 6455 prescribes (1002, 1007, 1009).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use crier_core::{Close, Command, Next, Outbox, Transport};
use crier_protocol::frames::{ClientFrame, FrameError};
use crier_protocol::ws::{Discard, Incoming, Violation};
use crier_protocol::{CloseCode, Encoding, ErrorCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::socket::{ReadError, WsSocket};
use crate::metrics as m;
use crate::session::{Pinger, Session};

/// How long a closing connection may take to write its last frames and hear the client's close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Client frames that may wait behind a request in flight; with this many waiting, the socket
/// is not read until the request is done (each may hold up to `max_message_bytes`).
pub const MAX_WAITING: usize = 4;

/// A client frame being handled; it owns the session and gives it back when done.
type Request = Pin<Box<dyn Future<Output = Session> + Send>>;

/// What woke the connection task.
enum Event {
    /// A message from the client, the end of its stream, or a read error.
    Inbound(Result<Option<Incoming>, ReadError>),
    /// The outbox asks for this close (what was queued before it is written).
    Close(Close),
    /// Writing failed, or the outbox was aborted while a write was stuck.
    WriteEnded,
    /// The request in flight is done: the session is back.
    Done(Session),
    /// A server command waits for the idle session (REST `subscribe`/`unsubscribe`, `subs`
    /// claim): [`Outbox::take_command`].
    Command,
}

/// The connection's session: in the task while idle, or owned by the request in flight.
enum Conn {
    Idle(Session),
    Busy(Busy),
    /// Only while switching between the two.
    Switching,
}

impl Conn {
    fn outbox(&self) -> Option<&Outbox> {
        match self {
            Conn::Idle(s) => Some(s.outbox()),
            Conn::Busy(b) => Some(&b.outbox),
            Conn::Switching => None,
        }
    }
}

/// A request in flight and what arrived meanwhile.
struct Busy {
    request: Request,
    /// The session's outbox (the session itself is inside `request`).
    outbox: std::sync::Arc<Outbox>,
    pinger: Pinger,
    /// Frames to handle next, in order (at most [`MAX_WAITING`]).
    waiting: VecDeque<Incoming>,
}

/// Starts handling `message` (a text or binary client frame): the request owns the session.
fn start(s: Session, message: Incoming, waiting: VecDeque<Incoming>) -> Busy {
    let outbox = s.outbox().clone();
    let pinger = s.pinger();
    let request = Box::pin(async move {
        let mut s = s;
        let mut scratch = String::new();
        if let Some(decoded) = decode(s.encoding(), &message, &mut scratch) {
            s.on_frame(decoded).await;
        }
        s
    });
    Busy { request, outbox, pinger, waiting }
}

/// Starts running a server `command` on the session, as a request like a client frame's.
fn start_command(s: Session, command: Command) -> Busy {
    let outbox = s.outbox().clone();
    let pinger = s.pinger();
    let request = Box::pin(async move {
        let mut s = s;
        s.on_command(command).await;
        s
    });
    Busy { request, outbox, pinger, waiting: VecDeque::new() }
}

/// Decodes a text or binary client message as a client frame (`None` for the other kinds);
/// `scratch` holds what a binary encoding's frame borrows.
fn decode<'a>(
    encoding: Encoding,
    message: &'a Incoming,
    scratch: &'a mut String,
) -> Option<Result<ClientFrame<'a>, FrameError>> {
    match message {
        Incoming::Text(text) => Some(encoding.decode_text(text)),
        Incoming::Binary(bytes) => Some(encoding.decode_binary(bytes, scratch)),
        Incoming::Ping(_) | Incoming::Pong | Incoming::Close(_) => None,
    }
}

/// `Some(id)` when `message` is a `ping` frame (answered at once, even behind a request).
fn ping_id(encoding: Encoding, message: &Incoming) -> Option<Option<u64>> {
    match decode(encoding, message, &mut String::new())? {
        Ok(ClientFrame::Ping { id }) => Some(id),
        _ => None,
    }
}

/// Waits for the next event of a connection while driving its writes and its request in
/// flight: one task reads the socket (unless `read` is false: backpressure), writes what the
/// outbox holds (one `sendmsg` per batch), polls the request and watches for aborts. Without a
/// request in flight, a server command waiting in the outbox is an event too.
fn next_event<'a>(
    ws: &'a mut WsSocket,
    outbox: &'a Outbox,
    mut request: Option<&'a mut Request>,
    read: bool,
    text: bool,
) -> impl Future<Output = Event> + 'a {
    std::future::poll_fn(move |cx| {
        // Before the outbox's batch: it registers the same waker, so a command queued after
        // this check wakes the task.
        if request.is_none() && outbox.poll_command(cx).is_ready() {
            return Poll::Ready(Event::Command);
        }
        loop {
            if let Some(r) = request.as_mut()
                && let Poll::Ready(s) = r.as_mut().poll(cx)
            {
                return Poll::Ready(Event::Done(s));
            }
            if ws.is_writing() {
                match ws.poll_write_pending(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Event::WriteEnded),
                    // Stuck on a socket that does not drain: give up as soon as the outbox is aborted.
                    Poll::Pending if outbox.poll_aborted(cx).is_ready() => return Poll::Ready(Event::WriteEnded),
                    Poll::Pending => break,
                }
            }
            let mut batch = Vec::new();
            match outbox.poll_next(cx, &mut batch) {
                Poll::Ready(Next::Batch) => {
                    if ws.write_batch(cx, &batch, text).is_err() {
                        return Poll::Ready(Event::WriteEnded);
                    }
                    // Taking the batch made room: a paced request may go on (polled above).
                }
                Poll::Ready(Next::Close(close)) => return Poll::Ready(Event::Close(close)),
                Poll::Pending => break,
            }
        }
        if read { ws.poll_message(cx).map(Event::Inbound) } else { Poll::Pending }
    })
}

/// How a connection ends.
enum Ending {
    /// The socket is gone: nothing to send.
    Gone,
    /// Send this close frame; with `linger`, wait (briefly) for the client's reply.
    Close(Close, bool),
    /// The client broke a framing rule: send this close frame, then read and drop what it still
    /// sends until its close (briefly), so the close code is not lost in a TCP reset.
    Violation(Close),
    /// The client closed: echo its code (RFC 6455 §5.5.1).
    Echo(Option<u16>),
}

/// Runs a connection to its end; see the module docs.
///
/// Not an `async fn`: the `async move` block uses the captured session in place, where an
/// `async fn` would keep a second copy of its argument in the task (rust-lang/rust#62958;
/// measured: 864 → ~580 bytes per connection task). Likewise the session goes into `conn`
/// *before* the `async move` block, which then uses it in place: moving it into a local inside
/// would keep a second session-sized slot in every task.
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub fn run(s: Session, upgrade: OnUpgrade, max_message: usize, deflate: bool) -> impl Future<Output = ()> + Send {
    let encoding = s.encoding();
    let mut conn = Conn::Idle(s);
    async move {
        let mut ws = match upgrade.await.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(parts)) => WsSocket::new(parts.io.into_inner(), parts.read_buf, max_message, deflate),
            Ok(Err(_)) => return tracing::error!("the upgraded connection is not a TCP stream"),
            Err(e) => return tracing::debug!(error = %e, "websocket upgrade failed"),
        };
        if let Conn::Idle(s) = &mut conn {
            s.open(Transport::WebSocket);
        }
        let ending = loop {
            let event = match &mut conn {
                Conn::Idle(s) => next_event(&mut ws, s.outbox(), None, true, encoding.is_text()).await,
                Conn::Busy(b) => {
                    let read = b.waiting.len() < MAX_WAITING;
                    if !read {
                        ws.reading_paused();
                    }
                    next_event(&mut ws, &b.outbox, Some(&mut b.request), read, encoding.is_text()).await
                }
                Conn::Switching => break Ending::Gone,
            };
            let inbound = match event {
                // A client that does not read (slow consumer) or answer (heartbeat timeout) gets
                // the close frame but no wait for a reply it will not send.
                Event::Close(close) => {
                    let linger = close.code.lingers();
                    break Ending::Close(close, linger);
                }
                // Aborted (the batch being written is abandoned) or the socket failed.
                Event::WriteEnded => {
                    let close = conn.outbox().and_then(Outbox::take_close);
                    break close.map_or(Ending::Gone, |c| Ending::Close(c, false));
                }
                Event::Done(mut s) => {
                    if let Conn::Busy(Busy { pinger, mut waiting, .. }) = std::mem::replace(&mut conn, Conn::Switching)
                    {
                        s.absorb(pinger);
                        conn = match waiting.pop_front() {
                            Some(next) => Conn::Busy(start(s, next, waiting)),
                            None => Conn::Idle(s),
                        };
                    }
                    continue;
                }
                Event::Command => {
                    if let Conn::Idle(s) = std::mem::replace(&mut conn, Conn::Switching) {
                        conn = match s.outbox().take_command() {
                            Some(command) => Conn::Busy(start_command(s, command)),
                            None => Conn::Idle(s),
                        };
                    }
                    continue;
                }
                Event::Inbound(inbound) => inbound,
            };
            if let Some(outbox) = conn.outbox() {
                outbox.touch();
            }
            match inbound {
                Ok(Some(message @ (Incoming::Text(_) | Incoming::Binary(_)))) => match &mut conn {
                    Conn::Busy(b) => match ping_id(encoding, &message) {
                        Some(id) => b.pinger.ping(&b.outbox, id),
                        None => b.waiting.push_back(message),
                    },
                    Conn::Idle(_) => {
                        if let Conn::Idle(s) = std::mem::replace(&mut conn, Conn::Switching) {
                            conn = Conn::Busy(start(s, message, VecDeque::new()));
                        }
                    }
                    Conn::Switching => {}
                },
                Ok(Some(Incoming::Ping(_) | Incoming::Pong)) => {}
                Ok(Some(Incoming::Close(c))) => break Ending::Echo(c.map(|(code, _)| code)),
                Ok(None) => break Ending::Gone,
                Err(ReadError::Violation(v)) => {
                    let code = match v {
                        Violation::TooBig => ErrorCode::MessageTooLarge,
                        _ => ErrorCode::BadRequest,
                    };
                    metrics::counter!(m::CLIENT_ERRORS, "code" => code.as_str()).increment(1);
                    break Ending::Violation(Close { code: v.close_code(), reason: v.reason().into() });
                }
                Err(ReadError::Io(e)) => {
                    tracing::debug!(error = %e, "websocket read error");
                    break Ending::Gone;
                }
            }
        };
        // Boxed: the task holds a pointer at this await, not the ending's state.
        Box::pin(shutdown(conn, ws, ending)).await;
    }
}

/// The connection ended: gets the session back (a request in flight finishes first), closes it
/// (channels left, presence and connection slot released), then [`finish`]es the socket.
async fn shutdown(conn: Conn, ws: WsSocket, ending: Ending) {
    let s = match conn {
        Conn::Idle(s) => s,
        Conn::Switching => return,
        Conn::Busy(b) => {
            // Whatever ended the connection, nothing more will be written: a paced request
            // stops waiting for room; one waiting for the broker finishes first (its
            // subscription, if any, must be undone by `close`).
            b.outbox.close(CloseCode::GOING_AWAY);
            let mut s = b.request.await;
            s.absorb(b.pinger);
            s
        }
    };
    s.close().await;
    finish(ws, ending).await;
}

/// Writes what is still pending, then the close frame, then — with `linger` — reads until the
/// client's close reply (discarding what it still sends), so the socket is not reset under the
/// close frame by unread data. After a violation the client's frames cannot be trusted, so
/// lingering skips them unread ([`Discard`]). Bounded by [`CLOSE_GRACE`].
async fn finish(mut ws: WsSocket, ending: Ending) {
    let (linger, violation) = match ending {
        Ending::Gone => return,
        Ending::Close(close, linger) => {
            ws.queue_close(Some((close.code.0, &close.reason)));
            (linger, false)
        }
        Ending::Violation(close) => {
            ws.queue_close(Some((close.code.0, &close.reason)));
            (true, true)
        }
        Ending::Echo(code) => {
            ws.queue_close(code.map(|c| (c, "")));
            (false, false)
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if std::future::poll_fn(|cx| ws.poll_write_pending(cx)).await.is_err() {
            return;
        }
        if violation {
            // A violation in the client's close frame: the client sends nothing more.
            if !ws.peer_closed() {
                let mut discard = Discard::default();
                let _ = std::future::poll_fn(|cx| ws.poll_discard(cx, &mut discard)).await;
            }
        } else if linger {
            while let Ok(Some(m)) = std::future::poll_fn(|cx| ws.poll_message(cx)).await {
                if matches!(m, Incoming::Close(_)) {
                    break;
                }
            }
        }
    })
    .await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The bound ARCHITECTURE.md states for a connection's task future (the `Session`, the
    /// `WsSocket` and the loop's state; 296 bytes when this was written): with tokio's task
    /// header and trailer it stays within a 512-byte task cell. Growing it multiplies by every
    /// connection (BENCHMARKS.md, memory per connection); raise the bound only with the doc and
    /// a measurement (`crier-bench idle`).
    const CONNECTION_FUTURE_MAX_BYTES: usize = 384;

    #[tokio::test]
    async fn connection_task_size_stays_within_the_documented_bound() {
        let mut config = crate::config::Config::default();
        config.jwt.key = Some(crate::config::KeySource::Secret("a-test-secret-of-enough-length-0123456789".into()));
        let st = crate::startup::build(config, None).await.expect("state");
        let admitted = crate::handshake::Admitted {
            conn: 1,
            claims: crate::auth::Claims { sub: "u".into(), exp: u64::MAX, ..Default::default() },
            slot: None,
            proxied: false,
        };
        let session = Session::new(st, admitted, Encoding::Json);
        let mut req = hyper::Request::new(());
        let upgrade = hyper::upgrade::on(&mut req);
        let task = run(session, upgrade, 65536, false);
        let size = std::mem::size_of_val(&task);
        assert!(size <= CONNECTION_FUTURE_MAX_BYTES, "a connection's task future is {size} bytes");
        eprintln!("connection task future: {size} bytes");
    }
}
