//! The shared state of a running node: one cheap-to-clone handle passed to every handler and
//! session, and the types it holds. It is built (and the broker wired to the hub) in
//! [`crate::startup`]; the modules of the types it holds do not use it (no import cycle).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crier_core::{Broker, ChannelPolicy, Hub, Node, NodeInfo, Registry};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{OriginPolicy, Verifier};
use crate::config::Config;
use crate::limits::Limits;

/// See the module docs.
#[derive(Clone)]
pub struct AppState(pub Arc<Inner>);

pub struct Inner {
    pub config: Config,
    pub node: Node,
    pub registry: Arc<Registry>,
    pub verifier: Verifier,
    pub origins: OriginPolicy,
    pub limits: Limits,
    pub metrics: Option<PrometheusHandle>,
    pub draining: AtomicBool,
    /// Four random base-36 characters, fresh per process: part of every client id.
    pub boot: Box<str>,
    /// Set by `--dev`: a token for the demo page.
    pub dev_token: Option<String>,
    /// The last token patterns seen, shared with the next connection whose token has the same.
    pub patterns: PatternCache,
    /// The backend proxies of the `[proxy]` table, if any.
    pub proxies: Option<Arc<crate::proxy::Proxies>>,
    /// Uptime and connections by transport, for `/api/v1/info`.
    pub details: crate::node_details::NodeDetails,
    /// Token revocations in force (server-side control, [`crate::control`]).
    pub revocations: Arc<crate::revocations::Revocations>,
}

/// A token's channel patterns: those it may subscribe to and those it may publish to.
#[derive(Debug, PartialEq, Eq)]
pub struct Patterns {
    /// The subscribe patterns, then the publish patterns, each ended by `\0` (one allocation
    /// for all of a token's patterns; no channel name holds a `\0`, so a pattern with one could
    /// match nothing and is left out).
    text: Box<str>,
    /// Where the publish patterns start in `text`.
    split: usize,
}

impl Patterns {
    pub fn new(channels: &[String], publish: &[String]) -> Patterns {
        let mut text = String::new();
        for p in channels.iter().filter(|p| !p.contains('\0')) {
            text.push_str(p);
            text.push('\0');
        }
        let split = text.len();
        for p in publish.iter().filter(|p| !p.contains('\0')) {
            text.push_str(p);
            text.push('\0');
        }
        Patterns { text: text.into_boxed_str(), split }
    }

    /// The patterns of the channels the token may subscribe to.
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.text[..self.split].split_terminator('\0')
    }

    /// The patterns of the channels the token may publish to.
    pub fn publish(&self) -> impl Iterator<Item = &str> {
        self.text[self.split..].split_terminator('\0')
    }

    /// Whether the token may publish to `channel`.
    pub fn may_publish(&self, channel: &str) -> bool {
        self.publish().any(|p| crier_protocol::channel::channel_matches(p, channel))
    }
}

/// Shares token patterns between connections: tokens minted for a role (or one service's
/// clients) carry the same patterns, and each connection kept its own copy (with `["*"]`
/// twice, four allocations, ~130 bytes per connection). One entry, the last patterns seen: a
/// token with patterns of its own still costs its own copy (one allocation besides the `Arc`).
#[derive(Default)]
pub struct PatternCache(std::sync::Mutex<Option<Arc<Patterns>>>);

impl PatternCache {
    /// The patterns, as one shared value.
    pub fn share(&self, channels: &[String], publish: &[String]) -> Arc<Patterns> {
        let patterns = Patterns::new(channels, publish);
        let mut last = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = &*last
            && **p == patterns
        {
            return p.clone();
        }
        let p = Arc::new(patterns);
        *last = Some(p.clone());
        p
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl AppState {
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.node.broker
    }
    pub fn hub(&self) -> &Arc<Hub> {
        &self.node.hub
    }
    /// The options `channel` gets from its namespace.
    pub fn policy(&self, channel: &str) -> &ChannelPolicy {
        self.config.namespaces.policy(channel)
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The client id of connection `conn` (in `welcome`, presence and connection counts):
    /// `<node_id>-<boot>-<conn>`, where `boot` is random per process ([`Inner::boot`]), so a node
    /// restarted with the same `node_id` never reuses the id of a connection whose presence or
    /// connection-count entry may still be in the broker.
    pub fn client_id(&self, conn: crier_core::ConnId) -> String {
        format!("{}-{}-{conn}", self.config.node_id, self.boot)
    }

    /// Publishes this node's entry in the node registry (`/api/v1/info`).
    pub async fn report_node(&self) {
        let connections = self.registry.len() as u64;
        let info = NodeInfo {
            node: self.config.node_id.clone(),
            connections,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ready: !self.is_draining() && self.broker().is_up(),
            uptime_s: self.details.uptime_s(),
            transports: self.details.transports(connections),
            memory_bytes: crate::node_details::resident_bytes(),
        };
        if let Err(e) = self.broker().report_node(&info).await {
            tracing::debug!(error = %e, "node report failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_patterns_are_shared_others_are_not() {
        let cache = PatternCache::default();
        let star = vec!["*".to_owned()];
        let a = cache.share(&star, &star);
        let b = cache.share(&star, &star);
        assert!(Arc::ptr_eq(&a, &b));
        let other = cache.share(&["news.*".into()], &[]);
        assert!(!Arc::ptr_eq(&a, &other));
        assert_eq!(other.channels().collect::<Vec<_>>(), ["news.*"]);
        assert_eq!(other.publish().count(), 0);
        // Same subscribe patterns, different publish patterns: not the same.
        let d = cache.share(&["news.*".into()], &["news.*".into()]);
        assert!(!Arc::ptr_eq(&other, &d));
        assert_eq!(*a, Patterns::new(&star, &star));
    }

    #[test]
    fn patterns_keep_their_lists_apart_and_empty_ones() {
        let p = Patterns::new(&["a:*".into(), "".into(), "b".into()], &["".into(), "c:*".into()]);
        assert_eq!(p.channels().collect::<Vec<_>>(), ["a:*", "", "b"]);
        assert_eq!(p.publish().collect::<Vec<_>>(), ["", "c:*"]);
        assert!(p.may_publish("c:1") && !p.may_publish("a:1"));
        let none = Patterns::new(&[], &[]);
        assert_eq!((none.channels().count(), none.publish().count()), (0, 0));
        // A pattern holding a NUL matches no channel name: it is left out.
        let nul = Patterns::new(&["x\0y".into(), "z".into()], &["q\0".into()]);
        assert_eq!(nul.channels().collect::<Vec<_>>(), ["z"]);
        assert_eq!(nul.publish().count(), 0);
    }
}
