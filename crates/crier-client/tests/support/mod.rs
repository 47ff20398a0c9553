//! Test harness: the real `crier` binary (and a real `redis-server`) on free loopback ports.
//!
//! The binary is [`crier_bin`] (crier-testkit's: the one next to this test's executable when it
//! is fresh, else built by cargo for the same profile; `CRIER_BIN` overrides).
//!
//! Free ports, redis-server, output capture and waits are crier-testkit's; processes are killed
//! on drop.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use crier_testkit::bin::crier_bin;
use crier_testkit::process::Process;
use serde_json::{Value, json};

pub const SECRET: &str = "client-test-secret-client-test-secret-0123456789";
pub const API_KEY: &str = "client-test-api-key";
/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

/// A `redis-server` on a free port, killed on drop (crier-testkit's).
pub use crier_testkit::redis::RedisServer as Redis;
/// A free TCP port on 127.0.0.1 (crier-testkit's).
pub use crier_testkit::redis::free_port;

/// A running `crier` node (crier-testkit's [`Process`]: output captured, killed on drop).
pub struct Node {
    process: Option<Process>,
    pub addr: SocketAddr,
    args: Vec<String>,
    pub http: reqwest::Client,
}

impl Node {
    /// A memory-broker node with test defaults plus `extra` flags.
    pub async fn start(extra: &[&str]) -> Node {
        let mut args: Vec<String> = [
            "--jwt-secret",
            SECRET,
            "--api-keys",
            API_KEY,
            "--node-id",
            "client-test",
            "--shutdown-drain",
            "200ms",
            "--history-size",
            "10000",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut node =
            Node { process: None, addr: SocketAddr::from(([127, 0, 0, 1], 0)), args, http: reqwest::Client::new() };
        node.launch("127.0.0.1:0").await.unwrap();
        node
    }

    /// A node on the Redis broker.
    pub async fn with_redis(redis: &Redis, name: &str, extra: &[&str]) -> Node {
        let url = redis.url();
        let mut args = vec!["--redis-url", url.as_str(), "--node-id", name];
        args.extend_from_slice(extra);
        Node::start(&args).await
    }

    async fn launch(&mut self, listen: &str) -> Result<(), String> {
        let mut cmd = Command::new(crier_bin());
        cmd.args(&self.args).args(["--listen", listen]);
        for (k, _) in std::env::vars() {
            if k.starts_with("CRIER_") {
                cmd.env_remove(k);
            }
        }
        let (process, addr) = Process::start(cmd, "crier listening on http://", WAIT).await?;
        self.addr = addr.trim().parse().map_err(|e| format!("listen address {addr:?}: {e}"))?;
        self.process = Some(process);
        Ok(())
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        self.process.as_ref().map(Process::logs).unwrap_or_default()
    }

    /// SIGKILL: no close frames, no goodbye.
    pub fn kill(&mut self) {
        self.process = None;
    }

    /// Starts the node again on the same port (after [`Node::kill`]). Binding is retried until
    /// the deadline: the kernel may hold the port for a moment.
    pub async fn restart(&mut self) {
        self.kill();
        let listen = self.addr.to_string();
        let mut args = Vec::new();
        std::mem::swap(&mut args, &mut self.args);
        let mut node = Node { process: None, addr: self.addr, args, http: self.http.clone() };
        crier_testkit::poll_within(format!("a restart on {listen}"), WAIT, async || node.launch(&listen).await).await;
        *self = node;
    }

    pub async fn publish(&self, channel: &str, data: Value) -> reqwest::Response {
        self.http
            .post(self.url("/api/v1/publish"))
            .bearer_auth(API_KEY)
            .json(&json!({"channel": channel, "data": data}))
            .send()
            .await
            .expect("POST /api/v1/publish")
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(self.url(path)).bearer_auth(API_KEY).json(&body).send().await.expect("POST")
    }

    /// A metric's value (`name{labels}` exactly as rendered), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.http.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
        crier_testkit::process::metric_value(&text, series)
    }
}

/// An HS256 token for `sub`, expiring `ttl` from now.
pub fn token(sub: &str, channels: &[&str], publish: &[&str], ttl: Duration) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"sub": sub, "iat": now, "exp": now + ttl.as_secs(), "channels": channels, "publish": publish});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("mint")
}

/// Polls `check` until it holds, failing the test after [`WAIT`] (crier-testkit's wait).
pub async fn until(what: &str, check: impl AsyncFnMut() -> bool) {
    crier_testkit::until_within(what, WAIT, check).await
}

/// The next event of a subscription, failing the test after [`WAIT`].
pub async fn next_event(sub: &mut crier_client::Subscription) -> crier_client::Event {
    tokio::time::timeout(WAIT, sub.next()).await.expect("an event within the deadline").expect("subscription open")
}

/// Waits for the subscription's next `Subscribed` event (skipping nothing else: anything else
/// before it fails the test).
pub async fn subscribed(sub: &mut crier_client::Subscription) -> (String, u64, Option<bool>) {
    match next_event(sub).await {
        crier_client::Event::Subscribed { epoch, offset, recovered } => (epoch, offset, recovered),
        other => panic!("expected Subscribed, got {other:?}"),
    }
}
