//! Server-side control (`user_op`, `disconnect_user`): a request on `<prefix>.op` applied here
//! and answered by every other live node on an inbox, counted against the node registry.

use std::sync::Arc;

use async_nats::HeaderMap;
use crier_core::broker::{BrokerError, UserOp, UserOpReply};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::{H_NODE, Inner, unavailable};

#[derive(Debug, Serialize, Deserialize)]
struct OpRequest {
    user: String,
    /// `None`: a plain `disconnect_user`.
    op: Option<UserOp>,
}

impl Inner {
    pub(crate) fn apply_op(&self, user: &str, op: Option<&UserOp>) -> UserOpReply {
        let Some(h) = self.handler() else { return UserOpReply::default() };
        match op {
            None => UserOpReply { count: h.on_disconnect_user(user) as u64, ..Default::default() },
            Some(op) => h.on_user_op(user, op),
        }
    }

    pub(crate) fn op_subject(&self) -> String {
        format!("{}.op", self.opts.prefix)
    }

    /// Applies an operation here and on every other live node (answers within a deadline).
    pub(crate) async fn fan_op(&self, user: &str, op: Option<&UserOp>) -> Result<UserOpReply, BrokerError> {
        let peers = self.nodes().await?.into_iter().filter(|n| n.node != self.opts.node_id).count();
        let mut reply = self.apply_op(user, op);
        if peers == 0 {
            return Ok(reply);
        }
        let inbox = self.client.new_inbox();
        let mut sub = self.client.subscribe(inbox.clone()).await.map_err(unavailable)?;
        let req = OpRequest { user: user.to_owned(), op: op.cloned() };
        let body = serde_json::to_vec(&req).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let mut h = HeaderMap::new();
        h.insert(H_NODE, self.opts.node_id.as_str());
        self.client
            .publish_with_reply_and_headers(self.op_subject(), inbox, h, body.into())
            .await
            .map_err(unavailable)?;
        let deadline = tokio::time::Instant::now() + self.opts.command_timeout;
        let mut got = 0;
        while got < peers {
            match tokio::time::timeout_at(deadline, sub.next()).await {
                Ok(Some(m)) => {
                    if let Ok(r) = serde_json::from_slice::<UserOpReply>(&m.payload) {
                        reply.merge(r);
                    }
                    got += 1;
                }
                _ => break,
            }
        }
        let _ = sub.unsubscribe().await;
        Ok(reply)
    }
}

/// Starts this node's answerer of control operations.
pub(crate) async fn start(inner: &Arc<Inner>) -> Result<(), BrokerError> {
    let mut sub = inner.client.subscribe(inner.op_subject()).await.map_err(unavailable)?;
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let Some(inner) = weak.upgrade() else { break };
            if crate::header(m.headers.as_ref(), H_NODE) == Some(inner.opts.node_id.as_str()) {
                continue;
            }
            let (Some(reply), Ok(req)) = (m.reply, serde_json::from_slice::<OpRequest>(&m.payload)) else { continue };
            let r = inner.apply_op(&req.user, req.op.as_ref());
            let body = serde_json::to_vec(&r).unwrap_or_default();
            let _ = inner.client.publish(reply, body.into()).await;
        }
    });
    Ok(())
}
