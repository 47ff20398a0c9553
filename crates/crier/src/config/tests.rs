use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::table::{SETTINGS, Shape};
use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

mod brokers;
mod jwt;
mod tables;

const SECRET: &str = "0123456789abcdef0123456789abcdef-long-enough";

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn argv(flags: &[&str]) -> Vec<String> {
    std::iter::once("crier").chain(flags.iter().copied()).map(str::to_owned).collect()
}

fn load_with(flags: &[&str], vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
    load(argv(flags), &env(vars))
}

/// The problems of a load that must fail.
fn problems(flags: &[&str], vars: &[(&str, &str)]) -> Vec<String> {
    match load_with(flags, vars) {
        Err(ConfigError::Invalid(problems)) => problems,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> std::io::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "crier-config-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    fn file(&self, name: &str, contents: &str) -> std::io::Result<String> {
        let path = self.0.join(name);
        std::fs::write(&path, contents)?;
        Ok(path.to_string_lossy().into_owned())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn assert_generated_node_id(id: &str, host: &str) {
    let suffix = id.strip_prefix(host).and_then(|rest| rest.strip_prefix('-')).unwrap_or_default();
    assert_eq!(suffix.len(), 6, "node id {id:?} should be {host}-xxxxxx");
    assert!(suffix.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()), "node id {id:?}");
}

#[test]
fn defaults_with_no_input() -> TestResult {
    let config = load_with(&[], &[])?;
    assert_eq!(config.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(config.redis_url, None);
    assert_eq!(config.jwt, JwtSettings::default());
    assert!(config.allowed_origins.is_empty() && config.api_keys.is_empty());
    assert!(!config.allow_anonymous && !config.dev);
    assert_eq!(config.ping_interval, Duration::from_secs(25));
    assert_eq!(config.pong_timeout, Duration::from_secs(10));
    assert_eq!(config.max_message_bytes, 65536);
    assert_eq!(config.max_subscriptions_per_connection, 128);
    assert_eq!(config.max_connections_per_user, 0);
    assert_eq!(config.client_queue_max_bytes, 1_048_576);
    assert_eq!((config.user_rate, config.user_burst), (20, 40));
    assert_eq!((config.handshake_rate, config.handshake_burst), (50, 100));
    assert_eq!(config.history_size, 100);
    assert_eq!(config.history_ttl, Duration::from_secs(300));
    assert_eq!(config.shutdown_drain, Duration::from_secs(10));
    assert_eq!(
        (config.rebalance_rate, config.rebalance_threshold_percent, config.rebalance_min_connections),
        (0, 20, 100)
    );
    assert_eq!(config.log_format, LogFormat::Human);
    Ok(())
}

#[test]
fn default_node_id_uses_the_injected_hostname() -> TestResult {
    let a = load_with(&[], &[("HOSTNAME", "web-1")])?;
    let b = load_with(&[], &[("HOSTNAME", "web-1")])?;
    assert_generated_node_id(&a.node_id, "web-1");
    assert_generated_node_id(&b.node_id, "web-1");
    assert_ne!(a.node_id, b.node_id, "the suffix is random");
    // Odd characters in the hostname are dropped.
    let c = load_with(&[], &[("HOSTNAME", " we b/1\n")])?;
    assert_generated_node_id(&c.node_id, "web1");
    // Given explicitly, it is used as is.
    let d = load_with(&["--node-id", "node-a"], &[("HOSTNAME", "web-1")])?;
    assert_eq!(d.node_id, "node-a");
    Ok(())
}

#[test]
fn each_source_alone() -> TestResult {
    let from_flag = load_with(&["--ping-interval", "5s"], &[])?;
    assert_eq!(from_flag.ping_interval, Duration::from_secs(5));
    let from_flag_equals = load_with(&["--ping-interval=6s"], &[])?;
    assert_eq!(from_flag_equals.ping_interval, Duration::from_secs(6));
    let from_env = load_with(&[], &[("CRIER_PING_INTERVAL", "500ms")])?;
    assert_eq!(from_env.ping_interval, Duration::from_millis(500));
    let dir = TempDir::new()?;
    let file = dir.file("crier.toml", "ping_interval = \"2m\"\n")?;
    let from_file = load_with(&["--config", &file], &[])?;
    assert_eq!(from_file.ping_interval, Duration::from_secs(120));
    let from_file_via_env = load_with(&[], &[("CRIER_CONFIG", &file)])?;
    assert_eq!(from_file_via_env.ping_interval, Duration::from_secs(120));
    Ok(())
}

#[test]
fn precedence_flags_then_env_then_file_then_default() -> TestResult {
    let dir = TempDir::new()?;
    let file = dir.file("crier.toml", "ping_interval = \"1s\"\npong_timeout = \"1s\"\nuser_rate = 1\n")?;
    let vars = [("CRIER_CONFIG", file.as_str()), ("CRIER_PING_INTERVAL", "2s"), ("CRIER_PONG_TIMEOUT", "2s")];
    let config = load_with(&["--ping-interval", "3s"], &vars)?;
    assert_eq!(config.ping_interval, Duration::from_secs(3), "flag wins");
    assert_eq!(config.pong_timeout, Duration::from_secs(2), "env beats file");
    assert_eq!(config.user_rate, 1, "file beats default");
    assert_eq!(config.user_burst, 40, "default");
    // --config beats CRIER_CONFIG.
    let other = dir.file("other.toml", "user_rate = 7\n")?;
    let config = load_with(&["--config", &other], &vars)?;
    assert_eq!(config.user_rate, 7);
    assert_eq!(config.ping_interval, Duration::from_secs(2));
    Ok(())
}

#[test]
fn toml_file_with_every_kind_of_value() -> TestResult {
    let dir = TempDir::new()?;
    let file = dir.file(
        "crier.toml",
        &format!(
            r#"
listen = "127.0.0.1:9000"
node_id = "node-7"
redis_url = "redis://127.0.0.1:6379/0"
jwt_secret = "{SECRET}"
jwt_algorithms = ["HS256", "hs512"]
jwt_issuer = "https://issuer.example"
jwt_audience = "crier"
allowed_origins = ["https://a.example.com", " https://*.b.example.com "]
allow_anonymous = true
api_keys = "k1, k2,,"
ping_interval = "500ms"
pong_timeout = "2m"
max_message_bytes = 1024
max_subscriptions_per_connection = "16"
max_connections_per_user = 3
client_queue_max_bytes = 4096
user_rate = 1
user_burst = 2
handshake_rate = 3
handshake_burst = 4
history_size = 0
history_ttl = "0s"
shutdown_drain = "0s"
log_format = "json"
dev = false
"#
        ),
    )?;
    let c = load_with(&["--config", &file], &[])?;
    assert_eq!(c.listen.to_string(), "127.0.0.1:9000");
    assert_eq!(c.node_id, "node-7");
    assert_eq!(c.redis_url.as_deref(), Some("redis://127.0.0.1:6379/0"));
    assert_eq!(c.jwt.key, Some(KeySource::Secret(SECRET.to_owned())));
    assert_eq!(c.jwt.algorithms, vec![Algorithm::HS256, Algorithm::HS512]);
    assert_eq!(c.jwt.issuer.as_deref(), Some("https://issuer.example"));
    assert_eq!(c.jwt.audience.as_deref(), Some("crier"));
    assert_eq!(c.allowed_origins, vec!["https://a.example.com", "https://*.b.example.com"]);
    assert!(c.allow_anonymous);
    assert_eq!(*c.api_keys, vec!["k1", "k2"]);
    assert_eq!(c.ping_interval, Duration::from_millis(500));
    assert_eq!(c.pong_timeout, Duration::from_secs(120));
    assert_eq!(c.max_message_bytes, 1024);
    assert_eq!(c.max_subscriptions_per_connection, 16);
    assert_eq!(c.max_connections_per_user, 3);
    assert_eq!(c.client_queue_max_bytes, 4096);
    assert_eq!((c.user_rate, c.user_burst, c.handshake_rate, c.handshake_burst), (1, 2, 3, 4));
    assert_eq!(c.history_size, 0);
    assert_eq!(c.history_ttl, Duration::ZERO);
    assert_eq!(c.shutdown_drain, Duration::ZERO);
    assert_eq!(c.log_format, LogFormat::Json);
    assert!(!c.dev);

    let keys = dir.file("keys.toml", "jwt_public_key_file = \"/keys/pub.pem\"\njwt_algorithms = \"RS256, ES256\"\n")?;
    let c = load_with(&["--config", &keys], &[])?;
    assert_eq!(c.jwt.key, Some(KeySource::PublicKeyFile(PathBuf::from("/keys/pub.pem"))));
    assert_eq!(c.jwt.algorithms, vec![Algorithm::RS256, Algorithm::ES256]);
    let jwks = dir.file("jwks.toml", "jwt_jwks_file = \"/keys/jwks.json\"\n")?;
    let c = load_with(&["--config", &jwks], &[])?;
    assert_eq!(c.jwt.key, Some(KeySource::JwksFile(PathBuf::from("/keys/jwks.json"))));
    Ok(())
}

#[test]
fn toml_values_of_the_wrong_shape() -> TestResult {
    let dir = TempDir::new()?;
    let file = dir.file(
        "crier.toml",
        "listen = [\"a\"]\napi_keys = [1]\nuser_rate = 1.5\ndev = \"maybe\"\nping_interval = 25\n\
         [history_size]\nx = 1\n",
    )?;
    let p = problems(&["--config", &file], &[]);
    assert_eq!(p.len(), 6, "{p:#?}");
    let has = |start: &str, part: &str| p.iter().any(|l| l.starts_with(start) && l.contains(part));
    assert!(has("listen:", "not a list"), "{p:#?}");
    assert!(has("api_keys: the value", "list items must be strings"), "{p:#?}");
    assert!(has("user_rate: `1.5`", "whole number"), "{p:#?}");
    assert!(has("dev: `maybe`", "true or false"), "{p:#?}");
    assert!(has("ping_interval: `25`", "like 25s"), "{p:#?}");
    assert!(has("history_size:", "not a table"), "{p:#?}");
    Ok(())
}

#[test]
fn every_problem_is_reported_at_once() {
    let p = problems(&["--max-message-bytes", "lots"], &[("CRIER_PING_INTERVAL", "25"), ("CRIER_USER_RATE", "0")]);
    assert_eq!(
        p,
        vec![
            "ping_interval: `25` (from CRIER_PING_INTERVAL): expected a duration like 25s, 500ms or 2m",
            "max_message_bytes: `lots` (from --max-message-bytes): expected a whole number (digits only, no units)",
            "user_rate: `0` (from CRIER_USER_RATE): must be at least 1",
        ]
    );
    let e = ConfigError::Invalid(p);
    assert_eq!(e.to_string().lines().count(), 3);
}

#[test]
fn validation_rules() {
    let cases: &[(&str, &str, &str)] = &[
        ("CRIER_LISTEN", "localhost:8080", "expected an IP address and a port"),
        ("CRIER_LISTEN", "8080", "expected an IP address and a port"),
        ("CRIER_PING_INTERVAL", "0s", "more than 0s"),
        ("CRIER_PONG_TIMEOUT", "0ms", "more than 0s"),
        ("CRIER_PONG_TIMEOUT", "400days", "at most"),
        ("CRIER_MAX_MESSAGE_BYTES", "63", "between 64 and 16777216"),
        ("CRIER_MAX_MESSAGE_BYTES", "16777217", "between 64 and 16777216"),
        ("CRIER_MAX_MESSAGE_BYTES", "-1", "whole number"),
        ("CRIER_CLIENT_QUEUE_MAX_BYTES", "65535", "at least max_message_bytes (65536, the default)"),
        ("CRIER_USER_RATE", "0", "at least 1"),
        ("CRIER_USER_BURST", "0", "at least 1"),
        ("CRIER_HANDSHAKE_RATE", "0", "at least 1"),
        ("CRIER_HANDSHAKE_BURST", "0", "at least 1"),
        ("CRIER_HANDSHAKE_BURST", "4294967296", "whole number"),
        ("CRIER_MAX_SUBSCRIPTIONS_PER_CONNECTION", "0", "at least 1"),
        ("CRIER_HISTORY_SIZE", "1000001", "at most 1000000"),
        ("CRIER_HISTORY_TTL", "0s", "history_size to 0"),
        ("CRIER_REDIS_URL", "http://redis:6379", "redis://, rediss:// or unix://"),
        ("CRIER_ALLOWED_ORIGINS", "https://ok.example.com,https://a.example.com/", "never ends with `/`"),
        ("CRIER_ALLOWED_ORIGINS", "app.example.com", "expected `*` or an origin"),
        ("CRIER_ALLOWED_ORIGINS", "https://a.example.com/path", "expected `*` or an origin"),
        ("CRIER_NODE_ID", "has space", "characters from"),
        ("CRIER_LOG_FORMAT", "xml", "`human` or `json`"),
        ("CRIER_DEV", "2", "true or false"),
        ("CRIER_JWT_ALGORITHMS", "HS257", "unknown algorithm; did you mean `HS256`?"),
    ];
    for (var, value, expected) in cases {
        let p = problems(&[], &[(var, value)]);
        assert_eq!(p.len(), 1, "{var}={value}: {p:#?}");
        assert!(p[0].contains(expected) && p[0].contains(&format!("(from {var})")), "{var}={value}: {p:#?}");
    }
}

#[test]
fn values_that_pass() -> TestResult {
    let c = load_with(
        &[],
        &[
            ("CRIER_LISTEN", "[::]:80"),
            ("CRIER_MAX_MESSAGE_BYTES", "64"),
            ("CRIER_CLIENT_QUEUE_MAX_BYTES", "64"),
            ("CRIER_HISTORY_SIZE", "1000000"),
            ("CRIER_REDIS_URL", "rediss://:pw@redis.internal:6380"),
            ("CRIER_ALLOWED_ORIGINS", " *, http://localhost:3000 ,, app://x"),
            ("CRIER_LOG_FORMAT", "JSON"),
            ("CRIER_JWT_ISSUER", " "),
        ],
    )?;
    assert_eq!(c.listen.port(), 80);
    assert_eq!(c.max_message_bytes, 64);
    assert_eq!(c.history_size, 1_000_000);
    assert_eq!(c.allowed_origins, vec!["*", "http://localhost:3000", "app://x"]);
    assert_eq!(c.log_format, LogFormat::Json);
    assert_eq!(c.jwt.issuer, None, "blank counts as unset");
    for url in ["redis://r:6379/0", "unix:///run/redis.sock"] {
        let c = load_with(&["--redis-url", url], &[])?;
        assert_eq!(c.redis_url.as_deref(), Some(url));
    }
    Ok(())
}

#[test]
fn booleans() -> TestResult {
    assert!(load_with(&["--dev"], &[])?.dev);
    assert!(load_with(&["--dev=true"], &[])?.dev);
    assert!(!load_with(&["--dev=false"], &[("CRIER_DEV", "1")])?.dev);
    for (value, expected) in [
        ("1", true),
        ("yes", true),
        ("TRUE", true),
        ("on", true),
        ("0", false),
        ("no", false),
        ("False", false),
        ("off", false),
    ] {
        let c = load_with(&[], &[("CRIER_ALLOW_ANONYMOUS", value)])?;
        assert_eq!(c.allow_anonymous, expected, "{value}");
    }
    let c = load_with(&["--allow-anonymous=false"], &[("CRIER_ALLOW_ANONYMOUS", "yes")])?;
    assert!(!c.allow_anonymous);
    // A switch does not swallow the next argument.
    let c = load_with(&["--dev", "--listen", "127.0.0.1:1"], &[])?;
    assert!(c.dev);
    assert_eq!(c.listen.port(), 1);
    Ok(())
}

#[test]
fn lists_are_trimmed_and_empties_dropped() -> TestResult {
    let c = load_with(&["--api-keys", " a , ,b,"], &[("CRIER_ALLOWED_ORIGINS", "")])?;
    assert_eq!(*c.api_keys, vec!["a", "b"]);
    assert!(c.allowed_origins.is_empty());
    Ok(())
}

#[test]
fn unknown_flag() {
    let p = problems(&["--ping-intervall", "5s"], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("command line: "), "{p:#?}");
    assert!(p[0].contains("--ping-intervall"), "{p:#?}");
    assert!(p[0].contains("--ping-interval'"), "a tip names the real flag: {p:#?}");
    assert!(!p[0].contains('\n'));
    // Other sources are still checked.
    let p = problems(&["stray"], &[("CRIER_USER_RATE", "0")]);
    assert_eq!(p.len(), 2, "{p:#?}");
    let p = problems(&["--listen"], &[]);
    assert!(p[0].contains("--listen"), "{p:#?}");
}

#[test]
fn an_address_flag_of_other_servers_points_to_listen() {
    for flag in ["--port", "--host", "--bind"] {
        let p = problems(&[flag, "8080"], &[]);
        assert!(p[0].contains("--listen 0.0.0.0:8080"), "{flag}: {p:#?}");
        assert!(!p[0].contains("--api-rate"), "{flag}: not the closest spelling: {p:#?}");
    }
    // Other unknown flags keep clap's own tip.
    let p = problems(&["--ping-intervall", "5s"], &[]);
    assert!(p[0].contains("--ping-interval"), "{p:#?}");
}

#[test]
fn unknown_toml_key() -> TestResult {
    let dir = TempDir::new()?;
    let file = dir.file("crier.toml", "ping_intervall = \"5s\"\nzzz = 1\n")?;
    let p = problems(&["--config", &file], &[]);
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(p[0].starts_with("ping_intervall: unknown key in "), "{p:#?}");
    assert!(p[0].ends_with("did you mean `ping_interval`?"), "{p:#?}");
    assert!(p[1].starts_with("zzz: unknown key in "), "{p:#?}");
    assert!(!p[1].contains("did you mean"), "{p:#?}");
    Ok(())
}

#[test]
fn unknown_crier_env_var() {
    let p = problems(
        &[],
        &[
            ("CRIER_REDIS_URLS", "redis://x"),
            ("CRIER_CONFIG", ""),
            ("NOT_CRIER_X", "ignored"),
            ("crier_lower", "ignored"),
        ],
    );
    assert_eq!(p.len(), 1, "unknown CRIER_* names are not errors: {p:#?}");
    assert_eq!(p[0], "config: `` (from CRIER_CONFIG): expected a file name");
    let w = super::env_warnings(&env(&[
        ("CRIER_REDIS_URLS", "redis://x"),
        ("CRIER_PORT", "tcp://10.0.0.1:8080"),
        ("CRIER_CONFIG", ""),
        ("CRIER_API_RATE", "5"),
        ("NOT_CRIER_X", "ignored"),
    ]));
    assert_eq!(
        w,
        [
            "CRIER_PORT: not a crier setting (from the environment), ignored",
            "CRIER_REDIS_URLS: not a crier setting (from the environment), ignored; did you mean `CRIER_REDIS_URL`?",
        ]
    );
}

#[test]
fn unreadable_and_invalid_toml_files() -> TestResult {
    let dir = TempDir::new()?;
    let missing = dir.0.join("missing.toml").to_string_lossy().into_owned();
    let p = problems(&["--config", &missing], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("config: `") && p[0].contains("cannot read it"), "{p:#?}");

    let bad = dir.file("bad.toml", &format!("user_rate = 5\njwt_secret = \"{SECRET}\" oops\n"))?;
    let p = problems(&[], &[("CRIER_CONFIG", &bad), ("CRIER_USER_BURST", "0")]);
    assert_eq!(p.len(), 2, "{p:#?}");
    assert!(p[0].contains("invalid TOML at line 2"), "{p:#?}");
    assert!(p[0].contains("(from CRIER_CONFIG)"), "{p:#?}");
    assert!(!p.join("\n").contains(SECRET), "{p:#?}");
    assert!(p[1].starts_with("user_burst:"), "{p:#?}");
    Ok(())
}

#[test]
fn exit_codes() {
    assert_eq!(ConfigError::Help(String::new()).exit_code(), 0);
    assert_eq!(ConfigError::Invalid(vec![]).exit_code(), 64);
    let Err(e) = load_with(&["--nope"], &[]) else {
        panic!("--nope must fail");
    };
    assert_eq!(e.exit_code(), 64);
    let Err(e) = load_with(&["--help"], &[]) else {
        panic!("--help must not load");
    };
    assert_eq!(e.exit_code(), 0);
}

#[test]
fn help_and_version() {
    for flag in ["--help", "-h"] {
        match load_with(&[flag], &[("CRIER_BOGUS", "x")]) {
            Err(ConfigError::Help(text)) => {
                for s in SETTINGS {
                    assert!(text.contains(&s.flag()), "{} missing from help", s.flag());
                    assert!(text.contains(&s.env()), "{} missing from help", s.env());
                }
                assert!(text.contains("--config <FILE>"), "{text}");
                assert!(text.contains("Precedence"), "{text}");
            }
            other => panic!("expected Help, got {other:?}"),
        }
    }
    match load_with(&["--version"], &[]) {
        Err(ConfigError::Help(text)) => {
            assert_eq!(text.trim(), format!("crier {}", env!("CARGO_PKG_VERSION")));
        }
        other => panic!("expected Help, got {other:?}"),
    }
}

/// A valid value for each setting, as a flag / env value (and TOML string).
fn sample(name: &str) -> &'static str {
    match name {
        "listen" => "127.0.0.1:7777",
        "node_id" => "sample-node",
        "redis_url" => "redis://sample:6379",
        "redis_sentinel_urls" => "redis://s1:26379,rediss://s2:26379",
        "redis_sentinel_master" => "sample-master",
        "redis_cluster_urls" => "redis://c1:6379,rediss://c2:6379",
        "redis_tls_ca_file" => "/sample-ca.pem",
        "nats_url" => "nats://n1:4222,tls://n2:4222",
        "nats_credentials_file" | "nats_token_file" | "nats_nkey_file" | "nats_tls_ca_file" => "/sample-nats",
        "jwt_secret" => SECRET,
        "jwt_public_key_file" => "/sample.pem",
        "jwt_jwks_file" => "/sample.json",
        "jwt_algorithms" => "HS384",
        "jwt_issuer" | "jwt_audience" => "sample",
        "allowed_origins" => "https://sample.example",
        "api_keys" => "sample-key",
        "ping_interval" | "pong_timeout" | "history_ttl" | "shutdown_drain" | "presence_ttl" | "token_max_lifetime" => {
            "7s"
        }
        "trusted_proxies" => "10.0.0.0/8,192.0.2.7",
        "max_message_bytes" => "777",
        "client_queue_max_bytes" => "777777",
        "log_format" => "json",
        "user_rate_scope" => "cluster",
        "allow_anonymous" | "dev" | "websocket_compression" | "admin" => "true",
        _ => "7",
    }
}

#[test]
fn usage_table_has_all_three_spellings_and_each_works() -> TestResult {
    let table = usage_table();
    let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("| `")).collect();
    assert_eq!(rows.len(), SETTINGS.len());
    let dir = TempDir::new()?;
    for s in SETTINGS {
        let flag = s.flag();
        let env_name = s.env();
        let row = rows.iter().find(|r| r.contains(&format!("| `{}`", s.name))).copied().unwrap_or_default();
        assert!(row.starts_with(&format!("| `{flag}")), "{} row: {row}", s.name);
        assert!(row.contains(&format!("`{env_name}`")), "{} row: {row}", s.name);

        // And each spelling really sets it, with the same result (Sentinel's two settings only
        // make sense together: each is given its partner by flag).
        let value = sample(s.name);
        let partner: &[&str] = match s.name {
            "redis_sentinel_urls" => &["--redis-sentinel-master", "m"],
            "redis_sentinel_master" => &["--redis-sentinel-urls", "redis://s:26379"],
            _ => &[],
        };
        let with = |args: &[&str]| -> Vec<String> { args.iter().chain(partner).map(|a| (*a).to_owned()).collect() };
        let load_args = |args: Vec<String>, vars: &[(&str, &str)]| {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            load_with(&refs, vars)
        };
        let by_flag = match s.shape {
            Shape::Bool => load_args(with(&[&flag]), &[])?,
            Shape::Scalar | Shape::List => load_args(with(&[&flag, value]), &[])?,
        };
        let by_env = load_args(with(&[]), &[(&env_name, value)])?;
        let file = dir
            .file(&format!("{}.toml", s.name), &format!("{} = {}\n", s.name, toml::Value::String(value.to_owned())))?;
        let by_file = load_args(with(&["--config", &file]), &[])?;
        // (A partner alone is invalid: compare with the plain defaults then.)
        let default = if partner.is_empty() { load_args(with(&[]), &[])? } else { load_with(&[], &[])? };
        let same_node =
            |c: Config| Config { node_id: if s.name == "node_id" { c.node_id } else { String::new() }, ..c };
        let (by_flag, by_env, by_file, default) =
            (same_node(by_flag), same_node(by_env), same_node(by_file), same_node(default));
        assert_eq!(by_flag, by_env, "{}", s.name);
        assert_eq!(by_flag, by_file, "{}", s.name);
        assert_ne!(by_flag, default, "{} has no effect", s.name);
    }
    assert!(table.contains("`--config <FILE>` / `CRIER_CONFIG`"));
    Ok(())
}

#[test]
fn dev_listens_on_loopback_unless_listen_is_set() -> TestResult {
    let loopback: std::net::SocketAddr = "127.0.0.1:8080".parse()?;
    assert_eq!(load_with(&["--dev"], &[])?.listen, loopback, "--dev alone: loopback");
    assert_eq!(load_with(&["--dev=false", "--jwt-secret", SECRET], &[])?.listen.to_string(), "0.0.0.0:8080");
    for (flags, vars) in [
        (&["--dev", "--listen", "0.0.0.0:8080"][..], &[][..]),
        (&["--dev"][..], &[("CRIER_LISTEN", "0.0.0.0:8080")][..]),
    ] {
        assert_eq!(load_with(flags, vars)?.listen.to_string(), "0.0.0.0:8080", "{flags:?} {vars:?}: as asked");
    }
    let dir = TempDir::new()?;
    let file = dir.0.join("crier.toml");
    std::fs::write(&file, "dev = true\nlisten = \"0.0.0.0:9000\"\n")?;
    let from_file = load_with(&["--config", file.to_str().unwrap_or_default()], &[])?;
    assert_eq!(from_file.listen.to_string(), "0.0.0.0:9000", "the file's listen wins over the dev default");
    Ok(())
}

#[test]
fn rebalance_threshold_is_a_share_or_a_percentage() -> TestResult {
    assert_eq!(load_with(&["--rebalance-threshold", "0.35"], &[])?.rebalance_threshold_percent, 35);
    assert_eq!(load_with(&["--rebalance-threshold", "15%"], &[])?.rebalance_threshold_percent, 15);
    assert_eq!(load_with(&["--rebalance-rate", "0"], &[])?.rebalance_rate, 0);
    for bad in ["-0.1", "abc", "11", "NaN"] {
        let p = problems(&[&format!("--rebalance-threshold={bad}")], &[]);
        assert!(p.len() == 1 && p[0].contains("rebalance_threshold"), "{bad}: {p:#?}");
    }
    Ok(())
}
