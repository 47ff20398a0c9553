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
use crate::broker::{Broker, History};
use crate::hub::{AlreadySubscribed, Hub};
use crate::outbox::Outbox;

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

/// The node: its hub and its broker.
#[derive(Clone)]
pub struct Node {
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Node {
    pub fn new(hub: Arc<Hub>, broker: Arc<dyn Broker>) -> Node {
        Node { hub, broker, slots: Arc::new(tokio::sync::Semaphore::new(BROKER_REQUESTS_IN_FLIGHT)) }
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
    pub async fn subscribe(
        &self,
        channel: &str,
        conn: ConnId,
        outbox: &Arc<Outbox>,
        recover: Option<&StreamPosition>,
        ack: impl FnOnce(&History, Option<bool>) -> Bytes,
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
        let limit = if recover.is_some() { usize::MAX } else { 0 };
        let history = match self.broker.history(channel, recover, limit).await {
            Ok(h) => h,
            Err(e) => {
                self.unsubscribe(channel, conn).await;
                return Err(SubscribeError::Unavailable(e.to_string()));
            }
        };
        let recovered = recover.map(|_| !history.gap);
        let mut frames = Vec::with_capacity(1 + history.publications.len());
        frames.push(ack(&history, recovered));
        let mut replayed = 0;
        if recovered == Some(true) {
            replayed = history.publications.len();
            let encoding = outbox.encoding();
            frames.extend(history.publications.iter().map(|p| encoding.frame_from_json(&p.frame)));
        }
        if !self.hub.activate(channel, conn, frames, (&history.epoch, history.offset)) {
            self.unsubscribe(channel, conn).await;
            return Err(SubscribeError::Closed);
        }
        Ok(Subscribed { epoch: history.epoch, offset: history.offset, recovered, replayed })
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
mod tests {
    use super::*;
    use crate::broker::{MemoryBroker, PublishOptions};
    use crate::outbox::{Next, Out};
    use std::time::Duration;

    fn offsets(batch: &[Out]) -> Vec<u64> {
        batch
            .iter()
            .filter_map(|o| match o {
                Out::Frame(f) => serde_json::from_slice::<serde_json::Value>(f).ok(),
                Out::Ping | Out::Deflated(_) => None,
            })
            .filter(|v| v["type"] == "message")
            .filter_map(|v| v["offset"].as_u64())
            .collect()
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
}
