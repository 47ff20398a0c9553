//! Server-side control (issue 19, part C): what a node does with the cluster-wide operations on a
//! user's connections ([`crier_core::UserOp`], sent by `Broker::user_op` from the REST API in
//! `api_control`), and the token revocations every node holds in memory.
//!
//! - Disconnect and invalidate close through the connections' outboxes, like every other close.
//! - Subscribe and unsubscribe become [`Command`]s queued in each connection's outbox: the
//!   connection's task runs them on its own session when no request of its own is in flight
//!   (`Session::on_command`), so they are ordered with the client's frames and an idle
//!   connection gets no task, buffer or timer for them.
//! - Revocations: a node loads those in force at start and after every broker reconnect
//!   ([`sync_revocations`]) and learns new ones from the `Invalidate` operation itself; the
//!   handshake and `refresh` check them in memory ([`Revocations::is_revoked`]), without a
//!   broker round trip.

use std::sync::Arc;
use std::time::Duration;

use crier_core::{Broker, Command, ConnectionInfo, Hub, Registry, UserOp, UserOpReply};
use crier_protocol::CloseCode;

use crate::revocations::Revocations;

/// What a node applies an operation with.
pub struct Local<'a> {
    pub hub: &'a Hub,
    pub registry: &'a Registry,
    pub revocations: &'a Revocations,
    /// `<node_id>-<boot>-`: the client ids' prefix (see `AppState::client_id`).
    pub client_prefix: &'a str,
    pub node: &'a str,
}

/// Applies `op` to this node's connections of `user`; see the module docs.
pub fn apply(local: &Local<'_>, user: &str, op: &UserOp) -> UserOpReply {
    let count = |n: usize| UserOpReply { count: n as u64, ..Default::default() };
    match op {
        UserOp::Disconnect { code, reason } => count(local.registry.close_user_with(user, CloseCode(*code), reason)),
        UserOp::Subscribe { channel, recover } => {
            let asked = local.registry.user_connections(user).into_iter().filter(|c| {
                c.outbox.command(Command::Subscribe { channel: channel.as_str().into(), recover: recover.clone() })
            });
            count(asked.count())
        }
        UserOp::Unsubscribe { channel } => {
            // Every connection is told (a subscribe asked just before may still be queued);
            // those subscribed now are counted.
            let mut n = 0;
            for c in local.registry.user_connections(user) {
                let subscribed = local.hub.is_subscribed(channel, c.id);
                if c.outbox.command(Command::Unsubscribe { channel: channel.as_str().into() }) && subscribed {
                    n += 1;
                }
            }
            count(n)
        }
        UserOp::Invalidate { before } => {
            local.revocations.record(user, *before);
            count(local.registry.close_revoked(user, *before))
        }
        UserOp::Connections => {
            let conns = local.registry.user_connections(user);
            let ids: Vec<_> = conns.iter().map(|c| c.id).collect();
            let channels = local.hub.channels_of(&ids);
            let connections: Vec<ConnectionInfo> = conns
                .iter()
                .zip(channels)
                .map(|(c, channels)| ConnectionInfo {
                    client: format!("{}{}", local.client_prefix, c.id),
                    node: local.node.to_owned(),
                    transport: c.transport.as_str().to_owned(),
                    channels,
                })
                .collect();
            UserOpReply { count: connections.len() as u64, connections }
        }
    }
}

/// Loads the revocations in force from the broker at start, again after every broker reconnect
/// (a revocation published while this node's pub/sub was down was missed), and retries a load
/// that failed; once a second. Also forgets expired ones.
pub async fn sync_revocations(broker: Arc<dyn Broker>, revocations: Arc<Revocations>) {
    let mut loaded_at: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        if n.is_multiple_of(600) {
            revocations.prune();
        }
        let reconnects = broker.reconnects();
        if loaded_at == Some(reconnects) || !broker.is_up() {
            continue;
        }
        match broker.revocations(revocations.since()).await {
            Ok(list) => {
                for r in list {
                    revocations.record(&r.user, r.before);
                }
                loaded_at = Some(reconnects);
            }
            Err(e) => tracing::warn!(error = %e, "could not load token revocations; retrying"),
        }
    }
}
