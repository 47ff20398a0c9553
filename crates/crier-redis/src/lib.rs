//! crier's Redis broker: any number of nodes sharing one Redis (or a Sentinel-managed master,
//! or a Redis Cluster; over TLS with `rediss://`) form one cluster.
//! [`RedisBroker`] implements [`crier_core::Broker`] and passes the same conformance suite as the
//! memory broker. This is the only crate that knows `redis`.
//!
//! # Map
//! - `lib.rs`: [`RedisOptions`], [`RedisBroker`] and its `Broker` impl (thin: it delegates).
//! - `keys.rs`: the key layout below, in code.
//! - `scripts.rs`: the Lua scripts (publish, history, expiring sets) and their reply parsing.
//! - `publisher.rs`: the task that batches a node's publishes into script calls.
//! - `payload.rs`: the `offset:epoch:ts_us:frame` payload published and kept in the history.
//! - `command.rs`: the command connection (auto-reconnecting, every call with a deadline) and
//!   the mapping of Redis errors to `BrokerError`.
//! - `pubsub/`: the task owning the node's single pub/sub connection: subscriptions, probe,
//!   reconnect with backoff (`mod.rs`, `backoff.rs`); delivery in offset order and gap-fill
//!   (`delivery.rs`).
//! - `tracker.rs`: per-channel "last delivered" bookkeeping (duplicates, holes), pure logic.
//! - `presence.rs`: presence, connections per user and the node registry, with expiry and a
//!   background refresh of this node's entries.
//! - `topology.rs`: where Redis is ([`Topology`]: one server, Sentinel, Cluster), resolved
//!   before every pub/sub (re)connect; `tls.rs` (rustls, always verified), `sentinel.rs` (asking
//!   Sentinels for the master), `cluster.rs` (slot map, key slots); `pubsub/shards.rs` (one
//!   pub/sub connection per master). See docs/cluster.md for the behaviour of each.
//!
//! # Key layout
//! Prefix `crier` (configurable, [`RedisOptions::key_prefix`]); `{...}` is a Cluster hash tag.
//!
//! | key | type | content | lifetime |
//! |---|---|---|---|
//! | `crier:{<channel>}:meta` | HASH | `epoch`, `top` (last offset), `due` (ms: when the keys' expiries are next pushed out) | `meta_ttl` (24h) to `meta_ttl` + slack after the last publish |
//! | `crier:{<channel>}:hist` | LIST | entries `offset:epoch:ts_us:frame`, oldest first; the newest `history_size` are the history (trimmed back to it once it holds an eighth more) | `history_ttl` to `history_ttl` + slack after the last publish; reads drop entries older than `history_ttl` |
//!
//! `history_size` and `history_ttl` are the channel's namespace's ([`RedisOptions::namespaces`];
//! channels outside every declared namespace get [`RedisOptions::history_size`] and
//! [`RedisOptions::history_ttl`]); `meta_ttl` is at least the longest history TTL of any of them.
//!
//! | key | type | content | lifetime |
//! |---|---|---|---|
//! | `crier:{<channel>}:idem:<key>` | STRING | `epoch:offset` of the first publish with that key | 300s |
//! | `crier:{<channel>}:pres` / `:pres:data` | ZSET / HASH | member → expiry ms / entry JSON | `presence_ttl` (30s), refreshed by the owning node |
//! | `crier:{<channel>}:pres:users` | HASH | user → that user's live members in the channel (`presence_stats`: `HLEN`; kept by the presence scripts only, so entries written by nodes older than it are not counted in `users` until they are re-added) | as the presence keys |
//! | `crier:user:{<user>}:conns` | ZSET | member → expiry ms | `presence_ttl`, refreshed |
//! | `crier:nodes` / `crier:nodes:info` | ZSET / HASH | node → expiry ms / `NodeInfo` JSON | `node_ttl` (30s), refreshed; on a Cluster `crier:{nodes}` / `crier:{nodes}:info` |
//! | `crier:{node:<node>}:chans` / `:chans:n` | ZSET / HASH | channel → 0 (name order, `ZRANGEBYLEX`) / channel → the node's local subscribers | `node_ttl`, pushed out by each report (once a second); the channel listing reads the live nodes' pages (one script call per node: one hash tag each) and merges them |
//! | `crier:revoked` | ZSET | user → `before` (Unix s): token revocations (`UserOp::Invalidate`, ZADD GT) | `revocation_ttl` (7d) after the last write; older members pruned on write |
//! | `crier:{<channel>}:hooknodes` | ZSET | broker instance → expiry ms: instances with subscribers of the channel (webhooks only: occupied/vacated, `hooks.rs`) | `presence_ttl`, refreshed; kept one more `presence_ttl` for the sweep |
//! | `crier:hooks:chans` | ZSET | channel → earliest expiry of its `hooknodes` (what the sweep of dead nodes reads; webhooks only) | as its members |
//! | `crier:hooks` | STREAM | undelivered webhook events (`e` = event JSON; the entry id is the event id; deleted once delivered), consumer group `crier` | at most `max_queue` entries (`MAXLEN`: the oldest trimmed) |
//! | `crier:hooks:dropped` | STRING | events trimmed undelivered (`crier_webhook_dropped_total`) | none |
//!
//! The meta HASH also holds `gen`: the run id of the server process that last published on the
//! channel (Sentinel, Cluster; see `scripts::PUBLISH`). The slack is a tenth of `history_ttl`,
//! at most 30 s: the publish script pushes a channel's expiries out once per slack, not per
//! message (`Params::expiry_slack_ms`).
//!
//! Pub/sub channels: `crier:ch:<channel>` (on a Cluster the shard channel `crier:ch:{<channel>}`,
//! SPUBLISH/SSUBSCRIBE) carries the channel's publications (payload
//! `offset:epoch:published_at_us:<message frame>`, or `e:<join/leave frame>` from the presence
//! scripts on channels with `join_leave`: not a publication, handed on without offset checks);
//! `crier:control` carries node-wide control messages (user disconnects, and `Broker::user_op`'s
//! operations, each node answering on `crier:reply:<broker instance>` of the caller, which every
//! instance subscribes to). Presence and connection members are `<broker instance>/<client>`.
//!
//! # Publishing
//! A node's publishes go to one task (`publisher.rs`) that sends them as calls of one Lua
//! script: one call in flight, whatever arrives meanwhile goes in the next call (up to 128
//! messages or 1 MiB; on a Cluster only messages whose channels share a hash slot). For each
//! message, in order and in its own `pcall` (its error is its own), the script does it all
//! atomically: it creates the epoch if the channel has no meta (a new
//! channel, or one whose state Redis lost: flush, restart without persistence, expiry, eviction —
//! so a lost history always means a new epoch and clients are told `recovered: false`),
//! increments `top`, builds the `message` frame by concatenation (byte-identical to
//! `crier_protocol::frames::encode_message`: channel names and epochs need no JSON escaping and
//! `data` is raw JSON), appends it to the history (trimmed to `history_size` in steps; entries past
//! `history_ttl` are pruned by the reads), pushes the TTLs out when due, PUBLISHes it, and
//! records the idempotency key (`SET ... EX 300` semantics: a repeat returns the first result and
//! publishes nothing; also for two messages of one call). A caller hears back after Redis
//! answered the call.
//!
//! # Delivery
//! The node's single pub/sub connection (RESP3) is owned by one task (`pubsub/`), which delivers
//! each channel's publications to the handler in offset order, exactly once (duplicates after
//! a gap-fill are dropped by offset). `subscribe` answers only after Redis confirmed the
//! SUBSCRIBE and the channel's baseline position was read on that connection. `history` of a
//! channel with local subscribers (`BrokerHandler::has_subscribers`) is read on that same
//! connection too: its reply comes after every publication it covers has been handed to the
//! handler, so the node's "buffer live, read history, merge by offset" leaves no duplicate and
//! no gap. Other history reads (e.g. the REST API on a channel nobody here watches) use the
//! command connection.
//!
//! # Faults
//! - Every Redis call has a deadline (`command_timeout`, 2s): when Redis is unreachable, calls
//!   fail with `BrokerError::Unavailable` instead of hanging. A publish that times out (or whose
//!   connection broke after it may have been sent) may still have been applied: it fails with
//!   `BrokerError::OutcomeUnknown`; idempotency keys make retries safe.
//! - [`RedisBroker::start`] only fails on a setting problem ([`StartError::Setting`]: a malformed
//!   URL, an unreadable CA file, and — found within `connect_wait` — a certificate that does not
//!   verify, a master name no Sentinel knows, a cluster seed that is no cluster node). When Redis
//!   is down it still returns (after waiting up to `connect_wait` for a first connection) with
//!   `is_up() == false`, and keeps retrying in the background.
//! - Sentinel: the master is asked for before every pub/sub reconnect; the probe is `ROLE`
//!   (a demoted master still answers PING); a `READONLY` reply forces a reconnect.
//! - Cluster: any slot-map change seen on the pub/sub side (a lost connection, `MOVED`, a
//!   server-side `SUNSUBSCRIBE`, a demoted master) reconnects every shard connection from a fresh
//!   `CLUSTER SLOTS` and gap-fills every channel.
//! - While the pub/sub connection is down, `subscribe` of a new channel and `history` of a
//!   locally subscribed channel fail with `Unavailable` (the node could not merge safely).
//! - `is_up()` follows the pub/sub connection: false from a lost connection or a failed probe
//!   (PING every `probe_interval`) until it is back, re-subscribed and gap-filled. Reconnects use
//!   jittered exponential backoff from `reconnect_min` (50ms) to `reconnect_max` (2s).
//! - After a reconnect every subscribed channel is gap-filled from its history, after the last
//!   offset delivered to the handler, before live publications; duplicates are dropped. When
//!   the epoch changed, the new epoch's history is delivered as it is; when the history no longer
//!   holds the whole gap, what it holds is delivered (logged as an incomplete gap-fill).
//! - With persistence and a restart that lost the last writes (e.g. `appendfsync everysec`), a
//!   channel can keep its epoch while its offsets go back; the broker follows the history then.

mod cluster;
mod command;
mod error;
mod hooks;
mod keys;
mod payload;
mod presence;
mod publisher;
mod pubsub;
mod scripts;
mod sentinel;
mod tls;
mod topology;
mod tracker;

pub use tls::check_ca_pem;
pub use topology::Topology;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use crier_core::broker::{IDEMPOTENCY_WINDOW, PublishOptions};
use crier_core::{
    Broker, BrokerError, BrokerHandler, ChannelCount, History, Namespaces, NodeInfo, PresenceStats, PublishResult,
    Revocation, UserOp, UserOpReply,
};
use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;
use tokio::sync::{mpsc, oneshot, watch};

use crate::command::Commands;
use crate::keys::Keys;
use crate::presence::ClusterState;
use crate::pubsub::{Command, Shared};
use crate::scripts::{HistoryCall, Params, Scripts};

/// How to reach Redis and how long things live. [`RedisOptions::new`] fills in the defaults.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Where Redis is: one server (`redis://[user:password@]host:port[/db]`, `rediss://` for
    /// TLS) or Sentinel.
    pub topology: Topology,
    /// PEM file of the CA that signed the Redis servers' certificates (`rediss://`); unset =
    /// the system's roots. Certificates are always verified.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// This node's name (names the pub/sub connection in `CLIENT LIST`).
    pub node_id: String,
    /// Messages kept per channel for recovery (0 disables history and gap-fill).
    pub history_size: usize,
    /// How long history is kept: after the last publish for the list, per message for reads.
    pub history_ttl: Duration,
    /// The channels' namespaces: per-namespace options (history, presence, join/leave). Channels
    /// outside every declared namespace get `history_size` and `history_ttl` above (they win
    /// over the namespaces' default policy). Default: none declared.
    pub namespaces: Arc<Namespaces>,
    /// How long a channel's epoch and offset outlive its last publish. Never less than
    /// `history_ttl`. Default 24h.
    pub meta_ttl: Duration,
    /// Expiry of presence and connection entries; a dead node's entries vanish within it.
    /// Live ones are refreshed every third of it. Default 30s.
    pub presence_ttl: Duration,
    /// Expiry of node registry entries (refreshed like presence). Default 30s.
    pub node_ttl: Duration,
    /// Prefix of every key and pub/sub channel. Default `crier`.
    pub key_prefix: String,
    /// Deadline of every Redis call, and of a connection attempt. Default 2s.
    pub command_timeout: Duration,
    /// PING period on the pub/sub connection. Default 1s.
    pub probe_interval: Duration,
    /// Reconnect backoff bounds. Default 50ms → 2s.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long [`RedisBroker::connect`] waits for a first connection before returning with
    /// `is_up() == false`. Default 2s.
    pub connect_wait: Duration,
    /// How long a token revocation is kept after its `before` (the longest token lifetime).
    /// Default 7 days.
    pub revocation_ttl: Duration,
}

impl RedisOptions {
    /// Options with the defaults (history: 100 messages for 300s, like the contract's defaults).
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> RedisOptions {
        RedisOptions {
            topology: Topology::Single(url.into()),
            tls_ca_file: None,
            node_id: node_id.into(),
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            namespaces: Arc::new(Namespaces::default()),
            meta_ttl: Duration::from_secs(24 * 3600),
            presence_ttl: Duration::from_secs(30),
            node_ttl: Duration::from_secs(30),
            key_prefix: "crier".into(),
            command_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            connect_wait: Duration::from_secs(2),
            revocation_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// Options for a Redis Cluster reached through `seeds` (defaults as [`RedisOptions::new`]).
    pub fn cluster(seeds: Vec<String>, node_id: impl Into<String>) -> RedisOptions {
        let mut o = RedisOptions::new(String::new(), node_id);
        o.topology = Topology::Cluster(seeds);
        o
    }

    /// Options for a Sentinel-managed master (defaults as [`RedisOptions::new`]).
    pub fn sentinel(urls: Vec<String>, master: impl Into<String>, node_id: impl Into<String>) -> RedisOptions {
        let mut o = RedisOptions::new(String::new(), node_id);
        o.topology = Topology::Sentinel { urls, master: master.into() };
        o
    }
}

/// Why [`RedisBroker::start`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// A setting is wrong (malformed URL, unreadable CA file, a certificate that does not
    /// verify, a master name no Sentinel knows): retrying cannot help.
    #[error("{0}")]
    Setting(String),
}

/// See the crate docs.
pub struct RedisBroker {
    keys: Keys,
    params: Params,
    scripts: Arc<Scripts>,
    commands: Commands,
    shared: Arc<Shared>,
    state: Arc<ClusterState>,
    pubsub: mpsc::Sender<Command>,
    /// The batching publisher's queue (`publisher.rs`).
    publisher: mpsc::Sender<publisher::Job>,
    /// Publish script calls made (each carries one or more messages).
    publish_calls: Arc<AtomicU64>,
    command_timeout: Duration,
    /// Expiry of the node registry entry, and of a node's channel counts.
    node_ttl: Duration,
    revocation_ttl: Duration,
    /// Ids of this instance's control operations (replies are matched by it).
    next_op: AtomicU64,
    up: watch::Receiver<bool>,
    /// Dropped with the broker: stops the background tasks.
    _shutdown: watch::Sender<()>,
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A duration in whole milliseconds, at least 1 (Redis expiries of 0 mean "now").
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl RedisBroker {
    /// [`RedisBroker::start`], with a setting problem as `BrokerError::Internal`.
    pub async fn connect(opts: RedisOptions) -> Result<Arc<RedisBroker>, BrokerError> {
        RedisBroker::start(opts).await.map_err(|e| BrokerError::Internal(e.to_string()))
    }

    /// Starts the broker: the command connection, the pub/sub task and the refresh task. Fails
    /// only on a setting problem (malformed URL, bad CA file; and, within `connect_wait`, a
    /// certificate that does not verify or a master name no Sentinel knows); see the crate docs
    /// for starting while Redis is down.
    pub async fn start(opts: RedisOptions) -> Result<Arc<RedisBroker>, StartError> {
        let t = opts.command_timeout;
        let setting = |f: error::Fault| StartError::Setting(f.to_string());
        let tls = tls::Tls::load(opts.tls_ca_file.as_deref()).map_err(setting)?;
        let resolver = topology::Resolver::new(&opts.topology, tls, t).map_err(setting)?;
        let manager = match resolver.fixed() {
            Some(target) => Some(
                command::manager(target.commands, t, opts.reconnect_min, opts.reconnect_max)
                    .map_err(|e| StartError::Setting(e.to_string()))?,
            ),
            None => None,
        };
        let commands = Commands::new(manager, t);

        let keys = match opts.topology {
            Topology::Cluster(_) => Keys::for_cluster(&opts.key_prefix),
            _ => Keys::new(&opts.key_prefix),
        };
        let scripts = Arc::new(Scripts::new());
        let params = Params::new(opts.namespaces.clone(), opts.history_size, opts.history_ttl, opts.meta_ttl);
        let instance = scripts::new_epoch();
        let (up_tx, up) = watch::channel(false);
        let shared = Arc::new(Shared {
            handler: OnceLock::new(),
            up: up_tx,
            reconnects: Default::default(),
            gap_filled: Default::default(),
            instance,
            commands: commands.clone(),
            setting_problem: Default::default(),
            node: opts.node_id.clone(),
            replies: Default::default(),
        });
        let (shutdown, shutdown_rx) = watch::channel(());
        let (pubsub, commands_rx) = mpsc::channel(1024);
        let client_name: String = format!("crier-pubsub-{}", opts.node_id)
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.:".contains(c) { c } else { '_' })
            .collect();
        let settings = pubsub::Settings {
            command_timeout: t,
            probe_interval: opts.probe_interval,
            reconnect_min: opts.reconnect_min,
            reconnect_max: opts.reconnect_max,
            client_name,
        };
        let task = pubsub::Task::new(
            resolver,
            keys.clone(),
            params.clone(),
            scripts.clone(),
            shared.clone(),
            settings,
            commands_rx,
            shutdown_rx.clone(),
        );
        tokio::spawn(task.run());
        let state = Arc::new(ClusterState::new(
            commands.clone(),
            keys.clone(),
            scripts.clone(),
            shared.instance.clone(),
            opts.presence_ttl,
            opts.node_ttl,
            opts.namespaces.clone(),
        ));
        tokio::spawn(presence::refresh_loop(state.clone(), shutdown_rx.clone()));
        let publish_calls = Arc::new(AtomicU64::new(0));
        let publisher = publisher::spawn(
            publisher::Context {
                commands: commands.clone(),
                keys: keys.clone(),
                params: params.clone(),
                scripts: scripts.clone(),
                idempotency_ttl_s: IDEMPOTENCY_WINDOW.as_secs(),
                calls: publish_calls.clone(),
            },
            shutdown_rx,
        );

        let mut wait = up.clone();
        let deadline = tokio::time::Instant::now() + opts.connect_wait;
        loop {
            let step = tokio::time::Duration::from_millis(50).min(opts.connect_wait);
            if tokio::time::timeout(step, wait.wait_for(|up| *up)).await.is_ok() {
                break;
            }
            if let Some(problem) = shared.setting_problem() {
                return Err(StartError::Setting(problem));
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("redis is not reachable yet; the broker keeps trying in the background");
                break;
            }
        }
        Ok(Arc::new(RedisBroker {
            keys,
            params,
            scripts,
            commands,
            shared,
            state,
            pubsub,
            publisher,
            publish_calls,
            command_timeout: t,
            node_ttl: opts.node_ttl,
            revocation_ttl: opts.revocation_ttl,
            next_op: AtomicU64::new(0),
            up,
            _shutdown: shutdown,
        }))
    }

    /// How many times the pub/sub connection was re-established after a loss
    /// (`crier_broker_reconnects_total`).
    pub fn reconnects(&self) -> u64 {
        self.shared.reconnects.load(Ordering::Relaxed)
    }

    /// How many publications were delivered by gap-fills: missed on the live stream (pub/sub
    /// reconnect, hole) and read from the history instead.
    pub fn gap_filled(&self) -> u64 {
        self.shared.gap_filled.load(Ordering::Relaxed)
    }

    /// Waits until [`Broker::is_up`] is `up` or `timeout` passes; returns whether it is.
    pub async fn wait_up(&self, up: bool, timeout: Duration) -> bool {
        let mut rx = self.up.clone();
        tokio::time::timeout(timeout, rx.wait_for(|v| *v == up)).await.is_ok_and(|r| r.is_ok())
    }

    /// Sends a command to the pub/sub task and waits for its answer (bounded: the task may be
    /// busy re-subscribing after a reconnect).
    async fn ask<T>(&self, cmd: Command, rx: oneshot::Receiver<T>) -> Result<T, BrokerError> {
        let deadline = self.command_timeout * 3;
        let gone = || BrokerError::Unavailable("redis pub/sub task is gone".into());
        let slow = || BrokerError::Unavailable(format!("redis pub/sub did not answer within {deadline:?}"));
        tokio::time::timeout(deadline, self.pubsub.send(cmd)).await.map_err(|_| slow())?.map_err(|_| gone())?;
        tokio::time::timeout(deadline, rx).await.map_err(|_| slow())?.map_err(|_| gone())
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.shared.handler.set(handler);
    }

    async fn publish(&self, channel: &str, data: &str, opts: PublishOptions<'_>) -> Result<PublishResult, BrokerError> {
        // The script copies the channel into the frame verbatim: only valid names may go there.
        crier_protocol::validate_channel(channel).map_err(|e| BrokerError::Internal(format!("publish: {e}")))?;
        let (reply, rx) = oneshot::channel();
        let job = publisher::Job {
            channel: channel.to_owned(),
            data: data.to_owned(),
            idempotency_key: opts.idempotency_key.map(str::to_owned),
            reply,
        };
        // Waiting for room in the queue and for the batch's call are bounded like any call. Until
        // the job is queued nothing was sent (`Unavailable`); after, the call may be on its way
        // (`OutcomeUnknown`; a job whose caller gave up before its batch formed is not sent).
        let bound = self.command_timeout * 2;
        let deadline = tokio::time::Instant::now() + bound;
        let slow = || BrokerError::Unavailable(format!("redis publish queue stayed full for {bound:?}"));
        let gone = || BrokerError::Unavailable("redis publisher task is gone".into());
        tokio::time::timeout_at(deadline, self.publisher.send(job)).await.map_err(|_| slow())?.map_err(|_| gone())?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(BrokerError::OutcomeUnknown("redis publisher task stopped during the publish".into())),
            Err(_) => Err(BrokerError::OutcomeUnknown(format!("redis did not answer within {bound:?}"))),
        }
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let (reply, rx) = oneshot::channel();
        self.ask(Command::Subscribe { channel: channel.to_owned(), reply }, rx).await??;
        // Webhooks: this instance now holds the channel (cluster-wide occupancy, `hooks.rs`).
        self.state.hook_channel(channel, true).await;
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let (reply, rx) = oneshot::channel();
        let r = self.ask(Command::Unsubscribe { channel: channel.to_owned(), reply }, rx).await;
        if !self.shared.handler.get().is_some_and(|h| h.has_subscribers(channel)) {
            self.state.hook_channel(channel, false).await;
        }
        r
    }

    fn enable_hooks(&self, config: crier_core::HookConfig) -> Result<(), BrokerError> {
        let claim_idle = config.claim_idle;
        self.state.enable_hooks(&config, claim_idle)
    }

    async fn hook_read(&self, max: usize, wait: Duration) -> Result<Vec<crier_core::HookEvent>, BrokerError> {
        self.state.hook_read(max, wait).await
    }

    async fn hook_ack(&self, ids: &[String]) -> Result<(), BrokerError> {
        self.state.hook_ack(ids).await
    }

    async fn hook_publish(&self, channel: &str, user: &str, client: &str, data: &str) -> Result<(), BrokerError> {
        self.state.hook_publish(channel, user, client, data).await
    }

    async fn hook_hold(&self, ids: &[String]) -> Result<(), BrokerError> {
        self.state.hook_hold(ids).await
    }

    fn hook_stats(&self) -> crier_core::HookStats {
        self.state.hook_stats()
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        if self.shared.has_subscribers(channel) {
            // The node is (being) subscribed: read on the pub/sub connection, in order with the
            // live stream, so the node's merge by offset is exact (see `pubsub`).
            let (reply, rx) = oneshot::channel();
            let read = pubsub::HistoryRead { channel: channel.to_owned(), since: since.cloned(), limit, reply };
            return self.ask(Command::History(read), rx).await?;
        }
        let since = since.map(|p| (p.epoch.as_str(), p.offset));
        let call = HistoryCall::new(&self.keys, &self.params, channel, since, limit);
        Ok(scripts::parse_history(self.commands.invoke(&call.invocation(&self.scripts.history)).await?)?)
    }

    async fn presence_add(&self, channel: &str, entry: &PresenceEntry) -> Result<(), BrokerError> {
        self.state.presence_add(channel, entry).await
    }

    async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        self.state.presence_remove(channel, client).await
    }

    async fn presence_add_counted(&self, channel: &str, entry: &PresenceEntry, max: u64) -> Result<u64, BrokerError> {
        self.state.presence_add_counted(channel, entry, max).await
    }

    async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        self.state.presence(channel).await
    }

    async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, BrokerError> {
        self.state.presence_stats(channel).await
    }

    async fn connection_opened(&self, user: &str, client: &str) -> Result<u64, BrokerError> {
        self.state.connection_opened(user, client).await
    }

    async fn connection_closed(&self, user: &str, client: &str) -> Result<(), BrokerError> {
        self.state.connection_closed(user, client).await
    }

    /// Counts the user's connections cluster-wide, tells every other node over the control
    /// channel, and closes this node's ones directly. Returns the larger of the cluster-wide
    /// count and the number closed here.
    async fn disconnect_user(&self, user: &str) -> Result<u64, BrokerError> {
        let count = self.state.connection_count(user).await?;
        let msg = pubsub::Control {
            op: pubsub::DISCONNECT_USER.into(),
            user: user.to_owned(),
            origin: self.shared.instance.clone(),
            cmd: None,
            id: 0,
            reply: None,
        };
        let msg = serde_json::to_string(&msg).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.keys.control()).arg(msg);
        self.commands.query(&publish).await?;
        let here = self.shared.handler.get().map_or(0, |h| h.on_disconnect_user(user)) as u64;
        Ok(count.max(here))
    }

    /// Stores a revocation first (ZADD GT: a later `before` wins), then publishes the operation
    /// on the control channel with this instance's reply channel, applies it here, and waits —
    /// within `command_timeout` — for a reply from each other node: as many as received the
    /// control message (PUBLISH's count, minus this one; on a Cluster, where PUBLISH counts one
    /// server's subscribers only, the other live nodes of the node registry).
    async fn user_op(&self, user: &str, op: &UserOp) -> Result<UserOpReply, BrokerError> {
        if let UserOp::Invalidate { before } = op {
            let mut add = redis::cmd("ZADD");
            add.arg(self.keys.revoked()).arg("GT").arg(*before).arg(user);
            self.commands.query(&add).await?;
            let mut expire = redis::cmd("EXPIRE");
            expire.arg(self.keys.revoked()).arg(self.revocation_ttl.as_secs().max(1));
            self.commands.query(&expire).await?;
            let stale = unix_now().saturating_sub(self.revocation_ttl.as_secs());
            let mut prune = redis::cmd("ZREMRANGEBYSCORE");
            prune.arg(self.keys.revoked()).arg("-inf").arg(format!("({stale}"));
            self.commands.query(&prune).await?;
        }
        let id = self.next_op.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let replies = &self.shared.replies;
        replies.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
        // Removes the wait on every path (an error, or the caller dropping this future).
        struct Forget<'a>(&'a pubsub::Shared, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.replies.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
            }
        }
        let _forget = Forget(&self.shared, id);
        let others: Option<std::collections::HashSet<String>> = if self.keys.is_cluster() {
            let nodes = self.state.nodes().await?;
            Some(nodes.into_iter().map(|n| n.node).filter(|n| *n != self.shared.node).collect())
        } else {
            None
        };
        let msg = pubsub::Control {
            op: pubsub::USER_OP.into(),
            user: user.to_owned(),
            origin: self.shared.instance.clone(),
            cmd: Some(op.clone()),
            id,
            reply: Some(self.keys.reply(&self.shared.instance)),
        };
        let msg = serde_json::to_string(&msg).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let mut publish = redis::cmd("PUBLISH");
        publish.arg(self.keys.control()).arg(msg);
        let received = match self.commands.query(&publish).await? {
            redis::Value::Int(n) => usize::try_from(n).unwrap_or(0),
            _ => 0,
        };
        let mut total = self.shared.handler.get().map(|h| h.on_user_op(user, op)).unwrap_or_default();
        // This instance's own subscription received it too (when its pub/sub is connected).
        let expected = match &others {
            Some(others) => others.len(),
            None => received.saturating_sub(usize::from(self.is_up())),
        };
        let mut heard = std::collections::HashSet::new();
        let deadline = tokio::time::Instant::now() + self.command_timeout;
        while heard.len() < expected {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(reply)) => {
                    let from = if reply.instance.is_empty() { reply.node } else { reply.instance };
                    if heard.insert(from) {
                        total.merge(reply.reply);
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    tracing::warn!(
                        answered = heard.len(),
                        expected,
                        "not every node answered a control operation in time; counting the answers"
                    );
                    break;
                }
            }
        }
        Ok(total)
    }

    async fn revocations(&self, since: u64) -> Result<Vec<Revocation>, BrokerError> {
        let mut range = redis::cmd("ZRANGEBYSCORE");
        range.arg(self.keys.revoked()).arg(since).arg("+inf").arg("WITHSCORES");
        let reply = self.commands.query(&range).await?;
        let pairs: Vec<(String, f64)> = redis::from_redis_value(reply)
            .map_err(|e| BrokerError::Internal(format!("unexpected revocations reply: {e}")))?;
        Ok(pairs.into_iter().map(|(user, before)| Revocation { user, before: before.max(0.0) as u64 }).collect())
    }

    async fn report_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        self.state.report_node(info).await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        self.state.nodes().await
    }

    fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    fn reconnects(&self) -> u64 {
        RedisBroker::reconnects(self)
    }

    fn publish_calls(&self) -> u64 {
        self.publish_calls.load(Ordering::Relaxed)
    }

    async fn rate_limit(&self, key: &str, rate: u32, burst: u32) -> Result<Option<Duration>, BrokerError> {
        let interval_ms = 1000.0 / f64::from(rate.max(1));
        let mut inv = self.scripts.rate.key(self.keys.rate(key));
        inv.arg(interval_ms).arg(burst.max(1));
        match self.commands.invoke(&inv).await? {
            redis::Value::Int(0) => Ok(None),
            redis::Value::Int(ms) => Ok(Some(Duration::from_millis(ms.unsigned_abs()))),
            other => Err(BrokerError::Internal(format!("unexpected rate-limit reply {other:?}"))),
        }
    }

    fn shares_rate_limits(&self) -> bool {
        true
    }

    // --- The cluster's channels and history deletion (issue 19, part D). ---

    async fn report_channels(&self, node: &str, counts: &[(String, u64)], full: bool) -> Result<bool, BrokerError> {
        let (z, h) = self.keys.node_channels(node);
        // Bounded calls: a node's first report may hold every one of its channels.
        let mut chunks = counts.chunks(REPORT_CHUNK).peekable();
        let mut first = true;
        let mut held = true;
        while first || chunks.peek().is_some() {
            let chunk = chunks.next().unwrap_or_default();
            let mut inv = self.scripts.channels_report.key(&z);
            inv.key(&h).arg(millis(self.node_ttl)).arg(if full && first { "1" } else { "0" });
            for (channel, n) in chunk {
                inv.arg(channel).arg(*n);
            }
            let reply = self.commands.invoke(&inv).await?;
            if first {
                held = scripts::int(&reply) == Some(1);
            }
            first = false;
        }
        Ok(held)
    }

    async fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ChannelCount>, BrokerError> {
        let start = match after {
            Some(a) if a >= prefix => format!("({a}"),
            _ if prefix.is_empty() => "-".to_owned(),
            _ => format!("[{prefix}"),
        };
        let nodes = self.state.nodes().await?;
        let pages = futures_util::future::try_join_all(nodes.iter().map(|n| {
            let (z, h) = self.keys.node_channels(&n.node);
            let mut inv = self.scripts.channels_page.key(z);
            inv.key(h).arg(&start).arg(prefix).arg(limit);
            async move { self.commands.invoke(&inv).await }
        }))
        .await?;
        // Each node's page is its first `limit` channels after the start: the first `limit`
        // names of the union are all in it, with every node's count (see `Broker::channels`).
        let mut merged = std::collections::BTreeMap::<String, u64>::new();
        for page in pages {
            let redis::Value::Array(items) = page else { continue };
            for pair in items.chunks_exact(2) {
                let name = scripts::bulk(&pair[0]).and_then(|b| std::str::from_utf8(b).ok());
                let n = scripts::int(&pair[1]).and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
                if let Some(name) = name
                    && n > 0
                {
                    *merged.entry(name.to_owned()).or_default() += n;
                }
            }
        }
        Ok(merged.into_iter().take(limit).map(|(channel, subscribers)| ChannelCount { channel, subscribers }).collect())
    }

    async fn delete_history(&self, channel: &str) -> Result<(), BrokerError> {
        // Both keys share the channel's hash tag. Without its meta, the channel's next publish
        // or read creates a new epoch; subscribed nodes see it on the next publication and
        // gap-fill, find the epoch changed and tell their subscribers (`on_gap`).
        let mut del = redis::cmd("DEL");
        del.arg(self.keys.meta(channel)).arg(self.keys.history(channel));
        self.commands.query(&del).await.map(drop).map_err(Into::into)
    }
}

/// Channels per call of the report script.
const REPORT_CHUNK: usize = 1000;
