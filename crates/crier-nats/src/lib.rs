//! crier's NATS broker: the [`Broker`] of a cluster whose nodes share one NATS system with
//! JetStream (one `nats-server`, or a cluster of them with R3 streams).
//!
//! - **History, offsets and epochs** live in JetStream: one stream per distinct history policy
//!   (`history_size`, `history_ttl`), one subject per channel (`<prefix>.h.<policy>.<token>`,
//!   the token being `c` + the channel name in unpadded base64url, so any channel name is one
//!   valid subject token). Every stored message carries its channel offset, epoch, the stream
//!   sequence of the channel's previous message and its publish time in headers. A publish is
//!   stored with `Nats-Expected-Last-Subject-Sequence` (optimistic concurrency): offsets stay
//!   contiguous per channel and epoch whatever the number of publishers; a publisher that lost
//!   the race re-reads the channel's last message and tries again. An empty channel gets its
//!   epoch from a marker message (offset 0) written on first read, so the epoch seen before
//!   the first publish is the channel's. When every message of a channel has expired or was
//!   purged, the next read or publish starts a new epoch (a recovery across it reports the gap).
//! - **Following** (follow.rs): a node that lost the race for a channel's next offset (another
//!   node publishes to it too) subscribes to the channel's live subject for a while, so its
//!   tail stays current and its publishes are one JetStream operation again.
//! - **Idempotent publish**: `Nats-Msg-Id` = channel token + key, JetStream's duplicate window
//!   ([`crier_core::broker::IDEMPOTENCY_WINDOW`], or the history TTL when shorter).
//! - **Live fan-out** over core NATS: the stream *republishes* every stored message to
//!   `<prefix>.l.<policy>.<token>` (server side, in stream order, only once stored); each node
//!   holds one core subscription per subscribed channel, all on its own subscriber connection
//!   (`rawsub`: plain or TLS, with the same credential as the async-nats client, which serves
//!   JetStream's API, the buckets and requests). The node's publishes — stored messages and
//!   presence events — are sent on that connection too, and acknowledged on it. Per channel the node keeps the last
//!   delivered offset and epoch: duplicates are dropped, a hole is filled from JetStream before
//!   the message after it, an unfillable hole or a new epoch is announced (`on_gap`). After a
//!   reconnect every subscribed channel is re-read from JetStream (what was published while
//!   the node was cut off is delivered, or the gap announced).
//! - **Cluster state** in JetStream key-value buckets whose `max_age` is the entries' TTL
//!   (refreshed by rewriting, as Redis refreshes its keys): presence, per-user connection
//!   counts, node registry, channel counts, rate limits (GCRA), token revocations. Values are
//!   updated by compare-and-set on the key's revision (presence: one key per channel and client).
//! - **Server-side control** (`user_op`, `disconnect_user`): a request on `<prefix>.op` that
//!   every other node answers on an inbox, counted against the node registry.
//!
//! - **Webhooks** (hooks.rs): channel occupancy in a key-value bucket changed by
//!   compare-and-set, events queued in a work-queue stream (deduplicated by id), delivered by
//!   the node holding a lease through one durable pull consumer.

mod cache;
mod connect;
mod control;
mod follow;
mod history;
mod hooks;
mod live;
mod publish;
mod rawsub;
mod state;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use base64::Engine;
use crier_core::Namespaces;
use crier_core::broker::{
    Broker, BrokerError, BrokerHandler, ChannelCount, History, NodeInfo, OwnEntries, PresenceStats, PublishOptions,
    PublishResult, Revocation, UserOp, UserOpReply,
};
use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;

pub(crate) use history::{HistPolicy, Stored, header};
use publish::ChanPub;

pub(crate) const H_EPOCH: &str = "Crier-Epoch";
pub(crate) const H_OFFSET: &str = "Crier-Offset";
pub(crate) const H_PREV: &str = "Crier-Prev";
pub(crate) const H_TS: &str = "Crier-Ts";
pub(crate) const H_KIND: &str = "Crier-Kind";
pub(crate) const H_CLIENT: &str = "Crier-Client";
pub(crate) const H_NODE: &str = "Crier-Node";
/// Byte lengths of a batch's publications (absent: the message is one publication).
pub(crate) const H_LENS: &str = "Crier-Lens";

/// How the broker authenticates to NATS (secrets are read from files, never logged); both of
/// the node's connections use it. A user and password may also come in the URL.
#[derive(Debug, Clone, Default)]
pub enum NatsAuth {
    #[default]
    None,
    /// A `.creds` file (user JWT + nkey seed).
    CredentialsFile(PathBuf),
    /// A file holding a token.
    TokenFile(PathBuf),
    /// A file holding an nkey seed (`SU...`).
    NkeyFile(PathBuf),
}

/// What [`NatsBroker::connect`] needs.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Seed servers (`nats://host:port`, `tls://host:port`, `nats://user:password@host:port`);
    /// the async-nats client learns the others (the subscriber connection uses these).
    pub urls: Vec<String>,
    pub auth: NatsAuth,
    /// PEM file of the CA that signed the servers' certificates (`tls://`, or a server that
    /// requires TLS); unset = system roots.
    pub tls_ca_file: Option<PathBuf>,
    /// This node's name.
    pub node_id: String,
    /// History of channels outside every declared namespace (they win over the namespaces'
    /// default policy, as on Redis).
    pub history_size: usize,
    pub history_ttl: Duration,
    pub namespaces: Arc<Namespaces>,
    /// Expiry of presence and connection entries (refreshed by the node). Default 30s.
    pub presence_ttl: Duration,
    /// Expiry of node registry entries. Default 30s.
    pub node_ttl: Duration,
    /// How long after its last lost race for a channel's next offset the node follows the
    /// channel (follow.rs; checked every third of `presence_ttl`). Default 30s.
    pub follow_for: Duration,
    /// How long a token revocation is kept. Default 7 days.
    pub revocation_ttl: Duration,
    /// Prefix of every subject, stream and bucket. Default `crier`.
    pub prefix: String,
    /// Replicas of every stream and bucket (3 on a 3-server cluster). Default 1.
    pub replicas: usize,
    /// Bytes of stored messages kept in memory for history reads (cache.rs: what history
    /// reads fetched, so each message is read once per node, not once per reader).
    /// Default 8 MiB; 0 keeps none.
    pub read_cache_bytes: usize,
    /// Deadline of every JetStream call. Default 2s.
    pub command_timeout: Duration,
    /// The subscriber connection sends a `PING` this often; one not answered within
    /// `command_timeout` marks the broker down and the connection is made again (a server
    /// hanging with its socket open is noticed, as on Redis). Default 1s.
    pub probe_interval: Duration,
    /// How long [`NatsBroker::connect`] waits for a first connection. Default 2s.
    pub connect_wait: Duration,
    /// How long [`NatsBroker::connect`] retries laying out streams and buckets while
    /// JetStream is not ready (a cluster electing its meta leader) before it returns a broker
    /// that is not up yet (a background task keeps trying). Default 10s.
    pub layout_wait: Duration,
}

impl NatsOptions {
    pub fn new(urls: Vec<String>, node_id: impl Into<String>) -> NatsOptions {
        NatsOptions {
            urls,
            auth: NatsAuth::None,
            tls_ca_file: None,
            node_id: node_id.into(),
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            namespaces: Arc::new(Namespaces::default()),
            presence_ttl: Duration::from_secs(30),
            node_ttl: Duration::from_secs(30),
            follow_for: Duration::from_secs(30),
            revocation_ttl: Duration::from_secs(7 * 24 * 3600),
            prefix: "crier".into(),
            replicas: 1,
            read_cache_bytes: 8 << 20,
            command_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_secs(1),
            connect_wait: Duration::from_secs(2),
            layout_wait: Duration::from_secs(10),
        }
    }
}

pub(crate) struct Inner {
    pub opts: NatsOptions,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub up: AtomicBool,
    pub reconnects: AtomicU64,
    pub publish_calls: AtomicU64,
    /// Stored messages read from JetStream (history reads, tails, baselines).
    pub reads: AtomicU64,
    /// Stored messages by stream sequence, for history reads (cache.rs).
    cache: cache::ReadCache,
    /// Lock stripes of history walks (one walk of a channel at a time: history.rs).
    walks: Vec<tokio::sync::Mutex<()>>,
    pub handler: OnceLock<Arc<dyn BrokerHandler>>,
    /// The streams and buckets, once laid out (until then the node is unready and every
    /// JetStream operation answers `Unavailable`; a background task keeps trying).
    laid: OnceLock<Laid>,
    /// This node's presence entries and connections (refreshed; kept while NATS is away).
    own: Mutex<OwnEntries>,
    /// This start of the node: the writer named in its presence entries (state.rs).
    instance: String,
    /// The writers of presence entries known alive, and when this node last rewrote its own.
    alive: Mutex<state::Alive>,
    rewrites: Mutex<state::Rewrites>,
    policies: HashMap<String, HistPolicy>,
    default_policy: HistPolicy,
    tails: Mutex<HashMap<String, ChanPub>>,
    /// Channels followed after a lost race (follow.rs).
    followed: follow::Followed,
    pub live: live::Live,
    /// The node's own subscriber connection (every live subscription).
    pub raw: Arc<rawsub::RawSub>,
    /// Webhooks (hooks.rs).
    hooks: hooks::Hooks,
}

/// The NATS broker (see the crate docs).
pub struct NatsBroker {
    inner: Arc<Inner>,
}

impl NatsBroker {
    /// The channels this node follows after a lost race (follow.rs), for tests and diagnostics.
    pub fn followed(&self) -> Vec<String> {
        self.inner.followed.channels()
    }

    /// Stored messages this node read from JetStream so far (history reads, tails, baselines;
    /// not the key-value buckets), for tests and diagnostics.
    pub fn stored_reads(&self) -> u64 {
        self.inner.reads.load(Ordering::Relaxed)
    }

    /// Does this node hold a live subscription to the channel (subscribed or followed)?
    pub fn holds_live(&self, channel: &str) -> bool {
        self.inner.live.has(channel)
    }
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

pub(crate) fn now_ms() -> u64 {
    now_us() / 1000
}

/// A channel (or any name) as one subject token / key-value key: `c` + unpadded base64url.
pub fn token(name: &str) -> String {
    let mut s = String::with_capacity(1 + name.len() * 4 / 3 + 3);
    s.push('c');
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_string(name.as_bytes(), &mut s);
    s
}

/// The inverse of [`token`].
pub fn untoken(t: &str) -> Option<String> {
    let b = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(t.strip_prefix('c')?).ok()?;
    String::from_utf8(b).ok()
}

pub(crate) fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// The streams (one per history policy) and the key-value buckets.
pub(crate) struct Laid {
    streams: HashMap<HistPolicy, stream::Stream>,
    kv: state::Buckets,
}

impl Inner {
    pub(crate) fn handler(&self) -> Option<&Arc<dyn BrokerHandler>> {
        self.handler.get()
    }

    fn laid(&self) -> Result<&Laid, BrokerError> {
        self.laid.get().ok_or_else(|| BrokerError::Unavailable("NATS JetStream is not ready yet".into()))
    }

    pub(crate) fn kv(&self) -> Result<&state::Buckets, BrokerError> {
        self.laid().map(|l| &l.kv)
    }
}

#[async_trait]
impl Broker for NatsBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.inner.handler.set(handler);
    }

    async fn publish(&self, channel: &str, data: &str, opts: PublishOptions<'_>) -> Result<PublishResult, BrokerError> {
        self.inner.publish(channel, data, opts).await
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.inner.live.subscribe(&self.inner, channel).await?;
        // Webhooks: this instance now holds the channel (cluster-wide occupancy, hooks.rs).
        self.inner.hook_channel(channel, true).await;
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        if self.inner.handler().is_some_and(|h| h.has_subscribers(channel)) {
            return Ok(());
        }
        // A followed channel keeps its live subscription until it is no longer contended.
        self.inner.live.unsubscribe_unless(&self.inner, channel, || self.inner.keeps_live(channel)).await;
        if !self.inner.handler().is_some_and(|h| h.has_subscribers(channel)) {
            self.inner.hook_channel(channel, false).await;
        }
        Ok(())
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        // A position read (a fresh subscribe's) of a channel this node follows: from the
        // channel's sequencer, without JetStream.
        if since.is_none()
            && limit == 0
            && let Some((epoch, offset)) = self.inner.live.position(channel)
        {
            return Ok(History { epoch: epoch.to_string(), offset, publications: Vec::new(), gap: false });
        }
        let h = self.inner.history(channel, since, limit).await?;
        self.inner.live.wait_delivered(channel, &h.epoch, h.offset, self.inner.opts.command_timeout).await;
        Ok(h)
    }

    async fn presence_add(&self, channel: &str, entry: &PresenceEntry) -> Result<(), BrokerError> {
        self.inner.presence_add(channel, entry, 0, false).await.map(|_| ())
    }

    async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        self.inner.presence_remove(channel, client).await
    }

    async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        self.inner.presence(channel).await
    }

    async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, BrokerError> {
        let p = self.inner.presence(channel).await?;
        let users: std::collections::HashSet<&str> = p.iter().map(|e| e.user.as_str()).collect();
        Ok(PresenceStats { clients: p.len() as u64, users: users.len() as u64 })
    }

    async fn presence_add_counted(&self, channel: &str, entry: &PresenceEntry, max: u64) -> Result<u64, BrokerError> {
        self.inner.presence_add(channel, entry, max, true).await
    }

    async fn connection_opened(&self, user: &str, client: &str) -> Result<u64, BrokerError> {
        self.inner.connection_opened(user, client).await
    }

    async fn connection_closed(&self, user: &str, client: &str) -> Result<(), BrokerError> {
        self.inner.connection_closed(user, client).await
    }

    async fn disconnect_user(&self, user: &str) -> Result<u64, BrokerError> {
        self.inner.fan_op(user, None).await.map(|r| r.count)
    }

    async fn report_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        self.inner.report_node(info).await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        self.inner.nodes().await
    }

    /// Both connections up: the async-nats client and the subscriber connection.
    fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::SeqCst)
            && self.inner.laid.get().is_some()
            && self.inner.client.connection_state() == async_nats::connection::State::Connected
            && self.inner.raw.is_up()
    }

    async fn report_channels(&self, node: &str, counts: &[(String, u64)], full: bool) -> Result<bool, BrokerError> {
        self.inner.report_channels(node, counts, full).await
    }

    async fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ChannelCount>, BrokerError> {
        self.inner.channels(prefix, after, limit).await
    }

    async fn delete_history(&self, channel: &str) -> Result<(), BrokerError> {
        let s = self.inner.stream(channel)?;
        s.purge().filter(self.inner.hist_subject(channel)).await.map_err(unavailable)?;
        if let Some(c) = self.inner.tails.lock().unwrap_or_else(|e| e.into_inner()).get_mut(channel) {
            c.tail = None;
        }
        Ok(())
    }

    async fn user_op(&self, user: &str, op: &UserOp) -> Result<UserOpReply, BrokerError> {
        if let UserOp::Invalidate { before } = op {
            self.inner.store_revocation(user, *before).await?;
        }
        self.inner.fan_op(user, Some(op)).await
    }

    async fn revocations(&self, since: u64) -> Result<Vec<Revocation>, BrokerError> {
        self.inner.revocations(since).await
    }

    async fn rate_limit(&self, key: &str, rate: u32, burst: u32) -> Result<Option<Duration>, BrokerError> {
        self.inner.rate_limit(key, rate, burst).await
    }

    fn shares_rate_limits(&self) -> bool {
        true
    }

    fn enable_hooks(&self, config: crier_core::HookConfig) -> Result<(), BrokerError> {
        self.inner.enable_hooks(config)
    }

    async fn hook_read(&self, max: usize, wait: Duration) -> Result<Vec<crier_core::HookEvent>, BrokerError> {
        self.inner.hook_read(max, wait).await
    }

    async fn hook_publish(&self, channel: &str, user: &str, client: &str, data: &str) -> Result<(), BrokerError> {
        self.inner.hook_publish(channel, user, client, data).await
    }

    async fn hook_ack(&self, ids: &[String]) -> Result<(), BrokerError> {
        self.inner.hook_ack(ids).await
    }

    async fn hook_hold(&self, ids: &[String]) -> Result<(), BrokerError> {
        self.inner.hook_hold(ids).await
    }

    async fn hook_release(&self) -> Result<(), BrokerError> {
        self.inner.hook_release().await
    }

    fn hook_stats(&self) -> crier_core::HookStats {
        self.inner.hook_stats()
    }

    fn reconnects(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    fn publish_calls(&self) -> u64 {
        self.inner.publish_calls.load(Ordering::Relaxed)
    }
}
