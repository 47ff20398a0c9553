//! How a node starts: [`build`] makes its [`AppState`] (the broker the settings name, the hub,
//! the verifier, limits, proxies, revocations in force) and wires the broker to the hub with
//! [`NodeHandler`], which fans what the broker delivers out to this node's connections.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crier_core::{
    Broker, BrokerHandler, Hub, MemoryBroker, Node, PresenceEvent, Publication, Registry, UserOp, UserOpReply,
};
use crier_protocol::CloseCode;

use crate::auth::{OriginPolicy, Verifier};
use crate::config::Config;
use crate::limits::Limits;
use crate::metrics as m;
use crate::state::{AppState, Inner, PatternCache};

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
    let revocations = Arc::new(crate::revocations::Revocations::new(config.token_max_lifetime));
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
        let since = crate::revocations::unix_now().saturating_sub(config.token_max_lifetime.as_secs());
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
        details: crate::node_details::NodeDetails::default(),
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
    pub revocations: Arc<crate::revocations::Revocations>,
    /// `<node_id>-<boot>-` (client ids, [`AppState::client_id`]): how this node's client
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
