//! Webhook events on NATS (docs/hooks.md, *Webhooks*, *On NATS*).
//!
//! - **Occupancy**: the key-value bucket `<prefix>_hooknodes` holds one key per channel (its
//!   token): the broker instances holding the channel, each with an expiry (`n`), and the
//!   channel's last few events (`ev`). A change is a compare-and-set on the key's revision; the
//!   instance whose write makes the set non-empty produces `channel_occupied`, the one that
//!   empties it `channel_vacated` (instances of dead nodes are dropped by any write, as on
//!   Redis). An instance is the node's start (state.rs) and is live while its liveness key is
//!   (an entry of an older crier, rewritten every period with a short expiry: until its
//!   expiry). A node's changes run in order through one task (a channel's in the order asked,
//!   several channels at once); a change that failed is tried again by the refresh, and every
//!   held channel is written again when the presence entries are (after a reconnect, a lapse of
//!   the liveness key, a third of the entries' life) — not every period. The delivering node
//!   sweeps the keys holding instances of dead nodes when a node died since its last sweep, so
//!   a channel held only by a dead node gets its `channel_vacated` once.
//! - **Queue**: the stream `<prefix>_hooks` (subject `<prefix>.hooks`, work-queue retention,
//!   `max_msgs` = `max_queue`, the oldest dropped), each event published with `Nats-Msg-Id` =
//!   its id, so publishing it again within the duplicate window stores nothing. A channel's
//!   events reach the stream in the order of its key's revisions: a node whose write makes a
//!   transition first publishes the events of the key written by other instances (`ev`, an
//!   earlier transition whose publisher may not have published yet, or died), then its own.
//! - **Delivery**: one node at a time, the holder of the lease `lead` in the bucket
//!   `<prefix>_hooklease` (`max_age` = the lease; taken by create, renewed by update at its
//!   revision, deleted on release), reads with the durable pull consumer `crier` (explicit ack,
//!   `ack_wait` = the claim time, `max_ack_pending` = the batch: a dead node's unacknowledged
//!   batch is redelivered first, before anything newer). Holding a batch being retried is an
//!   in-progress acknowledgement; a release gives the batch back at once (a negative
//!   acknowledgement).
//! - **Member events** come from the presence writes that decide them (state.rs: a create is a
//!   join, a delete at the revision read a leave, once), **client_publish** from
//!   [`Inner::hook_publish`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::{self, AckKind, kv, stream};
use crier_core::broker::hooks::{
    CHANNEL_OCCUPIED, CHANNEL_VACATED, CLIENT_PUBLISH, MEMBER_ADDED, MEMBER_REMOVED, OccupancyQueue, by_channel,
};
use crier_core::{BrokerError, HookConfig, HookEvent, HookStats};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{Inner, now_ms, token, unavailable};

/// The durable consumer every node reads with.
const CONSUMER: &str = "crier";
/// The lease's key.
const LEAD: &str = "lead";
/// How often a waiting read polls the queue.
const POLL: Duration = Duration::from_millis(50);
/// How often the queue's length is read.
const STATS_EVERY: Duration = Duration::from_secs(1);
/// Changes taken per step of the occupancy task, and channels changed at once.
const OCCUPANCY_BATCH: usize = 100;
const OCCUPANCY_CONCURRENCY: usize = 16;
/// Acknowledgements in flight at once.
const ACK_CONCURRENCY: usize = 64;
/// A channel's last events kept in its key (see the module docs).
const KEPT_EVENTS: usize = 4;
/// The queue's duplicate window: an event published again within it is stored once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// What [`Inner::enable_hooks`] set.
struct Cfg {
    events: Vec<String>,
    max_queue: usize,
    claim_idle: Duration,
    lease: Duration,
    /// This start of the node (instances in the occupancy sets, event ids).
    instance: String,
}

impl Cfg {
    fn wants(&self, name: &str) -> bool {
        self.events.iter().any(|e| e == name)
    }

    fn channels(&self) -> bool {
        self.wants(CHANNEL_OCCUPIED) || self.wants(CHANNEL_VACATED)
    }
}

/// The queue stream and the two buckets, laid out on first use.
struct Laid {
    stream: stream::Stream,
    subject: String,
    nodes: kv::Store,
    lease: kv::Store,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Add,
    Rem,
    Sweep,
}

/// A channel's occupancy key.
#[derive(Default, Serialize, Deserialize)]
struct Occ {
    /// Instance → expiry (ms since the Unix epoch).
    #[serde(default)]
    n: BTreeMap<String, u64>,
    /// The channel's last events: (instance that made it, event).
    #[serde(default)]
    ev: Vec<(String, HookEvent)>,
}

/// The webhook side of the NATS broker (a field of [`Inner`]).
#[derive(Default)]
pub(crate) struct Hooks {
    cfg: OnceLock<Cfg>,
    /// Laid out on first use, again after a failure (NATS may have lost its store).
    laid: std::sync::RwLock<Option<Arc<Laid>>>,
    laying: tokio::sync::Mutex<()>,
    /// When a publish of this node's events last failed: its own events kept in a channel's
    /// key are then published again too (see `occupancy_change`).
    push_failed: Mutex<Option<Instant>>,
    seq: AtomicU64,
    /// Channels this instance holds (broker-level subscriptions).
    channels: Mutex<HashSet<String>>,
    /// Channels whose last occupancy change failed (NATS away): tried again by the refresh.
    dirty: Mutex<HashSet<String>>,
    /// The presence rewrites (state.rs: after a reconnect, a lapse of the liveness key, a third
    /// of the entries' life) whose held channels were written again: every held channel is when
    /// another was done (`u64::MAX`: a rewrite of them failed).
    rewrites_seen: AtomicU64,
    /// The dead writers the delivering node's sweeps handled (`None`: no sweep since it leads).
    swept: Mutex<Option<HashSet<String>>>,
    occupancy: OccupancyQueue<Op>,
    /// The lease's revision while this node holds it.
    lead: Mutex<Option<u64>>,
    consumer: tokio::sync::Mutex<Option<PullConsumer>>,
    /// Messages of the batch being delivered, by event id (until acknowledged).
    held: Mutex<HashMap<String, jetstream::Message>>,
    last_stats: Mutex<Option<Instant>>,
    /// The stream sequence last read while holding the lease (0: none yet this turn).
    last_seq: AtomicU64,
    queued: AtomicU64,
    dropped: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hooks {
    pub(crate) fn members_enabled(&self) -> bool {
        self.cfg.get().is_some_and(|c| c.wants(MEMBER_ADDED) || c.wants(MEMBER_REMOVED))
    }
}

impl Inner {
    fn hooks_prefix(&self) -> String {
        self.opts.prefix.replace(['.', '*', '>', ' '], "_")
    }

    pub(crate) fn enable_hooks(&self, config: HookConfig) -> Result<(), BrokerError> {
        // The node's instance (state.rs): an occupancy entry is live while its liveness key is.
        let instance = self.instance.clone();
        let _ = self.hooks.cfg.set(Cfg {
            events: config.events,
            max_queue: config.max_queue.max(1),
            claim_idle: config.claim_idle,
            lease: config.lease,
            instance,
        });
        Ok(())
    }

    fn hook_laid_now(&self) -> Option<Arc<Laid>> {
        self.hooks.laid.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The queue and buckets are laid out again on next use (after a failure).
    fn hook_relay(&self) {
        *self.hooks.laid.write().unwrap_or_else(|e| e.into_inner()) = None;
        if let Ok(mut c) = self.hooks.consumer.try_lock() {
            *c = None;
        }
    }

    async fn hook_laid(&self) -> Result<Arc<Laid>, BrokerError> {
        if let Some(l) = self.hook_laid_now() {
            return Ok(l);
        }
        let cfg = self.hooks.cfg.get().ok_or_else(|| BrokerError::Internal("webhooks not enabled".into()))?;
        // Only once JetStream answers (the broker's own layout done).
        self.kv()?;
        let _laying = self.hooks.laying.lock().await;
        if let Some(l) = self.hook_laid_now() {
            return Ok(l);
        }
        let p = self.hooks_prefix();
        let config = stream::Config {
            name: format!("{p}_hooks"),
            subjects: vec![format!("{}.hooks", self.opts.prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages: cfg.max_queue as i64,
            discard: stream::DiscardPolicy::Old,
            duplicate_window: DUPLICATE_WINDOW,
            storage: stream::StorageType::File,
            num_replicas: self.opts.replicas.max(1),
            ..Default::default()
        };
        self.js
            .create_or_update_stream(config.clone())
            .await
            .map_err(|e| unavailable(format!("stream {}: {e}", config.name)))?;
        let stream = self.js.get_stream(&config.name).await.map_err(unavailable)?;
        // Kept well past their last refresh: the sweep sees a dead node's entries.
        let nodes = crate::state::bucket(&self.js, &self.opts, "hooknodes", self.opts.presence_ttl * 10).await?;
        let lease = crate::state::bucket(&self.js, &self.opts, "hooklease", cfg.lease).await?;
        let laid = Arc::new(Laid { stream, subject: format!("{}.hooks", self.opts.prefix), nodes, lease });
        *self.hooks.laid.write().unwrap_or_else(|e| e.into_inner()) = Some(laid.clone());
        Ok(laid)
    }

    /// A new event made by this node (id: `<ms>-<n>.<instance>`, unique cluster-wide).
    fn hook_event(&self, cfg: &Cfg, name: &str, channel: &str, member: Option<(&str, &str)>) -> HookEvent {
        let time_ms = now_ms();
        let n = self.hooks.seq.fetch_add(1, Ordering::Relaxed);
        HookEvent {
            id: format!("{time_ms}-{n}.{}", cfg.instance),
            name: name.to_owned(),
            channel: channel.to_owned(),
            time_ms,
            user: member.map(|m| m.0.to_owned()),
            client: member.map(|m| m.1.to_owned()),
            data: None,
        }
    }

    /// Publishes `event` to the queue (again: stored once within the duplicate window).
    async fn hook_push(&self, event: &HookEvent) -> Result<(), BrokerError> {
        let laid = self.hook_laid().await?;
        let body = serde_json::to_vec(event).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let mut last = None;
        for attempt in 0..3u64 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            let msg = PublishMessage::build().payload(body.clone().into()).message_id(event.id.as_str());
            match self.js.send_publish(laid.subject.clone(), msg).await {
                Ok(f) => match f.await {
                    Ok(_) => return Ok(()),
                    Err(e) => last = Some(unavailable(e)),
                },
                Err(e) => last = Some(unavailable(e)),
            }
        }
        *lock(&self.hooks.push_failed) = Some(Instant::now());
        self.hook_relay();
        Err(last.unwrap_or_else(|| BrokerError::Unavailable("webhooks: event not queued".into())))
    }

    /// A presence member added or removed (decided by the presence write: once per cluster).
    pub(crate) async fn hook_member(&self, name: &str, channel: &str, user: &str, client: &str) {
        let Some(cfg) = self.hooks.cfg.get() else { return };
        if !cfg.wants(name) {
            return;
        }
        let event = self.hook_event(cfg, name, channel, Some((user, client)));
        if let Err(e) = self.hook_push(&event).await {
            tracing::warn!(error = %e, channel, "webhooks: a member event could not be queued");
        }
    }

    pub(crate) async fn hook_publish(
        &self,
        channel: &str,
        user: &str,
        client: &str,
        data: &str,
    ) -> Result<(), BrokerError> {
        let Some(cfg) = self.hooks.cfg.get() else { return Ok(()) };
        if !cfg.wants(CLIENT_PUBLISH) {
            return Ok(());
        }
        let mut event = self.hook_event(cfg, CLIENT_PUBLISH, channel, Some((user, client)));
        event.data = serde_json::from_str(data).ok();
        self.hook_push(&event).await
    }

    /// The instance's first (`add`) or last subscriber of `channel` (broker level).
    pub(crate) async fn hook_channel(self: &Arc<Self>, channel: &str, add: bool) {
        let Some(cfg) = self.hooks.cfg.get() else { return };
        if !cfg.channels() {
            return;
        }
        if add {
            lock(&self.hooks.channels).insert(channel.to_owned());
        } else {
            lock(&self.hooks.channels).remove(channel);
        }
        if let Err(e) = self.hook_nodes(channel, if add { Op::Add } else { Op::Rem }).await {
            // NATS away: the refresh tries again (an add if the channel is still held, else a
            // remove).
            lock(&self.hooks.dirty).insert(channel.to_owned());
            tracing::warn!(error = %e, channel, "webhooks: could not record the channel's occupancy; retried by the refresh");
        }
    }

    /// Queues an occupancy change for the occupancy task (started if idle) and waits for it.
    async fn hook_nodes(self: &Arc<Self>, channel: &str, op: Op) -> Result<(), BrokerError> {
        let (start, rx) = self.hooks.occupancy.push(channel, op);
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.occupancy_task().await });
        }
        rx.await.unwrap_or_else(|_| Err(BrokerError::Unavailable("webhooks: the occupancy change was dropped".into())))
    }

    /// Runs the queued changes: a channel's in order, several channels at once.
    async fn occupancy_task(&self) {
        while let Some(batch) = self.hooks.occupancy.next_batch(OCCUPANCY_BATCH) {
            futures_util::stream::iter(by_channel(batch))
                .for_each_concurrent(OCCUPANCY_CONCURRENCY, |(channel, ops)| async move {
                    for (op, reply) in ops {
                        let _ = reply.send(self.occupancy_change(&channel, op).await);
                    }
                })
                .await;
        }
    }

    /// One change of `channel`'s occupancy (see the module docs), then its events queued.
    async fn occupancy_change(&self, channel: &str, op: Op) -> Result<(), BrokerError> {
        let Some(cfg) = self.hooks.cfg.get() else { return Ok(()) };
        let laid = self.hook_laid().await?;
        let key = token(channel);
        let ttl = self.opts.presence_ttl.as_millis() as u64;
        let life = ttl * u64::from(crate::state::ENTRY_LIFE_TTLS);
        for _ in 0..64 {
            let read_at = Instant::now();
            let entry = laid.nodes.entry(&key).await.map_err(unavailable)?;
            let (mut occ, revision) = match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    (serde_json::from_slice::<Occ>(&e.value).unwrap_or_default(), e.revision)
                }
                Some(e) => (Occ::default(), e.revision),
                None => (Occ::default(), 0),
            };
            let now = now_ms();
            let mut made = Vec::new();
            let mut changed = false;
            if !occ.n.is_empty() {
                let before = occ.n.len();
                let instances: Vec<&str> = occ.n.keys().map(String::as_str).collect();
                let alive = self.alive_among(&instances, read_at).await?;
                occ.n.retain(|i, e| live_instance(i, *e, now, ttl, &alive));
                changed |= occ.n.len() != before;
                if occ.n.is_empty() {
                    made.push(CHANNEL_VACATED);
                }
            }
            match op {
                Op::Add => {
                    let was_empty = occ.n.is_empty();
                    occ.n.insert(cfg.instance.clone(), now + life);
                    changed = true;
                    if was_empty {
                        made.push(CHANNEL_OCCUPIED);
                    }
                }
                Op::Rem => {
                    if occ.n.remove(&cfg.instance).is_some() {
                        changed = true;
                        if occ.n.is_empty() {
                            made.push(CHANNEL_VACATED);
                        }
                    }
                }
                Op::Sweep => {}
            }
            if !changed {
                return Ok(());
            }
            // Others' events still within the duplicate window (this node's own too after one of
            // its publishes failed): published again before this one's (stored once), so the
            // stream keeps the key's order.
            let window = DUPLICATE_WINDOW / 2;
            let mine_too = lock(&self.hooks.push_failed).is_some_and(|at| at.elapsed() < window);
            let earlier: Vec<HookEvent> = occ
                .ev
                .iter()
                .filter(|(by, e)| (mine_too || *by != cfg.instance) && e.time_ms + window.as_millis() as u64 > now)
                .map(|(_, e)| e.clone())
                .collect();
            let events: Vec<HookEvent> =
                made.into_iter().filter(|n| cfg.wants(n)).map(|n| self.hook_event(cfg, n, channel, None)).collect();
            occ.ev.extend(events.iter().map(|e| (cfg.instance.clone(), e.clone())));
            let extra = occ.ev.len().saturating_sub(KEPT_EVENTS);
            occ.ev.drain(..extra);
            let bytes = serde_json::to_vec(&occ).map_err(|e| BrokerError::Internal(e.to_string()))?;
            let written = match laid.nodes.update(&key, bytes.into(), revision).await {
                Ok(r) => r,
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(unavailable(e)),
            };
            // (Before the key goes, too: what it kept is queued first.)
            if !events.is_empty() || occ.n.is_empty() {
                for e in earlier.iter().chain(&events) {
                    self.hook_push(e).await?;
                }
            }
            if occ.n.is_empty() {
                // Vacated and its events queued: the key goes (unless written since), so the
                // sweep lists only held channels.
                let _ = laid.nodes.delete_expect_revision(&key, Some(written)).await;
            }
            return Ok(());
        }
        Err(BrokerError::Unavailable("webhooks: too much contention on a channel's occupancy".into()))
    }

    /// Takes or renews the delivery lease; whether this node holds it.
    async fn hook_lead(&self, laid: &Laid, cfg: &Cfg) -> Result<bool, BrokerError> {
        let held = *lock(&self.hooks.lead);
        if let Some(rev) = held {
            match laid.lease.update(LEAD, cfg.instance.clone().into(), rev).await {
                Ok(r) => {
                    *lock(&self.hooks.lead) = Some(r);
                    return Ok(true);
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    // Lost (it expired, another node took it).
                    *lock(&self.hooks.lead) = None;
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        match laid.lease.create(LEAD, cfg.instance.clone().into()).await {
            Ok(r) => {
                *lock(&self.hooks.lead) = Some(r);
                self.hooks.last_seq.store(0, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    async fn hook_consumer(&self, laid: &Laid, cfg: &Cfg, max: usize) -> Result<PullConsumer, BrokerError> {
        let mut c = self.hooks.consumer.lock().await;
        if let Some(c) = &*c {
            return Ok(c.clone());
        }
        let config = pull::Config {
            durable_name: Some(CONSUMER.into()),
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait: cfg.claim_idle,
            // A batch outstanding holds back what is newer: a dead node's batch goes out first.
            max_ack_pending: max.max(1) as i64,
            ..Default::default()
        };
        let consumer: PullConsumer = laid.stream.get_or_create_consumer(CONSUMER, config).await.map_err(unavailable)?;
        *c = Some(consumer.clone());
        Ok(consumer)
    }

    async fn hook_update_stats(&self, laid: &Laid) {
        let due = {
            let mut last = lock(&self.hooks.last_stats);
            let due = last.is_none_or(|at| at.elapsed() >= STATS_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if !due {
            return;
        }
        // Not yet delivered, plus delivered and not acknowledged by another node (a dead
        // one's batch); without the consumer yet (nothing read so far), the stream's length.
        let queued = match laid.stream.consumer_info(CONSUMER).await {
            Ok(info) => {
                let held = lock(&self.hooks.held).len();
                Ok(info.num_pending + info.num_ack_pending.saturating_sub(held) as u64)
            }
            Err(_) => laid.stream.get_info().await.map(|i| i.state.messages).map_err(unavailable),
        };
        match queued {
            Ok(n) => self.hooks.queued.store(n, Ordering::Relaxed),
            Err(e) => tracing::debug!(error = %e, "webhooks: could not read the queue's length"),
        }
    }

    pub(crate) async fn hook_read(&self, max: usize, wait: Duration) -> Result<Vec<HookEvent>, BrokerError> {
        let Some(cfg) = self.hooks.cfg.get() else {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        };
        let laid = self.hook_laid().await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.hook_update_stats(&laid).await;
            if !self.hook_lead(&laid, cfg).await? {
                // Another node delivers (one at a time, so events go out in queue order).
                tokio::time::sleep_until(deadline).await;
                return Ok(Vec::new());
            }
            let consumer = self.hook_consumer(&laid, cfg, max).await?;
            let mut batch = match consumer.fetch().max_messages(max).messages().await {
                Ok(b) => b,
                Err(e) => {
                    self.hook_relay();
                    return Err(unavailable(e));
                }
            };
            let mut out = Vec::new();
            while let Some(m) = batch.next().await {
                let m = m.map_err(unavailable)?;
                let (seq, delivered) = m.info().map(|i| (i.stream_sequence, i.delivered)).unwrap_or((0, 1));
                if delivered <= 1 {
                    // A hole in what this node reads in turn: dropped (the queue was full).
                    let last = self.hooks.last_seq.load(Ordering::Relaxed);
                    if last > 0 && seq > last + 1 {
                        self.hooks.dropped.fetch_add(seq - last - 1, Ordering::Relaxed);
                    }
                }
                self.hooks.last_seq.fetch_max(seq, Ordering::Relaxed);
                match serde_json::from_slice::<HookEvent>(&m.payload) {
                    Ok(e) => {
                        lock(&self.hooks.held).insert(e.id.clone(), m);
                        out.push(e);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "webhooks: an unreadable queue entry dropped");
                        let _ = m.ack_with(AckKind::Term).await;
                    }
                }
            }
            if !out.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
            tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())).await;
        }
    }

    pub(crate) async fn hook_ack(&self, ids: &[String]) -> Result<(), BrokerError> {
        let msgs: Vec<jetstream::Message> = {
            let mut held = lock(&self.hooks.held);
            ids.iter().filter_map(|id| held.remove(id)).collect()
        };
        // A few at once (each waits for the server's confirmation). One not acknowledged is
        // delivered again after the claim time (same id).
        let mut acks = futures_util::stream::iter(msgs)
            .map(|m| async move { m.double_ack().await.map_err(unavailable) })
            .buffer_unordered(ACK_CONCURRENCY);
        let mut result = Ok(());
        while let Some(r) = acks.next().await {
            if r.is_err() {
                result = r;
            }
        }
        result
    }

    pub(crate) async fn hook_hold(&self, ids: &[String]) -> Result<(), BrokerError> {
        let Some(cfg) = self.hooks.cfg.get() else { return Ok(()) };
        let laid = self.hook_laid().await?;
        self.hook_update_stats(&laid).await;
        let _ = self.hook_lead(&laid, cfg).await?;
        let msgs: Vec<jetstream::Message> = {
            let held = lock(&self.hooks.held);
            ids.iter().filter_map(|id| held.get(id).cloned()).collect()
        };
        for m in msgs {
            m.ack_with(AckKind::Progress).await.map_err(unavailable)?;
        }
        Ok(())
    }

    pub(crate) async fn hook_release(&self) -> Result<(), BrokerError> {
        let Some(laid) = self.hook_laid_now() else { return Ok(()) };
        let msgs: Vec<jetstream::Message> = lock(&self.hooks.held).drain().map(|(_, m)| m).collect();
        for m in msgs {
            // Given back at once to the next delivering node.
            let _ = m.ack_with(AckKind::Nak(None)).await;
        }
        let rev = lock(&self.hooks.lead).take();
        if let Some(rev) = rev {
            laid.lease.delete_expect_revision(LEAD, Some(rev)).await.map_err(unavailable)?;
        }
        Ok(())
    }

    pub(crate) fn hook_stats(&self) -> HookStats {
        HookStats {
            queued: self.hooks.queued.load(Ordering::Relaxed),
            dropped: self.hooks.dropped.load(Ordering::Relaxed),
        }
    }
}

/// An occupancy entry's instance is live: not expired, and (an entry of this crier, whose
/// expiry is far: the entries' life) its writer alive. An entry of an older crier (its expiry
/// within two TTLs: it is rewritten every period) is live until its expiry.
fn live_instance(instance: &str, expiry: u64, now: u64, ttl: u64, alive: &HashSet<String>) -> bool {
    expiry > now && (expiry <= now + 2 * ttl || alive.contains(instance))
}

/// Periodic (with the presence refresh): writes again the channels whose last change failed, or
/// every held channel after the presence entries were all written again (an entry NATS lost
/// comes back, as an occupy if the set was empty); the delivering node then sweeps the keys holding instances of dead
/// writers (their liveness key lapsed) or expired ones — only when a writer died since its last
/// sweep, or at a rewrite — reporting their vacates.
pub(crate) async fn refresh(inner: &Arc<Inner>) -> Result<(), BrokerError> {
    let Some(cfg) = inner.hooks.cfg.get() else { return Ok(()) };
    if !cfg.channels() {
        return Ok(());
    }
    let done = inner.rewrites_done();
    let all = inner.hooks.rewrites_seen.swap(done, Ordering::Relaxed) != done;
    let todo: Vec<String> = if all {
        lock(&inner.hooks.dirty).clear();
        lock(&inner.hooks.channels).iter().cloned().collect()
    } else {
        std::mem::take(&mut *lock(&inner.hooks.dirty)).into_iter().collect()
    };
    let mut result = Ok(());
    let mut calls = futures_util::stream::iter(todo)
        .map(|c| async move {
            // Held or let go since? (The change asked last is what is written.)
            let op = if lock(&inner.hooks.channels).contains(&c) { Op::Add } else { Op::Rem };
            let r = inner.hook_nodes(&c, op).await;
            if r.is_err() {
                lock(&inner.hooks.dirty).insert(c);
            }
            r
        })
        .buffer_unordered(OCCUPANCY_BATCH);
    while let Some(r) = calls.next().await {
        if r.is_err() {
            result = r;
        }
    }
    if result.is_err() && all {
        inner.hooks.rewrites_seen.store(u64::MAX, Ordering::Relaxed);
    }
    drop(calls);
    if lock(&inner.hooks.lead).is_none() {
        *lock(&inner.hooks.swept) = None;
        return result;
    }
    // A sweep only when a writer died since the last one (or at a rewrite, or the first time
    // since this node leads). (A node that lived less than a listing period is only seen dead
    // by the sweep of a rewrite: a third of the entries' life.)
    let (alive, gone) = inner.alive_listed().await?;
    let died = lock(&inner.hooks.swept).as_ref().is_none_or(|handled| gone.iter().any(|w| !handled.contains(w)));
    if !died && !all {
        return result;
    }
    let laid = inner.hook_laid().await?;
    let laid = &*laid;
    let keys = crate::state::keys(&laid.nodes).await?;
    let now = now_ms();
    let ttl = inner.opts.presence_ttl.as_millis() as u64;
    let alive = &alive;
    let mut sweeps = futures_util::stream::iter(keys)
        .map(|k| async move {
            // (A key deleted since it was listed reads as none.)
            let Some(value) = laid.nodes.get(&k).await.map_err(unavailable)? else { return Ok(()) };
            let occ: Occ = serde_json::from_slice(&value).unwrap_or_default();
            match crate::untoken(&k) {
                Some(channel) if occ.n.iter().any(|(i, e)| !live_instance(i, *e, now, ttl, alive)) => {
                    inner.hook_nodes(&channel, Op::Sweep).await
                }
                _ => Ok(()),
            }
        })
        .buffer_unordered(OCCUPANCY_CONCURRENCY);
    let mut swept = Ok(());
    while let Some(r) = sweeps.next().await {
        if r.is_err() {
            swept = r;
        }
    }
    // Remembered only after a whole sweep (a failed one is done again next period).
    if swept.is_ok() {
        *lock(&inner.hooks.swept) = Some(gone);
    }
    result.and(swept)
}
