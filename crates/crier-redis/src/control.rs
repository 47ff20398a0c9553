//! Node-wide operations: control messages between the nodes (a user's disconnect,
//! `Broker::user_op`'s operations and their replies), token revocations, and the cluster-wide
//! rate limit.
//!
//! Control messages go on `crier:control` (plain pub/sub: a Cluster broadcasts it to every
//! node); each node answers a `user_op` on the caller instance's reply channel
//! (`crier:reply:<instance>`, which every instance subscribes to). The pub/sub task hands what
//! arrives on both to [`on_control`] and [`on_reply`].

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crier_core::{BrokerError, Revocation, UserOp, UserOpReply};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::context::{Context, Reply};
use crate::presence::Presence;

/// A message on the control channel.
#[derive(Serialize, Deserialize)]
pub(crate) struct ControlMessage {
    pub op: String,
    pub user: String,
    pub origin: String,
    /// [`USER_OP`]: the operation, the id of the caller's wait and its reply channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<UserOp>,
    #[serde(default)]
    pub id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
}

/// Closes a user's connections on every node.
pub(crate) const DISCONNECT_USER: &str = "disconnect_user";
/// A server-side control operation (`Broker::user_op`); every node answers on `reply`.
pub(crate) const USER_OP: &str = "user_op";

async fn send(ctx: &Context, msg: &ControlMessage) -> Result<redis::Value, BrokerError> {
    let msg = serde_json::to_string(msg).map_err(|e| BrokerError::Internal(e.to_string()))?;
    let mut publish = redis::cmd("PUBLISH");
    publish.arg(ctx.keys.control()).arg(msg);
    Ok(ctx.commands.query(&publish).await?)
}

/// Counts the user's connections cluster-wide, tells every other node over the control
/// channel, and closes this node's ones directly. Returns the larger of the cluster-wide count
/// and the number closed here.
pub(crate) async fn disconnect_user(ctx: &Context, presence: &Presence, user: &str) -> Result<u64, BrokerError> {
    let count = presence.connection_count(user).await?;
    let msg = ControlMessage {
        op: DISCONNECT_USER.into(),
        user: user.to_owned(),
        origin: ctx.instance.clone(),
        cmd: None,
        id: 0,
        reply: None,
    };
    send(ctx, &msg).await?;
    let here = ctx.handler.get().map_or(0, |h| h.on_disconnect_user(user)) as u64;
    Ok(count.max(here))
}

/// Stores a revocation first (one script: ZADD GT, so a later `before` wins; the set's expiry
/// pushed out; revocations older than `revocation_ttl` pruned), then publishes the operation
/// on the control channel with this instance's reply channel, applies it here, and waits —
/// within `command_timeout` — for a reply from each other node: as many as received the
/// control message (PUBLISH's count, minus this one; on a Cluster, where PUBLISH counts one
/// server's subscribers only, the other live nodes of the node registry).
pub(crate) async fn user_op(
    ctx: &Context,
    presence: &Presence,
    is_up: bool,
    user: &str,
    op: &UserOp,
) -> Result<UserOpReply, BrokerError> {
    if let UserOp::Invalidate { before } = op {
        let ttl = ctx.options.revocation_ttl.as_secs();
        let stale = unix_now().saturating_sub(ttl);
        let mut inv = ctx.scripts.revoke.key(ctx.keys.revoked());
        inv.arg(*before).arg(user).arg(ttl.max(1)).arg(stale);
        ctx.commands.invoke(&inv).await?;
    }
    let id = ctx.next_op.fetch_add(1, Ordering::Relaxed) + 1;
    let (tx, mut rx) = mpsc::unbounded_channel();
    ctx.replies.lock().unwrap_or_else(|e| e.into_inner()).insert(id, tx);
    // Removes the wait on every path (an error, or the caller dropping this future).
    struct Forget<'a>(&'a Context, u64);
    impl Drop for Forget<'_> {
        fn drop(&mut self) {
            self.0.replies.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
        }
    }
    let _forget = Forget(ctx, id);
    let others: Option<HashSet<String>> = if ctx.keys.is_redis_cluster() {
        let nodes = presence.nodes().await?;
        Some(nodes.into_iter().map(|n| n.node).filter(|n| n != ctx.node()).collect())
    } else {
        None
    };
    let msg = ControlMessage {
        op: USER_OP.into(),
        user: user.to_owned(),
        origin: ctx.instance.clone(),
        cmd: Some(op.clone()),
        id,
        reply: Some(ctx.keys.reply(&ctx.instance)),
    };
    let received = match send(ctx, &msg).await? {
        redis::Value::Int(n) => usize::try_from(n).unwrap_or(0),
        _ => 0,
    };
    let mut total = ctx.handler.get().map(|h| h.on_user_op(user, op)).unwrap_or_default();
    // This instance's own subscription received it too (when its pub/sub is connected).
    let expected = match &others {
        Some(others) => others.len(),
        None => received.saturating_sub(usize::from(is_up)),
    };
    let mut heard = HashSet::new();
    let deadline = tokio::time::Instant::now() + ctx.options.command_timeout;
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

/// The revocations whose `before` is at or after `since`.
pub(crate) async fn revocations(ctx: &Context, since: u64) -> Result<Vec<Revocation>, BrokerError> {
    let mut range = redis::cmd("ZRANGEBYSCORE");
    range.arg(ctx.keys.revoked()).arg(since).arg("+inf").arg("WITHSCORES");
    let reply = ctx.commands.query(&range).await?;
    let pairs: Vec<(String, f64)> = redis::from_redis_value(reply)
        .map_err(|e| BrokerError::Internal(format!("unexpected revocations reply: {e}")))?;
    Ok(pairs.into_iter().map(|(user, before)| Revocation { user, before: before.max(0.0) as u64 }).collect())
}

/// The cluster-wide GCRA (`scripts::RATE`): `None` when allowed, else how long until it is.
pub(crate) async fn rate_limit(
    ctx: &Context,
    key: &str,
    rate: u32,
    burst: u32,
) -> Result<Option<Duration>, BrokerError> {
    let interval_ms = 1000.0 / f64::from(rate.max(1));
    let mut inv = ctx.scripts.rate.key(ctx.keys.rate(key));
    inv.arg(interval_ms).arg(burst.max(1));
    match ctx.commands.invoke(&inv).await? {
        redis::Value::Int(0) => Ok(None),
        redis::Value::Int(ms) => Ok(Some(Duration::from_millis(ms.unsigned_abs()))),
        other => Err(BrokerError::Internal(format!("unexpected rate-limit reply {other:?}"))),
    }
}

/// A message on the control channel (from the pub/sub task).
pub(crate) fn on_control(ctx: &Context, payload: &[u8]) {
    let Ok(msg) = serde_json::from_slice::<ControlMessage>(payload) else {
        tracing::warn!("malformed control message ignored");
        return;
    };
    if msg.origin == ctx.instance {
        return;
    }
    let Some(h) = ctx.handler.get() else {
        return;
    };
    match (msg.op.as_str(), &msg.cmd) {
        (DISCONNECT_USER, _) => {
            h.on_disconnect_user(&msg.user);
        }
        (USER_OP, Some(op)) => {
            let reply = h.on_user_op(&msg.user, op);
            let Some(channel) = msg.reply else {
                return;
            };
            let reply = Reply { id: msg.id, node: ctx.node().to_owned(), instance: ctx.instance.clone(), reply };
            let Ok(payload) = serde_json::to_string(&reply) else {
                return;
            };
            // Answered from its own task: the pub/sub task never waits for a command call.
            let commands = ctx.commands.clone();
            tokio::spawn(async move {
                let mut publish = redis::cmd("PUBLISH");
                publish.arg(channel).arg(payload);
                if let Err(e) = commands.query(&publish).await {
                    tracing::debug!(error = %e, "control reply not sent");
                }
            });
        }
        _ => {}
    }
}

/// Another node answered one of this instance's control operations (from the pub/sub task).
pub(crate) fn on_reply(ctx: &Context, payload: &[u8]) {
    let Ok(reply) = serde_json::from_slice::<Reply>(payload) else {
        tracing::warn!("malformed control reply ignored");
        return;
    };
    let waiting = ctx.replies.lock().unwrap_or_else(|e| e.into_inner()).get(&reply.id).cloned();
    if let Some(tx) = waiting {
        let _ = tx.send(reply);
    }
}

/// Seconds since the Unix epoch.
fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
