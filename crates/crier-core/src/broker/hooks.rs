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

/// Who waits for an occupancy change's result.
pub type OccupancyReply = tokio::sync::oneshot::Sender<Result<(), crate::BrokerError>>;

/// One queued occupancy change: the channel, the broker's operation, who waits for its result.
pub type OccupancyChange<T> = (String, T, OccupancyReply);

/// The occupancy changes (a channel got its first subscriber on this node, lost its last, a
/// sweep) a distributed broker runs for webhooks: queued by whoever makes them, run by one task
/// of the broker's, started by the change that finds none running, a batch at a time (a
/// channel's changes in the order they came).
pub struct OccupancyQueue<T> {
    /// The changes waiting, and whether a task runs.
    inner: Mutex<(VecDeque<OccupancyChange<T>>, bool)>,
}

impl<T> Default for OccupancyQueue<T> {
    fn default() -> Self {
        OccupancyQueue { inner: Mutex::new((VecDeque::new(), false)) }
    }
}

impl<T> OccupancyQueue<T> {
    /// Queues a change; the receiver answers its result. `true`: no task runs, the caller
    /// starts one (a task, not the caller itself: a caller that gives up must not strand the
    /// queue).
    pub fn push(&self, channel: &str, op: T) -> (bool, tokio::sync::oneshot::Receiver<Result<(), crate::BrokerError>>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut q = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        q.0.push_back((channel.to_owned(), op, tx));
        (!std::mem::replace(&mut q.1, true), rx)
    }

    /// The task's next batch (at most `max` changes); `None` when none waits — the task ends
    /// then, and the next change starts another.
    pub fn next_batch(&self, max: usize) -> Option<Vec<OccupancyChange<T>>> {
        let mut q = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.0.is_empty() {
            q.1 = false;
            return None;
        }
        let n = q.0.len().min(max);
        Some(q.0.drain(..n).collect())
    }
}

/// A batch's changes by channel (first appearance order), each channel's in the order queued:
/// what runs one channel at a time while several channels run at once.
pub fn by_channel<T>(batch: Vec<OccupancyChange<T>>) -> Vec<(String, Vec<(T, OccupancyReply)>)> {
    let mut groups: Vec<(String, Vec<_>)> = Vec::new();
    for (channel, op, reply) in batch {
        match groups.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, ops)) => ops.push((op, reply)),
            None => groups.push((channel, vec![(op, reply)])),
        }
    }
    groups
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_changes_start_one_task_and_keep_each_channels_order() {
        let q: OccupancyQueue<&str> = OccupancyQueue::default();
        let (start, _a) = q.push("a", "add");
        assert!(start, "the first change starts the task");
        let (start, _b) = q.push("b", "add");
        let (again, _c) = q.push("a", "rem");
        assert!(!start && !again, "one task at a time");
        let batch = q.next_batch(10).unwrap();
        let groups: Vec<(String, Vec<&str>)> =
            by_channel(batch).into_iter().map(|(c, ops)| (c, ops.into_iter().map(|(op, _)| op).collect())).collect();
        assert_eq!(groups, [("a".to_owned(), vec!["add", "rem"]), ("b".to_owned(), vec!["add"])]);
        assert!(q.next_batch(10).is_none(), "empty: the task ends");
        assert!(q.push("c", "add").0, "the next change starts another");
    }

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
