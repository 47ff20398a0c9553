//! Webhook events on Redis (docs/hooks.md, *Webhooks*). One file (~690 lines): producing
//! events (one server and the Redis Cluster outbox) and consuming them share one state, `Hooks`;
//! its unit tests are in `hooks/tests.rs`.
//!
//! - Produced once per cluster by the scripts that make the decision: the presence scripts
//!   append `member_added` / `member_removed` (`scripts::PRES_PRELUDE`), and `HOOK_NODES`
//!   keeps each channel's set of broker instances with subscribers (`Keys::hook_nodes`),
//!   appending `channel_occupied` / `channel_vacated` on its 0 → 1 / → 0 transitions. A node
//!   refreshes its instances' expiry with the presence refresh; a dead node's entries expire and
//!   the periodic sweep (the index `Keys::hook_index`) reports the vacate.
//! - Durable before acknowledged: the event is appended (`XADD … MAXLEN max_queue`) to the
//!   stream `Keys::hook_stream` by the same script, atomically with the change. Delivered events
//!   are acknowledged and deleted (`HOOK_ACK`), so the stream holds only undelivered ones: at
//!   the bound the oldest is trimmed and counted (`<stream>:dropped`).
//! - Consumed through the consumer group `crier` by one node at a time, the one holding the
//!   delivery lease (`HOOK_LEAD`, `<stream>:lead`, renewed on every read and while it retries,
//!   given up when it stops), so events go out in stream order: it first takes what is pending
//!   (`XAUTOCLAIM` from 0: the batch of a delivering node that stopped or died, or one whose
//!   acknowledgement failed), then reads new events with `XREADGROUP` (no `BLOCK`: the command
//!   connection is shared, so it polls), `XACK`s and `XDEL`s after a 2xx, and keeps a batch it
//!   is retrying claimed (`XCLAIM … JUSTID`) → at least once, in order. Consumers of earlier
//!   starts, idle past `claim_idle` with nothing pending, are deleted.
//!
//! On a Redis Cluster a script keeps to its channel's slot: `HOOK_NODES_REDIS_CLUSTER` (one channel per
//! call) pushes its events, each with its own id (`<instance>:<call>-<k>`), to the channel's
//! outbox (`Keys::hook_outbox`), and the node moves them to the stream (`XADD`, then `HOOK_TRIM`)
//! and writes the index itself, listing the channel before the script runs so that a node
//! dying between the two leaves the channel for the sweep, which moves the outbox. Member events
//! are not supported there yet (refused at start); see docs/hooks.md.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crier_core::broker::hooks::{OccupancyQueue, by_channel};
use crier_core::{BrokerError, HookConfig, HookEvent, HookStats};
use futures_util::StreamExt;
use redis::Value;

use crate::context::Context;
use crate::error::Fault;
use crate::scripts::{HOOK_FLAGS, bulk, int};

/// The consumer group every node reads in.
const GROUP: &str = "crier";
/// How often a waiting read polls the stream.
const POLL: Duration = Duration::from_millis(50);
/// How often dead consumers' pending events are looked for, and the gauges refreshed.
const CLAIM_EVERY: Duration = Duration::from_secs(1);
/// Channels per occupancy script call (`HOOK_NODES`).
const OCCUPANCY_BATCH: usize = 100;
/// Channels whose occupancy calls run at once on a Redis Cluster (one channel per call there).
const CLUSTER_CONCURRENCY: usize = 16;
/// How often consumers of nodes gone (idle past the claim time, nothing pending) are deleted.
const REAP_EVERY: Duration = Duration::from_secs(60);

/// What a script needs to append events, set once by [`Hooks::enable_hooks`].
struct Args {
    stream: String,
    flags: String,
    max: u64,
    members: bool,
    channels: bool,
    claim_idle: Duration,
    lease: Duration,
}

/// The webhook side of the broker: the hook arguments the presence scripts take (set once
/// webhooks are enabled), the occupancy queue and the stream's consumer. Presence holds one and
/// passes [`Hooks::hook_args`] to its scripts; this module knows nothing of presence.
pub(crate) struct Hooks {
    ctx: Arc<Context>,
    args: OnceLock<Args>,
    /// Channels this instance has (broker-level) subscriptions of, refreshed in `HOOK_NODES`.
    channels: Mutex<HashSet<String>>,
    group_ready: AtomicBool,
    last_claim: Mutex<Option<Instant>>,
    last_reap: Mutex<Option<Instant>>,
    /// Occupancy changes for the script calls: per channel in the order asked, up to
    /// [`OCCUPANCY_BATCH`] per call (a node's channel churn costs one call per batch).
    occupancy: OccupancyQueue<&'static str>,
    queued: AtomicU64,
    dropped: AtomicU64,
    /// Redis Cluster: the calls of `HOOK_NODES_REDIS_CLUSTER` (the events' id prefix), and the stream
    /// entry of each event read whose id is its own (event id → stream id, until acknowledged).
    calls: AtomicU64,
    entry_ids: Mutex<HashMap<String, Vec<String>>>,
}

impl Hooks {
    pub(crate) fn new(ctx: Arc<Context>) -> Hooks {
        Hooks {
            ctx,
            args: OnceLock::new(),
            channels: Mutex::default(),
            group_ready: AtomicBool::new(false),
            last_claim: Mutex::new(None),
            last_reap: Mutex::new(None),
            occupancy: OccupancyQueue::default(),
            queued: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            entry_ids: Mutex::default(),
        }
    }

    pub(crate) fn members_enabled(&self) -> bool {
        self.args.get().is_some_and(|a| a.members)
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends the three hook arguments every presence script takes last.
    pub(crate) fn hook_args(&self, inv: &mut redis::ScriptInvocation<'_>) {
        match self.args.get() {
            Some(a) => inv.arg(&a.stream).arg(&a.flags).arg(a.max),
            None => inv.arg("").arg("").arg(0),
        };
    }

    pub(crate) fn enable_hooks(&self, config: &HookConfig, claim_idle: Duration) -> Result<(), BrokerError> {
        let flags: String =
            HOOK_FLAGS.iter().filter(|(name, _)| config.events.iter().any(|e| e == name)).map(|(_, f)| *f).collect();
        if self.ctx.keys.is_redis_cluster() && (flags.contains('A') || flags.contains('R')) {
            return Err(BrokerError::Internal(
                "member_added / member_removed webhooks are not supported on a Redis Cluster yet (channel_occupied, \
                 channel_vacated and client_publish are)"
                    .into(),
            ));
        }
        let args = Args {
            stream: self.ctx.keys.hook_stream(),
            members: flags.contains('A') || flags.contains('R'),
            channels: flags.contains('O') || flags.contains('V'),
            flags,
            max: config.max_queue.max(1) as u64,
            claim_idle,
            lease: config.lease,
        };
        let _ = self.args.set(args);
        Ok(())
    }

    /// The instance's first (`add`) or last (`rem`) subscriber of `channel` (broker level).
    pub(crate) async fn hook_channel(self: &Arc<Self>, channel: &str, add: bool) {
        let Some(a) = self.args.get() else { return };
        if !a.channels {
            return;
        }
        if add {
            self.channels().insert(channel.to_owned());
        } else {
            self.channels().remove(channel);
        }
        if let Err(e) = self.hook_nodes(channel, if add { "add" } else { "rem" }).await {
            // Redis down: the refresh re-adds a channel still held; one let go expires (its
            // vacate then comes from the sweep).
            tracing::warn!(error = %e, channel, "webhooks: could not record the channel's occupancy; retried by the refresh");
        }
    }

    /// Queues an occupancy change of `channel` for the occupancy task (started if idle) and
    /// waits for the call that carries it.
    async fn hook_nodes(self: &Arc<Self>, channel: &str, op: &'static str) -> Result<(), BrokerError> {
        let (start, rx) = self.occupancy.push(channel, op);
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.occupancy_calls().await });
        }
        rx.await.unwrap_or_else(|_| Err(BrokerError::Unavailable("webhooks: the occupancy call was dropped".into())))
    }

    /// The occupancy task: runs the queued changes, a batch per script call, until none waits.
    async fn occupancy_calls(&self) {
        while let Some(batch) = self.occupancy.next_batch(OCCUPANCY_BATCH) {
            if self.ctx.keys.is_redis_cluster() {
                // One slot per script: one call per change, a channel's changes in order, up to
                // CLUSTER_CONCURRENCY channels at once.
                futures_util::stream::iter(by_channel(batch))
                    .for_each_concurrent(CLUSTER_CONCURRENCY, |(channel, ops)| async move {
                        for (op, reply) in ops {
                            let _ = reply.send(self.hook_nodes_redis_cluster(&channel, op).await);
                        }
                    })
                    .await;
                continue;
            }
            let mut inv = self.ctx.scripts.hook_nodes.key(self.ctx.keys.hook_index());
            for (channel, _, _) in &batch {
                inv.key(self.ctx.keys.hook_nodes(channel));
            }
            inv.arg(&self.ctx.instance).arg(crate::millis(self.ctx.options.presence_ttl));
            for (channel, op, _) in &batch {
                inv.arg(*op).arg(channel.as_str());
            }
            self.hook_args(&mut inv);
            let result = self.ctx.commands.invoke(&inv).await.map(drop).map_err(BrokerError::from);
            for (_, _, reply) in batch {
                let _ = reply.send(result.clone());
            }
        }
    }

    /// One occupancy change on a Redis Cluster (see the module's doc).
    async fn hook_nodes_redis_cluster(&self, channel: &str, op: &str) -> Result<(), BrokerError> {
        let Some(a) = self.args.get() else { return Ok(()) };
        let idx = self.ctx.keys.hook_index();
        let ttl = crate::millis(self.ctx.options.presence_ttl);
        if op != "sweep" {
            // Listed first (an earlier score kept): a node dying before it moved the events or
            // wrote the index leaves the channel to the sweep.
            let mut cmd = redis::cmd("ZADD");
            cmd.arg(&idx).arg("LT").arg(crate::unix_ms() + ttl).arg(channel);
            self.ctx.commands.query(&cmd).await?;
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut inv = self.ctx.scripts.hook_nodes_redis_cluster.key(self.ctx.keys.hook_nodes(channel));
        inv.key(self.ctx.keys.hook_outbox(channel));
        inv.arg(&self.ctx.instance).arg(ttl).arg(op).arg(channel);
        inv.arg(format!("{}:{call}", self.ctx.instance)).arg(&a.flags);
        let reply = self.ctx.commands.invoke(&inv).await?;
        let (score, made, queued) = match &reply {
            Value::Array(v) => (
                v.first().and_then(bulk).map(<[u8]>::to_vec),
                v.get(1).and_then(int).unwrap_or(0),
                v.get(2).and_then(int).unwrap_or(0),
            ),
            _ => (None, 0, 0),
        };
        // Moved by the node that made them; what another node left behind (it died before its
        // move) goes with the channel's next event, or with the sweep. Not at every call: an
        // outbox holding another live node's events before its move would be moved twice.
        if made > 0 || (op == "sweep" && queued > 0) {
            self.hook_move(a, channel).await?;
        }
        match score.filter(|s| !s.is_empty()) {
            Some(score) => {
                let mut cmd = redis::cmd("ZADD");
                cmd.arg(&idx).arg(score).arg(channel);
                self.ctx.commands.query(&cmd).await?;
            }
            None if op == "sweep" => {
                let mut inv = self.ctx.scripts.hook_unindex.key(&idx);
                inv.arg(channel).arg(crate::unix_ms());
                self.ctx.commands.invoke(&inv).await?;
            }
            // Emptied by this change: the entry stays until its score, then the sweep finds
            // the set empty and removes it.
            None => {}
        }
        Ok(())
    }

    /// Moves a channel's outbox to the stream (Redis Cluster), oldest first, 100 at a time.
    async fn hook_move(&self, a: &Args, channel: &str) -> Result<(), BrokerError> {
        let out = self.ctx.keys.hook_outbox(channel);
        loop {
            let items = match self.ctx.commands.query(redis::cmd("LRANGE").arg(&out).arg(0).arg(99)).await? {
                Value::Array(items) => items.iter().filter_map(bulk).map(<[u8]>::to_vec).collect::<Vec<_>>(),
                _ => Vec::new(),
            };
            for item in &items {
                let mut inv = self.ctx.scripts.hook_append.key(&a.stream);
                inv.arg(item.as_slice());
                self.hook_args(&mut inv);
                self.ctx.commands.invoke(&inv).await?;
            }
            if items.is_empty() {
                return Ok(());
            }
            let mut inv = self.ctx.scripts.hook_trim.key(&out);
            inv.arg(&items);
            let removed = int(&self.ctx.commands.invoke(&inv).await?).unwrap_or(0);
            if items.len() < 100 || removed < items.len() as i64 {
                return Ok(());
            }
        }
    }

    /// Periodic: re-adds this instance to the sets of the channels it holds (fresh expiry; an
    /// entry Redis lost or that expired comes back, as an occupy if the set was empty), then
    /// sweeps the sets with expired instances (dead nodes), reporting their vacates.
    pub(crate) async fn hook_refresh(self: &Arc<Self>) -> Result<(), BrokerError> {
        let Some(a) = self.args.get() else { return Ok(()) };
        if !a.channels {
            return Ok(());
        }
        let held: Vec<String> = self.channels().iter().cloned().collect();
        let mut result = Ok(());
        // Queued in order with the subscribes' and unsubscribes' changes: a `rem` asked after
        // this `add` is applied after it.
        let mut calls = futures_util::stream::iter(held)
            .map(|c| async move {
                // Still held? (A `rem` may have come meanwhile.)
                if self.channels().contains(&c) { self.hook_nodes(&c, "add").await } else { Ok(()) }
            })
            .buffer_unordered(OCCUPANCY_BATCH);
        while let Some(r) = calls.next().await {
            if r.is_err() {
                result = r;
            }
        }
        drop(calls);
        let now = crate::unix_ms();
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(self.ctx.keys.hook_index()).arg("-inf").arg(now).arg("LIMIT").arg(0).arg(500);
        let expired = self.ctx.commands.query(&cmd).await?;
        let channels: Vec<String> = match &expired {
            Value::Array(items) => {
                items.iter().filter_map(bulk).filter_map(|b| std::str::from_utf8(b).ok()).map(str::to_owned).collect()
            }
            _ => Vec::new(),
        };
        let mut sweeps = futures_util::stream::iter(channels)
            .map(|c| async move { self.hook_nodes(&c, "sweep").await })
            .buffer_unordered(OCCUPANCY_BATCH);
        while let Some(r) = sweeps.next().await {
            if r.is_err() {
                result = r;
            }
        }
        result
    }

    async fn ensure_group(&self, a: &Args) -> Result<(), BrokerError> {
        if self.group_ready.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut cmd = redis::cmd("XGROUP");
        cmd.arg("CREATE").arg(&a.stream).arg(GROUP).arg("0").arg("MKSTREAM");
        match self.ctx.commands.query(&cmd).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("BUSYGROUP") => {}
            Err(e) => return Err(e.into()),
        }
        self.group_ready.store(true, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) async fn hook_read(&self, max: usize, wait: Duration) -> Result<Vec<HookEvent>, BrokerError> {
        let Some(a) = self.args.get() else {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        };
        self.ensure_group(a).await?;
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let due = {
                let mut last = self.last_claim.lock().unwrap_or_else(|e| e.into_inner());
                let due = last.is_none_or(|at| at.elapsed() >= CLAIM_EVERY);
                if due {
                    *last = Some(Instant::now());
                }
                due
            };
            if due {
                self.update_queued(a).await;
                self.reap_consumers(a).await;
            }
            if !self.lead(a).await? {
                // Another node delivers (one at a time, so events go out in stream order).
                tokio::time::sleep_until(deadline).await;
                return Ok(Vec::new());
            }
            // The delivering node: what is pending first — a batch of the node that delivered
            // before (it stopped or died) or one whose acknowledgement failed — then new events.
            let mut cmd = redis::cmd("XAUTOCLAIM");
            cmd.arg(&a.stream).arg(GROUP).arg(&self.ctx.instance).arg(0).arg("0");
            cmd.arg("COUNT").arg(max);
            let claimed = match self.ctx.commands.query(&cmd).await {
                Ok(Value::Array(parts)) => self.events_of(parts.get(1)).await,
                Ok(_) => Vec::new(),
                Err(e) => return Err(self.lost_group(e)),
            };
            if !claimed.is_empty() {
                tracing::debug!(events = claimed.len(), "webhooks: delivering events left pending");
                return Ok(claimed);
            }
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(&self.ctx.instance)
                .arg("COUNT")
                .arg(max)
                .arg("STREAMS")
                .arg(&a.stream)
                .arg(">");
            let got = match self.ctx.commands.query(&cmd).await {
                Ok(Value::Array(streams)) => {
                    let list = streams.first().and_then(|s| match s {
                        Value::Array(pair) => pair.get(1),
                        _ => None,
                    });
                    self.events_of(list).await
                }
                Ok(Value::Map(streams)) => self.events_of(streams.first().map(|(_, v)| v)).await,
                Ok(_) => Vec::new(),
                Err(e) => return Err(self.lost_group(e)),
            };
            if !got.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(got);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Takes or renews the delivery lease (`HOOK_LEAD`, for `lease`): whether this node is
    /// the one delivering.
    async fn lead(&self, a: &Args) -> Result<bool, BrokerError> {
        let mut inv = self.ctx.scripts.hook_lead.key(format!("{}:lead", a.stream));
        inv.arg(&self.ctx.instance).arg(crate::millis(a.lease).max(1));
        let held = self.ctx.commands.invoke(&inv).await.map_err(|e| self.lost_group(e))?;
        Ok(int(&held) == Some(1))
    }

    /// Gives the delivery lease up (a node stopping), so another node delivers at once.
    pub(crate) async fn hook_release(&self) -> Result<(), BrokerError> {
        let Some(a) = self.args.get() else { return Ok(()) };
        let mut inv = self.ctx.scripts.hook_lead.key(format!("{}:lead", a.stream));
        inv.arg(&self.ctx.instance).arg(0);
        self.ctx.commands.invoke(&inv).await.map(drop).map_err(Into::into)
    }

    /// Deletes (`XGROUP DELCONSUMER`) the group's consumers idle for longer than the claim
    /// time with nothing pending: the nodes of earlier starts (an instance id is new at every
    /// start). Their pending events were claimed first (`XAUTOCLAIM`, same idle bound); a live
    /// node reads every `POLL`, and one deleted anyway is re-created by its next read.
    async fn reap_consumers(&self, a: &Args) {
        {
            let mut last = self.last_reap.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < REAP_EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        let Ok(Value::Array(consumers)) =
            self.ctx.commands.query(redis::cmd("XINFO").arg("CONSUMERS").arg(&a.stream).arg(GROUP)).await
        else {
            return;
        };
        let idle_bound = crate::millis(a.claim_idle) as i64;
        for c in &consumers {
            let Some((name, pending, idle)) = consumer_info(c) else { continue };
            if name == self.ctx.instance || pending > 0 || idle <= idle_bound {
                continue;
            }
            let mut cmd = redis::cmd("XGROUP");
            cmd.arg("DELCONSUMER").arg(&a.stream).arg(GROUP).arg(&name);
            match self.ctx.commands.query(&cmd).await {
                Ok(_) => tracing::debug!(consumer = %name, "webhooks: deleted the consumer of a node gone"),
                Err(e) => tracing::debug!(error = %e, "webhooks: could not delete a stale consumer"),
            }
        }
    }

    /// The events of a list of stream entries; entries that are not events (written by
    /// something else) are acknowledged, so they are not claimed again and again.
    async fn events_of(&self, list: Option<&Value>) -> Vec<HookEvent> {
        let Some(list) = list else { return Vec::new() };
        let (events, bad, aliases) = entries(list);
        if !aliases.is_empty() {
            let mut map = self.entry_ids.lock().unwrap_or_else(|e| e.into_inner());
            for (own, entry) in aliases {
                let entries = map.entry(own).or_default();
                if !entries.contains(&entry) {
                    entries.push(entry);
                }
            }
        }
        if !bad.is_empty() {
            tracing::warn!(ids = ?bad, "webhooks: stream entries that are not events; acknowledged and skipped");
            if let Err(e) = self.hook_ack(&bad).await {
                tracing::debug!(error = %e, "webhooks: could not acknowledge the entries skipped");
            }
        }
        events
    }

    /// A `NOGROUP` (Redis lost the stream): create the group again at the next read.
    fn lost_group(&self, e: Fault) -> BrokerError {
        if e.to_string().contains("NOGROUP") {
            self.group_ready.store(false, Ordering::Relaxed);
        }
        e.into()
    }

    /// The queue's length (the stream holds only undelivered events) and the drops counted
    /// by the scripts, for [`Hooks::hook_stats`].
    async fn update_queued(&self, a: &Args) {
        if let Ok(len) = self.ctx.commands.query(redis::cmd("XLEN").arg(&a.stream)).await {
            self.queued.store(int(&len).unwrap_or(0).max(0) as u64, Ordering::Relaxed);
        }
        if let Ok(dropped) = self.ctx.commands.query(redis::cmd("GET").arg(format!("{}:dropped", a.stream))).await {
            self.dropped.store(int(&dropped).unwrap_or(0).max(0) as u64, Ordering::Relaxed);
        }
    }

    /// A client publish (`client_publish`), appended by this node after the publish: not in the
    /// publish script (a node dying between the two loses the event; see docs/hooks.md).
    pub(crate) async fn hook_publish(
        &self,
        channel: &str,
        user: &str,
        client: &str,
        data: &str,
    ) -> Result<(), BrokerError> {
        let Some(a) = self.args.get() else { return Ok(()) };
        if !a.flags.contains('P') {
            return Ok(());
        }
        let data: Option<serde_json::Value> = serde_json::from_str(data).ok();
        let event = serde_json::json!({
            "name": "client_publish", "channel": channel, "time_ms": crate::unix_ms(),
            "user": user, "client": client, "data": data,
        });
        // The key only routes the call on a Cluster (the script appends to the stream).
        let mut inv = self.ctx.scripts.hook_append.key(&a.stream);
        inv.arg(event.to_string());
        self.hook_args(&mut inv);
        self.ctx.commands.invoke(&inv).await.map(drop).map_err(Into::into)
    }

    pub(crate) async fn hook_ack(&self, ids: &[String]) -> Result<(), BrokerError> {
        let Some(a) = self.args.get() else { return Ok(()) };
        if ids.is_empty() {
            return Ok(());
        }
        // Acknowledged and deleted: the stream holds only what is still to deliver, so its
        // length is the queue's and its bound drops only undelivered events.
        let ids = self.entry_ids(ids, true);
        let mut inv = self.ctx.scripts.hook_ack.key(&a.stream);
        inv.arg(GROUP).arg(&ids);
        self.ctx.commands.invoke(&inv).await.map(drop).map_err(Into::into)
    }

    /// Keeps a batch this node is retrying claimed by it (resets the entries' idle time, so no
    /// other node claims them as a dead consumer's).
    pub(crate) async fn hook_hold(&self, ids: &[String]) -> Result<(), BrokerError> {
        let Some(a) = self.args.get() else { return Ok(()) };
        if ids.is_empty() {
            return Ok(());
        }
        let ids = self.entry_ids(ids, false);
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&a.stream).arg(GROUP).arg(&self.ctx.instance).arg(0).arg(&ids).arg("JUSTID");
        self.ctx.commands.query(&cmd).await?;
        // No read happens while a batch is retried: the lease and the gauges are renewed here.
        if !self.lead(a).await? {
            tracing::debug!("webhooks: another node took the delivery lease while this one retried a batch");
        }
        self.update_queued(a).await;
        Ok(())
    }

    /// The stream entries of events (see [`entries_of`]).
    fn entry_ids(&self, ids: &[String], forget: bool) -> Vec<String> {
        entries_of(&mut self.entry_ids.lock().unwrap_or_else(|e| e.into_inner()), ids, forget)
    }

    pub(crate) fn hook_stats(&self) -> HookStats {
        HookStats { queued: self.queued.load(Ordering::Relaxed), dropped: self.dropped.load(Ordering::Relaxed) }
    }
}

/// The stream entries of events: an event whose id is its own (made on a Cluster) maps to its
/// entries (two, if it was moved twice); a stream id stands for itself; anything else is
/// skipped (an entry not known here stays pending and is claimed again). `forget`: acknowledged,
/// dropped from the map.
fn entries_of(map: &mut HashMap<String, Vec<String>>, ids: &[String], forget: bool) -> Vec<String> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let mapped = if forget { map.remove(id) } else { map.get(id).cloned() };
        match mapped {
            Some(entries) => out.extend(entries),
            None if is_stream_id(id) => out.push(id.clone()),
            None => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `<ms>-<seq>`.
fn is_stream_id(id: &str) -> bool {
    id.split_once('-').is_some_and(|(ms, seq)| {
        !ms.is_empty()
            && !seq.is_empty()
            && ms.bytes().all(|b| b.is_ascii_digit())
            && seq.bytes().all(|b| b.is_ascii_digit())
    })
}

/// One entry of `XINFO CONSUMERS` (RESP2: a flat key/value array; RESP3: a map) → its name,
/// pending count and idle ms.
fn consumer_info(v: &Value) -> Option<(String, i64, i64)> {
    let pairs: Vec<(&Value, &Value)> = match v {
        Value::Array(kv) => kv.chunks(2).filter_map(|p| Some((p.first()?, p.get(1)?))).collect(),
        Value::Map(kv) => kv.iter().map(|(k, v)| (k, v)).collect(),
        _ => return None,
    };
    let field = |name: &[u8]| pairs.iter().find(|(k, _)| bulk(k) == Some(name)).map(|(_, v)| *v);
    let name = String::from_utf8(bulk(field(b"name")?)?.to_vec()).ok()?;
    Some((name, int(field(b"pending")?)?, int(field(b"idle")?)?))
}

/// Stream entries `[[id, [field, value, …]], …]` → events (the id is the entry's, or the event's
/// own when it has one: made on a Cluster), the ids of the entries that are not events, and
/// (event id, entry id) for the events with an id of their own.
fn entries(v: &Value) -> (Vec<HookEvent>, Vec<String>, Vec<(String, String)>) {
    let Value::Array(items) = v else { return (Vec::new(), Vec::new(), Vec::new()) };
    let mut out = Vec::new();
    let mut bad = Vec::new();
    let mut aliases = Vec::new();
    for item in items {
        let Value::Array(pair) = item else { continue };
        let (Some(id), Some(Value::Array(fields))) = (pair.first().and_then(bulk), pair.get(1)) else { continue };
        let Ok(id) = std::str::from_utf8(id) else { continue };
        let body = fields.chunks(2).find_map(|kv| match kv {
            [k, v] if bulk(k) == Some(b"e") => bulk(v),
            _ => None,
        });
        #[derive(serde::Deserialize)]
        struct Stored {
            #[serde(default)]
            id: Option<String>,
            name: String,
            channel: String,
            time_ms: f64,
            #[serde(default)]
            user: Option<String>,
            #[serde(default)]
            client: Option<String>,
            #[serde(default)]
            data: Option<serde_json::Value>,
        }
        match body.map(serde_json::from_slice::<Stored>) {
            Some(Ok(s)) => out.push(HookEvent {
                id: match s.id {
                    Some(own) => {
                        aliases.push((own.clone(), id.to_owned()));
                        own
                    }
                    None => id.to_owned(),
                },
                name: s.name,
                channel: s.channel,
                time_ms: s.time_ms as u64,
                user: s.user,
                client: s.client,
                data: s.data,
            }),
            _ => bad.push(id.to_owned()),
        }
    }
    (out, bad, aliases)
}

#[cfg(test)]
mod tests;
