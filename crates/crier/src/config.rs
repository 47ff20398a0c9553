//! Settings from command-line flags, `CRIER_*` environment variables, an optional TOML file
//! and built-in defaults, in that order of precedence.
//!
//! One static table (`table::SETTINGS`) names every setting; the clap command, the
//! environment and TOML spellings, `--help` and [`usage_table`] are all derived from it.
//! Raw values are gathered with their source, then parsed and checked in one pass that
//! reports every problem at once ([`ConfigError::Invalid`], exit code 64).
//!
//! ```no_run
//! let env: std::collections::HashMap<String, String> = std::env::vars_os()
//!     .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
//!     .collect();
//! match crier::config::load(std::env::args_os(), &env) {
//!     Ok(config) => { /* run */ }
//!     Err(crier::config::ConfigError::Help(text)) => print!("{text}"),
//!     Err(e) => {
//!         eprintln!("crier: invalid settings:\n{e}");
//!         std::process::exit(e.exit_code());
//!     }
//! }
//! ```

mod parse;
mod sources;
mod table;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use table::usage_table;

/// Every setting, typed and checked. Field names are the setting names (see
/// [`usage_table`]); the JWT ones are grouped in [`JwtSettings`].
///
/// A setting is written in three places: its row in the settings table (name, default, help),
/// its line in the parse, and its field here. `Default` is the table's defaults parsed, and
/// `Debug` is derived: the secrets' types hide them (`jwt_secret` in [`KeySource`], `api_keys`
/// in [`Redacted`], the password of `redis_url` in [`RedisUrl`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub node_id: String,
    /// Unset = the embedded in-memory broker (single node).
    pub redis_url: Option<RedisUrl>,
    /// Redis Sentinel addresses (with `redis_sentinel_master`); exclusive with `redis_url`.
    pub redis_sentinel_urls: Vec<RedisUrl>,
    pub redis_sentinel_master: Option<String>,
    /// Redis Cluster seed nodes; exclusive with `redis_url` and Sentinel.
    pub redis_cluster_urls: Vec<RedisUrl>,
    /// PEM CA for `rediss://` (unset: the system's roots).
    pub redis_tls_ca_file: Option<PathBuf>,
    /// The NATS broker (`nats_url` and its credentials); exclusive with every Redis topology.
    pub nats: NatsSettings,
    pub jwt: JwtSettings,
    /// As written (trimmed): `*`, `https://app.example.com`, `https://*.example.com`.
    pub allowed_origins: Vec<String>,
    pub allow_anonymous: bool,
    pub api_keys: Redacted<Vec<String>>,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_subscriptions_per_connection: usize,
    /// Accept permessage-deflate offers (RFC 7692).
    pub websocket_compression: bool,
    /// Message frames shorter than this are sent uncompressed.
    pub websocket_compression_min_bytes: usize,
    /// 0 = unlimited.
    pub max_connections_per_user: usize,
    pub client_queue_max_bytes: usize,
    pub user_rate: u32,
    pub user_burst: u32,
    pub handshake_rate: u32,
    pub handshake_burst: u32,
    /// Handshakes per second the node admits from all addresses (0 = no bound), and the burst.
    pub node_handshake_rate: u32,
    pub node_handshake_burst: u32,
    pub history_size: usize,
    pub history_ttl: Duration,
    /// Channel namespaces (`[namespaces.<name>]` tables in the TOML file); the default policy
    /// is the top-level `history_size` and `history_ttl` with today's behaviour.
    pub namespaces: crier_core::Namespaces,
    /// Backend proxies (the `[proxy]` table of the TOML file); `None` when it is absent.
    pub proxy: Option<ProxySettings>,
    /// Webhooks (the `[webhooks]` table of the TOML file); `None` when it is absent.
    pub webhooks: Option<WebhookSettings>,
    /// Memory broker: history bytes kept across all channels (0 = no cap).
    pub memory_history_max_bytes: usize,
    /// Redis broker: expiry of presence, connection-count and node-registry entries.
    pub presence_ttl: Duration,
    /// How long a token invalidation is kept after its `before` (the longest token lifetime).
    pub token_max_lifetime: Duration,
    /// Connections this node accepts (0 = unlimited).
    pub max_connections: usize,
    /// Connections whose request head is not complete yet, at most.
    pub max_pending_handshakes: usize,
    /// Runtime worker threads (0 = one per core).
    pub worker_threads: usize,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Where `user_rate` is counted.
    pub user_rate_scope: RateScope,
    /// REST API requests per second per API key (0 = unlimited, the default), and the burst.
    pub api_rate: u32,
    pub api_burst: u32,
    pub shutdown_drain: Duration,
    /// Closes per second of a node holding more than its share (0 = rebalancing off).
    pub rebalance_rate: u32,
    /// How far above the ready nodes' mean a node may be before it sheds, in percent.
    pub rebalance_threshold_percent: u32,
    /// No shedding while the ready nodes' mean is below this.
    pub rebalance_min_connections: u64,
    pub log_format: LogFormat,
    pub dev: bool,
    /// Serve the admin page at `/admin`.
    pub admin: bool,
}

/// The `[proxy]` table (TOML only): backend calls crier makes on a connection's behalf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxySettings {
    /// Called for a handshake without a token (or every handshake with `connect_always`).
    pub connect_url: Option<String>,
    /// Request headers forwarded to the connect proxy, lower-cased.
    pub connect_headers: Vec<String>,
    /// Every handshake goes to the connect proxy, token or not (a token is then not checked).
    pub connect_always: bool,
    /// Decides subscriptions in namespaces with `subscribe_proxy = true`.
    pub subscribe_url: Option<String>,
    /// Checks (and may rewrite) client publishes in namespaces with `publish_proxy = true`.
    pub publish_url: Option<String>,
    /// Extends connections the connect proxy admitted with an `expire_at`.
    pub refresh_url: Option<String>,
    /// Deadline of one call (and, separately, of the wait for a free call slot).
    pub timeout: Duration,
    /// Calls in flight per proxy per node; more wait (at most `timeout`) for a slot.
    pub max_concurrency: usize,
    /// Consecutive failures after which a proxy's breaker opens (0 = no breaker).
    pub breaker_failures: u32,
    /// How long an open breaker fails calls at once before it lets one probe through.
    pub breaker_cooldown: Duration,
    /// How long before a proxy-admitted connection's `expire_at` the refresh proxy is asked.
    pub refresh_before: Duration,
}

/// The `[webhooks]` table (TOML only): events POSTed to the backend (docs/hooks.md, Webhooks).
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookSettings {
    /// Where batches are POSTed (`http://`).
    pub url: String,
    /// HMAC-SHA256 key of `X-Crier-Signature` (at least 32 bytes; never logged).
    pub secret: String,
    /// The events produced (names as in the payload).
    pub events: Vec<String>,
    /// Deadline of one POST.
    pub timeout: Duration,
    /// Events held for the backend at most; the oldest are dropped past it.
    pub max_queue: usize,
    /// Events per POST at most.
    pub batch: usize,
    /// First retry delay (doubled at each failure) and its bound.
    pub retry_min: Duration,
    pub retry_max: Duration,
}

impl std::fmt::Debug for WebhookSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebhookSettings")
            .field("url", &self.url)
            .field("secret", &"<redacted>")
            .field("events", &self.events)
            .field("timeout", &self.timeout)
            .field("max_queue", &self.max_queue)
            .field("batch", &self.batch)
            .field("retry_min", &self.retry_min)
            .field("retry_max", &self.retry_max)
            .finish()
    }
}

/// Webhook event names crier knows (`client_publish` is accepted and not produced yet).
pub const WEBHOOK_EVENTS: [&str; 5] =
    ["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_publish"];

/// How client tokens are verified.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwtSettings {
    /// Where the verification key comes from; `None` is allowed here (the caller decides, since
    /// `--dev` generates a secret).
    pub key: Option<KeySource>,
    /// `jwt_algorithms`, deduplicated; empty = decide from the key. Never contains HS* with a
    /// public key file, nor non-HS* with a secret.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// The one setting of `jwt_secret`, `jwt_public_key_file` and `jwt_jwks_file` that is set (more
/// than one is a configuration error). `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// `jwt_secret`: HS256/384/512; at least 32 bytes unless `dev`. Its UTF-8 bytes are the key.
    Secret(String),
    /// `jwt_public_key_file`: a PEM file (read when the verifier is built).
    PublicKeyFile(PathBuf),
    /// `jwt_jwks_file`: a JWKS file, keys chosen by `kid` (read when the verifier is built).
    JwksFile(PathBuf),
}

impl fmt::Debug for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Secret(_) => f.write_str("Secret(<redacted>)"),
            KeySource::PublicKeyFile(p) => f.debug_tuple("PublicKeyFile").field(p).finish(),
            KeySource::JwksFile(p) => f.debug_tuple("JwksFile").field(p).finish(),
        }
    }
}

/// Where the per-user frame rate is counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RateScope {
    /// Each node counts the user's frames on that node (the contract's default).
    #[default]
    Node,
    /// All nodes count together, in the broker (Redis); a user cannot multiply the limit by
    /// spreading connections over nodes.
    Cluster,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Why [`load`] returned no [`Config`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// `--help` or `--version` was asked for: print this to stdout and exit 0.
    Help(String),
    /// Every problem found, one line each, naming the setting and where its value came from.
    /// Secret values are never included.
    Invalid(Vec<String>),
}

impl ConfigError {
    /// 0 for [`ConfigError::Help`], 64 (`EX_USAGE`) for [`ConfigError::Invalid`].
    pub fn exit_code(&self) -> i32 {
        match self {
            ConfigError::Help(_) => 0,
            ConfigError::Invalid(_) => 64,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Help(text) => f.write_str(text),
            ConfigError::Invalid(problems) => f.write_str(&problems.join("\n")),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Loads settings. `args` includes argv[0]. `env` is the process environment (injected so
/// tests never call `set_var`); `CRIER_*` variables that name no setting are ignored (see
/// [`env_warnings`]), and `HOSTNAME` seeds the default `node_id`. Unknown flags and unknown
/// keys in the TOML file are errors.
pub fn load<I, T>(args: I, env: &HashMap<String, String>) -> Result<Config, ConfigError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut problems = Vec::new();
    let mut namespaces = Vec::new();
    let mut proxy = None;
    let mut webhooks = None;
    let raw = sources::collect(args, env, &mut problems, &mut namespaces, &mut proxy, &mut webhooks)?;
    parse::build(&raw, &namespaces, proxy.as_ref(), webhooks.as_ref(), env, problems)
}

/// Warnings to log at start-up: one line per `CRIER_*` environment variable that names no
/// setting (with a "did you mean" hint when one is close). Not errors: Kubernetes injects
/// `CRIER_PORT`, `CRIER_SERVICE_HOST`, ... into every pod of a namespace with a Service named
/// `crier`, and wrapper scripts set their own `CRIER_*` names.
pub fn env_warnings(env: &HashMap<String, String>) -> Vec<String> {
    sources::unknown_env(env)
}

impl Default for Config {
    /// The built-in defaults: the settings table's, exactly as [`load`] gives them with no flags,
    /// environment or file (with a fresh `node_id`). Handy for tests:
    /// `Config { dev: true, ..Config::default() }`.
    fn default() -> Self {
        match load(["crier"], &HashMap::new()) {
            Ok(config) => config,
            // The table's own defaults always parse (`config::tests::defaults_with_no_input`).
            Err(e) => unreachable!("the built-in defaults do not parse: {e}"),
        }
    }
}

/// A value never shown by `Debug` (the API keys).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Redacted<T>(pub T);

impl<T> std::ops::Deref for Redacted<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> fmt::Debug for Redacted<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A Redis URL (`redis://`, `rediss://` or `unix://`); `Debug` and `Display` hide its user
/// info (a password).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(pub String);

impl Config {
    /// Which broker the settings select: `nats`, `redis` or `memory` (the `broker` label of
    /// `crier_broker_info` and the start log line).
    pub fn broker_kind(&self) -> &'static str {
        if !self.nats.urls.is_empty() {
            "nats"
        } else if self.redis_url.is_some()
            || self.redis_sentinel_master.is_some()
            || !self.redis_cluster_urls.is_empty()
        {
            "redis"
        } else {
            "memory"
        }
    }
}

impl RedisUrl {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for RedisUrl {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&parse::redact_url(&self.0), f)
    }
}

impl fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&parse::redact_url(&self.0))
    }
}

/// The NATS broker's settings (`nats_*`). `urls` empty = no NATS broker. The credential files
/// are read when connecting; their contents are never held in the settings nor logged.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsSettings {
    /// Seed servers (`nats://`, `tls://`; passwords in them are redacted like redis_url's).
    pub urls: Vec<RedisUrl>,
    pub credentials_file: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub nkey_file: Option<PathBuf>,
    pub tls_ca_file: Option<PathBuf>,
    pub replicas: usize,
}
