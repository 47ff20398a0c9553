//! The embedded memory broker: a complete single-node broker, the default when no Redis is
//! configured. It keeps the same promises as the Redis broker (offsets, epochs, bounded history
//! with a TTL, idempotent publish, presence, connection counts), so one node behaves exactly like
//! a one-node cluster.
//!
//! Channels are sharded; a publish assigns the offset, appends to the history and hands the
//! publication to the handler while holding its shard's lock, which is what makes the order of
//! delivery the order of offsets.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use crier_protocol::StreamPosition;
use crier_protocol::frames::{PresenceEntry, encode_message};
use rand::Rng;

use super::{
    Broker, BrokerError, BrokerHandler, History, IDEMPOTENCY_WINDOW, NodeInfo, Publication, PublishOptions,
    PublishResult,
};

const SHARDS: usize = 32;

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

    fn prune(&mut self, ttl: Duration, now: Instant) {
        while let Some((_, at)) = self.history.front() {
            if now.duration_since(*at) > ttl {
                self.history.pop_front();
            } else {
                break;
            }
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
    fn add(&mut self, channel: &str, entry: &PresenceEntry) {
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
        members.insert(entry.client.as_str().into(), (entry.user.as_str().into(), node));
    }
}

/// See the module docs.
pub struct MemoryBroker {
    shards: Vec<Mutex<HashMap<String, ChannelState>>>,
    hasher: RandomState,
    subscribed: Mutex<HashSet<String>>,
    handler: OnceLock<Arc<dyn BrokerHandler>>,
    history_size: usize,
    history_ttl: Duration,
    idempotency: Mutex<HashMap<(String, String), (PublishResult, Instant)>>,
    presence: Mutex<Presence>,
    connections: Mutex<HashMap<String, HashSet<String>>>,
    node: Mutex<Option<NodeInfo>>,
}

impl MemoryBroker {
    /// A broker keeping at most `history_size` messages per channel for `history_ttl`.
    /// When called inside a tokio runtime, a background task sweeps idle channels.
    pub fn new(history_size: usize, history_ttl: Duration) -> Arc<MemoryBroker> {
        let broker = Arc::new(MemoryBroker {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            subscribed: Mutex::new(HashSet::new()),
            handler: OnceLock::new(),
            history_size,
            history_ttl,
            idempotency: Mutex::new(HashMap::new()),
            presence: Mutex::new(Presence::default()),
            connections: Mutex::new(HashMap::new()),
            node: Mutex::new(None),
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            let weak = Arc::downgrade(&broker);
            let period = (history_ttl / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
            tokio::spawn(sweeper(weak, period));
        }
        broker
    }

    fn shard(&self, channel: &str) -> &Mutex<HashMap<String, ChannelState>> {
        let i = (self.hasher.hash_one(channel) as usize) % SHARDS;
        &self.shards[i]
    }

    /// Drops expired history, and forgets channels that are idle, empty and unsubscribed (their
    /// next publish starts a new epoch).
    pub fn sweep(&self) {
        let now = Instant::now();
        for shard in &self.shards {
            let mut map = lock(shard);
            map.retain(|channel, st| {
                st.prune(self.history_ttl, now);
                !st.history.is_empty()
                    || now.duration_since(st.last_publish) <= self.history_ttl
                    || lock(&self.subscribed).contains(channel)
            });
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
        // The idempotency lock is held across the publish so two concurrent retries cannot both
        // deliver.
        let mut idem = idem_key.as_ref().map(|_| lock(&self.idempotency));
        if let (Some(map), Some(key)) = (idem.as_ref(), idem_key.as_ref())
            && let Some((res, at)) = map.get(key)
            && now.duration_since(*at) <= IDEMPOTENCY_WINDOW
        {
            return Ok(res.clone());
        }
        let mut map = lock(self.shard(channel));
        let st = map.entry(channel.to_owned()).or_insert_with(ChannelState::new);
        st.prune(self.history_ttl, now);
        st.top += 1;
        st.last_publish = now;
        let publication = Publication {
            offset: st.top,
            epoch: st.epoch.clone(),
            frame: encode_message(channel, &st.epoch, st.top, data),
            published_at_us: crate::now_micros(),
        };
        if self.history_size > 0 {
            if st.history.len() >= self.history_size {
                st.history.pop_front();
            }
            st.history.push_back((publication.clone(), now));
        }
        let result = PublishResult { epoch: st.epoch.to_string(), offset: st.top };
        if let Some(h) = self.handler.get()
            && lock(&self.subscribed).contains(channel)
        {
            h.on_publication(channel, publication);
        }
        drop(map);
        if let (Some(map), Some(key)) = (idem.as_mut(), idem_key) {
            map.insert(key, (result.clone(), now));
        }
        Ok(result)
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        // Taken under the channel's shard lock so a subscribe is ordered against publishes.
        let _shard = lock(self.shard(channel));
        lock(&self.subscribed).insert(channel.to_owned());
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let _shard = lock(self.shard(channel));
        let still_wanted = self.handler.get().is_some_and(|h| h.has_subscribers(channel));
        if !still_wanted {
            lock(&self.subscribed).remove(channel);
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
        st.prune(self.history_ttl, now);
        let all = st.history.iter().map(|(p, _)| p);
        let (publications, gap) = match since {
            Some(pos) if *pos.epoch == *st.epoch && pos.offset <= st.top => {
                let first = st.history.front().map_or(st.top + 1, |(p, _)| p.offset);
                let gap = first > pos.offset + 1;
                (all.filter(|p| p.offset > pos.offset).take(limit).cloned().collect(), gap)
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
        lock(&self.presence).add(channel, entry);
        Ok(())
    }

    async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let mut p = lock(&self.presence);
        if let Some(m) = p.channels.get_mut(channel) {
            m.remove(client);
            if m.is_empty() {
                p.channels.remove(channel);
            }
        }
        Ok(())
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
}
