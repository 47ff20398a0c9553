//! The `crier` binary: reads settings, sets up logging, binds the listener, installs signal
//! handlers, and hands over to [`crier::run`].

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use crier::auth;
use crier::config::{self, Config, ConfigError, KeySource, LogFormat};

fn main() -> ExitCode {
    let env: HashMap<String, String> = std::env::vars_os()
        .map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
        .collect();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "token") {
        return token_command(&args, &env);
    }
    let mut config = match config::load(args, &env) {
        Ok(c) => c,
        Err(ConfigError::Help(text)) => {
            say(&text);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            complain(&format!("crier: invalid configuration:\n{e}"));
            return ExitCode::from(64);
        }
    };
    init_logging(config.log_format);
    for warning in config::env_warnings(&env) {
        tracing::warn!("{warning}");
    }
    let dev_token = if config.dev { Some(prepare_dev(&mut config)) } else { None };
    if config.jwt.key.is_none() {
        complain(&format!("crier: {}", auth::NO_KEY));
        return ExitCode::from(64);
    }
    if let Err(e) = auth::check(&config) {
        complain(&format!("crier: invalid configuration:\n{e}"));
        return ExitCode::from(64);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        builder.worker_threads(config.worker_threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            complain(&format!("crier: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    // On a worker, not on this thread: `block_on` would run the accept loop here, and glibc gives
    // every thread that allocates its arena of its own; every connection's task cell would then
    // come from this thread's arena while its buffers come from the worker's, and both arenas
    // keep their own free memory (scripts/peers-mem-malloc-stats: ~150–220 B per connection).
    runtime.block_on(async { tokio::spawn(serve(config, dev_token)).await.unwrap_or(ExitCode::FAILURE) })
}

async fn serve(config: Config, dev_token: Option<String>) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            complain(&format!("crier: cannot listen on {}: {e}", config.listen));
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_else(|_| config.listen.to_string());
    // Tests and scripts read this line to learn the port when listening on port 0.
    say(&format!("crier listening on http://{addr}"));
    tracing::info!(%addr, node = %config.node_id, broker = config.broker_kind(), "crier started");
    if let Some(token) = &dev_token {
        print_dev_banner(&addr, token, &config);
    }
    // The first signal starts the drain; a second one ends it at once.
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
    let first = async move {
        shutdown_signal().await;
        let _ = first_tx.send(());
    };
    let second = async move {
        match first_rx.await {
            Ok(()) => shutdown_signal().await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        result = crier::run(listener, config, dev_token, first) => match result {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => match e.downcast_ref::<ConfigError>() {
                // A bad setting only found at start (e.g. a Redis certificate that does not verify).
                Some(bad) => {
                    complain(&format!("crier: invalid configuration:\n{bad}"));
                    ExitCode::from(64)
                }
                None => {
                    complain(&format!("crier: {e:#}"));
                    ExitCode::FAILURE
                }
            },
        },
        () = second => {
            tracing::warn!("second shutdown signal: exiting without finishing the drain");
            ExitCode::SUCCESS
        }
    }
}

/// The namespace `--dev` declares (with join/leave) when the settings do not.
const DEV_NAMESPACE: &str = "chat";

/// `--dev`: a generated secret and API key (unless given), any Origin, and a token to print.
fn prepare_dev(config: &mut Config) -> String {
    let key = config.jwt.key.get_or_insert_with(|| KeySource::Secret(auth::generate_secret()));
    let secret = match key {
        KeySource::Secret(secret) => secret.clone(),
        // A dev page with a public key of the user's: no token can be minted here.
        KeySource::PublicKeyFile(_) | KeySource::JwksFile(_) => String::new(),
    };
    if config.api_keys.is_empty() {
        config.api_keys.0 = vec![format!("dev-{}", auth::generate_secret())];
    }
    if config.allowed_origins.is_empty() {
        config.allowed_origins = vec!["*".into()];
    }
    // The demo page's channels (`chat:lobby`) push join/leave, unless the settings declare the
    // `chat` namespace themselves.
    if !config.namespaces.named().any(|(name, _)| name == DEV_NAMESPACE) {
        let policy = crier_core::ChannelPolicy { join_leave: true, ..config.namespaces.default_policy().clone() };
        config.namespaces = std::mem::take(&mut config.namespaces).with(DEV_NAMESPACE, policy);
    }
    auth::mint_hs256(secret.as_bytes(), "dev-user", &["*"], &["*"], Duration::from_secs(24 * 3600)).unwrap_or_default()
}

fn print_dev_banner(addr: &str, token: &str, config: &Config) {
    let host = addr.replace("0.0.0.0", "localhost").replace("[::]", "localhost");
    let key = config.api_keys.first().map(String::as_str).unwrap_or_default();
    let reach = if config.listen.ip().is_loopback() {
        "  Listening on this machine only (loopback); `--listen 0.0.0.0:8080` opens it to the network.\n"
    } else {
        "  Listening on the network as --listen asked: anyone who reaches it gets the token below.\n"
    };
    say(&format!(
        "\n  crier --dev: single node, memory broker, any Origin allowed. Not for production.\n{reach}\n  \
         demo page:   http://{host}/\n  \
         token (24h): {token}\n  \
         connect:     ws://{host}/ws   (Authorization: Bearer <token>, or subprotocols crier.v1, crier.bearer.<token>)\n  \
         publish:     curl -s -X POST http://{host}/api/v1/publish -H 'Authorization: Bearer {key}' \
         -H 'Content-Type: application/json' -d '{{\"channel\":\"chat:lobby\",\"data\":{{\"text\":\"hello\"}}}}'\n"
    ));
}

const TOKEN_USAGE: &str = "\
Usage: crier token --sub USER [--channels P,..] [--publish P,..] [--subs C,..] [--ttl 1h]
                   [--jwt-private-key-file FILE] [--kid KID] [SETTINGS]

Prints a client token signed with the configured key, for development and scripts:
  --sub USER                  the user (`sub` claim), required
  --channels P,..             channel patterns the user may subscribe to (`channels` claim)
  --publish P,..              channel patterns the user may publish to (`publish` claim)
  --subs C,..                 channels subscribed at connect (`subs` claim)
  --ttl DURATION              lifetime (`exp` - `iat`), default 1h
  --jwt-private-key-file FILE PEM private key (RSA, EC, Ed25519) when the node verifies with
                              a public key or JWKS; the HS* secret is the node's own setting
  --kid KID                   the `kid` header (a key of a JWKS)
SETTINGS are the node's own (--jwt-secret, --jwt-algorithms, --jwt-issuer, --jwt-audience,
--config FILE, CRIER_* variables): the token is what this node's configuration accepts.";

/// `crier token ...`: mints a token from the node's settings (see [`TOKEN_USAGE`]).
fn token_command(args: &[std::ffi::OsString], env: &HashMap<String, String>) -> ExitCode {
    let mut req = auth::TokenRequest { ttl: Duration::from_secs(3600), ..Default::default() };
    let mut private_key: Option<std::path::PathBuf> = None;
    let mut rest: Vec<std::ffi::OsString> = vec![args[0].clone()];
    let list = |v: &str| v.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect();
    let mut it = args[2..].iter();
    while let Some(arg) = it.next() {
        let text = arg.to_string_lossy();
        let (flag, inline) = match text.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
            _ => (text.clone().into_owned(), None),
        };
        const OURS: &[&str] =
            &["--sub", "--channels", "--publish", "--subs", "--ttl", "--jwt-private-key-file", "--kid"];
        if flag == "--help" || flag == "-h" {
            say(TOKEN_USAGE);
            return ExitCode::SUCCESS;
        }
        if !OURS.contains(&flag.as_str()) {
            rest.push(arg.clone());
            continue;
        }
        let Some(value) = inline.or_else(|| it.next().map(|v| v.to_string_lossy().into_owned())) else {
            complain(&format!("crier token: {flag} needs a value\n\n{TOKEN_USAGE}"));
            return ExitCode::from(64);
        };
        match flag.as_str() {
            "--sub" => req.sub = value,
            "--channels" => req.channels = list(&value),
            "--publish" => req.publish = list(&value),
            "--subs" => req.subs = Some(list(&value)),
            "--ttl" => match humantime::parse_duration(value.trim()) {
                Ok(d) if !d.is_zero() => req.ttl = d,
                _ => {
                    complain(&format!("crier token: --ttl {value}: expected a duration like 1h, 30m or 90s"));
                    return ExitCode::from(64);
                }
            },
            "--jwt-private-key-file" => private_key = Some(value.into()),
            _ => req.kid = Some(value),
        }
    }
    let config = match config::load(rest, env) {
        Ok(c) => c,
        Err(ConfigError::Help(_)) => {
            say(TOKEN_USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            complain(&format!("crier token: invalid configuration:\n{e}"));
            return ExitCode::from(64);
        }
    };
    req.issuer = config.jwt.issuer.clone();
    req.audience = config.jwt.audience.clone();
    let pem;
    let key = match (&private_key, &config.jwt.key) {
        (Some(path), _) => match std::fs::read(path) {
            Ok(bytes) => {
                pem = bytes;
                auth::SigningKey::PrivatePem(&pem)
            }
            Err(e) => {
                complain(&format!("crier token: cannot read {}: {e}", path.display()));
                return ExitCode::from(64);
            }
        },
        (None, Some(KeySource::Secret(secret))) => auth::SigningKey::Secret(secret.as_bytes()),
        (None, Some(_)) => {
            complain(
                "crier token: this configuration verifies tokens with a public key or a JWKS; \
                 pass the matching private key with --jwt-private-key-file",
            );
            return ExitCode::from(64);
        }
        (None, None) => {
            complain(
                "crier token: no key to sign with: set --jwt-secret (or CRIER_JWT_SECRET, or jwt_secret in --config), or pass --jwt-private-key-file",
            );
            return ExitCode::from(64);
        }
    };
    match auth::mint(&key, &config.jwt.algorithms, &req) {
        Ok(token) => {
            say(&token);
            ExitCode::SUCCESS
        }
        Err(e) => {
            complain(&format!("crier token: {e}"));
            ExitCode::from(64)
        }
    }
}

/// Prints a line to stdout; a closed or broken stdout (a pipe whose reader left) is not an
/// error worth dying for.
fn say(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}").and_then(|()| out.flush());
}

/// Prints a line to stderr, ignoring a broken stderr.
fn complain(text: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=warn"));
    // Colour only for a person at a terminal: logs piped to a file, journald or a collector
    // get plain text (and NO_COLOR, https://no-color.org, turns it off everywhere).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr()) && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received");
}
