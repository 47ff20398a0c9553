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

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crier_core::{Command, ConnectionInfo, Hub, Registry, UserOp, UserOpReply};
use crier_protocol::CloseCode;

use crate::state::AppState;

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The client id of connection `conn` (in `welcome`, presence and connection counts):
/// `<node_id>-<boot>-<conn>`, where `boot` is random per process ([`crate::state::Inner::boot`]),
/// so a node restarted with the same `node_id` never reuses the id of a connection whose presence
/// or connection-count entry may still be in the broker.
pub fn client_id(st: &AppState, conn: crier_core::ConnId) -> String {
    format!("{}-{}-{conn}", st.config.node_id, st.boot)
}

/// The token revocations in force on this node: user → `before` (tokens with an `iat` before it,
/// or without `iat`, are refused). An entry counts for `token_max_lifetime` after its `before`.
pub struct Revocations {
    by_user: RwLock<HashMap<Box<str>, u64>>,
    lifetime_s: u64,
}

impl Revocations {
    pub fn new(lifetime: Duration) -> Revocations {
        Revocations { by_user: RwLock::new(HashMap::new()), lifetime_s: lifetime.as_secs() }
    }

    /// Records that `user`'s tokens issued before `before` are revoked (a later `before` wins).
    pub fn record(&self, user: &str, before: u64) {
        let mut map = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        let at = map.entry(user.into()).or_insert(0);
        *at = (*at).max(before);
    }

    /// Whether a token of `user` issued at `iat` is revoked. A token without `iat` cannot show
    /// it was issued after the revocation: it is revoked while one is in force for its user.
    pub fn is_revoked(&self, user: &str, iat: Option<u64>) -> bool {
        let map = self.by_user.read().unwrap_or_else(|e| e.into_inner());
        let Some(&before) = map.get(user) else {
            return false;
        };
        if before.saturating_add(self.lifetime_s) < unix_now() {
            return false;
        }
        iat.is_none_or(|iat| iat < before)
    }

    /// Forgets revocations older than `token_max_lifetime` (every token they cover expired).
    fn prune(&self) {
        let stale = unix_now().saturating_sub(self.lifetime_s);
        let mut map = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, before| *before >= stale);
    }

    /// Since when revocations matter (what to load from the broker).
    fn since(&self) -> u64 {
        unix_now().saturating_sub(self.lifetime_s)
    }
}

/// What a node applies an operation with.
pub struct Local<'a> {
    pub hub: &'a Hub,
    pub registry: &'a Registry,
    pub revocations: &'a Revocations,
    /// `<node_id>-<boot>-`: the client ids' prefix (see `handshake::client_id`).
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
pub async fn sync_revocations(st: AppState) {
    let mut loaded_at: Option<u64> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        n += 1;
        if n.is_multiple_of(600) {
            st.revocations.prune();
        }
        let reconnects = st.broker().reconnects();
        if loaded_at == Some(reconnects) || !st.broker().is_up() {
            continue;
        }
        match st.broker().revocations(st.revocations.since()).await {
            Ok(list) => {
                for r in list {
                    st.revocations.record(&r.user, r.before);
                }
                loaded_at = Some(reconnects);
            }
            Err(e) => tracing::warn!(error = %e, "could not load token revocations; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_cover_older_and_iat_less_tokens_for_their_lifetime() {
        let r = Revocations::new(Duration::from_secs(100));
        let now = unix_now();
        assert!(!r.is_revoked("u", None));
        r.record("u", now);
        r.record("u", now - 50);
        assert!(r.is_revoked("u", Some(now - 1)));
        assert!(!r.is_revoked("u", Some(now)), "issued at `before`: not revoked");
        assert!(r.is_revoked("u", None), "no iat: revoked while in force");
        assert!(!r.is_revoked("v", Some(0)));
        r.record("old", now - 200);
        assert!(!r.is_revoked("old", Some(0)), "past token_max_lifetime the revocation no longer counts");
        r.prune();
        assert!(r.by_user.read().map(|m| !m.contains_key("old") && m.contains_key("u")).unwrap_or(false));
    }
}
