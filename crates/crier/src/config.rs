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
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use table::usage_table;

/// Every setting, typed and checked. Field names are the setting names (see
/// [`usage_table`]); the JWT ones are grouped in [`JwtSettings`].
///
/// `Debug` hides `jwt.secret`, `api_keys` and any password in `redis_url`.
#[derive(Clone, PartialEq, Eq)]
pub struct Config {
    pub listen: SocketAddr,
    pub node_id: String,
    /// Unset = the embedded in-memory broker (single node).
    pub redis_url: Option<String>,
    pub jwt: JwtSettings,
    /// As written (trimmed): `*`, `https://app.example.com`, `https://*.example.com`.
    pub allowed_origins: Vec<String>,
    pub allow_anonymous: bool,
    pub api_keys: Vec<String>,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub max_message_bytes: usize,
    pub max_subscriptions_per_connection: usize,
    /// 0 = unlimited.
    pub max_connections_per_user: usize,
    pub client_queue_max_bytes: usize,
    pub user_rate: u32,
    pub user_burst: u32,
    pub handshake_rate: u32,
    pub handshake_burst: u32,
    pub history_size: usize,
    pub history_ttl: Duration,
    /// Redis broker: expiry of presence, connection-count and node-registry entries.
    pub presence_ttl: Duration,
    /// Connections this node accepts (0 = unlimited).
    pub max_connections: usize,
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
    pub log_format: LogFormat,
    pub dev: bool,
}

/// How client tokens are verified. At most one of `secret`, `public_key_file` and
/// `jwks_file` is set; none being set is allowed here (the caller decides, since `--dev`
/// generates a secret).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct JwtSettings {
    /// `jwt_secret`: at least 32 bytes unless `dev`.
    pub secret: Option<String>,
    /// `jwt_public_key_file`: a PEM file (not read or checked here).
    pub public_key_file: Option<PathBuf>,
    /// `jwt_jwks_file`: a JWKS file (not read or checked here).
    pub jwks_file: Option<PathBuf>,
    /// `jwt_algorithms`, deduplicated; empty = decide from the key. Never contains HS* with a
    /// public key file, nor non-HS* with a secret.
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
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
    let raw = sources::collect(args, env, &mut problems)?;
    parse::build(&raw, env, problems)
}

/// Warnings to log at start-up: one line per `CRIER_*` environment variable that names no
/// setting (with a "did you mean" hint when one is close). Not errors: Kubernetes injects
/// `CRIER_PORT`, `CRIER_SERVICE_HOST`, ... into every pod of a namespace with a Service named
/// `crier`, and wrapper scripts set their own `CRIER_*` names.
pub fn env_warnings(env: &HashMap<String, String>) -> Vec<String> {
    sources::unknown_env(env)
}

impl Default for Config {
    /// The built-in defaults, as [`load`] gives them with no flags, environment or file
    /// (with a fresh `node_id`). Handy for tests: `Config { dev: true, ..Config::default() }`.
    fn default() -> Self {
        Config {
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8080)),
            node_id: parse::default_node_id(&HashMap::new()),
            redis_url: None,
            jwt: JwtSettings::default(),
            allowed_origins: Vec::new(),
            allow_anonymous: false,
            api_keys: Vec::new(),
            ping_interval: Duration::from_secs(25),
            pong_timeout: Duration::from_secs(10),
            max_message_bytes: 65_536,
            max_subscriptions_per_connection: 128,
            max_connections_per_user: 0,
            client_queue_max_bytes: 1_048_576,
            user_rate: 20,
            user_burst: 40,
            handshake_rate: 50,
            handshake_burst: 100,
            history_size: 100,
            history_ttl: Duration::from_secs(300),
            presence_ttl: Duration::from_secs(30),
            max_connections: 0,
            worker_threads: 0,
            trusted_proxies: Vec::new(),
            user_rate_scope: RateScope::Node,
            api_rate: 0,
            api_burst: 2000,
            shutdown_drain: Duration::from_secs(10),
            log_format: LogFormat::Human,
            dev: false,
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("node_id", &self.node_id)
            .field("redis_url", &self.redis_url.as_deref().map(parse::redact_url))
            .field("jwt", &self.jwt)
            .field("allowed_origins", &self.allowed_origins)
            .field("allow_anonymous", &self.allow_anonymous)
            .field("api_keys", &format_args!("[{} redacted]", self.api_keys.len()))
            .field("ping_interval", &self.ping_interval)
            .field("pong_timeout", &self.pong_timeout)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_subscriptions_per_connection", &self.max_subscriptions_per_connection)
            .field("max_connections_per_user", &self.max_connections_per_user)
            .field("client_queue_max_bytes", &self.client_queue_max_bytes)
            .field("user_rate", &self.user_rate)
            .field("user_burst", &self.user_burst)
            .field("handshake_rate", &self.handshake_rate)
            .field("handshake_burst", &self.handshake_burst)
            .field("history_size", &self.history_size)
            .field("history_ttl", &self.history_ttl)
            .field("presence_ttl", &self.presence_ttl)
            .field("max_connections", &self.max_connections)
            .field("worker_threads", &self.worker_threads)
            .field("trusted_proxies", &self.trusted_proxies)
            .field("user_rate_scope", &self.user_rate_scope)
            .field("api_rate", &self.api_rate)
            .field("api_burst", &self.api_burst)
            .field("shutdown_drain", &self.shutdown_drain)
            .field("log_format", &self.log_format)
            .field("dev", &self.dev)
            .finish()
    }
}

impl fmt::Debug for JwtSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtSettings")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public_key_file", &self.public_key_file)
            .field("jwks_file", &self.jwks_file)
            .field("algorithms", &self.algorithms)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish()
    }
}
