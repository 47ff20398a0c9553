//! Webhook events (docs/hooks.md, *Webhooks*): what a broker produces, once per cluster, when a
//! channel is occupied or vacated and when a presence member is added or removed, and the
//! in-memory queue the memory broker keeps them in.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One webhook event, as the backend receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookEvent {
    /// Unique per event cluster-wide; the same on every delivery attempt.
    pub id: String,
    /// `channel_occupied`, `channel_vacated`, `member_added`, `member_removed`.
    pub name: String,
    pub channel: String,
    /// When it happened (the broker's clock), milliseconds since the Unix epoch.
    pub time_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// `client_publish`: the published data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
}

/// Event names.
pub const CHANNEL_OCCUPIED: &str = "channel_occupied";
pub const CHANNEL_VACATED: &str = "channel_vacated";
pub const MEMBER_ADDED: &str = "member_added";
pub const MEMBER_REMOVED: &str = "member_removed";
pub const CLIENT_PUBLISH: &str = "client_publish";

/// Which events are produced and how many are queued at most ([`crate::Broker::enable_hooks`]).
#[derive(Clone, Debug, Default)]
pub struct HookConfig {
    pub events: Vec<String>,
    pub max_queue: usize,
    /// A durable queue hands events a node has held this long without acknowledging (or
    /// holding) them to another node: the holder is taken for dead.
    pub claim_idle: Duration,
    /// Where one node of the cluster delivers at a time (so events go out in the order they
    /// were queued): how long its turn lasts without being renewed. The delivering node renews
    /// it at least once a second and around every request, so a dead one is replaced after
    /// at most this.
    pub lease: Duration,
}

/// What a broker's queue holds, as this node sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HookStats {
    /// Events waiting to be delivered (not counting a batch being delivered).
    pub queued: u64,
    /// Events dropped since the start because the queue was full.
    pub dropped: u64,
}

/// Milliseconds since the Unix epoch (the wall clock: what the backend compares).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A bounded in-memory queue of events (the memory broker's; lost on a restart).
#[derive(Default)]
pub struct MemoryHookQueue {
    inner: Mutex<Inner>,
    notify: tokio::sync::Notify,
    seq: AtomicU64,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Inner {
    config: Option<HookConfig>,
    queue: VecDeque<HookEvent>,
}

impl MemoryHookQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn enable(&self, config: HookConfig) {
        self.lock().config = Some(config);
    }

    /// Queues a `name` event of `channel` if that event is enabled; past `max_queue` the oldest
    /// queued event is dropped (counted).
    pub fn push(&self, name: &str, channel: &str, member: Option<(&str, &str)>) {
        self.push_data(name, channel, member, None);
    }

    /// [`MemoryHookQueue::push`] with the event's `data`.
    pub fn push_data(&self, name: &str, channel: &str, member: Option<(&str, &str)>, data: Option<serde_json::Value>) {
        let mut inner = self.lock();
        let Some(config) = &inner.config else { return };
        if !config.events.iter().any(|e| e == name) {
            return;
        }
        let max = config.max_queue.max(1);
        let time_ms = unix_ms();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let (user, client) = match member {
            Some((user, client)) => (Some(user.to_owned()), Some(client.to_owned())),
            None => (None, None),
        };
        let event = HookEvent {
            id: format!("{time_ms}-{seq}"),
            name: name.to_owned(),
            channel: channel.to_owned(),
            time_ms,
            user,
            client,
            data,
        };
        while inner.queue.len() >= max {
            inner.queue.pop_front();
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        inner.queue.push_back(event);
        drop(inner);
        self.notify.notify_one();
    }

    /// Up to `max` events, oldest first, waiting up to `wait` for the first one. They leave the
    /// queue: the caller holds them until delivered.
    pub async fn read(&self, max: usize, wait: Duration) -> Vec<HookEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.notify.notified();
            {
                let mut inner = self.lock();
                if !inner.queue.is_empty() {
                    let n = max.min(inner.queue.len());
                    return inner.queue.drain(..n).collect();
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Vec::new();
            }
        }
    }

    pub fn stats(&self) -> HookStats {
        HookStats { queued: self.lock().queue.len() as u64, dropped: self.dropped.load(Ordering::Relaxed) }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_oldest_dropped_only_enabled_events() {
        let q = MemoryHookQueue::default();
        q.push(CHANNEL_OCCUPIED, "a", None);
        assert_eq!(q.stats(), HookStats::default(), "nothing before enable");
        q.enable(HookConfig {
            events: vec![CHANNEL_OCCUPIED.into(), MEMBER_ADDED.into()],
            max_queue: 2,
            claim_idle: Duration::from_secs(1),
            lease: Duration::from_secs(1),
        });
        q.push(CHANNEL_OCCUPIED, "a", None);
        q.push(CHANNEL_VACATED, "a", None);
        q.push(MEMBER_ADDED, "b", Some(("u", "c")));
        q.push(CHANNEL_OCCUPIED, "c", None);
        assert_eq!(q.stats(), HookStats { queued: 2, dropped: 1 });
        let got = q.read(10, Duration::from_millis(1)).await;
        assert_eq!(
            got.iter().map(|e| (e.name.as_str(), e.channel.as_str())).collect::<Vec<_>>(),
            [(MEMBER_ADDED, "b"), (CHANNEL_OCCUPIED, "c")]
        );
        assert_eq!((got[0].user.as_deref(), got[0].client.as_deref()), (Some("u"), Some("c")));
        assert_ne!(got[0].id, got[1].id);
        assert!(q.read(10, Duration::from_millis(1)).await.is_empty());
    }
}
