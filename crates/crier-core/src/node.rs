//! Subscribe and unsubscribe for one connection: hub and broker together.
//!
//! Rules: a node holds one broker subscription per channel, however many local subscribers it
//! has. The first local subscriber makes it (concurrent newcomers wait for the same attempt; a
//! failure removes the newcomer again), the last one leaving releases it (the broker re-checks
//! that the channel is still empty, so a late unsubscribe cannot undo a newer subscribe).

use std::sync::Arc;

use bytes::Bytes;
use crier_protocol::StreamPosition;

use crate::ConnId;
use crier_protocol::CloseCode;

use crate::broker::{Broker, History, Publication};
use crate::hub::{Activation, AlreadySubscribed, Hub};
use crate::outbox::{Out, Outbox, Push};

/// Why a subscribe failed.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("already subscribed")]
    AlreadySubscribed,
    #[error("{0}")]
    Unavailable(String),
    /// The connection is closing (its outbox overflowed or was closed meanwhile).
    #[error("connection closing")]
    Closed,
}

/// The outcome of a successful subscribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscribed {
    pub epoch: String,
    pub offset: u64,
    /// `Some` when recovery was asked for.
    pub recovered: Option<bool>,
    /// Messages replayed by recovery.
    pub replayed: usize,
}

/// Broker-bound client requests (subscribe, history, ...) a node works on at once; more wait
/// for a slot (see [`Node::broker_slot`]). 32: in the peers rig's `mem` shape 256 → 64 took
/// ~350 B per subscribed connection off and 64 → 32 another ~35 B, while 10,000 subscribes
/// still take ~1.1 s; 16 saves ~70 B but slows that burst by ~30%. (HTTP publishes take no
/// slot; a WebSocket publish holds one for its Redis round trip.)
pub const BROKER_REQUESTS_IN_FLIGHT: usize = 32;

/// Messages per history read of a paced recovery unless set ([`Node::with_recovery_page`]).
pub const DEFAULT_RECOVERY_PAGE: usize = 16;

/// Where a paced recovery is: the last offset queued, and the channel's top as of the latest
/// history read.
struct Pager {
    epoch: String,
    top: u64,
    pos: u64,
}

/// The node: its hub and its broker.
#[derive(Clone)]
pub struct Node {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    slots: Arc<tokio::sync::Semaphore>,
    recovery_page: usize,
}

impl Node {
    pub fn new(hub: Arc<Hub>, broker: Arc<dyn Broker>) -> Node {
        Node {
            hub,
            broker,
            slots: Arc::new(tokio::sync::Semaphore::new(BROKER_REQUESTS_IN_FLIGHT)),
            recovery_page: DEFAULT_RECOVERY_PAGE,
        }
    }

    /// Messages per history read of a paced recovery (at least 1). The server uses
    /// `client_queue_max_bytes / max_message_bytes`: a page then fits the queue.
    pub fn with_recovery_page(mut self, messages: usize) -> Node {
        self.recovery_page = messages.max(1);
        self
    }

    /// Waits for one of the node's [`BROKER_REQUESTS_IN_FLIGHT`] slots; hold it while a client
    /// request works with the broker, and take it *before* allocating that work's future.
    ///
    /// Why: when every client of a node subscribes at once (10,000 in the peers rig), each
    /// request's future (presence, broker subscribe, history read; ~4 KiB with the Redis
    /// broker's calls) would be alive at the same time, and the allocator keeps that peak as
    /// resident memory long after (`malloc_stats`: 27 MB mapped for 11 MB in use). With a bound,
    /// the peak is a few hundred futures; the Redis broker batches what it is sent anyway, so
    /// the burst takes no longer.
    pub async fn broker_slot(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.slots.acquire().await.ok()
    }

    /// Subscribes `conn` to `channel`. `ack` builds the acknowledgement frame from the channel's
    /// position and the recovery outcome; it is queued before any message of the channel. With
    /// `recover`, the missed messages follow the ack (when the history still holds all of them),
    /// then live messages, with no gap and no duplicate.
    ///
    /// Paced: the missed messages are read from the history a page at a time
    /// ([`Node::with_recovery_page`]) and each is queued only when the outbox has room for it, so
    /// a recovery of any size (up to what the history keeps) flows at the pace the connection
    /// drains, and the connection's memory stays about its queue bound (the queue, one page, the
    /// hub's bounded buffer of live messages). The caller must keep the connection's writer
    /// running meanwhile. Live messages arriving meanwhile wait in the hub's buffer; when they
    /// outgrow it, the oldest are dropped and the pages continue from the history until they
    /// reach what is still buffered ([`Hub::try_activate`]). If the history no longer holds the
    /// next message mid-way (trimmed: live traffic outran the client), the connection is closed
    /// with 4009 (slow consumer); if the broker fails mid-way (after the ack), with 1011.
    pub async fn subscribe(
        &self,
        channel: &str,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        recover: Option<&StreamPosition>,
        ack: impl FnOnce(&History, Option<bool>) -> Bytes,
    ) -> Result<Subscribed, SubscribeError> {
        self.subscribe_holding(channel, conn, outbox, recover, ack, None).await
    }

    /// [`Node::subscribe`] for a request holding one of the node's broker slots
    /// ([`Node::broker_slot`]): the slot is given back once the first history read is done, so
    /// a recovery paced by a slow reader never holds one while it waits for room (each further
    /// page read takes one again for its call).
    pub async fn subscribe_holding(
        &self,
        channel: &str,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        recover: Option<&StreamPosition>,
        ack: impl FnOnce(&History, Option<bool>) -> Bytes,
        slot: Option<tokio::sync::SemaphorePermit<'_>>,
    ) -> Result<Subscribed, SubscribeError> {
        let ready = self
            .hub
            .add(channel, conn, outbox.clone())
            .map_err(|AlreadySubscribed| SubscribeError::AlreadySubscribed)?;
        if let Some(ready) = ready {
            if let Err(e) = ready.get_or_try_init(|| self.broker.subscribe(channel)).await {
                self.unsubscribe(channel, conn).await;
                return Err(SubscribeError::Unavailable(e.to_string()));
            }
            self.hub.broker_ready(channel, &ready);
        }
        let limit = if recover.is_some() { self.recovery_page } else { 0 };
        let first = match self.broker.history(channel, recover, limit).await {
            Ok(h) => h,
            Err(e) => {
                self.unsubscribe(channel, conn).await;
                return Err(SubscribeError::Unavailable(e.to_string()));
            }
        };
        drop(slot);
        let recovered = recover.map(|_| !first.gap);
        // Still buffering: nothing of the channel reaches the outbox before the ack.
        if outbox.push(ack(&first, recovered)) != Push::Queued {
            self.unsubscribe(channel, conn).await;
            return Err(SubscribeError::Closed);
        }
        let subscribed = Subscribed { epoch: first.epoch.clone(), offset: first.offset, recovered, replayed: 0 };
        // Replay from the client's position when recovered; otherwise nothing (from the top).
        let (pos, page) = match recover.filter(|_| recovered == Some(true)) {
            Some(since) => (since.offset, first.publications),
            None => (first.offset, Vec::new()),
        };
        let pager = Pager { epoch: first.epoch, top: first.offset, pos };
        match self.replay(channel, conn, outbox, pager, page).await {
            Ok(replayed) => Ok(Subscribed { replayed, ..subscribed }),
            Err(code) => {
                if let Some(code) = code {
                    outbox.close(code);
                }
                self.unsubscribe(channel, conn).await;
                Err(SubscribeError::Closed)
            }
        }
    }

    /// Queues `page`, then further pages, until the hub's buffer continues the stream; then
    /// the subscriber goes live. Returns how many messages were replayed, or the close code
    /// to close the connection with (`None`: it is already closing).
    async fn replay(
        &self,
        channel: &str,
        conn: ConnId,
        outbox: &Outbox,
        mut at: Pager,
        mut page: Vec<Publication>,
    ) -> Result<usize, Option<CloseCode>> {
        let mut replayed = 0;
        // History reads in a row that brought nothing while the buffer was ahead.
        let mut idle_reads = 0;
        loop {
            let fetched = page.len();
            for p in page {
                if p.offset <= at.pos {
                    continue;
                }
                if p.offset != at.pos + 1 {
                    return Err(Some(CloseCode::SLOW_CONSUMER));
                }
                // The form a live message takes on this connection (its encoding; compressed when
                // it negotiated permessage-deflate and the frame is large enough), built once per
                // node for every connection recovering this message.
                let item = self.hub.recovered_out(channel, &p, outbox);
                let len = match &item {
                    Out::Frame(f) | Out::Deflated(f) => f.len(),
                    Out::Ping => 0,
                };
                if !outbox.room(len).await || outbox.push_out(item) != Push::Queued {
                    return Err(None);
                }
                at.pos = p.offset;
                replayed += 1;
            }
            loop {
                match self.hub.try_activate(channel, conn, (&at.epoch, at.pos), at.pos >= at.top) {
                    Activation::Live => return Ok(replayed),
                    Activation::Gone => return Err(None),
                    Activation::Room(bytes) => {
                        if !outbox.room(bytes).await {
                            return Err(None);
                        }
                    }
                    Activation::Behind => break,
                }
            }
            idle_reads = if fetched == 0 { idle_reads + 1 } else { 0 };
            if idle_reads > 3 {
                // The history keeps bringing nothing new while the buffer is ahead: live
                // traffic outruns every read (or the broker broke its promise); do not spin.
                return Err(Some(CloseCode::SLOW_CONSUMER));
            }
            let since = StreamPosition { epoch: at.epoch.clone(), offset: at.pos };
            let read = async {
                let _slot = self.broker_slot().await;
                self.broker.history(channel, Some(&since), self.recovery_page).await
            };
            let next = match read.await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "history read failed mid-recovery");
                    return Err(Some(CloseCode::INTERNAL));
                }
            };
            if next.gap || next.epoch != at.epoch || (next.publications.is_empty() && next.offset > at.pos) {
                // The history lost what comes next: live traffic outran this client.
                return Err(Some(CloseCode::SLOW_CONSUMER));
            }
            at.top = next.offset;
            page = next.publications;
        }
    }
    /// Removes `conn` from `channel`, releasing the broker subscription if it was the last one.
    pub async fn unsubscribe(&self, channel: &str, conn: ConnId) {
        if self.hub.remove(channel, conn)
            && let Err(e) = self.broker.unsubscribe(channel).await
        {
            tracing::warn!(error = %e, "broker unsubscribe failed");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::broker::{MemoryBroker, PublishOptions};
    use crate::outbox::{Next, Out};
    use proptest::prelude::*;
    use std::future::Future;
    use std::time::Duration;

    /// The offsets of the messages in `batch`.
    fn offsets(batch: &[Out]) -> Vec<u64> {
        message_offsets(batch).into_iter().filter_map(|x| u64::try_from(x).ok()).collect()
    }

    #[tokio::test]
    async fn recover_then_live_in_order() {
        let hub = Arc::new(Hub::new());
        let broker = MemoryBroker::new(100, Duration::from_secs(60));
        broker.set_handler(hub.clone());
        let node = Node::new(hub.clone(), broker.clone());
        let mut epoch = String::new();
        for i in 0..5 {
            epoch = broker
                .publish("c", &i.to_string(), PublishOptions::default())
                .await
                .map(|r| r.epoch)
                .unwrap_or_default();
        }
        let o = Arc::new(Outbox::new(1 << 20));
        let pos = StreamPosition { epoch: epoch.clone(), offset: 2 };
        let s = node.subscribe("c", 1, &o, Some(&pos), |_, _| Bytes::from_static(b"{\"type\":\"ack\"}")).await;
        assert_eq!(s.ok().map(|s| (s.recovered, s.replayed)), Some((Some(true), 3)));
        let _ = broker.publish("c", "5", PublishOptions::default()).await;
        let mut batch = Vec::new();
        assert_eq!(o.next(&mut batch).await, Next::Batch);
        assert_eq!(offsets(&batch), vec![3, 4, 5, 6]);
        // Wrong epoch: not recovered, nothing replayed.
        let o2 = Arc::new(Outbox::new(1 << 20));
        let bad = StreamPosition { epoch: "nope".into(), offset: 2 };
        let s = node.subscribe("c", 2, &o2, Some(&bad), |_, _| Bytes::from_static(b"{}")).await;
        assert_eq!(s.ok().map(|s| (s.recovered, s.replayed, s.offset)), Some((Some(false), 0, 6)));
        assert!(matches!(
            node.subscribe("c", 2, &o2, None, |_, _| Bytes::new()).await,
            Err(SubscribeError::AlreadySubscribed)
        ));
        node.unsubscribe("c", 1).await;
        node.unsubscribe("c", 2).await;
        assert!(!hub.has_channel("c"));
    }

    /// The offsets of the messages in `batch`, an ack as -1.
    fn message_offsets(batch: &[Out]) -> Vec<i64> {
        batch
            .iter()
            .filter_map(|o| match o {
                Out::Frame(f) => serde_json::from_slice::<serde_json::Value>(f).ok(),
                Out::Ping | Out::Deflated(_) => None,
            })
            .filter_map(|v| match v["type"].as_str() {
                Some("message") => v["offset"].as_i64(),
                Some("ack") => Some(-1),
                _ => None,
            })
            .collect()
    }

    /// A node over a memory broker keeping `history` messages on "c", recovering `page` at a
    /// time, after `published` messages of ~1 KB: the node, the message, the channel's epoch.
    async fn paging_node(
        history: usize,
        page: usize,
        published: usize,
    ) -> (Arc<Hub>, Arc<MemoryBroker>, Node, String, String) {
        let hub = Arc::new(Hub::new());
        let broker = MemoryBroker::new(history, Duration::from_secs(60));
        broker.set_handler(hub.clone());
        let node = Node::new(hub.clone(), broker.clone()).with_recovery_page(page);
        let big = format!("\"{}\"", "x".repeat(1000));
        let mut epoch = String::new();
        for _ in 0..published {
            epoch = broker.publish("c", &big, PublishOptions::default()).await.map(|r| r.epoch).unwrap_or_default();
        }
        (hub, broker, node, big, epoch)
    }

    /// A recovery many times the queue: paced by the drain, never closed, everything once.
    #[tokio::test]
    async fn recovery_larger_than_the_queue_is_paced_by_the_drain() {
        let (hub, broker, node, big, epoch) = paging_node(100, 3, 20).await;
        // Room for about two messages.
        let o = Arc::new(Outbox::new(2500));
        let pos = StreamPosition { epoch, offset: 0 };
        let ack = |_: &History, _| Bytes::from_static(b"{\"type\":\"ack\"}");
        let subscribe = node.subscribe("c", 1, &o, Some(&pos), ack);
        let mut got = Vec::new();
        let drain = async {
            let mut batch = Vec::new();
            // Live messages race the recovery: published whenever the writer takes a batch.
            let mut published = 0;
            while got.iter().filter(|&&x| x >= 0).count() < 25 {
                batch.clear();
                match o.next(&mut batch).await {
                    Next::Batch => got.extend(message_offsets(&batch)),
                    Next::Close(c) => panic!("closed: {c:?}"),
                }
                if published < 5 {
                    let _ = broker.publish("c", &big, PublishOptions::default()).await;
                    published += 1;
                }
            }
        };
        let (s, ()) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(subscribe, drain) })
            .await
            .expect("the recovery finishes while the writer drains");
        assert!(matches!(s, Ok(Subscribed { recovered: Some(true), .. })), "{s:?}");
        let mut want = vec![-1];
        want.extend(1..=25);
        assert_eq!(got, want);
        assert!(!o.is_closing());
        assert!(hub.try_activate("c", 1, ("x", 0), true) == Activation::Live, "live");
    }

    /// The history is trimmed under a recovery that is still paging: 4009, not a silent gap.
    #[tokio::test]
    async fn recovery_overtaken_by_trimming_closes_as_slow_consumer() {
        let (hub, broker, node, big, epoch) = paging_node(10, 2, 10).await;
        let o = Arc::new(Outbox::new(2500));
        let pos = StreamPosition { epoch, offset: 0 };
        let subscribe = node.subscribe("c", 1, &o, Some(&pos), |_, _| Bytes::from_static(b"{\"type\":\"ack\"}"));
        let drain = async {
            let mut batch = Vec::new();
            loop {
                batch.clear();
                match o.next(&mut batch).await {
                    // 20 more while the first pages are read: the history moves past the pager.
                    Next::Batch => {
                        for _ in 0..20 {
                            let _ = broker.publish("c", &big, PublishOptions::default()).await;
                        }
                    }
                    Next::Close(c) => return c.code,
                }
            }
        };
        let (s, code) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(subscribe, drain) })
            .await
            .expect("ends");
        assert!(matches!(s, Err(SubscribeError::Closed)), "{s:?}");
        assert_eq!(code, CloseCode::SLOW_CONSUMER);
        assert!(!hub.has_channel("c"), "the subscriber was removed");
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        Publish,
        Drain,
        /// Poll the subscribe (the connection task polls it whenever woken).
        Poll,
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 512, ..Default::default() })]

        /// Paged recovery against the memory broker with a small queue, live publications and
        /// drains interleaved at random: the subscriber gets the ack, then every offset after its
        /// position once, in order — or, only when live traffic outran it, a 4009.
        #[test]
        fn paged_recovery_has_each_offset_once_in_order(
            before in 0u64..40,
            history_size in 1usize..40,
            back in proptest::option::of(0u64..50),
            queue_messages in 1usize..5,
            page in 1usize..6,
            steps in proptest::collection::vec(
                proptest::prop_oneof![2 => proptest::strategy::Just(Step::Publish), 2 => proptest::strategy::Just(Step::Drain), 2 => proptest::strategy::Just(Step::Poll)],
                0..150,
            ),
        ) {
            use std::task::{Context, Poll, Waker};
            let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let hub = Arc::new(Hub::new());
            let broker = MemoryBroker::new(history_size, Duration::from_secs(600));
            broker.set_handler(hub.clone());
            let node = Node::new(hub.clone(), broker.clone()).with_recovery_page(page);
            let data = format!("\"{}\"", "y".repeat(200));
            let publish = || rt.block_on(broker.publish("c", &data, PublishOptions::default())).ok();
            let mut top = 0;
            let mut epoch = String::new();
            for _ in 0..before {
                if let Some(r) = publish() {
                    (top, epoch) = (r.offset, r.epoch);
                }
            }
            let since = back.map(|b| StreamPosition { epoch: epoch.clone(), offset: top.saturating_sub(b) });
            let o = Arc::new(Outbox::new(300 * queue_messages));
            let mut fut = Box::pin(node.subscribe("c", 1, &o, since.as_ref(), |_, _| Bytes::from_static(b"{\"type\":\"ack\"}")));
            let mut cx = Context::from_waker(Waker::noop());
            let mut result = None;
            let mut got = Vec::new();
            let mut published_while_recovering = false;
            let drain = |got: &mut Vec<i64>| {
                let mut batch = Vec::new();
                if let Poll::Ready(Next::Batch) = o.poll_next(&mut Context::from_waker(Waker::noop()), &mut batch) {
                    got.extend(message_offsets(&batch));
                }
            };
            let mut last = top;
            // The subscribe reads the history when first polled: publications made before that
            // (a `Publish` step before the first poll) count against what the history still holds.
            let mut read_at: Option<u64> = None;
            for step in steps.iter().copied().chain(std::iter::repeat_n(Step::Drain, 1)) {
                match step {
                    Step::Publish => {
                        if let Some(r) = publish() {
                            last = r.offset;
                        }
                        published_while_recovering |= result.is_none();
                    }
                    Step::Drain => drain(&mut got),
                    Step::Poll => {}
                }
                if result.is_none() {
                    read_at.get_or_insert(last);
                    if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                        result = Some(r);
                    }
                }
            }
            // Finish: drain and poll until the subscribe is done (bounded).
            for _ in 0..1000 {
                if result.is_some() {
                    break;
                }
                drain(&mut got);
                if let Poll::Ready(r) = fut.as_mut().poll(&mut cx) {
                    result = Some(r);
                }
            }
            drain(&mut got);
            let result = result.expect("the subscribe finished while the writer drained");
            if o.is_closing() {
                prop_assert!(published_while_recovering || result.is_ok(), "closed without live traffic: {result:?}");
                return Ok(());
            }
            let s = result.expect("subscribed");
            prop_assert_eq!(got.first().copied(), Some(-1), "the ack first");
            let from = match (since.as_ref(), s.recovered) {
                (Some(p), Some(true)) => p.offset + 1,
                _ => s.offset + 1,
            };
            let want: Vec<i64> = (from..=last).map(|x| x as i64).collect();
            prop_assert_eq!(&got[1..], &want[..]);
            let oldest_kept = (read_at.unwrap_or(last) + 1).saturating_sub(history_size as u64).max(1);
            if let Some(p) = since.as_ref().filter(|_| before > 0) {
                prop_assert_eq!(s.recovered, Some(p.offset + 1 >= oldest_kept));
            }
        }
    }
}
