//! crier's delivery core: everything between "a message was accepted" and "its bytes are queued
//! for a socket", independent of HTTP and of Redis.
//!
//! - [`outbox`]: a connection's bounded outbound queue (bytes-bounded; overflow = close 4009).
//! - [`hub`]: the node's local subscriptions, channel → subscribers, sharded; fan-out of one
//!   shared frame; the buffering that makes recovery race-free.
//! - [`broker`]: the [`Broker`] trait (publish with offsets/epochs, history, node-level
//!   subscriptions, presence, cluster-wide connection counts) and the embedded [`MemoryBroker`];
//!   the test suite every broker passes is `crier_testkit::conformance` (dev-only).
//! - [`node`]: subscribe/unsubscribe orchestration between hub and broker (one broker subscription
//!   per channel per node, rolled back on failure) and the recovery merge.
//! - [`namespace`]: channel namespaces, the options each channel gets ([`ChannelPolicy`]).
//! - [`registry`]: the node's live connections, by id (a disconnect by user scans; drain,
//!   heartbeat sweep, the connection gauge).
//!
//! Architecture invariant: crier-core knows nothing of HTTP, WebSockets or Redis.

pub mod broker;
pub mod hub;
pub mod namespace;
pub mod node;
pub mod outbox;
pub mod registry;

pub use broker::{
    Broker, BrokerError, BrokerHandler, ChannelCount, ConnectionInfo, History, HookConfig, HookEvent, HookStats,
    MemoryBroker, NodeInfo, PresenceEvent, PresenceStats, Publication, PublishResult, Revocation, TransportCounts,
    UserOp, UserOpReply,
};
pub use hub::Hub;
pub use namespace::{ChannelPolicy, Namespaces};
pub use node::{Node, SubscribeError};
pub use outbox::{Beat, Close, Command, Next, Out, Outbox, Push, clock_ms};
pub use registry::{Registry, Transport, UserConnection};

/// A connection's id, unique within a node.
pub type ConnId = u64;

/// Microseconds since the Unix epoch (publication timestamps; compared across nodes).
pub fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}
