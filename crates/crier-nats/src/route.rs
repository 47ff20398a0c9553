//! Publish routing: every channel has an owner node, chosen by rendezvous hashing over the
//! nodes that announce themselves, and a publish made on another node is forwarded to it over
//! core NATS request/reply (`<prefix>.p.<node token>`). One node storing a channel's publishes
//! keeps its cached tail current (a publish is one JetStream operation, never a lost race) and
//! lets it batch what arrives together.
//!
//! Correctness never depends on it: a publish is stored with the channel's expected last
//! sequence wherever it is stored, so while nodes disagree on an owner (a node joining or
//! leaving) two nodes may store one channel's publishes and only race, as without routing.
//!
//! Nodes announce themselves on `<prefix>.hb` every second while their streams are laid out
//! (a node hearing a node it did not know announces itself at once); a node not heard for
//! five seconds, or whose forward found nobody listening, owns nothing. When the owner
//! cannot take a publish (nobody listens, it is not ready, the publish is too large for a NATS
//! message), the publish is stored here. When the owner took it and did not answer in time,
//! the outcome is unknown (the owner may have stored it) unless the publish has an idempotency
//! key: then it is stored here with the same key, and JetStream's de-duplication answers with
//! the first store's offset if there was one.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::{HeaderMap, RequestErrorKind};
use bytes::Bytes;
use crier_core::broker::{BrokerError, PublishResult};
use futures_util::StreamExt;

use crate::{H_EPOCH, H_OFFSET, Inner, header, token, unavailable, untoken};

const H_CHANNEL: &str = "Crier-Channel";
const H_KEY: &str = "Crier-Key";
const H_ERROR: &str = "Crier-Error";

/// How often a node announces itself, and how long a node not heard from still owns channels.
const ANNOUNCE: Duration = Duration::from_secs(1);
const EXPIRY: Duration = Duration::from_secs(5);

/// The other nodes heard from: name → (its hash, when last heard).
#[derive(Default)]
pub(crate) struct Peers(std::sync::Mutex<HashMap<String, (u64, Instant)>>);

impl Peers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// FNV-1a, 64 bits: the same on every node and every build (the owner must be agreed on).
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// A node's rendezvous score for a channel (splitmix64's finaliser over both hashes).
fn score(channel: u64, node: u64) -> u64 {
    let mut z = channel ^ node.rotate_left(29);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The owner among `nodes` (name, hash): highest score, ties to the greater name.
fn owner_of<'a>(channel: &str, nodes: impl Iterator<Item = (&'a str, u64)>) -> Option<&'a str> {
    let c = fnv(channel);
    nodes.max_by_key(|&(name, h)| (score(c, h), name)).map(|(name, _)| name)
}

impl Inner {
    fn forward_subject(&self, node: &str) -> String {
        format!("{}.p.{}", self.opts.prefix, token(node))
    }

    fn announce_subject(&self) -> String {
        format!("{}.hb", self.opts.prefix)
    }

    /// The channel's owner when it is another node (`None`: this node stores it).
    pub(crate) fn owner(&self, channel: &str) -> Option<String> {
        let peers = self.peers.lock();
        if peers.is_empty() {
            return None;
        }
        let me = self.opts.node_id.as_str();
        let live = peers.iter().filter(|(_, (_, seen))| seen.elapsed() < EXPIRY).map(|(n, (h, _))| (n.as_str(), *h));
        let owner = owner_of(channel, live.chain(std::iter::once((me, fnv(me)))))?;
        (owner != me).then(|| owner.to_owned())
    }

    /// Forwards a publish to its channel's owner: its outcome, or `None` when the owner did not
    /// take it (the caller stores it here).
    pub(crate) async fn forward(
        &self,
        owner: &str,
        channel: &str,
        data: &str,
        key: Option<&str>,
    ) -> Option<Result<PublishResult, BrokerError>> {
        let mut h = HeaderMap::new();
        h.insert(H_CHANNEL, token(channel).as_str());
        if let Some(k) = key {
            h.insert(H_KEY, token(k).as_str());
        }
        let req = async_nats::Request::new()
            .headers(h)
            .payload(Bytes::copy_from_slice(data.as_bytes()))
            .timeout(Some(self.opts.command_timeout * 2));
        self.publish_forwards.fetch_add(1, Ordering::Relaxed);
        let reply = match self.client.send_request(self.forward_subject(owner), req).await {
            Ok(m) => m,
            Err(e) => {
                return match e.kind() {
                    RequestErrorKind::NoResponders => {
                        // Gone (or not started yet): it owns nothing until heard from again.
                        self.peers.lock().remove(owner);
                        None
                    }
                    RequestErrorKind::MaxPayloadExceeded | RequestErrorKind::InvalidSubject => None,
                    // Sent, unanswered: stored or not, only a key can tell.
                    _ if key.is_some() => None,
                    _ => Some(Err(BrokerError::OutcomeUnknown(format!("forwarded to node {owner}: {e}")))),
                };
            }
        };
        let hs = reply.headers.as_ref();
        if let (Some(epoch), Some(offset)) =
            (header(hs, H_EPOCH), header(hs, H_OFFSET).and_then(|o| o.parse::<u64>().ok()))
        {
            return Some(Ok(PublishResult { epoch: epoch.to_owned(), offset }));
        }
        let text = String::from_utf8_lossy(&reply.payload).into_owned();
        match header(hs, H_ERROR) {
            // The owner could not store it (not ready, cut off from JetStream): tried here.
            Some("unavailable") => None,
            Some("unknown") => Some(Err(BrokerError::OutcomeUnknown(text))),
            _ => Some(Err(BrokerError::Internal(text))),
        }
    }
}

/// Answers a forwarded publish.
async fn answer(inner: &Inner, reply: async_nats::Subject, r: Result<PublishResult, BrokerError>) {
    let mut h = HeaderMap::new();
    let body = match r {
        Ok(p) => {
            h.insert(H_EPOCH, p.epoch.as_str());
            h.insert(H_OFFSET, p.offset.to_string().as_str());
            String::new()
        }
        Err(e) => {
            let kind = match &e {
                BrokerError::Unavailable(_) => "unavailable",
                BrokerError::OutcomeUnknown(_) => "unknown",
                BrokerError::Internal(_) => "internal",
            };
            h.insert(H_ERROR, kind);
            e.to_string()
        }
    };
    if let Err(e) = inner.client.publish_with_headers(reply, h, body.into()).await {
        tracing::debug!(error = %e, "nats: a forwarded publish's answer was not sent");
    }
}

/// Starts this node's side of routing: the answerer of forwarded publishes, the announcements.
pub(crate) async fn start(inner: &Arc<Inner>) -> Result<(), BrokerError> {
    let mut forwards = inner.client.subscribe(inner.forward_subject(&inner.opts.node_id)).await.map_err(unavailable)?;
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        while let Some(m) = forwards.next().await {
            let Some(inner) = weak.upgrade() else { break };
            let Some(reply) = m.reply.clone() else { continue };
            let hs = m.headers.as_ref();
            let Some(channel) = header(hs, H_CHANNEL).and_then(untoken) else {
                answer(&inner, reply, Err(BrokerError::Internal("a forwarded publish without its channel".into())))
                    .await;
                continue;
            };
            let key = header(hs, H_KEY).and_then(untoken).map(|k| format!("{}:{k}", token(&channel)));
            // Queued here, in arrival order (a publisher's publishes stay in its order); stored
            // and answered by a task.
            let (rx, lead) = inner.enqueue(&channel, m.payload, key);
            tokio::spawn(async move {
                let r = inner.complete(&channel, rx, lead).await;
                answer(&inner, reply, r).await;
            });
        }
    });
    let mut heard = inner.client.subscribe(inner.announce_subject()).await.map_err(unavailable)?;
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        while let Some(m) = heard.next().await {
            let Some(inner) = weak.upgrade() else { break };
            let Ok(node) = std::str::from_utf8(&m.payload) else { continue };
            if node == inner.opts.node_id {
                continue;
            }
            let new = inner.peers.lock().insert(node.to_owned(), (fnv(node), Instant::now())).is_none();
            if new {
                tracing::debug!(node, "nats: a node to route publishes to");
                inner.announce_self().await;
            }
        }
    });
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(ANNOUNCE);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else { break };
            inner.peers.lock().retain(|_, (_, seen)| seen.elapsed() < EXPIRY);
            inner.announce_self().await;
        }
    });
    Ok(())
}

impl Inner {
    /// Announces this node as an owner of channels, while it can store them.
    async fn announce_self(&self) {
        if self.laid.get().is_none() || self.client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let _ = self.client.publish(self.announce_subject(), self.opts.node_id.clone().into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_spread_over_the_nodes_and_move_only_from_a_node_that_left() {
        let nodes: Vec<(String, u64)> = (0..3).map(|i| format!("node-{i}")).map(|n| (n.clone(), fnv(&n))).collect();
        let of =
            |c: &str, ns: &[(String, u64)]| owner_of(c, ns.iter().map(|(n, h)| (n.as_str(), *h))).map(str::to_owned);
        let mut counts: HashMap<String, usize> = HashMap::new();
        let mut moved = 0;
        for i in 0..3000 {
            let c = format!("private:user-{i}");
            let o = of(&c, &nodes).expect("an owner");
            *counts.entry(o.clone()).or_default() += 1;
            let without: Vec<_> = nodes.iter().filter(|(n, _)| *n != "node-2").cloned().collect();
            let after = of(&c, &without).expect("an owner");
            if o != "node-2" {
                assert_eq!(after, o, "{c} moved though its owner stayed");
            } else {
                moved += 1;
            }
        }
        for (n, k) in &counts {
            assert!((800..=1200).contains(k), "{n} owns {k} of 3000 channels");
        }
        assert_eq!(moved, counts["node-2"]);
    }

    #[test]
    fn the_hash_is_the_same_everywhere() {
        // FNV-1a's published test vector: nodes of any build agree on owners.
        assert_eq!(fnv("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv(""), 0xcbf2_9ce4_8422_2325);
    }
}
