//! The typed pass: every raw value parsed and checked, every problem collected.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use jsonwebtoken::{Algorithm, AlgorithmFamily};
use rand::Rng;

use crier_core::{ChannelPolicy, Namespaces};

use super::sources::{Raw, RawNamespace, RawSettings, RawValue, Source, suggest};
use super::table;
use super::{
    Config, ConfigError, JwtSettings, KeySource, LogFormat, NatsSettings, ProxySettings, RateScope, Redacted, RedisUrl,
    WebhookSettings,
};

mod namespaces;
mod proxy;
mod values;
mod webhooks;

use namespaces::{namespaces, proxied_namespaces};
use proxy::proxy;
#[allow(clippy::wildcard_imports)]
use values::*;
use webhooks::webhooks;

const MIN_MESSAGE_BYTES: usize = 64;
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
const MAX_HISTORY_SIZE: usize = 1_000_000;
const MIN_SECRET_BYTES: usize = 32;
const MAX_NODE_ID_BYTES: usize = 128;
/// Upper bound for heartbeats and the drain: far beyond any sane value, far below
/// anything that could overflow `Instant + Duration`.
const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
const MAX_HISTORY_TTL: Duration = Duration::from_secs(30 * 24 * 60 * 60);
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// Longest proxy and webhook `timeout`.
const MAX_BACKEND_TIMEOUT: Duration = Duration::from_secs(60);
const KEY_SETTINGS: [&str; 3] = ["jwt_secret", "jwt_public_key_file", "jwt_jwks_file"];
const ALGORITHMS: [&str; 12] =
    ["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

struct Parser<'a> {
    raw: &'a RawSettings,
    problems: Vec<String>,
}

impl<'a> Parser<'a> {
    fn source(&self, name: &str) -> Option<&'a Source> {
        self.raw.get(name).map(|r| &r.source)
    }

    /// Records `name: <value> (<source>): <problem>`, hiding secret values.
    fn report(&mut self, name: &str, value: &str, source: &Source, problem: impl Display) {
        let shown = if table::find(name).is_some_and(|s| s.secret) {
            "the value".to_owned()
        } else if name.starts_with("redis_") && name.ends_with("_urls") || name == "redis_url" || name == "nats_url" {
            format!("`{}`", redact_url(value))
        } else {
            format!("`{value}`")
        };
        self.problems.push(format!("{name}: {shown} ({source}): {problem}"));
    }

    /// The text of a one-value setting, or `None` when it has no value at all.
    fn text(&mut self, name: &str) -> Option<(&'a str, &'a Source)> {
        let raw: &'a Raw = self.raw.get(name)?;
        match &raw.value {
            RawValue::Text(t) => Some((t.as_str(), &raw.source)),
            // `sources` only makes lists for list settings; be safe anyway.
            RawValue::List(items) => {
                self.report(name, &items.join(","), &raw.source, "expected a single value, not a list");
                None
            }
        }
    }

    /// A setting with a default: always has a value, which must pass `check`.
    fn required<T>(&mut self, name: &str, check: impl FnOnce(&str) -> Result<T, String>) -> Option<T> {
        let Some((text, source)) = self.text(name) else {
            if self.raw.get(name).is_none() {
                self.problems.push(format!("{name}: no value"));
            }
            return None;
        };
        match check(text) {
            Ok(v) => Some(v),
            Err(problem) => {
                self.report(name, text, source, problem);
                None
            }
        }
    }

    /// A setting that may be unset (blank counts as unset). `None` = invalid (reported).
    fn optional<T>(&mut self, name: &str, check: impl FnOnce(&str) -> Result<T, String>) -> Option<Option<T>> {
        if !self.raw.contains_key(name) {
            return Some(None);
        }
        let (text, source) = self.text(name)?;
        if text.trim().is_empty() {
            return Some(None);
        }
        match check(text) {
            Ok(v) => Some(Some(v)),
            Err(problem) => {
                self.report(name, text, source, problem);
                None
            }
        }
    }

    /// A list setting: items trimmed, empties dropped, each passed through `check`.
    /// `None` if any item was invalid (each one reported).
    fn list<T>(&mut self, name: &str, check: impl Fn(&str) -> Result<T, String>) -> Option<Vec<T>> {
        let Some(raw) = self.raw.get(name) else {
            return Some(Vec::new());
        };
        let items: Vec<&str> = match &raw.value {
            RawValue::Text(t) => t.split(',').collect(),
            RawValue::List(items) => items.iter().map(String::as_str).collect(),
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for item in items.into_iter().map(str::trim).filter(|i| !i.is_empty()) {
            match check(item) {
                Ok(v) => out.push(v),
                Err(problem) => {
                    self.report(name, item, &raw.source, problem);
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }
}

/// Turns raw values into a [`Config`], adding every problem to `problems`.
pub(super) fn build(
    raw: &RawSettings,
    raw_namespaces: &[RawNamespace],
    raw_proxy: Option<&RawNamespace>,
    raw_webhooks: Option<&RawNamespace>,
    env: &HashMap<String, String>,
    problems: Vec<String>,
) -> Result<Config, ConfigError> {
    let mut p = Parser { raw, problems };

    let dev = p.required("dev", boolean);
    let listen = p.required("listen", |s| {
        s.trim()
            .parse::<SocketAddr>()
            .map_err(|_| "expected an IP address and a port, like 0.0.0.0:8080 or [::]:8080".to_owned())
    });
    // `--dev` prints a full-access token and serves it on the demo page: it listens on loopback
    // unless `listen` is set explicitly (flag, env or file), so the local network never sees it.
    let listen = match (dev, listen, p.source("listen")) {
        (Some(true), Some(addr), Some(Source::Default) | None) => {
            Some(SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()))
        }
        (_, listen, _) => listen,
    };
    let node_id = p.optional("node_id", node_id).map(|id| id.unwrap_or_else(|| default_node_id(env)));
    let redis_url = p.optional("redis_url", |s| {
        let s = s.trim();
        if ["redis://", "rediss://", "unix://"].iter().any(|scheme| s.starts_with(scheme)) {
            Ok(s.to_owned())
        } else {
            Err("expected a URL starting with redis://, rediss:// or unix://".to_owned())
        }
    });
    let sentinel_urls = p.list("redis_sentinel_urls", |s| {
        if ["redis://", "rediss://"].iter().any(|scheme| s.starts_with(scheme)) {
            Ok(RedisUrl(s.to_owned()))
        } else {
            Err("expected a Sentinel address like redis://10.0.0.5:26379 (or rediss://)".to_owned())
        }
    });
    let sentinel_master = p.optional("redis_sentinel_master", |s| {
        let s = s.trim();
        if s.chars().all(|c| c.is_ascii_graphic()) {
            Ok(s.to_owned())
        } else {
            Err("expected a master name without spaces".to_owned())
        }
    });
    let cluster_urls = p.list("redis_cluster_urls", |s| {
        if ["redis://", "rediss://"].iter().any(|scheme| s.starts_with(scheme)) {
            Ok(RedisUrl(s.to_owned()))
        } else {
            Err("expected a cluster node address like redis://10.0.0.5:6379 (or rediss://)".to_owned())
        }
    });
    check_topology(&mut p, &redis_url, &sentinel_urls, &sentinel_master);
    if cluster_urls.as_ref().is_some_and(|c| !c.is_empty()) {
        let others: Vec<&str> = [
            ("redis_url", redis_url.as_ref().is_some_and(Option::is_some)),
            ("redis_sentinel_urls", sentinel_urls.as_ref().is_some_and(|s| !s.is_empty())),
            ("redis_sentinel_master", sentinel_master.as_ref().is_some_and(Option::is_some)),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| name)
        .collect();
        if !others.is_empty() {
            p.problems.push(format!(
                "redis_cluster_urls, {}: set exactly one Redis topology: redis_url (one Redis), \
                 redis_sentinel_urls + redis_sentinel_master (Sentinel) or redis_cluster_urls (Cluster)",
                others.join(", ")
            ));
        }
    }
    let redis_tls_ca_file = p.optional("redis_tls_ca_file", path);
    let nats_url = p.list("nats_url", |s| {
        if ["nats://", "tls://"].iter().any(|scheme| s.starts_with(scheme)) {
            Ok(RedisUrl(s.to_owned()))
        } else {
            Err("expected a NATS server address like nats://10.0.0.5:4222 (or tls://)".to_owned())
        }
    });
    let nats_credentials_file = p.optional("nats_credentials_file", path);
    let nats_token_file = p.optional("nats_token_file", path);
    let nats_nkey_file = p.optional("nats_nkey_file", path);
    let nats_tls_ca_file = p.optional("nats_tls_ca_file", path);
    let nats_replicas = p.required("nats_replicas", at_least_one::<usize>);
    let nats_set = nats_url.as_ref().is_some_and(|u| !u.is_empty());
    if nats_set {
        let redis: Vec<&str> = [
            ("redis_url", redis_url.as_ref().is_some_and(Option::is_some)),
            ("redis_sentinel_urls", sentinel_urls.as_ref().is_some_and(|s| !s.is_empty())),
            ("redis_cluster_urls", cluster_urls.as_ref().is_some_and(|s| !s.is_empty())),
        ]
        .into_iter()
        .filter(|(_, set)| *set)
        .map(|(name, _)| name)
        .collect();
        if !redis.is_empty() {
            p.problems.push(format!(
                "nats_url, {}: set one broker: nats_url (NATS with JetStream) or a Redis topology, not both",
                redis.join(", ")
            ));
        }
        let auth = [
            nats_credentials_file.as_ref().is_some_and(Option::is_some),
            nats_token_file.as_ref().is_some_and(Option::is_some),
            nats_nkey_file.as_ref().is_some_and(Option::is_some),
        ];
        if auth.iter().filter(|a| **a).count() > 1 {
            p.problems.push(
                "nats_credentials_file, nats_token_file, nats_nkey_file: set at most one NATS credential".to_owned(),
            );
        }
    }

    // JWT
    let secret = p.optional("jwt_secret", |s| Ok(s.to_owned()));
    if let (Some(Some(secret)), Some(false)) = (&secret, dev)
        && secret.len() < MIN_SECRET_BYTES
        && let Some(source) = p.source("jwt_secret")
    {
        p.report(
            "jwt_secret",
            secret,
            source,
            format!(
                "is {} bytes; HS256 secrets shorter than {MIN_SECRET_BYTES} bytes are \
                 guessable, so use at least {MIN_SECRET_BYTES} random bytes (e.g. \
                 `openssl rand -base64 48`), or --dev for local testing",
                secret.len()
            ),
        );
    }
    let public_key_file = p.optional("jwt_public_key_file", path);
    let jwks_file = p.optional("jwt_jwks_file", path);
    let key_set = [
        secret.as_ref().is_some_and(Option::is_some),
        public_key_file.as_ref().is_some_and(Option::is_some),
        jwks_file.as_ref().is_some_and(Option::is_some),
    ];
    if key_set.iter().filter(|set| **set).count() > 1 {
        let which: Vec<String> = KEY_SETTINGS
            .iter()
            .zip(key_set)
            .filter(|(_, set)| *set)
            .map(|(name, _)| match p.source(name) {
                Some(source) => format!("{name} ({source})"),
                None => (*name).to_owned(),
            })
            .collect();
        p.problems
            .push(format!("{}: set only one of jwt_secret, jwt_public_key_file and jwt_jwks_file", which.join(", ")));
    }
    let algorithms = p.list("jwt_algorithms", algorithm).map(|algs| {
        let mut unique: Vec<Algorithm> = Vec::with_capacity(algs.len());
        for alg in algs {
            if !unique.contains(&alg) {
                unique.push(alg);
            }
        }
        unique
    });
    if let Some(algs) = &algorithms {
        check_algorithms_fit_key(&mut p, algs, key_set);
    }
    let key = match (secret, public_key_file, jwks_file) {
        (Some(Some(secret)), _, _) => Some(Some(KeySource::Secret(secret))),
        (_, Some(Some(path)), _) => Some(Some(KeySource::PublicKeyFile(path))),
        (_, _, Some(Some(path))) => Some(Some(KeySource::JwksFile(path))),
        (Some(None), Some(None), Some(None)) => Some(None),
        // A value that failed to parse was reported.
        _ => None,
    };
    let issuer = p.optional("jwt_issuer", |s| Ok(s.trim().to_owned()));
    let audience = p.optional("jwt_audience", |s| Ok(s.trim().to_owned()));

    // Access
    let allowed_origins = p.list("allowed_origins", origin);
    let allow_anonymous = p.required("allow_anonymous", boolean);
    let api_keys = p.list("api_keys", |s| Ok(s.to_owned()));

    // Heartbeats and limits
    let ping_interval = p.required("ping_interval", |s| duration_within(s, false, MAX_DURATION));
    let pong_timeout = p.required("pong_timeout", |s| duration_within(s, false, MAX_DURATION));
    let max_message_bytes = p.required("max_message_bytes", |s| {
        let n: usize = number(s)?;
        if (MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&n) {
            Ok(n)
        } else {
            Err(format!("must be between {MIN_MESSAGE_BYTES} and {MAX_MESSAGE_BYTES} (16 MiB)"))
        }
    });
    let max_subscriptions = p.required("max_subscriptions_per_connection", at_least_one::<usize>);
    let websocket_compression = p.required("websocket_compression", boolean);
    let websocket_compression_min_bytes = p.required("websocket_compression_min_bytes", number::<usize>);
    let max_connections_per_user = p.required("max_connections_per_user", number::<usize>);
    let client_queue_max_bytes = p.required("client_queue_max_bytes", number::<usize>);
    if let (Some(queue), Some(max)) = (client_queue_max_bytes, max_message_bytes)
        && queue < max
        && let (Some((text, source)), Some(max_source)) =
            (p.text("client_queue_max_bytes"), p.source("max_message_bytes"))
    {
        p.report(
            "client_queue_max_bytes",
            text,
            source,
            format!(
                "must be at least max_message_bytes ({max}, {max_source}), or no message \
                 could ever be queued"
            ),
        );
    }
    let user_rate = p.required("user_rate", at_least_one::<u32>);
    let user_burst = p.required("user_burst", at_least_one::<u32>);
    let handshake_rate = p.required("handshake_rate", at_least_one::<u32>);
    let handshake_burst = p.required("handshake_burst", at_least_one::<u32>);
    let node_handshake_rate = p.required("node_handshake_rate", number::<u32>);
    let node_handshake_burst = p.required("node_handshake_burst", at_least_one::<u32>);

    // History, shutdown, logs
    let history_size = p.required("history_size", |s| {
        let n: usize = number(s)?;
        if n <= MAX_HISTORY_SIZE { Ok(n) } else { Err(format!("must be at most {MAX_HISTORY_SIZE}")) }
    });
    let history_ttl = p.required("history_ttl", |s| {
        duration_within(s, history_size == Some(0), MAX_HISTORY_TTL).map_err(|e| {
            if e.starts_with("must be more than") {
                format!("{e} (set history_size to 0 to keep no history)")
            } else {
                e
            }
        })
    });
    let namespaces = match (history_size, history_ttl) {
        (Some(history_size), Some(history_ttl)) => {
            let default = ChannelPolicy { history_size, history_ttl, ..ChannelPolicy::default() };
            namespaces(&mut p, raw_namespaces, default)
        }
        // The top-level history is invalid (reported): namespaces inheriting it cannot be judged.
        _ => None,
    };
    let proxy = raw_proxy.map_or(Some(None), |raw| proxy(&mut p, raw).map(Some));
    if let (Some(ns), Some(px)) = (&namespaces, &proxy) {
        proxied_namespaces(&mut p, ns, px.as_ref());
    }
    let webhooks = raw_webhooks.map_or(Some(None), |raw| webhooks(&mut p, raw).map(Some));
    let presence_ttl = p.required("presence_ttl", |s| duration_within(s, false, MAX_DURATION));
    let token_max_lifetime = p.required("token_max_lifetime", |s| duration_within(s, false, MAX_TOKEN_LIFETIME));
    let max_connections = p.required("max_connections", number::<usize>);
    let max_pending_handshakes = p.required("max_pending_handshakes", |s| {
        number::<usize>(s).and_then(|n| if n >= 1 { Ok(n) } else { Err("at least 1".into()) })
    });
    let memory_history_max_bytes = p.required("memory_history_max_bytes", number::<usize>);
    let worker_threads = p.required("worker_threads", |s| {
        number::<usize>(s).and_then(|n| if n <= 1024 { Ok(n) } else { Err("at most 1024".into()) })
    });
    let trusted_proxies = p.list("trusted_proxies", |s| {
        let s = s.trim();
        s.parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map_err(|_| format!("`{s}` is neither an IP address nor a CIDR like 10.0.0.0/8"))
    });
    let user_rate_scope = p.required("user_rate_scope", |s| match s.trim().to_ascii_lowercase().as_str() {
        "node" => Ok(RateScope::Node),
        "cluster" => Ok(RateScope::Cluster),
        _ => Err("expected `node` or `cluster`".to_owned()),
    });
    let api_rate = p.required("api_rate", number::<u32>);
    let api_burst = p.required("api_burst", at_least_one::<u32>);
    let shutdown_drain = p.required("shutdown_drain", |s| duration_within(s, true, MAX_DURATION));
    let rebalance_rate = p.required("rebalance_rate", number::<u32>);
    let admin = p.required("admin", boolean);
    let rebalance_threshold = p.required("rebalance_threshold", fraction_percent);
    let rebalance_min_connections = p.required("rebalance_min_connections", number::<u64>);
    let log_format = p.required("log_format", |s| match s.trim().to_ascii_lowercase().as_str() {
        "human" | "text" => Ok(LogFormat::Human),
        "json" => Ok(LogFormat::Json),
        _ => Err("expected `human` or `json`".to_owned()),
    });

    if !p.problems.is_empty() {
        return Err(ConfigError::Invalid(p.problems));
    }
    Ok(Config {
        listen: got(listen)?,
        node_id: got(node_id)?,
        redis_url: got(redis_url)?.map(RedisUrl),
        redis_sentinel_urls: got(sentinel_urls)?,
        redis_sentinel_master: got(sentinel_master)?,
        redis_cluster_urls: got(cluster_urls)?,
        redis_tls_ca_file: got(redis_tls_ca_file)?,
        nats: NatsSettings {
            urls: got(nats_url)?,
            credentials_file: got(nats_credentials_file)?,
            token_file: got(nats_token_file)?,
            nkey_file: got(nats_nkey_file)?,
            tls_ca_file: got(nats_tls_ca_file)?,
            replicas: got(nats_replicas)?,
        },
        jwt: JwtSettings {
            key: got(key)?,
            algorithms: got(algorithms)?,
            issuer: got(issuer)?,
            audience: got(audience)?,
        },
        allowed_origins: got(allowed_origins)?,
        allow_anonymous: got(allow_anonymous)?,
        api_keys: Redacted(got(api_keys)?),
        ping_interval: got(ping_interval)?,
        pong_timeout: got(pong_timeout)?,
        max_message_bytes: got(max_message_bytes)?,
        max_subscriptions_per_connection: got(max_subscriptions)?,
        websocket_compression: got(websocket_compression)?,
        websocket_compression_min_bytes: got(websocket_compression_min_bytes)?,
        max_connections_per_user: got(max_connections_per_user)?,
        client_queue_max_bytes: got(client_queue_max_bytes)?,
        user_rate: got(user_rate)?,
        user_burst: got(user_burst)?,
        handshake_rate: got(handshake_rate)?,
        handshake_burst: got(handshake_burst)?,
        node_handshake_rate: got(node_handshake_rate)?,
        node_handshake_burst: got(node_handshake_burst)?,
        history_size: got(history_size)?,
        history_ttl: got(history_ttl)?,
        namespaces: got(namespaces)?,
        proxy: got(proxy)?,
        webhooks: got(webhooks)?,
        presence_ttl: got(presence_ttl)?,
        token_max_lifetime: got(token_max_lifetime)?,
        max_connections: got(max_connections)?,
        max_pending_handshakes: got(max_pending_handshakes)?,
        memory_history_max_bytes: got(memory_history_max_bytes)?,
        worker_threads: got(worker_threads)?,
        trusted_proxies: got(trusted_proxies)?,
        user_rate_scope: got(user_rate_scope)?,
        api_rate: got(api_rate)?,
        api_burst: got(api_burst)?,
        shutdown_drain: got(shutdown_drain)?,
        rebalance_rate: got(rebalance_rate)?,
        rebalance_threshold_percent: got(rebalance_threshold)?,
        rebalance_min_connections: got(rebalance_min_connections)?,
        log_format: got(log_format)?,
        dev: got(dev)?,
        admin: got(admin)?,
    })
}

/// Exactly one Redis topology (or none: the memory broker), and Sentinel's two settings together.
fn check_topology(
    p: &mut Parser<'_>,
    url: &Option<Option<String>>,
    sentinels: &Option<Vec<RedisUrl>>,
    master: &Option<Option<String>>,
) {
    let url_set = url.as_ref().is_some_and(Option::is_some);
    let sentinels_set = sentinels.as_ref().is_some_and(|s| !s.is_empty());
    let master_set = master.as_ref().is_some_and(Option::is_some);
    let at = |p: &Parser<'_>, name: &str| match p.source(name) {
        Some(source) => format!("{name} ({source})"),
        None => name.to_owned(),
    };
    if url_set && (sentinels_set || master_set) {
        let which = if sentinels_set { "redis_sentinel_urls" } else { "redis_sentinel_master" };
        let problem = format!(
            "{}, {}: set exactly one Redis topology: redis_url (one Redis) or redis_sentinel_urls + \
             redis_sentinel_master (Sentinel)",
            at(p, "redis_url"),
            at(p, which)
        );
        p.problems.push(problem);
    } else if sentinels_set && !master_set && master.is_some() {
        let problem = format!(
            "{}: needs redis_sentinel_master, the name Sentinel monitors the master by",
            at(p, "redis_sentinel_urls")
        );
        p.problems.push(problem);
    } else if master_set && !sentinels_set && sentinels.is_some() {
        let problem = format!("{}: needs redis_sentinel_urls, the Sentinels to ask", at(p, "redis_sentinel_master"));
        p.problems.push(problem);
    }
}

/// Every failed value was reported, so with no problems every value is present.
fn got<T>(value: Option<T>) -> Result<T, ConfigError> {
    value.ok_or_else(|| ConfigError::Invalid(vec!["internal error: a setting failed without saying why".to_owned()]))
}

/// HS* needs a secret and a secret only does HS*: mixing them is the classic
/// algorithm-confusion hole (an HS256 token "signed" with the public key).
fn check_algorithms_fit_key(p: &mut Parser<'_>, algs: &[Algorithm], key_set: [bool; 3]) {
    let Some(source) = p.source("jwt_algorithms") else {
        return;
    };
    let [secret, public_key, _] = key_set;
    for alg in algs {
        let hmac = alg.family() == AlgorithmFamily::Hmac;
        let name = format!("{alg:?}");
        if secret && !hmac {
            p.report(
                "jwt_algorithms",
                &name,
                source,
                "does not fit jwt_secret: a secret only verifies HS256, HS384 or HS512",
            );
        } else if public_key && hmac {
            p.report(
                "jwt_algorithms",
                &name,
                source,
                "does not fit jwt_public_key_file: accepting HS* with a public key lets anyone \
                 holding the public key forge tokens",
            );
        }
    }
}

/// A URL with any `user:password@` replaced by `***@`.
pub(super) fn redact_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let rest = url.get(start..).unwrap_or_default();
    let end = rest.find(['/', '?', '#']).map_or(rest.len(), |i| i);
    let authority = rest.get(..end).unwrap_or_default();
    match authority.rfind('@') {
        Some(at) => format!("{}***@{}", url.get(..start).unwrap_or_default(), rest.get(at + 1..).unwrap_or_default()),
        None => url.to_owned(),
    }
}

/// Hostname (`$HOSTNAME` from `env`, else `/etc/hostname`, else `crier`) + `-` + 6 random
/// lowercase letters and digits.
pub(super) fn default_node_id(env: &HashMap<String, String>) -> String {
    let clean = |h: &str| -> String {
        h.trim().chars().filter(|c| c.is_ascii_alphanumeric() || "-._".contains(*c)).take(64).collect()
    };
    let host = env
        .get("HOSTNAME")
        .map(|h| clean(h))
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| clean(&h)).filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "crier".to_owned());
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..6).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect();
    format!("{host}-{suffix}")
}
