//! The pub/sub task: the node's ONE Redis pub/sub connection, owned by ONE task that takes
//! subscribe/unsubscribe commands over a channel and delivers publications to the handler.
//!
//! The connection speaks RESP3, so ordinary commands (PING, the history script) run on it between
//! pushes, and their replies are ordered with the pushes. That ordering is what makes the
//! bookkeeping exact:
//! - **subscribe**: SUBSCRIBE, then read the channel's position (epoch, top) on the same
//!   connection. Publications pushed before that reply were published after the SUBSCRIBE took
//!   effect: they are delivered first; the position then becomes the channel's baseline. The
//!   caller gets its answer only after all this, so the node's history read comes after the
//!   subscription is live.
//! - **history reads** of locally subscribed channels run here too, pipelined: the pushes that
//!   precede their replies are delivered before the callers get the histories, so a node's
//!   merge by offset never sees a covered publication arrive live afterwards.
//! - **live**: each publication is checked against the channel's [`Position`]: in order →
//!   delivered; at or below the last delivered offset → dropped as a duplicate; a hole → filled
//!   from the history first.
//! - **reconnect** (jittered exponential backoff): re-SUBSCRIBE every channel in batches, then
//!   GAP-FILL: read each channel's history after its last delivered offset (pipelined) and deliver
//!   what is missing before any live publication; live ones already delivered are dropped. When
//!   the epoch changed (Redis lost the data), the new epoch's history is delivered as it is; when
//!   the history no longer holds the whole gap (trimmed, expired), what it holds is delivered.
//! - **probe**: a PING every `probe_interval`; no answer within the command timeout marks the
//!   broker down and forces a reconnect.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crier_core::{BrokerError, BrokerHandler, History, Publication};
use crier_protocol::StreamPosition;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::command::bounded;
use crate::keys::Keys;
use crate::scripts::{self, HistoryCall, Params, Scripts};
use crate::topology::Resolver;
use crate::tracker::Position;

mod backoff;
mod delivery;
mod shards;

use backoff::Backoff;
use shards::{Conn, Shard};
/// History reads per pipeline.
const FILL_BATCH: usize = 100;
/// Commands taken from the queue at once.
const COMMAND_BATCH: usize = 256;

/// State shared between the broker handle and its tasks.
pub(crate) struct Shared {
    pub handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// Whether the pub/sub connection is up (subscribed and gap-filled).
    pub up: watch::Sender<bool>,
    pub reconnects: AtomicU64,
    /// Publications delivered by gap-fills (missed live, recovered from the history).
    pub gap_filled: AtomicU64,
    /// Random id of this broker instance (control messages skip their sender).
    pub instance: String,
    /// The command connection, probed before the broker reports itself up again, so that
    /// readiness never turns green while publishes would still fail.
    pub commands: crate::command::Commands,
    /// Set when a connection attempt failed for a reason retrying cannot fix (a certificate
    /// that does not verify, a master name no Sentinel knows); `start` reports it.
    pub setting_problem: std::sync::Mutex<Option<String>>,
    /// This node's name (`node_id`): what its replies to control operations carry.
    pub node: String,
    /// Control operations of this instance waiting for the other nodes' replies, by id.
    pub replies: std::sync::Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>,
}

/// Another node's reply to a control operation of this instance (on its reply channel).
#[derive(Serialize, Deserialize)]
pub(crate) struct Reply {
    pub id: u64,
    pub node: String,
    /// The replying broker instance (two nodes misconfigured with one `node_id` still count
    /// twice).
    #[serde(default)]
    pub instance: String,
    pub reply: crier_core::UserOpReply,
}

impl Shared {
    fn deliver(&self, channel: &str, publication: Publication) {
        if let Some(h) = self.handler.get() {
            h.on_publication(channel, publication);
        }
    }

    pub(crate) fn has_subscribers(&self, channel: &str) -> bool {
        self.handler.get().is_some_and(|h| h.has_subscribers(channel))
    }

    pub(crate) fn setting_problem(&self) -> Option<String> {
        self.setting_problem.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_setting_problem(&self, problem: Option<String>) {
        *self.setting_problem.lock().unwrap_or_else(|e| e.into_inner()) = problem;
    }
}

/// What the broker asks of the task.
pub(crate) enum Command {
    Subscribe {
        channel: String,
        reply: oneshot::Sender<Result<(), BrokerError>>,
    },
    Unsubscribe {
        channel: String,
        reply: oneshot::Sender<()>,
    },
    /// A history read of a channel with local subscribers, ordered with the live stream (see
    /// `Task::read_histories`).
    History(HistoryRead),
}

type Subscribe = (String, oneshot::Sender<Result<(), BrokerError>>);

pub(crate) struct HistoryRead {
    pub channel: String,
    pub since: Option<StreamPosition>,
    pub limit: usize,
    pub reply: oneshot::Sender<Result<History, BrokerError>>,
}

/// A message on the control channel.
#[derive(Serialize, Deserialize)]
pub(crate) struct Control {
    pub op: String,
    pub user: String,
    pub origin: String,
    /// [`USER_OP`]: the operation, the id of the caller's wait and its reply channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<crier_core::UserOp>,
    #[serde(default)]
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

pub(crate) const DISCONNECT_USER: &str = "disconnect_user";
/// A server-side control operation (`Broker::user_op`); every node answers on `reply`.
pub(crate) const USER_OP: &str = "user_op";

/// Timing of the task.
pub(crate) struct Settings {
    pub command_timeout: Duration,
    pub probe_interval: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    pub client_name: String,
}

enum State {
    /// SUBSCRIBE sent, baseline not read yet: everything that arrives is delivered.
    Pending,
    Tracking(Position),
}

/// Why the connected phase ended.
enum End {
    Exit,
    Lost(String),
}

type Step = Result<(), End>;

fn lost(e: impl std::fmt::Display) -> End {
    End::Lost(e.to_string())
}

/// The server process's run id (`INFO server`): changes with every restart and differs between
/// a master and the replica promoted in its place.
async fn run_id(con: &mut MultiplexedConnection, t: Duration) -> Result<String, End> {
    let info: String = bounded(t, redis::cmd("INFO").arg("server").query_async(con)).await.map_err(lost)?;
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| lost("INFO server has no run_id"))
}

/// See the module docs.
pub(crate) struct Task {
    pub resolver: Resolver,
    /// The server the command connection points at (`host:port`).
    current: Option<String>,
    pub keys: Keys,
    pub params: Params,
    pub scripts: Arc<Scripts>,
    pub shared: Arc<Shared>,
    pub settings: Settings,
    pub commands: mpsc::Receiver<Command>,
    pub shutdown: watch::Receiver<()>,
    /// Boxed names: a channel's name is kept here, in the hub and in redis-rs, for its whole life.
    channels: HashMap<Box<str>, State>,
    control: Vec<u8>,
    /// This instance's reply channel (answers to its control operations).
    reply: Vec<u8>,
}

impl Task {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        resolver: Resolver,
        keys: Keys,
        params: Params,
        scripts: Arc<Scripts>,
        shared: Arc<Shared>,
        settings: Settings,
        commands: mpsc::Receiver<Command>,
        shutdown: watch::Receiver<()>,
    ) -> Task {
        let control = keys.control().into_bytes();
        let reply = keys.reply(&shared.instance).into_bytes();
        let channels = HashMap::new();
        let current = resolver.fixed().map(|t| t.key);
        Task {
            resolver,
            current,
            keys,
            params,
            scripts,
            shared,
            settings,
            commands,
            shutdown,
            channels,
            control,
            reply,
        }
    }

    /// Makes sure the command connection answers too (after a Redis restart its first call fails
    /// and makes it reconnect). Bounded: after a few tries the broker reports up anyway, since
    /// the pub/sub side works and the command connection keeps reconnecting by itself.
    async fn probe_commands(&self) {
        for attempt in 0..5u64 {
            if self.shared.commands.query(&redis::cmd("PING")).await.is_ok() {
                return;
            }
            tokio::time::sleep(self.settings.reconnect_min * (attempt as u32 + 1)).await;
        }
        tracing::warn!("redis command connection does not answer yet");
    }

    /// Runs until the broker is dropped.
    pub(crate) async fn run(mut self) {
        let mut backoff = Backoff::new(self.settings.reconnect_min, self.settings.reconnect_max);
        let (mut connected_before, mut failures) = (false, 0u64);
        loop {
            let end = match self.connect().await {
                Ok(mut conn) => {
                    backoff.reset();
                    failures = 0;
                    if connected_before {
                        self.shared.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_before = true;
                    self.probe_commands().await;
                    self.shared.up.send_replace(true);
                    tracing::info!(channels = self.channels.len(), "redis pub/sub connected");
                    let end = self.serve(&mut conn).await;
                    self.shared.up.send_replace(false);
                    end
                }
                Err(end) => end,
            };
            match end {
                End::Exit => return,
                End::Lost(why) if failures == 0 => tracing::warn!(%why, "redis pub/sub unavailable; reconnecting"),
                End::Lost(why) => tracing::debug!(%why, failures, "redis pub/sub still unavailable"),
            }
            failures += 1;
            if self.wait_down(backoff.next()).await.is_err() {
                return;
            }
        }
    }

    /// Connects (one connection, or one per Cluster master), subscribes the control channel and
    /// every channel, and gap-fills them.
    async fn connect(&mut self) -> Result<Conn, End> {
        let t = self.settings.command_timeout;
        let (targets, slots) = if self.resolver.is_cluster() {
            match self.resolver.shards().await {
                Ok((map, targets)) => (targets, Some(map)),
                Err(u) => {
                    self.shared.set_setting_problem(u.setting.then(|| u.why.clone()));
                    return Err(lost(u.why));
                }
            }
        } else {
            match self.resolver.resolve().await {
                Ok(target) => (vec![target], None),
                Err(u) => {
                    self.shared.set_setting_problem(u.setting.then(|| u.why.clone()));
                    return Err(lost(u.why));
                }
            }
        };
        let (tx, pushes) = mpsc::unbounded_channel();
        let mut shards = Vec::with_capacity(targets.len());
        let mut first = None;
        for target in targets {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(t))
                .set_response_timeout(Some(t))
                .set_push_sender(tx.clone());
            let mut con = match bounded(t, target.pubsub.get_multiplexed_async_connection_with_config(&config)).await {
                Ok(con) => con,
                Err(e) => {
                    let why = format!("{} ({})", e, target.key);
                    let setting = crate::tls::message_is_certificate_error(&why);
                    self.shared.set_setting_problem(setting.then(|| format!("redis TLS: {why}")));
                    return Err(lost(why));
                }
            };
            let mut name = redis::cmd("CLIENT");
            name.arg("SETNAME").arg(&self.settings.client_name);
            if let Err(e) = bounded(t, name.query_async::<Value>(&mut con)).await {
                tracing::debug!(error = %e, "CLIENT SETNAME failed");
            }
            let history_sha = bounded(t, self.scripts.history.load_async(&mut con)).await.map_err(lost)?;
            let key = target.key.clone();
            if first.is_none() {
                first = Some(target);
            }
            shards.push(Shard { con, history_sha, key });
        }
        self.shared.set_setting_problem(None);
        if self.resolver.is_sentinel()
            && let (Some(shard), Some(target)) = (shards.first_mut(), first)
        {
            self.follow(&mut shard.con, target).await?;
        }
        if self.resolver.is_cluster() && !self.shared.commands.is_set() {
            let con = self.resolver.cluster_commands().await.map_err(|e| lost(format!("cluster commands: {e}")))?;
            self.shared.commands.replace(crate::command::Con::Cluster(con), String::new());
        }
        let mut conn = Conn { shards, slots, pushes, unsubscribing: HashMap::new() };
        // The control channel: plain pub/sub (a Cluster broadcasts it to every node).
        if let Some(shard) = conn.shards.first_mut() {
            bounded(t, shard.con.subscribe(self.keys.control())).await.map_err(lost)?;
            bounded(t, shard.con.subscribe(self.keys.reply(&self.shared.instance))).await.map_err(lost)?;
        }
        let tracked: Vec<String> = self.channels.keys().map(|c| c.to_string()).collect();
        for (shard, channels) in conn.group(&tracked) {
            let names: Vec<String> = channels.iter().map(|c| self.keys.pubsub(c)).collect();
            conn.subscribe(shard, &names, t).await?;
        }
        if conn.shards.len() > 1 {
            tracing::info!(shards = conn.shards.len(), masters = ?conn.shards.iter().map(|s| &s.key).collect::<Vec<_>>(), "redis cluster pub/sub connected");
        }
        self.fill(&mut conn, &tracked).await?;
        self.drain(&mut conn).await?;
        Ok(conn)
    }

    /// Sentinel: points the command connection at the master this connection reached (when it
    /// changed), with that server process's run id as the publish script's generation.
    async fn follow(&mut self, con: &mut MultiplexedConnection, target: crate::topology::Target) -> Step {
        let t = self.settings.command_timeout;
        let run_id = run_id(con, t).await?;
        let manager =
            crate::command::manager(target.commands, t, self.settings.reconnect_min, self.settings.reconnect_max)
                .map_err(lost)?;
        if self.current.as_deref() != Some(target.key.as_str()) {
            tracing::info!(master = %target.key, previous = ?self.current, "redis master (from Sentinel)");
        }
        self.shared.commands.replace(crate::command::Con::Single(manager), run_id);
        self.current = Some(target.key);
        Ok(())
    }

    /// The probe: PING, or with Sentinel or a Cluster ROLE on every connection (a demoted
    /// master still answers PING).
    async fn probe(&self, conn: &mut Conn) -> Step {
        let t = self.settings.command_timeout;
        let check_role = self.resolver.is_sentinel() || self.resolver.is_cluster();
        for shard in &mut conn.shards {
            if !check_role {
                let ping = redis::cmd("PING");
                bounded(t, ping.query_async::<Value>(&mut shard.con))
                    .await
                    .map_err(|e| lost(format!("probe failed: {e}")))?;
                continue;
            }
            let reply = bounded(t, redis::cmd("ROLE").query_async::<Value>(&mut shard.con))
                .await
                .map_err(|e| lost(format!("probe of {} failed: {e}", shard.key)))?;
            match crate::sentinel::role_of(&reply).as_deref() {
                Some("master") => {}
                other => return Err(lost(format!("{} is no longer a master (role {other:?})", shard.key))),
            }
        }
        Ok(())
    }

    async fn serve(&mut self, conn: &mut Conn) -> End {
        let mut probe = tokio::time::interval(self.settings.probe_interval);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        probe.reset();
        let readonly = self.shared.commands.readonly.clone();
        loop {
            let step = tokio::select! {
                _ = self.shutdown.changed() => Err(End::Exit),
                push = conn.pushes.recv() => match push {
                    Some(push) => self.on_push(conn, push).await,
                    None => Err(lost("push stream ended")),
                },
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.on_commands(conn, cmd).await,
                    None => Err(End::Exit),
                },
                _ = probe.tick() => self.probe(conn).await,
                _ = readonly.notified() => {
                    if self.resolver.is_sentinel() {
                        Err(lost("a command hit a read-only replica: the master moved"))
                    } else {
                        Ok(())
                    }
                }
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    /// While disconnected: answers commands without Redis until `delay` passes.
    async fn wait_down(&mut self, delay: Duration) -> Step {
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => return Ok(()),
                _ = self.shutdown.changed() => return Err(End::Exit),
                cmd = self.commands.recv() => match cmd {
                    Some(cmd) => self.answer_offline(cmd),
                    None => return Err(End::Exit),
                },
            }
        }
    }

    /// Answers a command without a connection: a new subscribe is refused; an unsubscribe only
    /// forgets the channel (it is not re-subscribed on reconnect).
    fn answer_offline(&mut self, cmd: Command) {
        match cmd {
            Command::Subscribe { channel, reply } => {
                let answer = if self.channels.contains_key(channel.as_str()) {
                    Ok(())
                } else {
                    Err(BrokerError::Unavailable("redis pub/sub is reconnecting".into()))
                };
                let _ = reply.send(answer);
            }
            Command::Unsubscribe { channel, reply } => {
                self.forget(&channel);
                let _ = reply.send(());
            }
            Command::History(read) => {
                let _ = read.reply.send(Err(BrokerError::Unavailable("redis pub/sub is reconnecting".into())));
            }
        }
    }

    /// Drops a channel from the subscription set unless the node has subscribers again.
    fn forget(&mut self, channel: &str) {
        if !self.shared.has_subscribers(channel) {
            self.channels.remove(channel);
        }
    }

    async fn on_commands(&mut self, conn: &mut Conn, first: Command) -> Step {
        let mut batch = vec![first];
        while batch.len() < COMMAND_BATCH {
            match self.commands.try_recv() {
                Ok(cmd) => batch.push(cmd),
                Err(_) => break,
            }
        }
        // Subscribes and history reads are batched (subscribes first), and so are unsubscribes:
        // per channel, in the order asked — a command about a channel with an earlier command of
        // the other kind waiting sends what waits first. (One UNSUBSCRIBE per channel, each
        // waited for, bounded a node's channel churn at one round trip per vacated channel.)
        let (mut subs, mut reads, mut unsubs) = (Vec::new(), Vec::new(), Vec::new());
        let mut batch = batch.into_iter();
        let mut result = Ok(());
        for cmd in batch.by_ref() {
            match cmd {
                Command::Subscribe { channel, reply } => {
                    if unsubs.iter().any(|(c, _)| *c == channel) {
                        result = self.unsubscribe(conn, &mut unsubs).await;
                    }
                    subs.push((channel, reply));
                }
                Command::History(read) => {
                    if unsubs.iter().any(|(c, _)| *c == read.channel) {
                        result = self.unsubscribe(conn, &mut unsubs).await;
                    }
                    reads.push(read);
                }
                Command::Unsubscribe { channel, reply } => {
                    if subs.iter().any(|(c, _)| *c == channel) || reads.iter().any(|r| r.channel == channel) {
                        result = self.flush(conn, &mut subs, &mut reads).await;
                    }
                    unsubs.push((channel, reply));
                }
            }
            if result.is_err() {
                break;
            }
        }
        if result.is_ok() {
            result = self.flush(conn, &mut subs, &mut reads).await;
        }
        if result.is_ok() {
            result = self.unsubscribe(conn, &mut unsubs).await;
        }
        // Unsubscribes not sent: forgotten (not re-subscribed on reconnect), answered.
        for (channel, reply) in unsubs {
            self.forget(&channel);
            let _ = reply.send(());
        }
        // The connection is gone: answer the rest as if offline.
        for (channel, reply) in subs {
            self.answer_offline(Command::Subscribe { channel, reply });
        }
        for read in reads {
            self.answer_offline(Command::History(read));
        }
        for cmd in batch {
            self.answer_offline(cmd);
        }
        result
    }

    async fn flush(&mut self, conn: &mut Conn, subs: &mut Vec<Subscribe>, reads: &mut Vec<HistoryRead>) -> Step {
        self.subscribe(conn, std::mem::take(subs)).await?;
        self.read_histories(conn, std::mem::take(reads)).await
    }

    /// History reads ordered with the live stream: the replies come on this connection after
    /// every publication pushed before the reads ran, and those are delivered (drained) before
    /// the callers get their answers. So a node that reads a channel's history at top T has
    /// already been handed every publication <= T that it will get live: its merge by offset
    /// (buffer, then drop what the history covered) is exact — no duplicate, no gap.
    async fn read_histories(&mut self, conn: &mut Conn, reads: Vec<HistoryRead>) -> Step {
        if reads.is_empty() {
            return Ok(());
        }
        let replies = self.read_on_shards(conn, &reads).await;
        let replies = match replies {
            Ok(replies) => self.drain(conn).await.map(|()| replies),
            Err(e) => Err(e),
        };
        match replies {
            Ok(replies) => {
                for (r, v) in reads.into_iter().zip(replies) {
                    let _ = r.reply.send(scripts::parse_history(v));
                }
                Ok(())
            }
            Err(end) => {
                for r in reads {
                    self.answer_offline(Command::History(r));
                }
                Err(end)
            }
        }
    }

    /// The history reads, each on its channel's shard (pipelined per shard); replies in `reads`'
    /// order.
    async fn read_on_shards(&mut self, conn: &mut Conn, reads: &[HistoryRead]) -> Result<Vec<Value>, End> {
        let t = self.settings.command_timeout;
        let mut replies: Vec<Option<Value>> = (0..reads.len()).map(|_| None).collect();
        let mut by_shard: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, r) in reads.iter().enumerate() {
            let shard = conn.shard_of(&r.channel);
            match by_shard.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, list)) => list.push(i),
                None => by_shard.push((shard, vec![i])),
            }
        }
        for (shard, indices) in by_shard {
            let sha = conn.shards.get(shard).map(|s| s.history_sha.clone()).unwrap_or_default();
            let mut pipe = redis::pipe();
            for &i in &indices {
                let r = &reads[i];
                let since = r.since.as_ref().map(|p| (p.epoch.as_str(), p.offset));
                pipe.add_command(HistoryCall::new(&self.keys, &self.params, &r.channel, since, r.limit).evalsha(&sha));
            }
            let values = conn.pipeline(shard, &pipe, t).await?;
            for (i, v) in indices.into_iter().zip(values) {
                replies[i] = Some(v);
            }
        }
        replies.into_iter().map(|v| v.ok_or_else(|| lost("a history read got no reply"))).collect()
    }

    async fn subscribe(&mut self, conn: &mut Conn, subs: Vec<Subscribe>) -> Step {
        if subs.is_empty() {
            return Ok(());
        }
        let mut fresh = Vec::new();
        let mut replies = Vec::with_capacity(subs.len());
        for (channel, reply) in subs {
            let known = self.channels.contains_key(channel.as_str()) && !fresh.contains(&channel);
            if !self.channels.contains_key(channel.as_str()) {
                self.channels.insert(channel.as_str().into(), State::Pending);
                fresh.push(channel);
            }
            replies.push((reply, known));
        }
        let result = self.subscribe_fresh(conn, &fresh).await;
        if result.is_err() {
            for channel in &fresh {
                self.channels.remove(channel.as_str());
            }
        }
        for (reply, known) in replies {
            let answer = match &result {
                Err(End::Lost(why)) if !known => {
                    Err(BrokerError::Unavailable(format!("redis subscribe failed: {why}")))
                }
                Err(End::Exit) if !known => Err(BrokerError::Unavailable("broker stopped".into())),
                _ => Ok(()),
            };
            let _ = reply.send(answer);
        }
        result
    }

    async fn subscribe_fresh(&mut self, conn: &mut Conn, fresh: &[String]) -> Step {
        let t = self.settings.command_timeout;
        let mut positions = HashMap::with_capacity(fresh.len());
        for (shard, channels) in conn.group(fresh) {
            let names: Vec<String> = channels.iter().map(|c| self.keys.pubsub(c)).collect();
            conn.subscribe(shard, &names, t).await?;
            let sha = conn.shards.get(shard).map(|s| s.history_sha.clone()).unwrap_or_default();
            for chunk in channels.chunks(FILL_BATCH) {
                let mut pipe = redis::pipe();
                for channel in chunk {
                    pipe.add_command(HistoryCall::new(&self.keys, &self.params, channel, None, 0).evalsha(&sha));
                }
                let replies = conn.pipeline(shard, &pipe, t).await?;
                for (channel, v) in chunk.iter().zip(replies) {
                    positions.insert((*channel).to_owned(), scripts::parse_history(v).map_err(lost)?);
                }
            }
        }
        // Publications pushed before the positions were read came after the SUBSCRIBE: deliver
        // them before the baseline is set.
        self.drain(conn).await?;
        for (channel, h) in positions {
            match self.channels.get_mut(channel.as_str()) {
                Some(state @ State::Pending) => *state = State::Tracking(Position::new(h.epoch.into(), h.offset)),
                Some(State::Tracking(pos)) if *pos.epoch == *h.epoch => pos.settle(h.offset),
                _ => {}
            }
        }
        Ok(())
    }

    /// Unsubscribes the channels of `unsubs` the node has no subscribers of again (one call per
    /// shard), then answers them; on a failure they stay in `unsubs` for the caller to forget.
    async fn unsubscribe(&mut self, conn: &mut Conn, unsubs: &mut Vec<(String, oneshot::Sender<()>)>) -> Step {
        let gone: Vec<&str> = unsubs
            .iter()
            .map(|(c, _)| c.as_str())
            .filter(|c| !self.shared.has_subscribers(c) && self.channels.remove(*c).is_some())
            .collect();
        for (shard, channels) in conn.group(&gone) {
            let names: Vec<String> = channels.iter().map(|c| self.keys.pubsub(c)).collect();
            conn.unsubscribe(shard, &names, self.settings.command_timeout).await?;
        }
        for (_, reply) in unsubs.drain(..) {
            let _ = reply.send(());
        }
        Ok(())
    }
}
