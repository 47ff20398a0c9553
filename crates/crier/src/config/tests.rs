use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use jsonwebtoken::Algorithm;

use super::table::{SETTINGS, Shape};
use super::*;

type TestResult = Result<(), Box<dyn std::error::Error>>;

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

#[test]
fn short_secret_is_refused_unless_dev_and_never_shown() -> TestResult {
    let p = problems(&["--jwt-secret", "hunter2"], &[]);
    assert_eq!(
        p,
        vec![
            "jwt_secret: the value (from --jwt-secret): is 7 bytes; HS256 secrets shorter than 32 \
             bytes are guessable, so use at least 32 random bytes (e.g. `openssl rand -base64 48`), \
             or --dev for local testing"
        ]
    );
    let c = load_with(&["--jwt-secret", "hunter2", "--dev"], &[])?;
    assert_eq!(c.jwt.key, Some(KeySource::Secret("hunter2".to_owned())));
    // A secret may start with a hyphen.
    let hyphen = format!("-{SECRET}");
    let c = load_with(&["--jwt-secret", &hyphen], &[])?;
    assert_eq!(c.jwt.key, Some(KeySource::Secret(hyphen.to_owned())));
    // Nor is an API key or a Redis password ever shown.
    let p = problems(
        &[],
        &[
            ("CRIER_JWT_SECRET", "short-secret"),
            ("CRIER_JWT_ALGORITHMS", "RS256"),
            ("CRIER_REDIS_URL", "http://user:hunter3@redis"),
        ],
    );
    let all = p.join("\n");
    assert!(!all.contains("short-secret") && !all.contains("hunter3"), "{all}");
    assert!(all.contains("`http://***@redis`"), "{all}");
    let c = load_with(&["--api-keys", "k-secret-1", "--redis-url", "redis://u:pw@r/0"], &[])?;
    let debug = format!("{c:?}");
    assert!(!debug.contains("k-secret-1") && !debug.contains("pw@"), "{debug}");
    let c = load_with(&[], &[("CRIER_JWT_SECRET", SECRET)])?;
    assert!(!format!("{c:?}").contains(SECRET));
    Ok(())
}

#[test]
fn at_most_one_key_source() {
    let p = problems(
        &["--jwt-jwks-file", "/k/jwks.json"],
        &[("CRIER_JWT_SECRET", SECRET), ("CRIER_JWT_PUBLIC_KEY_FILE", "/k/pub.pem")],
    );
    assert_eq!(
        p,
        vec![
            "jwt_secret (from CRIER_JWT_SECRET), jwt_public_key_file (from \
             CRIER_JWT_PUBLIC_KEY_FILE), jwt_jwks_file (from --jwt-jwks-file): set only one of \
             jwt_secret, jwt_public_key_file and jwt_jwks_file"
        ]
    );
}

#[test]
fn jwt_algorithms() -> TestResult {
    let c = load_with(&["--jwt-algorithms", "hs256, EDDSA,HS256"], &[])?;
    assert_eq!(c.jwt.algorithms, vec![Algorithm::HS256, Algorithm::EdDSA]);
    assert!(load_with(&[], &[])?.jwt.algorithms.is_empty());

    let p = problems(&["--jwt-algorithms", "RS256,none"], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("jwt_algorithms: `none` (from --jwt-algorithms): `none` is never accepted"), "{p:#?}");

    let p = problems(&["--jwt-algorithms", "HS256,RS256"], &[("CRIER_JWT_SECRET", SECRET)]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("jwt_algorithms: `RS256`") && p[0].contains("does not fit jwt_secret"), "{p:#?}");

    let p = problems(&["--jwt-algorithms", "HS256,RS256", "--jwt-public-key-file", "k.pem"], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("jwt_algorithms: `HS256`") && p[0].contains("forge"), "{p:#?}");

    let c = load_with(&["--jwt-algorithms", "RS256", "--jwt-jwks-file", "jwks.json"], &[])?;
    assert_eq!(c.jwt.algorithms, vec![Algorithm::RS256]);
    Ok(())
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
fn nats_url_is_one_broker_among_the_redis_topologies_and_takes_one_credential() -> TestResult {
    let c = load_with(&["--nats-url", "nats://a:4222, tls://b:4222", "--nats-replicas", "3"], &[])?;
    assert_eq!(c.nats.urls.iter().map(|u| u.as_str()).collect::<Vec<_>>(), ["nats://a:4222", "tls://b:4222"]);
    assert_eq!((c.nats.replicas, c.broker_kind()), (3, "nats"));
    let p = problems(&["--nats-url", "nats://a:4222", "--redis-url", "redis://r:6379"], &[]);
    assert!(p.len() == 1 && p[0].contains("set one broker"), "{p:#?}");
    let p = problems(&["--nats-url", "redis://a:4222"], &[]);
    assert!(p.len() == 1 && p[0].starts_with("nats_url: `redis://a:4222`"), "{p:#?}");
    let p = problems(&["--nats-url", "nats://a:4222", "--nats-token-file", "/t", "--nats-nkey-file", "/n"], &[]);
    assert!(p.len() == 1 && p[0].contains("at most one NATS credential"), "{p:#?}");
    // A password in the URL is not echoed in a problem.
    let p = problems(&["--nats-url", "nats://u:hunter2@a:4222", "--redis-url", "redis://r:6379"], &[]);
    assert!(p.iter().all(|p| !p.contains("hunter2")), "{p:#?}");
    assert_eq!(load_with(&[], &[])?.broker_kind(), "memory");
    Ok(())
}

#[test]
fn exactly_one_redis_topology() -> TestResult {
    let p = problems(&["--redis-url", "redis://r:6379", "--redis-sentinel-urls", "redis://s:26379"], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].contains("set exactly one Redis topology"), "{p:#?}");
    let p = problems(&["--redis-cluster-urls", "redis://c:6379", "--redis-url", "redis://r:6379"], &[]);
    assert!(p.len() == 1 && p[0].contains("set exactly one Redis topology"), "{p:#?}");
    let c = load_with(&["--redis-cluster-urls", "redis://c1:6379,redis://c2:6379"], &[])?;
    assert_eq!(c.redis_cluster_urls.len(), 2);
    let p = problems(&["--redis-sentinel-urls", "redis://s:26379"], &[]);
    assert!(p.len() == 1 && p[0].contains("needs redis_sentinel_master"), "{p:#?}");
    let p = problems(&[], &[("CRIER_REDIS_SENTINEL_MASTER", "m")]);
    assert!(p.len() == 1 && p[0].contains("needs redis_sentinel_urls"), "{p:#?}");
    let p = problems(&["--redis-sentinel-urls", "http://s:26379", "--redis-sentinel-master", "m"], &[]);
    assert!(p.len() == 1 && p[0].contains("Sentinel address"), "{p:#?}");
    let p = problems(&["--redis-sentinel-urls", "redis://:hunter3@s:26379,x", "--redis-sentinel-master", "m"], &[]);
    assert!(p.iter().all(|l| !l.contains("hunter3")), "{p:#?}");
    let c = load_with(
        &["--redis-sentinel-urls", "redis://a:26379, rediss://b:26379", "--redis-sentinel-master", "m"],
        &[],
    )?;
    assert_eq!(c.redis_sentinel_urls.len(), 2);
    assert_eq!(c.redis_sentinel_master.as_deref(), Some("m"));
    Ok(())
}

#[test]
fn redact_url_hides_user_info() {
    use super::parse::redact_url;
    assert_eq!(redact_url("redis://:pw@host:6379/0"), "redis://***@host:6379/0");
    assert_eq!(redact_url("redis://u:p@ss@host"), "redis://***@host");
    assert_eq!(redact_url("redis://host/0?x=a@b"), "redis://host/0?x=a@b");
    assert_eq!(redact_url("user:pw@host"), "***@host");
    assert_eq!(redact_url("unix:///tmp/r.sock"), "unix:///tmp/r.sock");
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

#[test]
fn namespaces_from_the_toml_file() -> TestResult {
    use crier_core::ChannelPolicy;
    let dir = TempDir::new()?;
    let file = dir.file(
        "crier.toml",
        "history_size = 50\nhistory_ttl = \"2m\"\n\
         [namespaces.chat]\nhistory_size = 500\nhistory_ttl = \"1h\"\njoin_leave = true\nmax_subscribers = 3\n\
         [namespaces.ticker]\nhistory_size = 0\nrecovery = false\npresence = false\nclient_publish = false\n\
         [namespaces.user]\nhistory_ttl = \"10m\"\n\
         [namespaces.\"a.b-c_d@e/f=g\"]\n",
    )?;
    let c = load_with(&["--config", &file], &[])?;
    let ns = &c.namespaces;
    let default = ChannelPolicy { history_size: 50, history_ttl: Duration::from_secs(120), ..ChannelPolicy::default() };
    assert_eq!(ns.default_policy(), &default);
    assert_eq!(ns.policy("lobby"), &default, "no `:`, no namespace");
    assert_eq!(ns.policy("news:x"), &default, "undeclared namespace");
    assert_eq!(
        ns.policy("chat:lobby"),
        &ChannelPolicy {
            history_size: 500,
            history_ttl: Duration::from_secs(3600),
            join_leave: true,
            max_subscribers: 3,
            ..default.clone()
        }
    );
    assert_eq!(
        ns.policy("ticker:eurusd"),
        &ChannelPolicy { history_size: 0, recovery: false, presence: false, client_publish: false, ..default.clone() },
        "history_ttl inherited even with history_size 0"
    );
    assert_eq!(
        ns.policy("user:alice"),
        &ChannelPolicy { history_ttl: Duration::from_secs(600), ..default.clone() },
        "personal channels are the `user` namespace"
    );
    assert_eq!(ns.policy("a.b-c_d@e/f=g:x"), &default, "an empty table declares the namespace with the defaults");
    assert_eq!(ns.max_history_ttl(), Duration::from_secs(3600));
    // Without namespaces: today's behaviour, the top-level history options.
    let c = load_with(&[], &[])?;
    assert_eq!(c.namespaces.named().count(), 0);
    assert_eq!(c.namespaces.default_policy(), &ChannelPolicy::default());
    Ok(())
}

#[test]
fn bad_namespaces_are_reported_with_every_other_problem() -> TestResult {
    let dir = TempDir::new()?;
    let file = dir.file(
        "crier.toml",
        "user_rate = 0\n\
         [namespaces.chat]\nhistory_sise = 5\nrecovery = \"maybe\"\nhistory_size = -1\nmax_subscribers = \"x\"\n\
         [namespaces.\"bad name\"]\n\
         [namespaces.\"a:b\"]\n\
         [namespaces.\"\"]\n\
         [namespaces.live]\nhistory_size = 10\nhistory_ttl = \"0s\"\n\
         [namespaces.full]\npresence = false\nmax_subscribers = 2\n\
         [namespaces.mute]\npresence = false\njoin_leave = true\n\
         [namespaces.nested]\nhistory_size = [1]\n",
    )?;
    let p = problems(&["--config", &file], &[]);
    let all = p.join("\n");
    let has = |needle: &str| p.iter().any(|l| l.contains(needle));
    assert!(has("user_rate:"), "{all}");
    assert!(
        has("namespaces.chat.history_sise: unknown namespace option") && has("did you mean `history_size`"),
        "{all}"
    );
    assert!(has("namespaces.chat.recovery: `maybe`"), "{all}");
    assert!(has("namespaces.chat.history_size: `-1`"), "{all}");
    assert!(has("namespaces.chat.max_subscribers: `x`"), "{all}");
    assert!(has("namespaces.bad name: `bad name`") && has("0x20"), "{all}");
    assert!(has("namespaces.a:b: `a:b`") && has("no `:`"), "{all}");
    assert!(has("namespaces.: ``") && has("needs a name"), "{all}");
    assert!(has("namespaces.live.history_ttl: `0s`"), "{all}");
    assert!(has("namespaces.full.max_subscribers: `2`") && has("needs presence = true"), "{all}");
    assert!(has("namespaces.mute.join_leave: `true`") && has("needs presence = true"), "{all}");
    assert!(has("namespaces.nested.history_size"), "{all}");
    assert_eq!(p.len(), 12, "{all}");

    // A namespace declared twice is refused by the TOML parser itself (with the line).
    let twice = dir.file("twice.toml", "[namespaces.chat]\nhistory_size = 1\n[namespaces.chat]\nhistory_size = 2\n")?;
    let p = problems(&["--config", &twice], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].contains("invalid TOML at line 3"), "{p:#?}");
    // `namespaces` must be tables.
    let flat = dir.file("flat.toml", "namespaces = \"chat\"\n")?;
    let p = problems(&["--config", &flat], &[]);
    assert!(p.len() == 1 && p[0].starts_with("namespaces: expected tables like [namespaces.chat]"), "{p:#?}");
    let Err(e) = load_with(&["--config", &flat], &[]) else { panic!("must fail") };
    assert_eq!(e.exit_code(), 64);
    Ok(())
}

#[test]
fn the_proxy_table_and_the_namespace_switches() -> TestResult {
    let dir = TempDir::new()?;
    let file = dir.file(
        "crier.toml",
        "[proxy]\nconnect_url = \"http://127.0.0.1:9000/connect\"\nconnect_headers = [\"Cookie\", \"X-Request-Id\"]\n\
         subscribe_url = \"http://127.0.0.1:9000/subscribe\"\ntimeout = \"250ms\"\nmax_concurrency = 8\n\
         refresh_before = \"30s\"\n[namespaces.room]\nsubscribe_proxy = true\n",
    )?;
    let c = load_with(&["--config", &file], &[])?;
    let p = c.proxy.ok_or("the [proxy] table")?;
    assert_eq!(p.connect_url.as_deref(), Some("http://127.0.0.1:9000/connect"));
    assert_eq!(p.connect_headers, ["cookie", "x-request-id"], "header names lower-cased");
    assert_eq!(p.subscribe_url.as_deref(), Some("http://127.0.0.1:9000/subscribe"));
    assert_eq!((p.publish_url, p.refresh_url), (None, None));
    assert_eq!((p.timeout, p.max_concurrency), (Duration::from_millis(250), 8));
    assert_eq!((p.connect_always, p.breaker_failures, p.breaker_cooldown), (false, 5, Duration::from_secs(5)));
    assert_eq!(p.refresh_before, Duration::from_secs(30));
    // `refresh_before`: 10 s unless set; more than an hour is a problem.
    let dflt = dir.file("dflt.toml", "[proxy]\nconnect_url = \"http://127.0.0.1:9000/connect\"\n")?;
    assert_eq!(load_with(&["--config", &dflt], &[])?.proxy.ok_or("proxy")?.refresh_before, Duration::from_secs(10));
    let long =
        dir.file("long.toml", "[proxy]\nconnect_url = \"http://127.0.0.1:9000/connect\"\nrefresh_before = \"2h\"\n")?;
    let p2 = problems(&["--config", &long], &[]);
    assert!(p2.len() == 1 && p2[0].starts_with("proxy.refresh_before: `2h`"), "{p2:#?}");
    assert!(c.namespaces.policy("room:1").subscribe_proxy);
    assert!(!c.namespaces.policy("room:1").publish_proxy);
    assert!(!c.namespaces.policy("news:1").subscribe_proxy, "off unless the namespace says so");
    // No table: no proxies.
    assert_eq!(load_with(&[], &[])?.proxy, None);
    Ok(())
}

#[test]
fn the_webhooks_table() -> TestResult {
    let dir = TempDir::new()?;
    let secret = "s".repeat(32);
    let file = dir.file(
        "crier.toml",
        &format!(
            "[webhooks]\nurl = \"http://127.0.0.1:9000/events\"\nsecret = \"{secret}\"\n\
             events = [\"channel_vacated\", \"member_added\"]\ntimeout = \"2s\"\nmax_queue = 10\nbatch = 5\n"
        ),
    )?;
    let c = load_with(&["--config", &file], &[])?;
    let w = c.webhooks.ok_or("the [webhooks] table")?;
    assert_eq!((w.url.as_str(), w.secret.as_str()), ("http://127.0.0.1:9000/events", secret.as_str()));
    assert_eq!(w.events, ["channel_vacated", "member_added"]);
    assert_eq!((w.timeout, w.max_queue, w.batch), (Duration::from_secs(2), 10, 5));
    assert_eq!((w.retry_min, w.retry_max), (Duration::from_millis(100), Duration::from_secs(30)));
    assert!(!format!("{w:?}").contains(&secret), "the secret is not in the Debug output");
    assert_eq!(load_with(&[], &[])?.webhooks, None);

    // Every problem at once, the short secret not echoed; exit 64.
    let bad = dir.file(
        "bad.toml",
        "[webhooks]\nurl = \"https://x\"\nsecret = \"short-secret\"\nevents = [\"channel_vacatd\"]\nbatch = 0\nretyr_max = \"1s\"\n",
    )?;
    let p = problems(&["--config", &bad], &[]);
    assert_eq!(p.len(), 5, "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.url: `https://x`")), "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.secret:") && l.contains("12 bytes")), "{p:#?}");
    assert!(!p.iter().any(|l| l.contains("short-secret")), "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.events: `\"channel_vacatd\"`")), "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.batch: `0`")), "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.retyr_max: unknown") && l.contains("retry_max")), "{p:#?}");
    let Err(e) = load_with(&["--config", &bad], &[]) else { panic!("must fail") };
    assert_eq!(e.exit_code(), 64);
    let missing = dir.file("missing.toml", "[webhooks]\nurl = \"http://127.0.0.1:9/e\"\n")?;
    let p = problems(&["--config", &missing], &[]);
    assert!(p.len() == 1 && p[0].starts_with("webhooks.secret:") && p[0].contains("required"), "{p:#?}");
    Ok(())
}
