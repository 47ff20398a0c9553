//! The Broker: what a node needs from the rest of the cluster.
//!
//! Delivery guarantee (enforced by the implementations, checked by the conformance suite in
//! crier-testkit, which every broker runs from its tests):
//! - `publish` assigns the channel's next `offset` and appends to its history atomically, so every
//!   node sees one order per channel; an `Ok` means the message is in the history and on its way
//!   to every node subscribed to the channel.
//! - A node subscribed to a channel receives its publications through
//!   [`BrokerHandler::on_publication`] in offset order. A subscriber that cannot be sure it saw
//!   every message (reconnect, node restart, broker blip) recovers from `history` by offset;
//!   when the history no longer holds the gap (trimmed, expired, or the epoch changed), the
//!   broker says so (`History::gap`) and the client is told `recovered: false`.
//! - The epoch changes whenever a channel's history is lost, so an offset is only meaningful with
//!   its epoch.
//!
//! Besides messages, the broker holds the little cluster state a node needs from the others:
//! presence, per-user connection counts, the node registry, and user disconnects.

pub mod hooks;
mod memory;
pub mod own;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;
use serde::{Deserialize, Serialize};

pub use hooks::{HookConfig, HookEvent, HookStats};
pub use memory::MemoryBroker;
pub use own::{OwnEntries, OwnPresence};

/// One published message as nodes pass it around: its place in the channel's stream and the
/// `message` frame, encoded once.
#[derive(Debug, Clone)]
pub struct Publication {
    pub offset: u64,
    pub epoch: Arc<str>,
    /// The complete `message` frame (valid UTF-8 JSON).
    pub frame: Bytes,
    /// When the publish was accepted, in microseconds since the Unix epoch.
    pub published_at_us: u64,
}

/// The answer to a publish: where the message landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublishResult {
    pub epoch: String,
    pub offset: u64,
}

/// A channel's position and the requested part of its history.
#[derive(Debug, Clone)]
pub struct History {
    pub epoch: String,
    /// The channel's last offset (0 when nothing was ever published in this epoch).
    pub offset: u64,
    /// Oldest first.
    pub publications: Vec<Publication>,
    /// `since` was given and the history cannot fill the gap after it: the epoch differs, or
    /// messages after `since` were trimmed or expired.
    pub gap: bool,
}

/// A node as listed by `/api/v1/info`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeInfo {
    pub node: String,
    pub connections: u64,
    pub version: String,
    /// Ready for new connections (not draining, broker reachable). Only ready nodes count in
    /// the rebalancing mean; an entry written without it (an older node) counts as ready.
    pub ready: bool,
    /// Seconds since the node started (absent in entries of older nodes: 0).
    #[serde(default)]
    pub uptime_s: u64,
    /// Open connections by transport (absent in entries of older nodes: zeros).
    #[serde(default)]
    pub transports: TransportCounts,
    /// Resident memory of the node's process, in bytes (0 when unknown).
    #[serde(default)]
    pub memory_bytes: u64,
}

/// A node's open connections by transport ([`NodeInfo::transports`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TransportCounts {
    pub ws: u64,
    pub sse: u64,
}

/// An active channel as listed by [`Broker::channels`]: its subscribers summed over the live
/// nodes (as each node last reported them with [`Broker::report_channels`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelCount {
    pub channel: String,
    pub subscribers: u64,
}

/// A channel's presence counted: clients in it and their distinct users.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PresenceStats {
    pub clients: u64,
    pub users: u64,
}

/// A `join` or `leave` of a channel's presence, as the broker hands it to every subscribed node
/// (channels whose policy has `join_leave`). Not a message: no offset, not in the history.
#[derive(Debug, Clone)]
pub struct PresenceEvent {
    /// The client that joined or left (its presence entry's `client`).
    pub client: String,
    /// The complete `join`/`leave` frame (JSON), built once per cluster
    /// (`crier_protocol::frames::encode_presence_event`).
    pub frame: Bytes,
}

/// Broker failures. `Unavailable` is what callers turn into `unavailable` / 503: the request
/// certainly had no effect (no connection when it was to be sent, or the broker refused it).
/// `OutcomeUnknown` (only from `publish`): the request may have been applied — the broker did
/// not answer in time, or the connection dropped after it may have been sent; callers turn it
/// into `outcome_unknown` / 504, and a retry with the same idempotency key is safe.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker outcome unknown: {0}")]
    OutcomeUnknown(String),
    #[error("broker error: {0}")]
    Internal(String),
}

/// What a broker calls back into (the node's hub, via the server).
pub trait BrokerHandler: Send + Sync + 'static {
    /// A publication on a channel this node subscribed to. Called in offset order per channel.
    fn on_publication(&self, channel: &str, publication: Publication);
    /// Close every local connection of `user` (cluster-wide disconnect). Returns how many.
    fn on_disconnect_user(&self, user: &str) -> usize;
    /// Publications of `channel` were lost for this node and cannot be recovered (after a broker
    /// outage the history no longer held them, or the channel's history itself was lost: a new
    /// epoch). Called before the publications that follow the loss; `epoch`/`offset` is the
    /// channel's position after it. Brokers that never lose messages never call it.
    fn on_gap(&self, channel: &str, epoch: &str, offset: u64) {
        let _ = (channel, epoch, offset);
    }
    /// A `join`/`leave` in `channel` (a channel whose policy has `join_leave`, which this node is
    /// subscribed to). Called in order with the channel's publications: a join or leave that
    /// happened between two publishes reaches the handler between them.
    fn on_presence_event(&self, channel: &str, event: PresenceEvent) {
        let _ = (channel, event);
    }
    /// Does this node still have local subscribers of `channel`? Checked before a broker-level
    /// unsubscribe, so a late unsubscribe never undoes a newer subscribe.
    fn has_subscribers(&self, channel: &str) -> bool;

    // Server-side control (issue 19, part C).
    /// Applies `op` to this node's connections of `user` ([`Broker::user_op`] calls it on every
    /// node); returns what it did here. The default knows only `Disconnect` (as
    /// [`BrokerHandler::on_disconnect_user`]).
    fn on_user_op(&self, user: &str, op: &UserOp) -> UserOpReply {
        match op {
            UserOp::Disconnect { .. } => {
                UserOpReply { count: self.on_disconnect_user(user) as u64, ..Default::default() }
            }
            _ => UserOpReply::default(),
        }
    }
}

// --- Server-side control (issue 19, part C): operations on a user's connections, cluster-wide ---

/// An operation on every live connection of one user, on every node ([`Broker::user_op`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum UserOp {
    /// Close them with `code` and `reason` (REST `disconnect`).
    Disconnect { code: u16, reason: String },
    /// Subscribe them to `channel` (REST `subscribe`; the server's word, no token check).
    Subscribe {
        channel: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        recover: Option<StreamPosition>,
    },
    /// Unsubscribe them from `channel` (REST `unsubscribe`).
    Unsubscribe { channel: String },
    /// Tokens issued before `before` (Unix seconds) are revoked: remembered by every node
    /// (handshakes and refreshes refuse them) and connections using them closed with 4001.
    Invalidate { before: u64 },
    /// List them (REST `GET /api/v1/users/{user}/connections`).
    Connections,
}

/// One live connection, as [`UserOp::Connections`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub client: String,
    pub node: String,
    pub transport: String,
    pub channels: Vec<String>,
}

/// What a [`UserOp`] did: connections closed (disconnect, invalidate), asked to subscribe,
/// unsubscribed, or listed; the list for [`UserOp::Connections`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserOpReply {
    pub count: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub connections: Vec<ConnectionInfo>,
}

impl UserOpReply {
    /// Adds another node's reply to this one.
    pub fn merge(&mut self, other: UserOpReply) {
        self.count += other.count;
        self.connections.extend(other.connections);
    }
}

/// A token revocation in force ([`UserOp::Invalidate`]): `user`'s tokens issued before `before`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub user: String,
    pub before: u64,
}

// --- end of server-side control ---

/// Options of a publish.
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishOptions<'a> {
    /// A repeated publish with the same key (per channel) within [`IDEMPOTENCY_WINDOW`] returns
    /// the first result and is not delivered again.
    pub idempotency_key: Option<&'a str>,
}

/// How long idempotency keys are remembered.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// See the module docs.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Installs the handler that receives publications and cluster events. Called once, before
    /// any subscribe.
    fn set_handler(&self, handler: Arc<dyn BrokerHandler>);

    /// Publishes raw JSON `data` on `channel` (already validated and authorized).
    async fn publish(&self, channel: &str, data: &str, opts: PublishOptions<'_>) -> Result<PublishResult, BrokerError>;

    /// Starts delivering `channel`'s publications to this node. Idempotent.
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// Stops delivering `channel` to this node, unless the handler has subscribers again.
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// The channel's position, and its publications after `since` (oldest first, at most
    /// `limit`), or the latest `limit` when `since` is `None`.
    async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: usize,
    ) -> Result<History, BrokerError>;

    /// Presence: adds or refreshes a client in a channel.
    async fn presence_add(&self, channel: &str, entry: &PresenceEntry) -> Result<(), BrokerError>;
    async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError>;
    async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError>;

    // --- Presence that pushes (join/leave events, presence_stats) ---
    // `presence_add` of a client not yet in the channel and `presence_remove` of one in it
    // announce a `join`/`leave` (`BrokerHandler::on_presence_event`) on channels whose policy
    // has `join_leave`; so does the expiry of a dead node's entries, once per entry cluster-wide.

    /// How many clients and distinct users are in `channel`'s presence (no listing).
    async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, BrokerError>;

    /// Counts a new connection of `user` cluster-wide; returns the user's count including it.
    async fn connection_opened(&self, user: &str, client: &str) -> Result<u64, BrokerError>;
    async fn connection_closed(&self, user: &str, client: &str) -> Result<(), BrokerError>;

    /// Closes every connection of `user` on every node; returns how many were closed.
    async fn disconnect_user(&self, user: &str) -> Result<u64, BrokerError>;

    /// Records this node in the node registry (called periodically).
    async fn report_node(&self, info: &NodeInfo) -> Result<(), BrokerError>;
    /// Live nodes.
    async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError>;

    /// Whether the broker is reachable right now (readiness, `crier_broker_up`).
    fn is_up(&self) -> bool;

    // --- Channel namespaces (`max_subscribers`) ---
    /// [`Broker::presence_add`], returning how many clients the channel's presence holds after
    /// it, cluster-wide (what a namespace's `max_subscribers` is checked against). With `max` >
    /// 0, a client not yet in the channel is added only while it holds fewer than `max`, checked
    /// and added in one step: when full nothing is added and no `join` announced, and the answer
    /// is `max + 1` or more (the caller refuses; its `presence_remove` then changes nothing).
    async fn presence_add_counted(&self, channel: &str, entry: &PresenceEntry, max: u64) -> Result<u64, BrokerError>;
    // --- The cluster's channels and history deletion (issue 19, part D: the admin API). ---

    /// Mirrors this node's (`node`) local subscriber counts: each `(channel, count)` replaces
    /// the node's count of that channel, a count of 0 removes the channel. `full`: the list is
    /// the node's whole set (everything else of this node is forgotten first). The entries
    /// live as long as the node's registry entry ([`Broker::report_node`]): a dead node's
    /// channels vanish with it. Called by one task per node, so calls never overlap.
    /// `Ok(false)`: the broker held nothing for this node before the call (Redis lost its data,
    /// or the entries expired while the node was stalled) — a node that has channels then
    /// reports its whole set.
    async fn report_channels(&self, node: &str, counts: &[(String, u64)], full: bool) -> Result<bool, BrokerError>;

    /// Active channels cluster-wide (at least one subscriber on a live node), in name order
    /// (byte-wise), those starting with `prefix` and after `after` (exclusive), at most
    /// `limit`, each with its subscribers summed over the live nodes.
    async fn channels(&self, prefix: &str, after: Option<&str>, limit: usize)
    -> Result<Vec<ChannelCount>, BrokerError>;

    /// Drops the channel's history and position: its next publish or read starts a new epoch,
    /// so a recovery from before answers `recovered: false`. Nodes subscribed to the channel
    /// tell their subscribers with a `gap` frame (in the new epoch) before its next message.
    async fn delete_history(&self, channel: &str) -> Result<(), BrokerError>;

    // --- Server-side control (issue 19, part C) ---
    /// Applies `op` to every live connection of `user` on every node (this one through its
    /// handler directly) and sums the nodes' replies. Exact: every live node of the registry is
    /// waited for, within a deadline (a node that does not answer in time is left out of the
    /// count). [`UserOp::Invalidate`] is also stored first, for [`Broker::revocations`].
    async fn user_op(&self, user: &str, op: &UserOp) -> Result<UserOpReply, BrokerError>;

    /// The token revocations in force: those with `before >= since` (Unix seconds; older ones
    /// cover only tokens that expired since). What a node loads at start and after a broker
    /// reconnect; newer ones reach it through [`BrokerHandler::on_user_op`].
    async fn revocations(&self, since: u64) -> Result<Vec<Revocation>, BrokerError>;
    // --- end of server-side control ---

    // --- Webhooks (docs/hooks.md, *Webhooks*) ---
    /// Starts producing webhook events (each once per cluster, queued in the broker). Until it
    /// is called none are produced.
    fn enable_hooks(&self, _config: HookConfig) -> Result<(), BrokerError> {
        Err(BrokerError::Internal("webhooks are not supported by this broker".into()))
    }

    /// Up to `max` queued events for this node to deliver, oldest first; waits up to `wait`
    /// for one. The node holds them until [`Broker::hook_ack`] (a broker with a durable
    /// queue hands them to another node if this one dies meanwhile).
    async fn hook_read(&self, _max: usize, wait: std::time::Duration) -> Result<Vec<HookEvent>, BrokerError> {
        tokio::time::sleep(wait).await;
        Ok(Vec::new())
    }

    /// Queues a `client_publish` event (if enabled): a client's publish on `channel`, accepted.
    /// Produced by the node that accepted it, after the publish (once: a publish is accepted by
    /// one node).
    async fn hook_publish(&self, _channel: &str, _user: &str, _client: &str, _data: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    /// The backend acknowledged these events.
    async fn hook_ack(&self, _ids: &[String]) -> Result<(), BrokerError> {
        Ok(())
    }

    /// This node still holds these events (it is retrying them): not to be handed to another
    /// node as a dead one's.
    async fn hook_hold(&self, _ids: &[String]) -> Result<(), BrokerError> {
        Ok(())
    }

    /// This node stops delivering events (it is stopping): where one node of the cluster
    /// delivers at a time, another takes over at once.
    async fn hook_release(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    /// The queue's length and drops, as this node sees them.
    fn hook_stats(&self) -> HookStats {
        HookStats::default()
    }
    // --- end of webhooks ---

    /// Cluster-wide rate limit (GCRA): counts one event for `key` at `rate` per second with a
    /// burst of `burst`. `Ok(None)` when allowed, `Ok(Some(retry_after))` when refused.
    /// Brokers without shared state (the memory broker) return `Ok(None)`: on one node the
    /// node-local limiter already is the cluster-wide one. See [`Broker::shares_rate_limits`].
    async fn rate_limit(&self, key: &str, rate: u32, burst: u32) -> Result<Option<std::time::Duration>, BrokerError> {
        let _ = (key, rate, burst);
        Ok(None)
    }

    /// Whether [`Broker::rate_limit`] is shared by every node of the cluster.
    fn shares_rate_limits(&self) -> bool {
        false
    }

    /// How many times the broker re-established its connections (`crier_broker_reconnects_total`).
    fn reconnects(&self) -> u64 {
        0
    }

    /// How many calls to its backend carried publishes (`crier_broker_publish_calls_total`; a
    /// broker that batches makes fewer than it publishes messages). 0 for one without calls.
    fn publish_calls(&self) -> u64 {
        0
    }
}
