//! crier's Redis broker: any number of nodes sharing one Redis (or a Sentinel-managed master,
//! or a Redis Cluster; over TLS with `rediss://`) form one cluster.
//! [`RedisBroker`] implements [`crier_core::Broker`] and passes the same conformance suite as the
//! memory broker. This is the only crate that knows `redis`.
//!
//! # Map
//! - `lib.rs`: this map, the design (below, told here once) and the `Broker` impl, which
//!   delegates to the parts.
//! - `broker.rs`: [`RedisBroker`] and [`RedisBroker::start`], which builds the parts around one
//!   `context::Context` (options, keys, scripts, channel parameters, the command connection,
//!   shared counters), held in one `Arc` by every part. `options.rs`: [`RedisOptions`] (each
//!   default declared once), [`StartError`].
//! - `keys.rs`: the key layout below, in code. `lua/*.lua`: the scripts; `scripts.rs` loads them
//!   and holds, per script, its argument builder beside its reply parser (`PublishCall`,
//!   `HistoryCall`). `payload.rs`: the `offset:epoch:ts_us:frame` payload published and kept in
//!   the history.
//! - `error.rs`: `Fault`, what went wrong talking to Redis (typed: `ReadOnly`, `Timeout`, ...),
//!   and what each kind is to a caller (`BrokerError`).
//! - `command.rs`: the command connection (auto-reconnecting, every call with a deadline).
//! - `publisher.rs`: the task that batches a node's publishes into script calls.
//! - `pubsub/`: the task owning the node's pub/sub connection (its own map is in its `mod.rs`:
//!   topology connect, request batching and ordered history reads, delivery and gap-fill,
//!   shards). `node_position.rs`: per-channel "last delivered to this node" bookkeeping that asks for
//!   gap-fills from history, pure logic.
//! - `presence.rs`: presence, connections per user and the node registry, with expiry and a
//!   background refresh of this node's entries; `hooks.rs`: the webhook event stream.
//! - `control.rs`: control messages between nodes (disconnects, `user_op`), revocations, the
//!   cluster-wide rate limit. `channels.rs`: the channel listing, history deletion, history
//!   reads on the command connection.
//! - `topology.rs`: where Redis is ([`Topology`]: one server, Sentinel, Cluster), resolved
//!   before every pub/sub (re)connect; `tls.rs` (rustls, always verified), `sentinel.rs` (asking
//!   Sentinels for the master), `cluster.rs` (slot map, key slots). See docs/cluster.md for the
//!   behaviour of each.
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
//! channels outside every declared namespace get its default policy's); `meta_ttl` is at least
//! the longest history TTL of any of them.
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
//! | `crier:hooks` | STREAM | undelivered webhook events (`e` = event JSON; the entry id is the event id; deleted once delivered), consumer group `crier`; `crier:{hooks}` on a Cluster, where the event JSON carries its own `id` | at most `max_queue` entries (`MAXLEN`: the oldest trimmed) |
//! | `crier:hooks:dropped` | STRING | events trimmed undelivered (`crier_webhook_dropped_total`); `crier:{hooks}:dropped` on a Cluster | none |
//! | `crier:{<channel>}:hookout` | LIST | Cluster only: the channel's webhook events not yet moved to the stream by the node that made them (or by the sweep) | until moved |
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
//! A node's publishes go to one task (`publisher.rs`, which tells how batches form) that sends
//! them as calls of the publish script (`PublishCall`): at most one call in flight on one Redis
//! or Sentinel (`publisher::IN_FLIGHT`), eight on a Cluster (`IN_FLIGHT_CLUSTER`: calls to
//! different masters should not wait for each other); whatever arrives meanwhile goes in the next
//! call (up to 128 messages or 1 MiB; on a Cluster only messages whose channels share a hash
//! slot). For each message, in order and in its own `pcall` (its error is its own), the script
//! does it all atomically: it creates the epoch if the channel has no meta (a new channel, or one
//! whose state Redis lost: flush, restart without persistence, expiry, eviction — so a lost
//! history always means a new epoch and clients are told `recovered: false`), increments `top`,
//! builds the `message` frame by concatenation (byte-identical to
//! `crier_protocol::frames::encode_message`: channel names and epochs need no JSON escaping and
//! `data` is raw JSON), appends it to the history (trimmed to `history_size` in steps; entries
//! past `history_ttl` are pruned by the reads), pushes the TTLs out when due, PUBLISHes it, and
//! records the idempotency key (`SET ... EX 300` semantics: a repeat returns the first result and
//! publishes nothing; also for two messages of one call). A caller hears back after Redis
//! answered the call.
//!
//! # Delivery
//! The node's pub/sub connection (RESP3; one per master on a Cluster) is owned by one task
//! (`pubsub/`), which delivers each channel's publications to the handler in offset order,
//! exactly once. Ordinary commands (PING, the history script) run on that connection between
//! pushes, and their replies are ordered with the pushes; that ordering makes the bookkeeping
//! exact:
//! - **subscribe**: SUBSCRIBE, then read the channel's position (epoch, top) on the same
//!   connection. Publications pushed before that reply were published after the SUBSCRIBE took
//!   effect: they are delivered first; the position then becomes the channel's baseline. The
//!   caller gets its answer only after all this, so the node's history read comes after the
//!   subscription is live.
//! - **history reads** of channels with local subscribers (`BrokerHandler::has_subscribers`)
//!   run there too, pipelined: the pushes that precede their replies are delivered before the
//!   callers get the histories, so the node's "buffer live, read history, merge by offset"
//!   leaves no duplicate and no gap. Other history reads (e.g. the REST API on a channel nobody
//!   here watches) use the command connection.
//! - **live**: each publication is checked against the channel's position: in order →
//!   delivered; at or below the last delivered offset → dropped as a duplicate; a hole → filled
//!   from the history first.
//! - **reconnect** (jittered exponential backoff): re-SUBSCRIBE every channel in batches, then
//!   gap-fill: read each channel's history after its last delivered offset (pipelined) and
//!   deliver what is missing before any live publication; live ones already delivered are
//!   dropped.
//! - **probe**: a PING (`ROLE` with Sentinel or a Cluster) every `probe_interval`; no answer
//!   within the command timeout marks the broker down and forces a reconnect.
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
//! - One Redis (`redis_url`) does not track the server generation (Sentinel and Cluster do, see
//!   `gen` above): a restart from persistence keeps every channel's epoch, so subscribers
//!   recover across it without a gap; but if that restart lost the last acknowledged writes
//!   (e.g. `appendfsync everysec`), a channel keeps its epoch while its offsets go back, and
//!   those offsets are handed out again. The broker follows the history then.

mod broker;
mod channels;
mod clock;
mod command;
mod context;
mod control;
mod error;
mod hooks;
mod keys;
mod node_position;
mod options;
mod payload;
mod presence;
mod publisher;
mod pubsub;
mod scripts;
mod sentinel;
mod slots;
mod tls;
mod topology;

pub use broker::RedisBroker;
pub use options::{RedisOptions, StartError};
pub use tls::check_ca_pem;
pub use topology::Topology;

// Older spellings used by `hooks.rs`.
pub(crate) use clock::{millis, unix_ms};

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use crier_core::broker::PublishOptions;
use crier_core::{
    Broker, BrokerError, BrokerHandler, ChannelCount, History, NodeInfo, PresenceStats, PublishResult, Revocation,
    UserOp, UserOpReply,
};
use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;

#[async_trait]
impl Broker for RedisBroker {
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>) {
        let _ = self.ctx.handler.set(handler);
    }

    async fn publish(&self, channel: &str, data: &str, opts: PublishOptions<'_>) -> Result<PublishResult, BrokerError> {
        // The script copies the channel into the frame verbatim: only valid names may go there.
        crier_protocol::validate_channel(channel).map_err(|e| BrokerError::Internal(format!("publish: {e}")))?;
        self.publisher.publish(channel, data, opts.idempotency_key).await
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.pubsub.subscribe(channel).await?;
        // Webhooks: this instance now holds the channel (cluster-wide occupancy, `hooks.rs`).
        self.presence.hooks.hook_channel(channel, true).await;
        Ok(())
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let r = self.pubsub.unsubscribe(channel).await;
        if !self.ctx.has_subscribers(channel) {
            self.presence.hooks.hook_channel(channel, false).await;
        }
        r
    }

    fn enable_hooks(&self, config: crier_core::HookConfig) -> Result<(), BrokerError> {
        let claim_idle = config.claim_idle;
        self.presence.hooks.enable_hooks(&config, claim_idle)
    }

    async fn hook_read(&self, max: usize, wait: Duration) -> Result<Vec<crier_core::HookEvent>, BrokerError> {
        self.presence.hooks.hook_read(max, wait).await
    }

    async fn hook_ack(&self, ids: &[String]) -> Result<(), BrokerError> {
        self.presence.hooks.hook_ack(ids).await
    }

    async fn hook_publish(&self, channel: &str, user: &str, client: &str, data: &str) -> Result<(), BrokerError> {
        self.presence.hooks.hook_publish(channel, user, client, data).await
    }

    async fn hook_hold(&self, ids: &[String]) -> Result<(), BrokerError> {
        self.presence.hooks.hook_hold(ids).await
    }

    async fn hook_release(&self) -> Result<(), BrokerError> {
        self.presence.hooks.hook_release().await
    }

    fn hook_stats(&self) -> crier_core::HookStats {
        self.presence.hooks.hook_stats()
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError> {
        if self.ctx.has_subscribers(channel) {
            // The node is (being) subscribed: read on the pub/sub connection, in order with the
            // live stream, so the node's merge by offset is exact (crate docs, # Delivery).
            return self.pubsub.history(channel, since, limit).await;
        }
        channels::history(&self.ctx, channel, since, limit).await
    }

    async fn presence_add(&self, channel: &str, entry: &PresenceEntry) -> Result<(), BrokerError> {
        self.presence.presence_add(channel, entry).await
    }

    async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        self.presence.presence_remove(channel, client).await
    }

    async fn presence_add_counted(&self, channel: &str, entry: &PresenceEntry, max: u64) -> Result<u64, BrokerError> {
        self.presence.presence_add_counted(channel, entry, max).await
    }

    async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        self.presence.presence(channel).await
    }

    async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, BrokerError> {
        self.presence.presence_stats(channel).await
    }

    async fn connection_opened(&self, user: &str, client: &str) -> Result<u64, BrokerError> {
        self.presence.connection_opened(user, client).await
    }

    async fn connection_closed(&self, user: &str, client: &str) -> Result<(), BrokerError> {
        self.presence.connection_closed(user, client).await
    }

    /// Counts the user's connections cluster-wide, tells every other node over the control
    /// channel, and closes this node's ones directly. Returns the larger of the cluster-wide
    async fn disconnect_user(&self, user: &str) -> Result<u64, BrokerError> {
        control::disconnect_user(&self.ctx, &self.presence, user).await
    }

    async fn user_op(&self, user: &str, op: &UserOp) -> Result<UserOpReply, BrokerError> {
        control::user_op(&self.ctx, &self.presence, self.is_up(), user, op).await
    }

    async fn revocations(&self, since: u64) -> Result<Vec<Revocation>, BrokerError> {
        control::revocations(&self.ctx, since).await
    }

    async fn report_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        self.presence.report_node(info).await
    }

    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        self.presence.nodes().await
    }

    fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    fn reconnects(&self) -> u64 {
        RedisBroker::reconnects(self)
    }

    fn publish_calls(&self) -> u64 {
        self.ctx.publish_calls.load(Ordering::Relaxed)
    }

    async fn rate_limit(&self, key: &str, rate: u32, burst: u32) -> Result<Option<Duration>, BrokerError> {
        control::rate_limit(&self.ctx, key, rate, burst).await
    }

    fn shares_rate_limits(&self) -> bool {
        true
    }

    async fn report_channels(&self, node: &str, counts: &[(String, u64)], full: bool) -> Result<bool, BrokerError> {
        channels::report(&self.ctx, node, counts, full).await
    }

    async fn channels(
        &self,
        prefix: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ChannelCount>, BrokerError> {
        channels::list(&self.ctx, &self.presence, prefix, after, limit).await
    }

    async fn delete_history(&self, channel: &str) -> Result<(), BrokerError> {
        channels::delete_history(&self.ctx, channel).await
    }
}
