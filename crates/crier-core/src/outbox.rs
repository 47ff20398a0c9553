//! A connection's bounded outbound queue.
//!
//! Producers (the hub's fan-out, the session's replies) push already-encoded frames; the
//! connection's task drains everything queued in one go and writes it with one flush. One waker
//! slot (the connection task is the only consumer) instead of a notifier per connection.
//! The queue is bounded in bytes (`client_queue_max_bytes`): a push that would exceed it closes
//! the connection with 4009 (slow consumer) and drops what was queued, so a consumer that does
//! not read can never slow the publisher or any other subscriber. Critical sections are a few
//! pointer moves; no lock is held across an await.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use crier_protocol::CloseCode;

/// An item for the writer.
#[derive(Debug, Clone)]
pub enum Out {
    /// A text frame (valid UTF-8 JSON).
    Frame(Bytes),
    /// A WebSocket Ping.
    Ping,
}

/// How a connection is to be closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    pub reason: String,
}

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

#[derive(Default)]
struct State {
    queue: VecDeque<Out>,
    bytes: usize,
    close: Option<Close>,
    closing: bool,
    aborted: bool,
    /// The connection task, parked until there is something for it.
    waker: Option<Waker>,
}

impl State {
    fn take_waker(&mut self) -> Option<Waker> {
        self.waker.take()
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(w) = waker {
        w.wake();
    }
}

/// See the module docs.
pub struct Outbox {
    state: Mutex<State>,
    max_bytes: usize,
}

impl Outbox {
    pub fn new(max_bytes: usize) -> Outbox {
        Outbox { state: Mutex::new(State::default()), max_bytes }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another thread panicked mid-push; the queue is still sound.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a frame.
    pub fn push(&self, frame: Bytes) -> Push {
        let mut s = self.lock();
        if s.closing {
            return Push::Closed;
        }
        if s.bytes + frame.len() > self.max_bytes {
            s.queue.clear();
            s.bytes = 0;
            s.closing = true;
            s.aborted = true;
            s.close = Some(Close { code: CloseCode::SLOW_CONSUMER, reason: "slow consumer".into() });
            let waker = s.take_waker();
            drop(s);
            wake(waker);
            return Push::Overflow;
        }
        s.bytes += frame.len();
        s.queue.push_back(Out::Frame(frame));
        let waker = s.take_waker();
        drop(s);
        wake(waker);
        Push::Queued
    }

    /// Pushes several frames atomically with respect to other pushers (used for ack + recovered
    /// messages). Stops at the first frame that does not fit.
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

    /// Queues a WebSocket Ping (not counted against the byte bound).
    pub fn ping(&self) {
        let mut s = self.lock();
        if !s.closing {
            s.queue.push_back(Out::Ping);
            let waker = s.take_waker();
            drop(s);
            wake(waker);
        }
    }

    /// Asks the writer to close the connection. With `flush`, frames already queued are written
    /// first; otherwise they are dropped. The first close wins; returns whether this one did.
    pub fn close(&self, code: CloseCode, reason: impl Into<String>, flush: bool) -> bool {
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
        s.close = Some(Close { code, reason: reason.into() });
        let waker = s.take_waker();
        drop(s);
        wake(waker);
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

    /// Appends every queued item to `batch` (`Ready(Batch)`), or gives the close once the queue
    /// is empty (`Ready(Close)`), or parks the caller. Only the connection's task calls this.
    pub fn poll_next(&self, cx: &mut Context<'_>, batch: &mut Vec<Out>) -> Poll<Next> {
        let mut s = self.lock();
        if !s.queue.is_empty() {
            batch.extend(s.queue.drain(..));
            s.bytes = 0;
            return Poll::Ready(Next::Batch);
        }
        if let Some(c) = s.close.take() {
            return Poll::Ready(Next::Close(c));
        }
        if s.closing {
            // The close was already handed out; nothing else will come.
            return Poll::Ready(Next::Close(Close { code: CloseCode::NORMAL, reason: String::new() }));
        }
        s.waker = Some(cx.waker().clone());
        Poll::Pending
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
        assert!(o.close(CloseCode::RESTART, "drain", true));
        assert!(!o.close(CloseCode::NORMAL, "second", false), "first close wins");
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
        assert_eq!(writer.await.ok(), Some(1));
    }
}
