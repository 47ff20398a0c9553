//! An SSE connection: one task that owns the socket and drives the session.
//!
//! Once the handshake passed, the handler takes the socket over from hyper
//! ([`crate::server::TakeOver`]); this task then writes the response head itself and, like a
//! WebSocket connection's task, takes what the outbox holds, renders it as events (chunked
//! HTTP/1.1: one chunk per batch; an HTTP/1.0 client gets a body that ends when the socket
//! closes) and hands it to the kernel with one `send`. Only what the socket does not take at
//! once is kept, and freed once written: an idle stream holds no buffer and no timer. The next
//! batch is taken only once the last one is out, so a client that does not read leaves its
//! frames in the outbox, whose byte bound then closes it (4009) like any slow consumer.
//!
//! Liveness: an SSE client cannot answer pings, so every write the socket takes counts as proof
//! of life (`Outbox::touch`); the heartbeat sweep's `: ping` comment (every `ping_interval` of
//! silence) is what checks it, and a stream whose bytes are not taken for `pong_timeout` after
//! that is closed (4010) by the sweep. The socket is read only to notice the client leaving.
//!
//! The end: the close event and the end of the body are written within [`CLOSE_GRACE`], the
//! write side is shut and the client's own close awaited within the same grace; a client that
//! does not read or close by then gets a reset (no lingering kernel buffers). Only then does the
//! session close (channels left, registry entry and the user's connection slot released), so a
//! stream counts against `max_connections` and `max_connections_per_user` for as long as its
//! socket is open. Subscribing (with recovery) runs concurrently with the writes: a recovering
//! subscribe may wait for outbox room, which only the writes make.

use std::io::{self, Read};
use std::net::Shutdown;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use crier_core::{Close, Next, Out, Outbox, Transport};
use crier_protocol::StreamPosition;
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::cursor::Cursor;
use super::render;
use crate::session::Session;
use crate::transport::poll_io;

/// How long an ending stream may take to write its close event and see the client close.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Room kept before a batch's events for its chunk-size line (`{hex}\r\n`).
const CHUNK_HEAD: usize = 10;
/// The end of a chunked body.
const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// The raw socket of an SSE stream; see the module docs.
pub struct SseSocket {
    io: TcpStream,
    /// Bytes to write: `wbuf[written..]` (empty, without allocation, while idle).
    wbuf: Vec<u8>,
    written: usize,
    /// Where the batch being written starts in `wbuf` (nothing of it sent while `written == begin`).
    begin: usize,
    /// Chunked transfer coding (HTTP/1.1); else the body ends with the connection (HTTP/1.0).
    chunked: bool,
}

impl SseSocket {
    /// A socket whose first bytes are the response `head` (status line, headers, blank line).
    pub fn new(io: TcpStream, head: Vec<u8>, chunked: bool) -> SseSocket {
        SseSocket { io, wbuf: head, written: 0, begin: 0, chunked }
    }

    fn is_writing(&self) -> bool {
        self.written < self.wbuf.len()
    }

    /// Writes what waits, touching the outbox on every byte the socket takes; `Ready(Ok)` once
    /// everything is out (the buffer is then freed).
    fn poll_write_pending(&mut self, cx: &mut Context<'_>, outbox: &Outbox) -> Poll<io::Result<()>> {
        while self.written < self.wbuf.len() {
            let rest = &self.wbuf[self.written..];
            let n = ready!(poll_io(&self.io, cx, Interest::WRITABLE, |io| SockRef::from(io).send(rest)))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
            outbox.touch();
        }
        self.wbuf = Vec::new();
        self.written = 0;
        self.begin = 0;
        Poll::Ready(Ok(()))
    }

    /// Renders a batch as one chunk to write (call only when not writing).
    fn start_batch(&mut self, batch: &[Out], cursor: &mut Cursor) {
        let mut out = Vec::with_capacity(CHUNK_HEAD + batch.iter().map(|o| 64 + size(o)).sum::<usize>() + 2);
        out.resize(CHUNK_HEAD, 0);
        for item in batch {
            render::push_event(&mut out, item, cursor);
        }
        self.begin = frame(&mut out, self.chunked);
        self.written = self.begin;
        self.wbuf = out;
    }

    /// Queues the close event and the end of the body after what waits. `replace`: drop the
    /// batch waiting to be written if none of it was sent yet (an aborted stream's).
    fn queue_close(&mut self, close: &Close, drain_ms: u64, replace: bool) {
        if replace && self.written == self.begin {
            self.wbuf = Vec::new();
            self.written = 0;
            self.begin = 0;
        }
        let mut out = vec![0; CHUNK_HEAD];
        render::push_close(&mut out, close, drain_ms);
        let begin = frame(&mut out, self.chunked);
        if self.chunked {
            out.extend_from_slice(LAST_CHUNK);
        }
        if self.is_writing() {
            self.wbuf.extend_from_slice(&out[begin..]);
        } else {
            self.wbuf = out;
            self.written = begin;
            self.begin = begin;
        }
    }

    /// Closes the socket with a reset (no lingering in the kernel with unsent bytes).
    fn reset(self) {
        let _ = SockRef::from(&self.io).set_linger(Some(Duration::ZERO));
    }

    /// Reads (and drops) whatever the client sends; `Ready` once its stream ended or failed.
    fn poll_closed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let read = poll_io(&self.io, cx, Interest::READABLE, |io| {
                let mut sink = [0u8; 512];
                (&*SockRef::from(io)).read(&mut sink)
            });
            match ready!(read) {
                Ok(0) | Err(_) => return Poll::Ready(()),
                Ok(_) => {}
            }
        }
    }
}

/// Frames `out` (events after [`CHUNK_HEAD`] bytes of room) as a chunk, or as they are when the
/// body is not chunked; returns where the bytes to send start. Nothing rendered: nothing to send
/// (an empty chunk would end the body).
fn frame(out: &mut Vec<u8>, chunked: bool) -> usize {
    let len = out.len() - CHUNK_HEAD;
    if len == 0 {
        return out.len();
    }
    if !chunked {
        return CHUNK_HEAD;
    }
    let head = format!("{len:x}\r\n");
    let begin = CHUNK_HEAD - head.len();
    out[begin..CHUNK_HEAD].copy_from_slice(head.as_bytes());
    out.extend_from_slice(b"\r\n");
    begin
}

fn size(out: &Out) -> usize {
    match out {
        Out::Frame(f) | Out::Deflated(f) => f.len(),
        Out::Ping => 0,
    }
}

/// How the stream ended.
enum End {
    /// The outbox asks for this close (what was queued before it was written).
    Close(Close),
    /// A close that drops what was queued (slow consumer, heartbeat timeout) while a write was
    /// stuck.
    Aborted,
    /// The client went away, or writing failed: nothing more to send.
    Gone,
}

/// One step of the stream: writes what waits, takes and renders the next batch, notices the
/// client leaving. `Ready` when the stream ends.
fn poll_stream(sock: &mut SseSocket, cx: &mut Context<'_>, outbox: &Outbox, cursor: &mut Cursor) -> Poll<End> {
    loop {
        if sock.is_writing() {
            match sock.poll_write_pending(cx, outbox) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(End::Gone),
                // Stuck on a socket that does not drain: give up as soon as the outbox is aborted.
                Poll::Pending if outbox.poll_aborted(cx).is_ready() => return Poll::Ready(End::Aborted),
                Poll::Pending => break,
            }
        }
        let mut batch = Vec::new();
        match outbox.poll_next(cx, &mut batch) {
            Poll::Ready(Next::Batch) => sock.start_batch(&batch, cursor),
            Poll::Ready(Next::Close(close)) => return Poll::Ready(End::Close(close)),
            Poll::Pending => break,
        }
    }
    sock.poll_closed(cx).map(|()| End::Gone)
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
    mut sock: SseSocket,
    drain_ms: u64,
) -> impl Future<Output = ()> + Send {
    async move {
        s.open(Transport::Sse);
        // Boxed: the subscribe phase's state is on the heap only while it runs, not in the task
        // of every idle stream.
        let (end, late) = 'stream: {
            if let Some(ended) = Box::pin(subscribe_all(&mut s, channels, &mut cursor, &mut sock)).await {
                break 'stream ended;
            }
            loop {
                // A server command (REST `subscribe`/`unsubscribe`, the `subs` claim) is run
                // beside the writes, like the named subscribes.
                let next = std::future::poll_fn(|cx| {
                    if s.outbox().poll_command(cx).is_ready() {
                        return Poll::Ready(None);
                    }
                    poll_stream(&mut sock, cx, s.outbox(), &mut cursor).map(Some)
                })
                .await;
                match next {
                    Some(end) => break 'stream (end, None),
                    None => {
                        if let Some(ended) = Box::pin(run_command(&mut s, &mut cursor, &mut sock)).await {
                            break 'stream ended;
                        }
                    }
                }
            }
        };
        let close = match &end {
            End::Close(close) => Some(close.clone()),
            End::Aborted => s.outbox().take_close().or(late),
            End::Gone => None,
        };
        match close {
            Some(close) => {
                sock.queue_close(&close, drain_ms, matches!(end, End::Aborted));
                Box::pin(finish(sock, s.outbox())).await;
            }
            // The client left (or the socket failed): whatever the kernel still holds for it
            // goes with a reset.
            None => sock.reset(),
        }
        Box::pin(s.close()).await;
    }
}

/// Subscribes the channels one after the other, each subscribe driven side by side with the
/// writes (a recovering subscribe may wait for room in the outbox, which only the writes make).
/// `Some` when the stream ended meanwhile: how, and a close asked for while the subscribe in
/// flight was being finished.
async fn subscribe_all(
    s: &mut Session,
    channels: Vec<(String, Option<StreamPosition>)>,
    cursor: &mut Cursor,
    sock: &mut SseSocket,
) -> Option<(End, Option<Close>)> {
    let outbox = s.outbox().clone();
    for (channel, recover) in channels {
        if outbox.is_closing() {
            break;
        }
        if let Some(ended) = beside_writes(s.subscribe_named(&channel, recover), &outbox, cursor, sock).await {
            return Some(ended);
        }
    }
    None
}

/// Runs the server command waiting in the outbox on the session, beside the writes
/// ([`beside_writes`]).
async fn run_command(s: &mut Session, cursor: &mut Cursor, sock: &mut SseSocket) -> Option<(End, Option<Close>)> {
    let outbox = s.outbox().clone();
    let command = outbox.take_command()?;
    beside_writes(s.on_command(command), &outbox, cursor, sock).await
}

/// Drives `work` (a subscribe that may wait for room in the outbox, which only the writes make)
/// side by side with the stream's writes. `Some` when the stream ended meanwhile: how, and a
/// close asked for while `work` was being finished.
async fn beside_writes(
    work: impl Future<Output = ()>,
    outbox: &Outbox,
    cursor: &mut Cursor,
    sock: &mut SseSocket,
) -> Option<(End, Option<Close>)> {
    {
        let mut subscribing = std::pin::pin!(work);
        let ended = std::future::poll_fn(|cx| {
            if subscribing.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            poll_stream(sock, cx, outbox, cursor).map(Some)
        })
        .await;
        if let Some(end) = ended {
            // Nothing more is written: what the subscribe still queues is dropped (a close asked
            // for meanwhile is kept for the end).
            let mut late = None;
            std::future::poll_fn(|cx| {
                if subscribing.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(());
                }
                let mut batch = Vec::new();
                loop {
                    match outbox.poll_next(cx, &mut batch) {
                        Poll::Ready(Next::Batch) => batch.clear(),
                        Poll::Ready(Next::Close(c)) => {
                            late.get_or_insert(c);
                            break;
                        }
                        Poll::Pending => break,
                    }
                }
                Poll::Pending
            })
            .await;
            return Some((end, late));
        }
    }
    None
}

/// Writes what is still pending (the close event, the end of the body), shuts the write side
/// and waits for the client to close, all within [`CLOSE_GRACE`]; a client that does not get
/// there in time is reset, so no kernel buffer outlives the stream.
async fn finish(mut sock: SseSocket, outbox: &Outbox) {
    let clean = tokio::time::timeout(CLOSE_GRACE, async {
        std::future::poll_fn(|cx| sock.poll_write_pending(cx, outbox)).await?;
        SockRef::from(&sock.io).shutdown(Shutdown::Write)?;
        std::future::poll_fn(|cx| sock.poll_closed(cx)).await;
        io::Result::Ok(())
    })
    .await;
    if !matches!(clean, Ok(Ok(()))) {
        sock.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(events: &[u8], chunked: bool) -> Vec<u8> {
        let mut out = vec![0; CHUNK_HEAD];
        out.extend_from_slice(events);
        let begin = frame(&mut out, chunked);
        out[begin..].to_vec()
    }

    #[test]
    fn a_batch_is_one_chunk_and_nothing_is_no_chunk() {
        assert_eq!(framed(b": ping\n\n", true), b"8\r\n: ping\n\n\r\n");
        assert_eq!(framed(b": ping\n\n", false), b": ping\n\n");
        let big = vec![b'x'; 0x12345];
        let chunk = framed(&big, true);
        assert!(chunk.starts_with(b"12345\r\nxxx") && chunk.ends_with(b"xxx\r\n"));
        assert_eq!(chunk.len(), 7 + big.len() + 2);
        assert!(framed(b"", true).is_empty(), "an empty chunk would end the body");
    }
}
