//! The shared state of a running node: one cheap-to-clone handle passed to every handler and
//! session, plus the [`BrokerHandler`] that connects the broker to the hub.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crier_core::{
    Broker, BrokerHandler, ChannelPolicy, Hub, MemoryBroker, Node, NodeInfo, PresenceEvent, Publication, Registry,
    UserOp, UserOpReply,
};
use crier_protocol::CloseCode;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::auth::{OriginPolicy, Verifier};
use crate::config::Config;
use crate::limits::Limits;
use crate::metrics as m;

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
    pub details: crate::admin::NodeDetails,
    /// Token revocations in force (server-side control, [`crate::control`]).
    pub revocations: Arc<crate::control::Revocations>,
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
            memory_bytes: crate::admin::resident_bytes(),
        };
        if let Err(e) = self.broker().report_node(&info).await {
            tracing::debug!(error = %e, "node report failed");
        }
    }
}

/// Builds a node's state: broker, hub, verifier, limits. `dev_token` enables the demo page.
pub async fn build(config: Config, dev_token: Option<String>) -> anyhow::Result<AppState> {
    // A key file or Origin list that does not load is a bad setting (exit 64), like one the parse
    // found; the binary already checked both before binding (`auth::check`).
    let invalid = |why: String| anyhow::Error::new(crate::config::ConfigError::Invalid(vec![why]));
    let verifier = Verifier::new(&config.jwt).map_err(invalid)?;
    tracing::info!(algorithms = ?verifier.algorithms(), "JWT verification ready");
    let origins = OriginPolicy::new(&config.allowed_origins).map_err(|e| invalid(format!("allowed_origins: {e}")))?;
    let broker: Arc<dyn Broker> = match redis_options(&config) {
        None if !config.nats.urls.is_empty() => {
            let broker = crier_nats::NatsBroker::connect(nats_options(&config)).await.map_err(|e| match e {
                // A credential file that cannot be read is a bad setting (exit 64).
                crier_core::broker::BrokerError::Internal(why) => {
                    anyhow::Error::new(crate::config::ConfigError::Invalid(vec![format!("nats: {why}")]))
                }
                e => anyhow::anyhow!("nats: {e}"),
            })?;
            if !broker.is_up() {
                tracing::warn!("NATS is not reachable yet; the node stays unready and keeps retrying");
            }
            broker
        }
        Some(opts) => {
            // A setting problem found while connecting (a certificate that does not verify, a
            // master name no Sentinel knows) is a bad setting: exit 64 like one found by the parse.
            let broker = crier_redis::RedisBroker::start(opts).await.map_err(|e| match e {
                crier_redis::StartError::Setting(why) => {
                    anyhow::Error::new(crate::config::ConfigError::Invalid(vec![format!("redis: {why}")]))
                }
            })?;
            if !broker.is_up() {
                tracing::warn!("Redis is not reachable yet; the node stays unready and keeps retrying");
            }
            broker
        }
        None => {
            let memory =
                MemoryBroker::with_namespaces(Arc::new(config.namespaces.clone()), config.memory_history_max_bytes);
            memory.set_revocation_ttl(config.token_max_lifetime);
            memory
        }
    };
    let hub = Arc::new(Hub::new());
    let registry = Arc::new(Registry::new());
    let boot = boot_id();
    let revocations = Arc::new(crate::control::Revocations::new(config.token_max_lifetime));
    broker.set_handler(Arc::new(NodeHandler {
        hub: hub.clone(),
        registry: registry.clone(),
        revocations: revocations.clone(),
        client_prefix: format!("{}-{boot}-", config.node_id),
        node: config.node_id.clone(),
    }));
    if let Some(w) = &config.webhooks {
        crate::webhooks::enable(&*broker, w).map_err(|e| invalid(format!("webhooks: {e}")))?;
    }
    let limits = Limits::new(&config);
    // Revocations in force before the first handshake (retried by `control::sync_revocations`).
    if broker.is_up() {
        let since = crate::control::unix_now().saturating_sub(config.token_max_lifetime.as_secs());
        match broker.revocations(since).await {
            Ok(list) => list.iter().for_each(|r| revocations.record(&r.user, r.before)),
            Err(e) => tracing::warn!(error = %e, "could not load token revocations yet"),
        }
    }
    Ok(AppState(Arc::new(Inner {
        // A recovery page of the largest messages fits the queue (config: queue >= message).
        node: Node::new(hub, broker)
            .with_recovery_page(config.client_queue_max_bytes / config.max_message_bytes.max(1)),
        registry,
        verifier,
        origins,
        limits,
        metrics: crate::metrics::install(),
        draining: AtomicBool::new(false),
        dev_token,
        boot,
        patterns: PatternCache::default(),
        proxies: crate::proxy::Proxies::new(config.proxy.as_ref())?.map(Arc::new),
        details: crate::admin::NodeDetails::default(),
        revocations,
        config,
    })))
}

/// The NATS broker's options from the settings (`nats_url` set).
fn nats_options(config: &Config) -> crier_nats::NatsOptions {
    let urls = config.nats.urls.iter().map(|u| u.as_str().to_owned()).collect();
    let mut opts = crier_nats::NatsOptions::new(urls, config.node_id.clone());
    opts.auth = match (&config.nats.credentials_file, &config.nats.token_file, &config.nats.nkey_file) {
        (Some(f), _, _) => crier_nats::NatsAuth::CredentialsFile(f.clone()),
        (None, Some(f), _) => crier_nats::NatsAuth::TokenFile(f.clone()),
        (None, None, Some(f)) => crier_nats::NatsAuth::NkeyFile(f.clone()),
        (None, None, None) => crier_nats::NatsAuth::None,
    };
    opts.tls_ca_file = config.nats.tls_ca_file.clone();
    opts.replicas = config.nats.replicas;
    opts.history_size = config.history_size;
    opts.history_ttl = config.history_ttl;
    opts.namespaces = Arc::new(config.namespaces.clone());
    opts.presence_ttl = config.presence_ttl;
    opts.node_ttl = config.presence_ttl;
    opts.revocation_ttl = config.token_max_lifetime;
    opts
}

/// The Redis broker's options from the settings (`None`: the memory broker).
fn redis_options(config: &Config) -> Option<crier_redis::RedisOptions> {
    let mut opts = match (&config.redis_url, config.redis_sentinel_master.as_deref()) {
        (Some(url), _) => crier_redis::RedisOptions::new(url.as_str().to_owned(), config.node_id.clone()),
        (None, Some(master)) => {
            let urls = config.redis_sentinel_urls.iter().map(|u| u.as_str().to_owned()).collect();
            crier_redis::RedisOptions::sentinel(urls, master, config.node_id.clone())
        }
        (None, None) if !config.redis_cluster_urls.is_empty() => {
            let urls = config.redis_cluster_urls.iter().map(|u| u.as_str().to_owned()).collect();
            crier_redis::RedisOptions::cluster(urls, config.node_id.clone())
        }
        (None, None) => return None,
    };
    opts.tls_ca_file = config.redis_tls_ca_file.clone();
    // The channels' history options: the namespaces' default policy is the top-level history.
    opts.namespaces = Arc::new(config.namespaces.clone());
    opts.presence_ttl = config.presence_ttl;
    opts.node_ttl = config.presence_ttl;
    opts.revocation_ttl = config.token_max_lifetime;
    Some(opts)
}

/// Receives what the broker delivers: fans publications out through the hub, closes users'
/// connections on cluster-wide disconnects.
pub struct NodeHandler {
    pub hub: Arc<Hub>,
    pub registry: Arc<Registry>,
    pub revocations: Arc<crate::control::Revocations>,
    /// `<node_id>-<boot>-` (client ids, [`crate::handshake::client_id`]): how this node's client
    /// ids start (the rest is the `ConnId`), so a client's own `join` is not sent back to it.
    pub client_prefix: String,
    pub node: String,
}

impl BrokerHandler for NodeHandler {
    fn on_publication(&self, channel: &str, publication: Publication) {
        let fanout = self.hub.deliver(channel, &publication);
        if fanout.delivered > 0 {
            metrics::counter!(m::DELIVERED).increment(fanout.delivered as u64);
            let latency_us = crier_core::now_micros().saturating_sub(publication.published_at_us);
            metrics::histogram!(m::BROADCAST_LATENCY).record(latency_us as f64 / 1e6);
        }
        if fanout.slow > 0 {
            metrics::counter!(m::SLOW_CONSUMERS).increment(fanout.slow as u64);
        }
    }

    fn on_gap(&self, channel: &str, epoch: &str, offset: u64) {
        let frame = crier_protocol::frames::ServerFrame::Gap { channel, epoch, offset }.encode();
        let slow = self.hub.notify(channel, &frame);
        metrics::counter!(m::SLOW_CONSUMERS).increment(slow as u64);
        tracing::warn!(channel, epoch, offset, "messages lost for this node's subscribers; they were told (gap frame)");
    }

    fn on_presence_event(&self, channel: &str, event: PresenceEvent) {
        let kind = if event.frame.starts_with(br#"{"type":"join""#) { "join" } else { "leave" };
        // A client is not told of its own join (nor of its own leave: it left the hub first).
        let own = event.client.strip_prefix(&*self.client_prefix).and_then(|id| id.parse().ok());
        let fanout = self.hub.notify_except(channel, &event.frame, own);
        metrics::counter!(m::PRESENCE_EVENTS, "kind" => kind).increment(1);
        if fanout.delivered > 0 {
            metrics::counter!(m::PRESENCE_EVENT_FRAMES).increment(fanout.delivered as u64);
        }
        if fanout.slow > 0 {
            metrics::counter!(m::SLOW_CONSUMERS).increment(fanout.slow as u64);
        }
    }

    fn on_disconnect_user(&self, user: &str) -> usize {
        self.registry.close_user(user, CloseCode::DISCONNECTED)
    }

    fn has_subscribers(&self, channel: &str) -> bool {
        self.hub.has_channel(channel)
    }

    fn on_user_op(&self, user: &str, op: &UserOp) -> UserOpReply {
        let local = crate::control::Local {
            hub: &self.hub,
            registry: &self.registry,
            revocations: &self.revocations,
            client_prefix: &self.client_prefix,
            node: &self.node,
        };
        crate::control::apply(&local, user, op)
    }
}

/// Four random characters of `[0-9a-z]`.
fn boot_id() -> Box<str> {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    (0..4).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect::<String>().into()
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
