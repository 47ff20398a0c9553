//! A WebSocket connection's one task: it waits for hyper to hand over the upgraded socket, then
//! reads client messages into the session, writes what the session's outbox holds (everything
//! queued is taken in one go and written with one `sendmsg`), and ends with a close frame.
//!
//! Heartbeats and token expiry are checked by the node's sweep ([`crate::heartbeat`]), which
//! acts through the outbox: an [`Out::Ping`](crier_core::Out::Ping) becomes a WebSocket Ping, an
//! outbox close becomes a close frame. A write stuck on a socket that does not drain is
//! abandoned as soon as the outbox is aborted (slow consumer, heartbeat timeout). Framing
//! violations close with the code RFC 6455 prescribes (1002, 1007, 1009).

use std::future::Future;
use std::task::Poll;
use std::time::Duration;

use crier_core::{Close, Next, Outbox};
use crier_protocol::ErrorCode;
use crier_protocol::ws::{Discard, Incoming, Violation};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::socket::{ReadError, WsSocket};
use crate::metrics as m;
use crate::session::Session;

/// How long a closing connection may take to write its last frames and hear the client's close.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What woke the connection task.
enum Event {
    /// A message from the client, the end of its stream, or a read error.
    Inbound(Result<Option<Incoming>, ReadError>),
    /// The outbox asks for this close (what was queued before it is written).
    Close(Close),
    /// Writing failed, or the outbox was aborted while a write was stuck.
    WriteEnded,
}

/// Waits for the next event of a connection while driving its writes: one task reads the socket,
/// writes what the outbox holds (one `sendmsg` per batch) and watches for aborts.
fn next_event<'a>(ws: &'a mut WsSocket, outbox: &'a Outbox, text: bool) -> impl Future<Output = Event> + 'a {
    std::future::poll_fn(move |cx| {
        loop {
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
                }
                Poll::Ready(Next::Close(close)) => return Poll::Ready(Event::Close(close)),
                Poll::Pending => break,
            }
        }
        ws.poll_message(cx).map(Event::Inbound)
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
/// measured: 864 → ~580 bytes per connection task).
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub fn run(mut s: Session, upgrade: OnUpgrade, max_message: usize, deflate: bool) -> impl Future<Output = ()> + Send {
    async move {
        let mut ws = match upgrade.await.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(parts)) => WsSocket::new(parts.io.into_inner(), parts.read_buf, max_message, deflate),
            Ok(Err(_)) => return tracing::error!("the upgraded connection is not a TCP stream"),
            Err(e) => return tracing::debug!(error = %e, "websocket upgrade failed"),
        };
        s.open();
        let encoding = s.encoding();
        let ending = loop {
            let inbound = match next_event(&mut ws, s.outbox(), encoding.is_text()).await {
                // A client that does not read (slow consumer) or answer (heartbeat timeout) gets
                // the close frame but no wait for a reply it will not send.
                Event::Close(close) => {
                    let linger = close.code.lingers();
                    break Ending::Close(close, linger);
                }
                // Aborted (the batch being written is abandoned) or the socket failed.
                Event::WriteEnded => break s.outbox().take_close().map_or(Ending::Gone, |c| Ending::Close(c, false)),
                Event::Inbound(inbound) => inbound,
            };
            s.outbox().touch();
            match inbound {
                Ok(Some(Incoming::Text(text))) => Box::pin(s.on_frame(encoding.decode_text(&text))).await,
                Ok(Some(Incoming::Binary(bytes))) => {
                    let mut scratch = String::new();
                    Box::pin(s.on_frame(encoding.decode_binary(&bytes, &mut scratch))).await
                }
                Ok(Some(Incoming::Ping(_) | Incoming::Pong)) => {}
                Ok(Some(Incoming::Close(c))) => break Ending::Echo(c.map(|(code, _)| code)),
                Ok(None) => break Ending::Gone,
                Err(ReadError::Violation(v)) => {
                    let code = match v {
                        Violation::TooBig => ErrorCode::MessageTooLarge,
                        _ => ErrorCode::BadRequest,
                    };
                    metrics::counter!(m::CLIENT_ERRORS, "code" => code.as_str()).increment(1);
                    break Ending::Violation(Close { code: v.close_code(), reason: v.reason() });
                }
                Err(ReadError::Io(e)) => {
                    tracing::debug!(error = %e, "websocket read error");
                    break Ending::Gone;
                }
            }
        };
        Box::pin(s.close()).await;
        Box::pin(finish(ws, ending)).await;
    }
}

/// Writes what is still pending, then the close frame, then — with `linger` — reads until the
/// client's close reply (discarding what it still sends), so the socket is not reset under the
/// close frame by unread data. After a violation the client's frames cannot be trusted, so
/// lingering skips them unread ([`Discard`]). Bounded by [`CLOSE_GRACE`].
async fn finish(mut ws: WsSocket, ending: Ending) {
    let (linger, violation) = match ending {
        Ending::Gone => return,
        Ending::Close(close, linger) => {
            ws.queue_close(Some((close.code.0, close.reason)));
            (linger, false)
        }
        Ending::Violation(close) => {
            ws.queue_close(Some((close.code.0, close.reason)));
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
