//! An SSE connection: one task driving the session, and the response body hyper writes.
//!
//! The task (like a WebSocket connection's) owns the [`Session`]: it opens it, subscribes the
//! channels the request named, then takes what the outbox holds, renders it as events and hands
//! the bytes to the body through a one-chunk [`Wire`]. It takes the next batch only once the body
//! took the last chunk, so a client that does not read leaves its frames in the outbox, whose
//! byte bound then closes it (4009) like any slow consumer; hyper itself buffers at most its
//! `max_buf_size`. The body is polled by hyper's connection task; every chunk it hands over
//! counts as proof of life (`Outbox::touch`): an SSE client cannot answer pings, so a stream
//! is alive while hyper keeps taking its bytes, and the heartbeat sweep's `: ping` comment
//! (every `ping_interval` of silence) is what checks that. A stream whose bytes are not taken
//! for `pong_timeout` after that is closed (4010) by the sweep. The task ends (and the session
//! closes: channels left, presence and connection slot released) on an outbox close, an abort,
//! or the body being dropped (the client went away).

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use crier_core::{Close, Next, Outbox};
use crier_protocol::StreamPosition;
use hyper::body::{Body, Frame, SizeHint};

use super::cursor::Cursor;
use super::render;
use crate::session::Session;

#[derive(Default)]
struct WireState {
    /// Rendered bytes the body has not taken yet.
    chunk: Vec<u8>,
    /// No more chunks after `chunk`.
    done: bool,
    /// The body was dropped (the response ended or the client went away).
    gone: bool,
    body: Option<Waker>,
    task: Option<Waker>,
}

/// The hand-over between the connection's task and its response body.
#[derive(Default)]
pub struct Wire(Mutex<WireState>);

impl Wire {
    fn lock(&self) -> MutexGuard<'_, WireState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The response body: what the task rendered, as hyper asks for it.
pub struct SseBody {
    wire: Arc<Wire>,
    outbox: Arc<Outbox>,
}

impl SseBody {
    pub fn new(wire: Arc<Wire>, outbox: Arc<Outbox>) -> SseBody {
        SseBody { wire, outbox }
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut w = self.wire.lock();
        if !w.chunk.is_empty() {
            let chunk = Bytes::from(std::mem::take(&mut w.chunk));
            let task = w.task.take();
            drop(w);
            self.outbox.touch();
            if let Some(t) = task {
                t.wake();
            }
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if w.done {
            return Poll::Ready(None);
        }
        w.body = Some(cx.waker().clone());
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        false
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

impl Drop for SseBody {
    fn drop(&mut self) {
        let mut w = self.wire.lock();
        w.gone = true;
        w.chunk = Vec::new();
        let task = w.task.take();
        drop(w);
        if let Some(t) = task {
            t.wake();
        }
    }
}

/// How the stream ended.
enum End {
    /// The outbox asks for this close (what was queued before it was rendered).
    Close(Close),
    /// A close that drops what was queued (slow consumer, heartbeat timeout): the pending chunk
    /// is replaced by the close event.
    Aborted,
    /// The body is gone: nothing more to send.
    Gone,
}

/// Renders the outbox into the wire until the stream ends.
fn pump<'a>(outbox: &'a Outbox, wire: &'a Wire, cursor: &'a mut Cursor) -> impl Future<Output = End> + 'a {
    std::future::poll_fn(move |cx| {
        loop {
            {
                let mut w = wire.lock();
                if w.gone {
                    return Poll::Ready(End::Gone);
                }
                if !w.chunk.is_empty() {
                    // The body has not taken the last chunk: wait for it, or for an abort.
                    w.task = Some(cx.waker().clone());
                    drop(w);
                    if outbox.poll_aborted(cx).is_ready() {
                        return Poll::Ready(End::Aborted);
                    }
                    return Poll::Pending;
                }
            }
            let mut batch = Vec::new();
            match outbox.poll_next(cx, &mut batch) {
                Poll::Ready(Next::Batch) => {
                    let mut out = Vec::with_capacity(batch.iter().map(|o| 64 + size(o)).sum());
                    for item in &batch {
                        render::push_event(&mut out, item, cursor);
                    }
                    drop(batch);
                    let mut w = wire.lock();
                    w.chunk = out;
                    if let Some(b) = w.body.take() {
                        b.wake();
                    }
                }
                Poll::Ready(Next::Close(close)) => return Poll::Ready(End::Close(close)),
                Poll::Pending => {
                    let mut w = wire.lock();
                    if w.gone {
                        return Poll::Ready(End::Gone);
                    }
                    w.task = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
    })
}

fn size(out: &crier_core::Out) -> usize {
    match out {
        crier_core::Out::Frame(f) | crier_core::Out::Deflated(f) => f.len(),
        crier_core::Out::Ping => 0,
    }
}

/// Runs an SSE connection to its end; see the module docs. `channels`: what the request named,
/// each with the position to resume from (from `Last-Event-ID`); `drain_ms`: `shutdown_drain`
/// (for the 1012 close's `retry:`).
///
/// Not an `async fn`, for the reason given at the WebSocket transport's `run`.
#[allow(clippy::manual_async_fn)] // on purpose
pub fn run(
    mut s: Session,
    channels: Vec<(String, Option<StreamPosition>)>,
    mut cursor: Cursor,
    wire: Arc<Wire>,
    drain_ms: u64,
) -> impl Future<Output = ()> + Send {
    async move {
        s.open();
        for (channel, recover) in channels {
            if s.outbox().is_closing() || wire.lock().gone {
                break;
            }
            Box::pin(s.subscribe_named(&channel, recover)).await;
        }
        let end = pump(s.outbox(), &wire, &mut cursor).await;
        let aborted = matches!(end, End::Aborted);
        let close = match end {
            End::Close(close) => Some(close),
            End::Aborted => s.outbox().take_close(),
            End::Gone => None,
        };
        {
            let mut w = wire.lock();
            if let Some(close) = close {
                if aborted {
                    w.chunk = Vec::new();
                }
                render::push_close(&mut w.chunk, &close, drain_ms);
            }
            w.done = true;
            if let Some(b) = w.body.take() {
                b.wake();
            }
        }
        Box::pin(s.close()).await;
    }
}
