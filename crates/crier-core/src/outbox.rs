//! A connection's bounded outbound queue.
//!
//! Producers (the hub's fan-out, the session's replies) push already-encoded frames; the
//! connection's task takes everything queued in one go and writes it with one flush. Taking
//! moves the queue out whole, so an idle outbox holds no allocation; the next push allocates a
//! fresh queue (the one per-subscriber allocation of a fan-out, once per batch, not per frame). One waker
//! slot (the connection task is the only consumer) instead of a notifier per connection.
//! The queue is bounded in bytes (`client_queue_max_bytes`): a push that would exceed it closes
//! the connection with 4009 (slow consumer) and drops what was queued, so a consumer that does
//! not read can never slow the publisher or any other subscriber. Critical sections are a few
//! pointer moves; no lock is held across an await.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use crier_protocol::{CloseCode, Encoding, StreamPosition};

/// An item for the writer.
#[derive(Debug, Clone)]
pub enum Out {
    /// A server frame, encoded in the connection's encoding.
    Frame(Bytes),
    /// A server frame compressed for permessage-deflate (RSV1; shared by every connection that
    /// negotiated it, see [`Outbox::set_deflate`]).
    Deflated(Bytes),
    /// A keep-alive is due: the transport sends its own (a WebSocket Ping).
    Ping,
}

/// How a connection is to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    /// The close frame's reason ([`CloseCode::reason`], or the one given to
    /// [`Outbox::close_with`]).
    pub reason: Cow<'static, str>,
}

/// A server-side request for the connection's own session (REST `subscribe`/`unsubscribe`, the
/// token's `subs` claim): the connection's task takes it ([`Outbox::poll_command`]) when no
/// request of its own is in flight and runs it on its session, in order with its other frames.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Subscribe the connection to `channel` (the server's word: no token check), recovering
    /// from `recover` when given.
    Subscribe { channel: Box<str>, recover: Option<StreamPosition> },
    /// Unsubscribe the connection from `channel`.
    Unsubscribe { channel: Box<str> },
}

/// Commands that may wait in one outbox; more are refused ([`Outbox::command`] returns false).
pub const MAX_COMMANDS: usize = 256;

/// Result of a push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The push would have exceeded the byte bound: the outbox is now closing with 4009.
    Overflow,
    /// The outbox was already closing; the frame was dropped.
    Closed,
}

/// What the writer gets next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Items were appended to the batch.
    Batch,
    /// Nothing more will be queued: send this close frame and stop.
    Close(Close),
}

/// What an outbox holds under its lock: the queued frames and their bytes, the close, the
/// wakers and the server commands (named apart from the client's public `State`).
#[derive(Default)]
struct Queued {
    queue: VecDeque<Out>,
    bytes: usize,
    close: Option<Close>,
    closing: bool,
    aborted: bool,
    /// The connection task, parked until there is something for it.
    waker: Option<Waker>,
    /// A producer parked until the queue has room ([`Outbox::room`]: paced recovery).
    room: Option<Waker>,
    /// Server commands waiting for the connection's task (boxed: one pointer while none wait).
    #[allow(clippy::box_collection)]
    commands: Option<Box<VecDeque<Command>>>,
}

impl Queued {
    fn take_waker(&mut self) -> Option<Waker> {
        self.waker.take()
    }

    /// The connection task's waker and that of a producer waiting for room, to wake once the
    /// lock is released (the outbox closes).
    fn take_wakers(&mut self) -> [Option<Waker>; 2] {
        [self.waker.take(), self.room.take()]
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

/// Milliseconds on the process's monotonic clock (counted from its first use); never 0.
pub fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// What a connection's heartbeat check found (see [`Outbox::heartbeat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Nothing to do.
    Alive,
    /// A ping is due; it is now recorded as sent.
    Ping,
    /// The last ping went unanswered for the whole timeout.
    TimedOut,
    /// The token expired (reported once).
    Expired,
}

/// See the module docs. Besides the queue it carries the connection's liveness (when the client
/// was last heard from, when a ping went out, when its token expires) as atomics: the node checks
/// every connection from one periodic sweep instead of each connection keeping its own timers.
pub struct Outbox {
    state: Mutex<Queued>,
    max_bytes: usize,
    /// [`clock_ms`] when the client last sent anything.
    last_seen: AtomicU64,
    /// [`clock_ms`] of the last ping sent (0: none yet).
    ping_sent: AtomicU64,
    /// [`clock_ms`] at which the token expires (`u64::MAX`: never).
    expires: AtomicU64,
    /// The connection's encoding: the hub queues `message` frames in it.
    encoding: Encoding,
    /// permessage-deflate: shared frames of at least this many bytes go compressed
    /// (`usize::MAX`: not negotiated).
    deflate_min: AtomicUsize,
    /// permessage-deflate: the server window negotiated (`server_max_window_bits`, 8..=15).
    deflate_window: AtomicU8,
}

impl Outbox {
    /// An outbox for a JSON connection.
    pub fn new(max_bytes: usize) -> Outbox {
        Outbox::with_encoding(max_bytes, Encoding::Json)
    }

    /// An outbox for a connection speaking `encoding` (the hub converts each `message` frame to
    /// it once per node and shares the result).
    pub fn with_encoding(max_bytes: usize, encoding: Encoding) -> Outbox {
        Outbox {
            state: Mutex::new(Queued::default()),
            max_bytes,
            last_seen: AtomicU64::new(clock_ms()),
            ping_sent: AtomicU64::new(0),
            expires: AtomicU64::new(u64::MAX),
            encoding,
            deflate_min: AtomicUsize::new(usize::MAX),
            deflate_window: AtomicU8::new(15),
        }
    }

    /// The connection's encoding.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The connection negotiated permessage-deflate: the hub queues its shared frames of at
    /// least `min_bytes` compressed ([`Out::Deflated`], compressed once per fan-out and server
    /// window) with a window of `window_bits` (the `server_max_window_bits` agreed, 8..=15).
    pub fn set_deflate(&self, min_bytes: usize, window_bits: u8) {
        self.deflate_window.store(window_bits, Ordering::Relaxed);
        self.deflate_min.store(min_bytes, Ordering::Relaxed);
    }

    /// The server window negotiated with permessage-deflate (15 unless the client asked for less).
    pub fn deflate_window_bits(&self) -> u8 {
        self.deflate_window.load(Ordering::Relaxed)
    }

    /// The smallest frame sent compressed; `None` without permessage-deflate.
    pub fn deflate_min(&self) -> Option<usize> {
        let min = self.deflate_min.load(Ordering::Relaxed);
        (min != usize::MAX).then_some(min)
    }

    /// The client was heard from (any frame counts as proof of life).
    pub fn touch(&self) {
        self.last_seen.store(clock_ms(), Ordering::Relaxed);
    }

    /// Sets when the token expires, in [`clock_ms`] (`u64::MAX`: never).
    pub fn set_expiry(&self, at_ms: u64) {
        self.expires.store(at_ms, Ordering::Relaxed);
    }

    /// The heartbeat rule, checked by the node's sweep at `now` ([`clock_ms`]): a ping once the
    /// client has been silent for `interval_ms`; `TimedOut` when a ping went unanswered for
    /// `timeout_ms`; `Expired` once the token's expiry has passed. The caller acts on the result.
    pub fn heartbeat(&self, now: u64, interval_ms: u64, timeout_ms: u64) -> Beat {
        if now >= self.expires.load(Ordering::Relaxed) {
            self.expires.store(u64::MAX, Ordering::Relaxed);
            return Beat::Expired;
        }
        let seen = self.last_seen.load(Ordering::Relaxed);
        let ping = self.ping_sent.load(Ordering::Relaxed);
        if ping > seen {
            if now >= ping + timeout_ms { Beat::TimedOut } else { Beat::Alive }
        } else if now >= seen + interval_ms {
            self.ping_sent.store(now, Ordering::Relaxed);
            Beat::Ping
        } else {
            Beat::Alive
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queued> {
        // A poisoned lock only means another thread panicked mid-push; the queue is still sound.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame.
    pub fn push(&self, frame: Bytes) -> Push {
        self.push_out(Out::Frame(frame))
    }

    /// Queues a frame, plain or compressed ([`Out::Ping`] is [`Outbox::ping`]'s).
    pub fn push_out(&self, item: Out) -> Push {
        let len = match &item {
            Out::Frame(f) | Out::Deflated(f) => f.len(),
            Out::Ping => return Push::Queued,
        };
        let mut s = self.lock();
        if s.closing {
            return Push::Closed;
        }
        if s.bytes + len > self.max_bytes {
            s.queue.clear();
            s.bytes = 0;
            s.closing = true;
            s.aborted = true;
            s.commands = None;
            s.close = Some(Close {
                code: CloseCode::SLOW_CONSUMER,
                reason: Cow::Borrowed(CloseCode::SLOW_CONSUMER.reason()),
            });
            let wakers = s.take_wakers();
            drop(s);
            wakers.into_iter().for_each(wake);
            return Push::Overflow;
        }
        s.bytes += len;
        s.queue.push_back(item);
        let waker = s.take_waker();
        drop(s);
        wake(waker);
        Push::Queued
    }

    /// Pushes several frames in order (ack + recovered messages), stopping at the first that does
    /// not fit. Not atomic by itself: another pusher may interleave between two frames. The
    /// recovery merge gets its order from the hub, which calls this under the channel's shard
    /// lock that live fan-out also takes.
    pub fn push_all(&self, frames: impl IntoIterator<Item = Bytes>) -> Push {
        let mut last = Push::Queued;
        for f in frames {
            last = self.push(f);
            if last != Push::Queued {
                break;
            }
        }
        last
    }

    /// Queues a keep-alive ([`Out::Ping`]; not counted against the byte bound).
    pub fn ping(&self) {
        let mut s = self.lock();
        if !s.closing {
            s.queue.push_back(Out::Ping);
            let waker = s.take_waker();
            drop(s);
            wake(waker);
        }
    }

    /// Asks the writer to close the connection with `code` and its reason from the close-code
    /// table. When the code [flushes the queue](CloseCode::flushes_queue), frames already queued
    /// are written first; otherwise they are dropped. The first close wins; returns whether this
    /// one did.
    pub fn close(&self, code: CloseCode) -> bool {
        self.close_with(code, Cow::Borrowed(code.reason()))
    }

    /// [`Outbox::close`] with a reason of the caller's (REST `disconnect`; at most 123 bytes,
    /// what a close frame holds — the caller checks).
    pub fn close_with(&self, code: CloseCode, reason: Cow<'static, str>) -> bool {
        let flush = code.flushes_queue();
        let mut s = self.lock();
        if s.closing {
            return false;
        }
        s.closing = true;
        if !flush {
            s.queue.clear();
            s.bytes = 0;
            s.aborted = true;
        }
        s.commands = None;
        s.close = Some(Close { code, reason });
        let wakers = s.take_wakers();
        drop(s);
        wakers.into_iter().for_each(wake);
        true
    }

    /// Ready once a close that drops queued data was requested (slow consumer, heartbeat
    /// timeout...): a writer blocked on a socket that does not drain checks this.
    pub fn poll_aborted(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if s.aborted {
            return Poll::Ready(());
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The requested close, if any and not handed out yet (for a connection ending on its own
    /// after a read error or a stuck write: what to tell the client).
    pub fn take_close(&self) -> Option<Close> {
        self.lock().close.take()
    }

    /// True once a close was requested.
    pub fn is_closing(&self) -> bool {
        self.lock().closing
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The byte bound (`client_queue_max_bytes`).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// `Ready(true)` once `bytes` more fit in the queue (or the queue is empty: a frame larger
    /// than the bound then overflows as any push would); `Ready(false)` once the outbox is
    /// closing (nothing more will be written). Otherwise parks the caller until the writer takes
    /// the queue or the outbox closes. For a producer that paces itself by the connection's
    /// drain (recovery larger than the queue, [`crate::node::Node::subscribe`]): one waiter at a
    /// time.
    pub fn poll_room(&self, cx: &mut Context<'_>, bytes: usize) -> Poll<bool> {
        let mut s = self.lock();
        if s.closing {
            return Poll::Ready(false);
        }
        if self.fits(s.bytes, bytes) {
            return Poll::Ready(true);
        }
        s.room = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Whether `bytes` more fit in the queue now (as [`Outbox::poll_room`] judges it).
    pub fn has_room(&self, bytes: usize) -> bool {
        self.fits(self.lock().bytes, bytes)
    }

    /// With `queued` bytes queued, whether `bytes` more fit: within the bound, or into an empty
    /// queue (a frame larger than the bound then overflows as any push would).
    fn fits(&self, queued: usize, bytes: usize) -> bool {
        queued == 0 || queued + bytes <= self.max_bytes
    }

    /// Async form of [`Outbox::poll_room`]: `true` when there is room, `false` when closing.
    pub async fn room(&self, bytes: usize) -> bool {
        std::future::poll_fn(|cx| self.poll_room(cx, bytes)).await
    }

    /// Appends every queued item to `batch` (`Ready(Batch)`), or gives the close once the queue
    /// is empty (`Ready(Close)`), or parks the caller. Only the connection's task calls this.
    /// Into an empty `batch` the queue moves whole, leaving the outbox without an allocation
    /// (an idle connection holds no queue memory once the caller drops the batch).
    pub fn poll_next(&self, cx: &mut Context<'_>, batch: &mut Vec<Out>) -> Poll<Next> {
        let mut s = self.lock();
        if !s.queue.is_empty() {
            if batch.is_empty() {
                *batch = Vec::from(std::mem::take(&mut s.queue));
            } else {
                batch.extend(s.queue.drain(..));
            }
            s.bytes = 0;
            // A producer waiting for room ([`Outbox::room`]) may go on.
            let room = s.room.take();
            drop(s);
            wake(room);
            return Poll::Ready(Next::Batch);
        }
        if let Some(c) = s.close.take() {
            return Poll::Ready(Next::Close(c));
        }
        if s.closing {
            // The close was already handed out; nothing else will come.
            return Poll::Ready(Next::Close(Close { code: CloseCode::NORMAL, reason: Cow::Borrowed("") }));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Queues a server command for the connection's task (and wakes it); `false` when the
    /// outbox is closing or [`MAX_COMMANDS`] already wait.
    pub fn command(&self, command: Command) -> bool {
        let mut s = self.lock();
        if s.closing {
            return false;
        }
        let queue = s.commands.get_or_insert_with(Box::default);
        if queue.len() >= MAX_COMMANDS {
            return false;
        }
        queue.push_back(command);
        let waker = s.take_waker();
        drop(s);
        wake(waker);
        true
    }

    /// `Ready` while a server command waits ([`Outbox::take_command`] takes it); otherwise parks
    /// the caller (the connection's task, in the same waker slot as [`Outbox::poll_next`]: call
    /// both in one poll, this one first). Never ready once the outbox is closing. (A signal, not
    /// the command: what the task holds across its idle wait stays small.)
    pub fn poll_command(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.lock();
        if !s.closing && s.commands.as_ref().is_some_and(|q| !q.is_empty()) {
            return Poll::Ready(());
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// The next server command, if one waits.
    pub fn take_command(&self) -> Option<Command> {
        let mut s = self.lock();
        if s.closing {
            return None;
        }
        let queue = s.commands.as_mut()?;
        let command = queue.pop_front();
        if queue.is_empty() {
            s.commands = None;
        }
        command
    }

    /// Async form of [`Outbox::poll_next`].
    pub async fn next(&self, batch: &mut Vec<Out>) -> Next {
        std::future::poll_fn(|cx| self.poll_next(cx, batch)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batches_and_bounds() {
        let o = Outbox::new(10);
        assert_eq!(o.push(Bytes::from_static(b"12345")), Push::Queued);
        assert_eq!(o.push(Bytes::from_static(b"12345")), Push::Queued);
        let mut batch = Vec::new();
        assert_eq!(o.next(&mut batch).await, Next::Batch);
        assert_eq!(batch.len(), 2);
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.push(Bytes::from_static(b"1234567")), Push::Queued);
        assert_eq!(o.push(Bytes::from_static(b"1234")), Push::Overflow);
        assert_eq!(o.push(Bytes::from_static(b"1")), Push::Closed);
        batch.clear();
        match o.next(&mut batch).await {
            Next::Close(c) => assert_eq!(c.code, CloseCode::SLOW_CONSUMER),
            other => panic!("expected close, got {other:?}"),
        }
        assert!(batch.is_empty(), "overflow drops what was queued");
    }

    #[tokio::test]
    async fn flush_close_writes_queue_first() {
        let o = Outbox::new(100);
        o.push(Bytes::from_static(b"a"));
        assert!(o.close(CloseCode::RESTART));
        assert!(!o.close(CloseCode::RATE_LIMITED), "first close wins");
        let mut batch = Vec::new();
        assert_eq!(o.next(&mut batch).await, Next::Batch);
        assert!(matches!(o.next(&mut batch).await, Next::Close(Close { code: CloseCode::RESTART, .. })));
    }

    #[tokio::test]
    async fn wakes_waiting_writer() {
        let o = std::sync::Arc::new(Outbox::new(100));
        let o2 = o.clone();
        let writer = tokio::spawn(async move {
            let mut batch = Vec::new();
            o2.next(&mut batch).await;
            batch.len()
        });
        tokio::task::yield_now().await;
        o.push(Bytes::from_static(b"x"));
        // Bounded: a lost wake-up fails the test instead of hanging it.
        let woken = tokio::time::timeout(std::time::Duration::from_secs(10), writer).await;
        assert_eq!(woken.ok().and_then(Result::ok), Some(1), "the push woke the waiting writer within 10s");
    }

    #[tokio::test]
    async fn commands_wake_the_task_queue_in_order_are_bounded_and_end_with_a_close() {
        let o = std::sync::Arc::new(Outbox::new(100));
        let o2 = o.clone();
        let task = tokio::spawn(async move {
            std::future::poll_fn(|cx| o2.poll_command(cx)).await;
            o2.take_command()
        });
        tokio::task::yield_now().await;
        let sub = Command::Subscribe { channel: "a".into(), recover: None };
        assert!(o.command(sub.clone()));
        let woken = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
        assert_eq!(woken.ok().and_then(Result::ok), Some(Some(sub)), "the command woke the task within 10s");
        assert_eq!(o.take_command(), None);
        for i in 0..MAX_COMMANDS {
            assert!(o.command(Command::Unsubscribe { channel: i.to_string().into() }));
        }
        assert!(!o.command(Command::Unsubscribe { channel: "over".into() }), "bounded");
        assert_eq!(o.take_command(), Some(Command::Unsubscribe { channel: "0".into() }), "in order");
        o.close(CloseCode::DISCONNECTED);
        assert_eq!(o.take_command(), None, "a close drops what waits");
        assert!(!o.command(Command::Unsubscribe { channel: "late".into() }));
    }

    #[test]
    fn a_slow_consumer_close_drops_the_waiting_commands() {
        let o = Outbox::new(10);
        assert!(o.command(Command::Subscribe { channel: "a".into(), recover: None }));
        assert_eq!(o.push(Bytes::from_static(b"more than ten bytes")), Push::Overflow);
        assert!(o.poll_command(&mut Context::from_waker(Waker::noop())).is_pending(), "nothing to run once closing");
        assert_eq!(o.take_command(), None);
    }

    #[test]
    fn heartbeat_pings_after_silence_and_times_out_without_an_answer() {
        let o = Outbox::new(100);
        let t0 = o.last_seen.load(Ordering::Relaxed);
        assert_eq!(o.heartbeat(t0 + 99, 100, 50), Beat::Alive);
        assert_eq!(o.heartbeat(t0 + 100, 100, 50), Beat::Ping);
        assert_eq!(o.heartbeat(t0 + 149, 100, 50), Beat::Alive, "waiting for the pong");
        assert_eq!(o.heartbeat(t0 + 150, 100, 50), Beat::TimedOut);
        // An answer (any frame) after the ping resets the cycle.
        o.last_seen.store(t0 + 160, Ordering::Relaxed);
        assert_eq!(o.heartbeat(t0 + 200, 100, 50), Beat::Alive);
        assert_eq!(o.heartbeat(t0 + 260, 100, 50), Beat::Ping);
        o.set_expiry(t0 + 300);
        assert_eq!(o.heartbeat(t0 + 300, 100, 50), Beat::Expired);
        assert_ne!(o.heartbeat(t0 + 301, 100, 50), Beat::Expired, "reported once");
    }
}
