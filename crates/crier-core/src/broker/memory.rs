//! The embedded memory broker: a complete single-node broker, the default when no Redis is
//! configured. It keeps the same promises as the Redis broker (offsets, epochs, bounded history
//! with a TTL, idempotent publish, presence, connection counts), so one node behaves exactly like
//! a one-node cluster.
//!
//! (~630 lines, one file: the `Broker` impl, a short method per promise over the same shard maps;
//! the history's byte budget is `memory/budget.rs`.)
//!
//! Channels are sharded; a publish assigns the offset, appends to the history and hands the
//! publication to the handler while holding its shard's lock, which is what makes the order of
//! delivery the order of offsets.
//!
//! The history of all channels together is bounded in bytes (`history_max_bytes`, see
//! [`MemoryBroker::with_history_cap`]): past the cap, the oldest messages — of whichever
//! channels — are dropped first, down to 90% of it, in publish-time slices of [`TICK`]. A
//! recovery across dropped messages reports the gap (`recovered: false`), as after a trim.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use crier_protocol::StreamPosition;
use crier_protocol::frames::{PresenceEntry, encode_message};
use rand::Rng;

use crate::namespace::{ChannelPolicy, Namespaces};

mod budget;
use budget::Budget;

use super::{
    Broker, BrokerError, BrokerHandler, ChannelCount, History, IDEMPOTENCY_WINDOW, NodeInfo, PresenceEvent,
    PresenceStats, Publication, PublishOptions, PublishResult, Revocation, UserOp, UserOpReply,
};

const SHARDS: usize = 32;
/// The resolution of "oldest first" when history is dropped for the byte cap.
const TICK: Duration = Duration::from_millis(10);

/// What a history entry costs, as the byte cap counts it: its frame and its slot.
fn entry_bytes(p: &Publication) -> usize {
    p.frame.len() + std::mem::size_of::<(Publication, Instant)>()
}

struct ChannelState {
    epoch: Arc<str>,
    top: u64,
    history: VecDeque<(Publication, Instant)>,
    last_publish: Instant,
}

impl ChannelState {
    fn new() -> ChannelState {
        ChannelState { epoch: new_epoch().into(), top: 0, history: VecDeque::new(), last_publish: Instant::now() }
    }

    /// Drops history older than `ttl`.
    fn prune(&mut self, ttl: Duration, now: Instant, budget: &Mutex<Budget>) {
        self.drop_front(budget, |at| now.duration_since(at) > ttl);
    }

    /// Drops history from the front while `old(published at)`, uncounting it from `budget`.
    fn drop_front(&mut self, budget: &Mutex<Budget>, old: impl Fn(Instant) -> bool) {
        if !self.history.front().is_some_and(|(_, at)| old(*at)) {
            return;
        }
        let mut budget = lock(budget);
        while let Some((p, at)) = self.history.front() {
            if !old(*at) {
                break;
            }
            budget.remove(*at, entry_bytes(p));
            self.history.pop_front();
        }
        if self.history.is_empty() {
            self.history = VecDeque::new();
        } else if self.history.capacity() > 16 && self.history.len() < self.history.capacity() / 4 {
            self.history.shrink_to_fit();
        }
    }
}

/// A random epoch: 8 alphanumerics.
pub(crate) fn new_epoch() -> String {
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(8).map(char::from).collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One channel's presence: client → (user, node).
type Members = BTreeMap<Box<str>, (Box<str>, Arc<str>)>;

/// Who is in each channel: client → (user, node). One entry per subscription of every
/// connection, so kept compact: boxed strings, node names shared.
#[derive(Default)]
struct Presence {
    channels: HashMap<String, Members>,
    /// Node names seen (a memory broker serves one node: in practice one name).
    nodes: Vec<Arc<str>>,
}

impl Presence {
    /// Whether the client was not in the channel yet.
    fn add(&mut self, channel: &str, entry: &PresenceEntry) -> bool {
        let node = match self.nodes.iter().find(|n| ***n == *entry.node) {
            Some(n) => n.clone(),
            None => {
                let n: Arc<str> = entry.node.as_str().into();
                self.nodes.push(n.clone());
                n
            }
        };
        let members = match self.channels.get_mut(channel) {
            Some(m) => m,
            None => self.channels.entry(channel.to_owned()).or_default(),
        };
        members.insert(entry.client.as_str().into(), (entry.user.as_str().into(), node)).is_none()
    }

    /// The removed entry, if the client was in the channel.
    fn remove(&mut self, channel: &str, client: &str) -> Option<PresenceEntry> {
        let m = self.channels.get_mut(channel)?;
        let (user, node) = m.remove(client)?;
        if m.is_empty() {
            self.channels.remove(channel);
        }
        Some(PresenceEntry { client: client.to_owned(), user: user.into(), node: node.to_string() })
    }
}

/// See the module docs.
pub struct MemoryBroker {
    shards: Vec<Mutex<HashMap<String, ChannelState>>>,
    hasher: RandomState,
    subscribed: Mutex<HashSet<String>>,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// The channels' namespaces: each channel's history size and TTL are its namespace's.
    namespaces: Arc<Namespaces>,
    /// The longest history TTL of any namespace (how long an idle channel is remembered).
    max_history_ttl: Duration,
    /// History bytes across channels, and the cap on them.
    budget: Mutex<Budget>,
    /// One eviction at a time (others publishing meanwhile do not wait for it).
    evicting: Mutex<()>,
    idempotency: Mutex<HashMap<(String, String), (PublishResult, Instant)>>,
    presence: Mutex<Presence>,
    connections: Mutex<HashMap<String, HashSet<String>>>,
    node: Mutex<Option<NodeInfo>>,
    /// Subscriber counts as each node reported them: node → channel → count.
    channel_counts: Mutex<HashMap<String, BTreeMap<String, u64>>>,
    /// Token revocations: user → `before` (server-side control), kept
    /// [`MemoryBroker::set_revocation_ttl`] after their `before` (older ones pruned on write).
    revoked: Mutex<HashMap<String, u64>>,
    /// Webhook events, in memory (lost on a restart; docs/hooks.md).
    hooks: super::hooks::MemoryHookQueue,
    /// Seconds a revocation is kept after its `before` (default 7 days, as Redis's).
    revocation_ttl_s: AtomicU64,
}

/// How long a revocation is kept when nobody said ([`MemoryBroker::set_revocation_ttl`]).
const DEFAULT_REVOCATION_TTL_S: u64 = 7 * 24 * 3600;

impl MemoryBroker {
    /// A broker keeping at most `history_size` messages per channel for `history_ttl`.
    /// When called inside a tokio runtime, a background task sweeps idle channels.
    pub fn new(history_size: usize, history_ttl: Duration) -> Arc<MemoryBroker> {
        MemoryBroker::with_history_cap(history_size, history_ttl, 0)
    }

    /// A broker whose channels get their namespace's options, keeping at most
    /// `history_max_bytes` of history across all channels (0: no cap).
    pub fn with_namespaces(namespaces: Arc<Namespaces>, history_max_bytes: usize) -> Arc<MemoryBroker> {
        let max_history_ttl = namespaces.max_history_ttl();
        // Sweeps often enough for the shortest TTL that keeps history.
        let shortest = namespaces
            .policies()
            .filter(|p| p.history_size > 0)
            .map(|p| p.history_ttl)
            .min()
            .unwrap_or(max_history_ttl);
        let broker = Arc::new(MemoryBroker {
            budget: Mutex::new(Budget::new(history_max_bytes)),
            evicting: Mutex::new(()),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            subscribed: Mutex::new(HashSet::new()),
            handler: OnceLock::new(),
            namespaces,
            max_history_ttl,
            idempotency: Mutex::new(HashMap::new()),
            presence: Mutex::new(Presence::default()),
            connections: Mutex::new(HashMap::new()),
            node: Mutex::new(None),
            channel_counts: Mutex::new(HashMap::new()),
            revoked: Mutex::new(HashMap::new()),
            hooks: super::hooks::MemoryHookQueue::default(),
            revocation_ttl_s: AtomicU64::new(DEFAULT_REVOCATION_TTL_S),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            let weak = Arc::downgrade(&broker);
            let period = (shortest / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
            tokio::spawn(sweeper(weak, period));
        }
        broker
    }

    /// How long a token revocation is kept after its `before` (the longest token lifetime);
    /// older ones are forgotten when the next one is written.
    pub fn set_revocation_ttl(&self, ttl: Duration) {
        self.revocation_ttl_s.store(ttl.as_secs().max(1), Ordering::Relaxed);
    }

    /// The channels' namespaces.
    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// [`MemoryBroker::new`], keeping at most `history_max_bytes` of history across all
    /// channels (0: no cap): beyond it the oldest messages go first (see the module docs).
    pub fn with_history_cap(history_size: usize, history_ttl: Duration, history_max_bytes: usize) -> Arc<MemoryBroker> {
        let policy = ChannelPolicy { history_size, history_ttl, ..ChannelPolicy::default() };
        MemoryBroker::with_namespaces(Arc::new(Namespaces::new(policy)), history_max_bytes)
    }

    /// Hands a `join`/`leave` to the handler if this node is subscribed to the channel; called
    /// under the channel's shard lock, so it is ordered with the channel's publications.
    fn announce(&self, kind: &str, channel: &str, entry: &PresenceEntry) {
        if let Some(h) = self.handler.get()
            && lock(&self.subscribed).contains(channel)
        {
            let json = serde_json::to_string(entry).unwrap_or_else(|_| "{}".into());
            let frame = crier_protocol::frames::encode_presence_event(kind, channel, &json);
            h.on_presence_event(channel, PresenceEvent { client: entry.client.clone(), frame });
        }
    }

    fn shard(&self, channel: &str) -> &Mutex<HashMap<String, ChannelState>> {
        let i = (self.hasher.hash_one(channel) as usize) % SHARDS;
        &self.shards[i]
    }

    /// Bytes of history held across all channels (as the cap counts them).
    pub fn history_bytes(&self) -> usize {
        lock(&self.budget).total
    }

    /// Over the byte cap: drops the oldest history of every channel, down to 90% of the cap.
    fn evict(&self) {
        let Ok(_one) = self.evicting.try_lock() else { return };
        let Some(cutoff) = lock(&self.budget).cutoff() else { return };
        for shard in &self.shards {
            let mut map = lock(shard);
            for st in map.values_mut() {
                st.drop_front(&self.budget, |at| at < cutoff);
            }
        }
        lock(&self.budget).forget_before(cutoff);
    }

    /// Drops expired history, and forgets channels that are idle, empty and unsubscribed (their
    /// next publish starts a new epoch); the maps give back the room of forgotten channels.
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let mut map = lock(shard);
            map.retain(|channel, st| {
                let ttl = self.namespaces.policy(channel).history_ttl;
                st.prune(ttl, now, &self.budget);
                !st.history.is_empty()
                    || now.duration_since(st.last_publish) <= ttl
                    || lock(&self.subscribed).contains(channel)
            });
            if map.capacity() > 64 && map.len() < map.capacity() / 4 {
                map.shrink_to_fit();
            }
        }
        if let Some(expired) = now.checked_sub(self.max_history_ttl) {
            lock(&self.budget).forget_before(expired);
        }
        lock(&self.idempotency).retain(|_, (_, at)| now.duration_since(*at) <= IDEMPOTENCY_WINDOW);
    }
}

async fn sweeper(weak: Weak<MemoryBroker>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match weak.upgrade() {
            Some(b) => b.sweep(),
            None => return,
        }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.handler.set(handler);
    }

    async fn publish(&self, channel: &str, data: &str, opts: PublishOptions<'_>) -> Result<PublishResult, BrokerError> {
        let now = Instant::now();
        let idem_key = opts.idempotency_key.map(|k| (channel.to_owned(), k.to_owned()));
        let policy = self.namespaces.policy(channel);
        // Two concurrent retries of one key (one channel) are serialised by the channel's shard
        // lock: the second finds the first's result. The idempotency map's own lock is held
        // only for the lookup and the insert, never across the fan-out.
        let mut map = lock(self.shard(channel));
        if let Some(key) = idem_key.as_ref()
            && let Some((res, at)) = lock(&self.idempotency).get(key)
            && now.duration_since(*at) <= IDEMPOTENCY_WINDOW
        {
            return Ok(res.clone());
        }
        let st = map.entry(channel.to_owned()).or_insert_with(ChannelState::new);
        st.prune(policy.history_ttl, now, &self.budget);
        st.top += 1;
        st.last_publish = now;
        let publication = Publication {
            offset: st.top,
            epoch: st.epoch.clone(),
            frame: encode_message(channel, &st.epoch, st.top, data),
            published_at_us: crate::now_micros(),
        };
        let mut over_cap = false;
        if policy.history_size > 0 {
            let mut budget = lock(&self.budget);
            if st.history.len() >= policy.history_size
                && let Some((old, at)) = st.history.pop_front()
            {
                budget.remove(at, entry_bytes(&old));
            }
            budget.add(now, entry_bytes(&publication));
            over_cap = budget.cap > 0 && budget.total > budget.cap;
            drop(budget);
            st.history.push_back((publication.clone(), now));
        }
        let result = PublishResult { epoch: st.epoch.to_string(), offset: st.top };
        if let Some(key) = idem_key {
            lock(&self.idempotency).insert(key, (result.clone(), now));
        }
        if let Some(h) = self.handler.get()
            && lock(&self.subscribed).contains(channel)
        {
            h.on_publication(channel, publication);
        }
        drop(map);
        if over_cap {
            self.evict();
        }
        Ok(result)
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        // Taken under the channel's shard lock so a subscribe is ordered against publishes.
        let _shard = lock(self.shard(channel));
        // One node: its first subscriber is the cluster's.
        if lock(&self.subscribed).insert(channel.to_owned()) {
            self.hooks.push(super::hooks::CHANNEL_OCCUPIED, channel, None);
        }
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let _shard = lock(self.shard(channel));
        let still_wanted = self.handler.get().is_some_and(|h| h.has_subscribers(channel));
        if !still_wanted && lock(&self.subscribed).remove(channel) {
            self.hooks.push(super::hooks::CHANNEL_VACATED, channel, None);
        }
        Ok(())
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        let now = Instant::now();
        let mut map = lock(self.shard(channel));
        let st = map.entry(channel.to_owned()).or_insert_with(ChannelState::new);
        st.prune(self.namespaces.policy(channel).history_ttl, now, &self.budget);
        let all = st.history.iter().map(|(p, _)| p);
        let (publications, gap) = match since {
            Some(pos) if *pos.epoch == *st.epoch && pos.offset <= st.top => {
                let first = st.history.front().map_or(st.top + 1, |(p, _)| p.offset);
                let gap = first > pos.offset + 1;
                // The history holds consecutive offsets: the next one is found by index, not by a
                // scan from the oldest (a paced recovery reads a page at a time, under the lock).
                let next = usize::try_from((pos.offset + 1).saturating_sub(first)).unwrap_or(usize::MAX);
                let after = st.history.range(next.min(st.history.len())..).map(|(p, _)| p);
                (after.filter(|p| p.offset > pos.offset).take(limit).cloned().collect(), gap)
            }
            Some(_) => (all.take(limit).cloned().collect(), true),
            None => {
                let skip = st.history.len().saturating_sub(limit);
                (all.skip(skip).cloned().collect(), false)
            }
        };
        Ok(History { epoch: st.epoch.to_string(), offset: st.top, publications, gap })
    }

    async fn presence_add(&self, channel: &str, entry: &PresenceEntry) -> Result<(), BrokerError> {
        if !self.namespaces.policy(channel).join_leave {
            if lock(&self.presence).add(channel, entry) {
                self.hooks.push(super::hooks::MEMBER_ADDED, channel, Some((&entry.user, &entry.client)));
            }
            return Ok(());
        }
        // Under the channel's shard lock: the join is ordered with the channel's publications.
        let _shard = lock(self.shard(channel));
        let joined = lock(&self.presence).add(channel, entry);
        if joined {
            self.announce("join", channel, entry);
            self.hooks.push(super::hooks::MEMBER_ADDED, channel, Some((&entry.user, &entry.client)));
        }
        Ok(())
    }

    async fn presence_add_counted(&self, channel: &str, entry: &PresenceEntry, max: u64) -> Result<u64, BrokerError> {
        // As `presence_add`: on a join/leave channel the join is announced, under the channel's
        // shard lock (Redis's counted add is the same script as its plain one).
        let join_leave = self.namespaces.policy(channel).join_leave;
        let _shard = join_leave.then(|| lock(self.shard(channel)));
        let (joined, n) = {
            let mut p = lock(&self.presence);
            let members = p.channels.get(channel);
            let held = members.map_or(0, |m| m.len() as u64);
            if max > 0 && held >= max && !members.is_some_and(|m| m.contains_key(entry.client.as_str())) {
                // Full: not entered, so neither a join nor (on the caller's remove) a leave.
                return Ok(held + 1);
            }
            let joined = p.add(channel, entry);
            (joined, p.channels.get(channel).map_or(0, |m| m.len() as u64))
        };
        if joined {
            self.hooks.push(super::hooks::MEMBER_ADDED, channel, Some((&entry.user, &entry.client)));
            if join_leave {
                self.announce("join", channel, entry);
            }
        }
        Ok(n)
    }

    async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        if !self.namespaces.policy(channel).join_leave {
            if let Some(entry) = lock(&self.presence).remove(channel, client) {
                self.hooks.push(super::hooks::MEMBER_REMOVED, channel, Some((&entry.user, &entry.client)));
            }
            return Ok(());
        }
        let _shard = lock(self.shard(channel));
        let left = lock(&self.presence).remove(channel, client);
        if let Some(entry) = left {
            self.announce("leave", channel, &entry);
            self.hooks.push(super::hooks::MEMBER_REMOVED, channel, Some((&entry.user, &entry.client)));
        }
        Ok(())
    }

    async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, BrokerError> {
        let p = lock(&self.presence);
        let Some(members) = p.channels.get(channel) else { return Ok(PresenceStats::default()) };
        let users: HashSet<&str> = members.values().map(|(user, _)| &**user).collect();
        Ok(PresenceStats { clients: members.len() as u64, users: users.len() as u64 })
    }

    async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        let p = lock(&self.presence);
        let entries = p.channels.get(channel).into_iter().flatten();
        Ok(entries
            .map(|(client, (user, node))| PresenceEntry {
                client: client.to_string(),
                user: user.to_string(),
                node: node.to_string(),
            })
            .collect())
    }

    async fn connection_opened(&self, user: &str, client: &str) -> Result<u64, BrokerError> {
        let mut c = lock(&self.connections);
        let set = c.entry(user.to_owned()).or_default();
        set.insert(client.to_owned());
        Ok(set.len() as u64)
    }

    async fn connection_closed(&self, user: &str, client: &str) -> Result<(), BrokerError> {
        let mut c = lock(&self.connections);
        if let Some(set) = c.get_mut(user) {
            set.remove(client);
            if set.is_empty() {
                c.remove(user);
            }
        }
        Ok(())
    }

    async fn disconnect_user(&self, user: &str) -> Result<u64, BrokerError> {
        Ok(self.handler.get().map_or(0, |h| h.on_disconnect_user(user)) as u64)
    }

    async fn user_op(&self, user: &str, op: &UserOp) -> Result<UserOpReply, BrokerError> {
        if let UserOp::Invalidate { before } = op {
            let mut revoked = lock(&self.revoked);
            let at = revoked.entry(user.to_owned()).or_insert(0);
            *at = (*at).max(*before);
            // Those that cover no live token any more go, as Redis's ZREMRANGEBYSCORE does.
            let stale = (crate::now_micros() / 1_000_000).saturating_sub(self.revocation_ttl_s.load(Ordering::Relaxed));
            revoked.retain(|_, b| *b >= stale);
        }
        Ok(self.handler.get().map(|h| h.on_user_op(user, op)).unwrap_or_default())
    }

    async fn revocations(&self, since: u64) -> Result<Vec<Revocation>, BrokerError> {
        let revoked = lock(&self.revoked);
        let in_force = revoked.iter().filter(|(_, before)| **before >= since);
        Ok(in_force.map(|(user, before)| Revocation { user: user.clone(), before: *before }).collect())
    }

    fn enable_hooks(&self, config: super::HookConfig) -> Result<(), BrokerError> {
        self.hooks.enable(config);
        Ok(())
    }

    async fn hook_publish(&self, channel: &str, user: &str, client: &str, data: &str) -> Result<(), BrokerError> {
        let data = serde_json::from_str(data).ok();
        self.hooks.push_data(super::hooks::CLIENT_PUBLISH, channel, Some((user, client)), data);
        Ok(())
    }

    async fn hook_read(&self, max: usize, wait: Duration) -> Result<Vec<super::HookEvent>, BrokerError> {
        Ok(self.hooks.read(max, wait).await)
    }

    fn hook_stats(&self) -> super::HookStats {
        self.hooks.stats()
    }

    async fn report_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        *lock(&self.node) = Some(info.clone());
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        Ok(lock(&self.node).iter().cloned().collect())
    }

    fn is_up(&self) -> bool {
        true
    }

    // --- The cluster's channels and history deletion (issue 19, part D). ---

    async fn report_channels(&self, node: &str, counts: &[(String, u64)], full: bool) -> Result<bool, BrokerError> {
        let mut all = lock(&self.channel_counts);
        let held = all.contains_key(node);
        let mine = all.entry(node.to_owned()).or_default();
        if full {
            mine.clear();
        }
        for (channel, n) in counts {
            if *n == 0 {
                mine.remove(channel);
            } else {
                mine.insert(channel.clone(), *n);
            }
        }
        if mine.is_empty() {
            all.remove(node);
        }
        Ok(held)
    }

    async fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ChannelCount>, BrokerError> {
        let all = lock(&self.channel_counts);
        let mut merged: BTreeMap<&str, u64> = BTreeMap::new();
        for counts in all.values() {
            let from = match after {
                Some(a) if a >= prefix => std::ops::Bound::Excluded(a),
                _ => std::ops::Bound::Included(prefix),
            };
            let page = counts
                .range::<str, _>((from, std::ops::Bound::Unbounded))
                .take_while(|(c, _)| c.starts_with(prefix))
                .take(limit);
            for (c, n) in page {
                *merged.entry(c.as_str()).or_default() += n;
            }
        }
        Ok(merged
            .into_iter()
            .take(limit)
            .map(|(channel, subscribers)| ChannelCount { channel: channel.to_owned(), subscribers })
            .collect())
    }

    async fn delete_history(&self, channel: &str) -> Result<(), BrokerError> {
        // The shard's lock before the idempotency map's, as `publish` takes them.
        let mut map = lock(self.shard(channel));
        lock(&self.idempotency).retain(|(c, _), _| c != channel);
        let Some(st) = map.get_mut(channel) else {
            // No state: the next publish or read starts a new epoch anyway.
            return Ok(());
        };
        st.drop_front(&self.budget, |_| true);
        *st = ChannelState::new();
        let epoch = st.epoch.clone();
        // Under the shard lock: ordered before the channel's next publication.
        if let Some(h) = self.handler.get()
            && lock(&self.subscribed).contains(channel)
        {
            h.on_gap(channel, &epoch, 0);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
