//! The one table of settings, and everything generated from it: the clap
//! [`Command`] and the markdown usage table.

use clap::{Arg, ArgAction, Command};

/// How a setting is written on the command line and in TOML.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shape {
    /// One value: `--name <VALUE>`, `name = "value"` or `name = 42`.
    Scalar,
    /// A comma-separated list: `--name a,b`, `name = ["a", "b"]` or `name = "a,b"`.
    List,
    /// A switch: `--name` or `--name=false`, `name = true`, `CRIER_NAME=1`.
    Bool,
}

/// One setting. Its three spellings all derive from `name`.
#[derive(Debug)]
pub(super) struct Setting {
    /// The TOML key, e.g. `ping_interval`.
    pub name: &'static str,
    pub shape: Shape,
    /// What `--help` shows after the flag, e.g. `DURATION`.
    pub value_name: &'static str,
    /// The raw default, parsed like any other value; `None` = unset (or computed).
    pub default: Option<&'static str>,
    /// The default as documented.
    pub default_doc: &'static str,
    /// Never shown in error messages or `Debug` output.
    pub secret: bool,
    pub help: &'static str,
}

impl Setting {
    /// `--ping-interval`
    pub fn flag(&self) -> String {
        format!("--{}", self.name.replace('_', "-"))
    }

    /// `CRIER_PING_INTERVAL`
    pub fn env(&self) -> String {
        format!("{ENV_PREFIX}{}", self.name.to_ascii_uppercase())
    }
}

pub(super) const ENV_PREFIX: &str = "CRIER_";
/// Names the TOML file; not a setting itself.
pub(super) const CONFIG_ENV: &str = "CRIER_CONFIG";
pub(super) const CONFIG_ARG: &str = "config";
/// The TOML-only table of channel namespaces (`[namespaces.<name>]`); not a setting itself.
pub(super) const NAMESPACES: &str = "namespaces";
/// The TOML-only table of backend proxies (`[proxy]`); not a setting itself.
pub(super) const PROXY: &str = "proxy";
/// The TOML-only table of webhooks (`[webhooks]`); not a setting itself.
pub(super) const WEBHOOKS: &str = "webhooks";

const fn setting(
    name: &'static str,
    shape: Shape,
    value_name: &'static str,
    default: Option<&'static str>,
    default_doc: &'static str,
    help: &'static str,
) -> Setting {
    Setting { name, shape, value_name, default, default_doc, secret: false, help }
}

const fn secret(mut s: Setting) -> Setting {
    s.secret = true;
    s
}

use Shape::{Bool, List, Scalar};

/// Every setting, in the order `--help` and the docs list them.
pub(super) static SETTINGS: &[Setting] = &[
    setting(
        "listen",
        Scalar,
        "ADDR",
        Some("0.0.0.0:8080"),
        "`0.0.0.0:8080`",
        "HTTP + WebSocket address (an IP and a port)",
    ),
    setting(
        "node_id",
        Scalar,
        "NAME",
        None,
        "`<hostname>-<6 random characters>`",
        "the node's name in `welcome`, presence and `/api/v1/info`",
    ),
    setting(
        "redis_url",
        Scalar,
        "URL",
        None,
        "unset (in-memory broker)",
        "Redis broker (`redis://`, `rediss://` or `unix://`); unset = single node, in-memory broker",
    ),
    setting(
        "redis_sentinel_urls",
        List,
        "URLS",
        None,
        "unset",
        "comma list of Redis Sentinel addresses (`redis://` or `rediss://`; their user, password and db \
         also reach the master), instead of redis_url; needs redis_sentinel_master",
    ),
    setting(
        "redis_sentinel_master",
        Scalar,
        "NAME",
        None,
        "unset",
        "the master's name in Sentinel (`sentinel monitor <name> ...`); crier follows its failovers",
    ),
    setting(
        "redis_cluster_urls",
        List,
        "URLS",
        None,
        "unset",
        "comma list of Redis Cluster seed nodes (`redis://` or `rediss://`), instead of redis_url; \
         channels are sharded by the hash tag `{<channel>}`, messages travel by SPUBLISH/SSUBSCRIBE",
    ),
    setting(
        "redis_tls_ca_file",
        Scalar,
        "FILE",
        None,
        "unset (the system's roots)",
        "PEM file of the CA that signed the Redis certificates (`rediss://`); certificates are always verified",
    ),
    setting(
        "nats_url",
        List,
        "URLS",
        None,
        "unset",
        "comma list of NATS seed servers with JetStream (`nats://` or `tls://`): the NATS broker, \
         instead of redis_url (set one of them)",
    ),
    setting(
        "nats_credentials_file",
        Scalar,
        "FILE",
        None,
        "unset",
        "NATS `.creds` file (user JWT and nkey seed); read at start, never logged",
    ),
    setting("nats_token_file", Scalar, "FILE", None, "unset", "file holding the NATS token; never logged"),
    setting("nats_nkey_file", Scalar, "FILE", None, "unset", "file holding the NATS nkey seed (`SU...`); never logged"),
    setting(
        "nats_tls_ca_file",
        Scalar,
        "FILE",
        None,
        "unset (the system's roots)",
        "PEM file of the CA that signed the NATS servers' certificates (`tls://`)",
    ),
    setting(
        "nats_replicas",
        Scalar,
        "N",
        Some("1"),
        "`1`",
        "replicas of crier's JetStream streams and key-value buckets (3 on a 3-server NATS cluster)",
    ),
    secret(setting("jwt_secret", Scalar, "SECRET", None, "unset", "HS* secret for client tokens, at least 32 bytes")),
    setting("jwt_public_key_file", Scalar, "FILE", None, "unset", "PEM public key for RS*/PS*/ES*/EdDSA client tokens"),
    setting("jwt_jwks_file", Scalar, "FILE", None, "unset", "JWKS file for client tokens (keys chosen by `kid`)"),
    setting(
        "jwt_algorithms",
        List,
        "ALGS",
        None,
        "from the key: `HS256` for a secret, the key's family otherwise",
        "comma list of accepted `alg`s, e.g. `RS256,ES256`; `none` is never accepted",
    ),
    setting("jwt_issuer", Scalar, "ISS", None, "unset", "required `iss` claim, checked when set"),
    setting("jwt_audience", Scalar, "AUD", None, "unset", "required `aud` claim, checked when set"),
    setting(
        "allowed_origins",
        List,
        "ORIGINS",
        None,
        "empty (no browser Origin allowed)",
        "comma list: `https://app.example.com`, `https://*.example.com`, or `*`",
    ),
    setting("allow_anonymous", Bool, "BOOL", Some("false"), "`false`", "allow connecting without a token"),
    secret(setting(
        "api_keys",
        List,
        "KEYS",
        None,
        "empty",
        "comma list of keys for the REST API (`Authorization: Bearer <key>`)",
    )),
    setting("ping_interval", Scalar, "DURATION", Some("25s"), "`25s`", "how often the server pings each connection"),
    setting(
        "pong_timeout",
        Scalar,
        "DURATION",
        Some("10s"),
        "`10s`",
        "how long to wait for a pong (or any frame) before closing",
    ),
    setting(
        "max_message_bytes",
        Scalar,
        "BYTES",
        Some("65536"),
        "`65536`",
        "largest client frame or published payload (64 to 16777216)",
    ),
    setting(
        "max_subscriptions_per_connection",
        Scalar,
        "N",
        Some("128"),
        "`128`",
        "channels one connection may subscribe to",
    ),
    setting(
        "websocket_compression",
        Bool,
        "BOOL",
        Some("false"),
        "`false`",
        "accept permessage-deflate (RFC 7692): message frames compressed once per node",
    ),
    setting(
        "websocket_compression_min_bytes",
        Scalar,
        "BYTES",
        Some("256"),
        "`256`",
        "message frames shorter than this go uncompressed",
    ),
    setting(
        "max_connections_per_user",
        Scalar,
        "N",
        Some("0"),
        "`0` (unlimited)",
        "connections per user across the whole cluster; 0 = unlimited",
    ),
    setting(
        "client_queue_max_bytes",
        Scalar,
        "BYTES",
        Some("1048576"),
        "`1048576`",
        "outbound bytes buffered per connection before it is dropped as a slow consumer",
    ),
    setting(
        "user_rate",
        Scalar,
        "N",
        Some("20"),
        "`20`",
        "client frames per second per user (all of the user's connections on a node)",
    ),
    setting("user_burst", Scalar, "N", Some("40"), "`40`", "client frames a user may send in a burst"),
    setting("handshake_rate", Scalar, "N", Some("50"), "`50`", "WebSocket handshakes per second per client IP"),
    setting(
        "handshake_burst",
        Scalar,
        "N",
        Some("100"),
        "`100`",
        "WebSocket handshakes a client IP may make in a burst",
    ),
    setting(
        "node_handshake_rate",
        Scalar,
        "N",
        Some("0"),
        "`0` (off)",
        "WebSocket and SSE handshakes per second this node admits from all addresses together; past it (and `node_handshake_burst`) a handshake gets 503 + `Retry-After` before any token work (0 = no bound)",
    ),
    setting(
        "node_handshake_burst",
        Scalar,
        "N",
        Some("1000"),
        "`1000`",
        "handshakes a node admits in a burst above `node_handshake_rate`",
    ),
    setting(
        "history_size",
        Scalar,
        "N",
        Some("100"),
        "`100`",
        "messages kept per channel for recovery (at most 1000000)",
    ),
    setting("history_ttl", Scalar, "DURATION", Some("300s"), "`300s`", "how long a channel's history is kept"),
    setting(
        "memory_history_max_bytes",
        Scalar,
        "BYTES",
        Some("268435456"),
        "`268435456` (256 MiB)",
        "memory broker: bytes of history kept across all channels; beyond it the oldest messages (of any channel) are dropped first (a recovery across them says `recovered: false`); 0 = no cap",
    ),
    setting(
        "presence_ttl",
        Scalar,
        "DURATION",
        Some("30s"),
        "`30s`",
        "Redis broker: how long presence, connection-count and node entries of a dead node outlive it",
    ),
    setting(
        "token_max_lifetime",
        Scalar,
        "DURATION",
        Some("7d"),
        "`7d`",
        "the longest lifetime (`exp` - `iat`) of the tokens you mint: a token invalidation (`POST /api/v1/users/{user}/invalidate`) is kept this long after its `before`, on every node and in Redis (at most 365d)",
    ),
    setting(
        "max_connections",
        Scalar,
        "N",
        Some("0"),
        "`0` (unlimited)",
        "connections this node accepts; more are refused with 503 before the upgrade; 0 = unlimited",
    ),
    setting(
        "max_pending_handshakes",
        Scalar,
        "N",
        Some("2048"),
        "`2048`",
        "connections that have not yet sent a complete request head (each may hold up to 16 KiB for up to 10 s); more are answered 503 and closed at once",
    ),
    setting(
        "worker_threads",
        Scalar,
        "N",
        Some("0"),
        "`0` (one per core)",
        "threads serving connections (at most 1024); when several nodes share a host, give each its share of the cores",
    ),
    setting(
        "trusted_proxies",
        List,
        "CIDRS",
        None,
        "empty (trust no proxy)",
        "comma list of proxy IPs or CIDRs (`10.0.0.0/8`) whose `X-Forwarded-For` gives the client IP",
    ),
    setting(
        "user_rate_scope",
        Scalar,
        "SCOPE",
        Some("node"),
        "`node`",
        "where `user_rate` is counted: `node` (each node separately) or `cluster` (all nodes together, in Redis)",
    ),
    setting(
        "api_rate",
        Scalar,
        "N",
        Some("0"),
        "`0` (unlimited)",
        "REST API requests per second per API key on each node; 0 = unlimited (API keys are trusted backend credentials, see docs/security.md)",
    ),
    setting(
        "api_burst",
        Scalar,
        "N",
        Some("2000"),
        "`2000`",
        "REST API requests an API key may make in a burst (when `api_rate` is set)",
    ),
    setting(
        "shutdown_drain",
        Scalar,
        "DURATION",
        Some("10s"),
        "`10s`",
        "how long a stopping node spreads its reconnect closes over",
    ),
    setting(
        "rebalance_rate",
        Scalar,
        "N",
        Some("0"),
        "`0` (off)",
        "connections per second a node holding more than its share closes with 1012 so the load \
         balancer places them elsewhere (with recovery: no message lost); 0 = never rebalance. \
         Turn it on (e.g. 50) only behind a balancer that spreads new connections (round robin, \
         least connections): clients that come back to the same node would churn",
    ),
    setting(
        "rebalance_threshold",
        Scalar,
        "FRACTION",
        Some("0.2"),
        "`0.2`",
        "a node starts shedding once it holds more than this share above the mean of the ready \
         nodes (0.2 = 20% above), and then sheds down to the mean",
    ),
    setting(
        "rebalance_min_connections",
        Scalar,
        "N",
        Some("100"),
        "`100`",
        "no node sheds while the ready nodes' mean is below this many connections",
    ),
    setting(
        "admin",
        Bool,
        "BOOL",
        Some("false"),
        "`false`",
        "serve the admin page at `/admin` (it signs in with an API key, held in the page's memory only); off: `/admin` is 404",
    ),
    setting("log_format", Scalar, "FORMAT", Some("human"), "`human`", "log format: `human` or `json`"),
    setting(
        "dev",
        Bool,
        "BOOL",
        Some("false"),
        "`false`",
        "development mode: generated HS256 secret and a printed token, any Origin, demo page at `/`; listens on 127.0.0.1 unless `listen` is set",
    ),
];

pub(super) fn find(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

const AFTER_HELP: &str = "\
Every setting can also be given as an environment variable (CRIER_<NAME>, e.g. CRIER_REDIS_URL)
or as a key in the TOML file named by --config / CRIER_CONFIG (e.g. redis_url = \"redis://...\").
Precedence: flags, then environment, then the TOML file, then the defaults.
Durations are written 25s, 500ms or 2m; lists are comma-separated (TOML arrays work too);
booleans accept true/false, 1/0, yes/no, on/off.

`crier token --sub USER ...` prints a client token signed with these settings' key
(`crier token --help`).";

/// The command line, generated from [`SETTINGS`].
pub(super) fn command() -> Command {
    let mut cmd = Command::new("crier")
        .version(env!("CARGO_PKG_VERSION"))
        .about("crier: a horizontally scalable WebSocket pub/sub gateway")
        .after_help(AFTER_HELP)
        .args_override_self(true)
        .arg(
            Arg::new(CONFIG_ARG)
                .long(CONFIG_ARG)
                .value_name("FILE")
                .action(ArgAction::Set)
                .help(format!("TOML settings file [env: {CONFIG_ENV}]")),
        );
    for s in SETTINGS {
        let help = format!("{} [env: {}] [default: {}]", s.help, s.env(), s.default_doc.replace('`', ""));
        let arg = Arg::new(s.name).long(s.name.replace('_', "-")).value_name(s.value_name).help(help);
        let arg = match s.shape {
            Shape::Bool => {
                arg.action(ArgAction::Set).num_args(0..=1).require_equals(true).default_missing_value("true")
            }
            // A secret may well start with `-` (URL-safe base64).
            Shape::Scalar | Shape::List => arg.action(ArgAction::Set).allow_hyphen_values(s.secret),
        };
        cmd = cmd.arg(arg);
    }
    cmd
}

/// A markdown table of every setting: flag, environment variable, TOML key, default, meaning.
pub fn usage_table() -> String {
    let mut out = String::from("| flag | environment | TOML key | default | meaning |\n|---|---|---|---|---|\n");
    for s in SETTINGS {
        let flag = match s.shape {
            Shape::Bool => format!("`{}`", s.flag()),
            Shape::Scalar | Shape::List => format!("`{} <{}>`", s.flag(), s.value_name),
        };
        out.push_str(&format!(
            "| {flag} | `{}` | `{}` | {} | {} |\n",
            s.env(),
            s.name,
            s.default_doc.replace('|', "\\|"),
            s.help.replace('|', "\\|"),
        ));
    }
    out.push_str(&format!(
        "\n`--config <FILE>` / `{CONFIG_ENV}` names the TOML file. Precedence: flags, then \
         environment, then the TOML file, then the defaults. Durations are written `25s`, \
         `500ms` or `2m`; lists are comma-separated (or TOML arrays); booleans accept \
         `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`, and the flags `--dev`, \
         `--allow-anonymous` also take `=false`.\n"
    ));
    out
}
