//! Test harness: the real `crier` binary (and a real `redis-server`) on free loopback ports.
//!
//! The binary is [`crier_bin`] (crier-testkit's: the one next to this test's executable when it
//! is fresh, else built by cargo for the same profile; `CRIER_BIN` overrides).
//!
//! Everything waits by polling with a deadline; processes are killed by PID on drop.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use crier_testkit::bin::crier_bin;
use serde_json::{Value, json};

pub const SECRET: &str = "client-test-secret-client-test-secret-0123456789";
pub const API_KEY: &str = "client-test-api-key";
/// How long any single wait may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn free_port() -> u16 {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0);
        if port != 0 && port != 6379 {
            return port;
        }
    }
    panic!("no free port");
}

/// A `redis-server` on a free port, killed on drop.
pub struct Redis {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("crier-client-test-{}-{port}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e}); install it: apt-get install -y redis-server"));
        let redis = Redis { child, port, dir };
        let deadline = Instant::now() + WAIT;
        loop {
            if redis.ping() {
                return redis;
            }
            assert!(Instant::now() < deadline, "redis-server on port {port} did not answer PING");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping(&self) -> bool {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 16];
        s.write_all(b"PING\r\n").is_ok() && s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `crier` node; killed on drop.
pub struct Node {
    child: Option<Child>,
    pub addr: SocketAddr,
    args: Vec<String>,
    stderr: Arc<Mutex<String>>,
    pub http: reqwest::Client,
}

impl Node {
    /// A memory-broker node with test defaults plus `extra` flags.
    pub fn start(extra: &[&str]) -> Node {
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
        let mut node = Node {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            args,
            stderr: Default::default(),
            http: reqwest::Client::new(),
        };
        node.launch("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
        node
    }

    /// A node on the Redis broker.
    pub fn with_redis(redis: &Redis, name: &str, extra: &[&str]) -> Node {
        let url = redis.url();
        let mut args = vec!["--redis-url", url.as_str(), "--node-id", name];
        args.extend_from_slice(extra);
        Node::start(&args)
    }

    fn launch(&mut self, listen: &str) -> Result<(), String> {
        let mut cmd = Command::new(crier_bin());
        cmd.args(&self.args).args(["--listen", listen]);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("CRIER_") {
                cmd.env_remove(k);
            }
        }
        let mut child = cmd.spawn().expect("spawn crier");
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("crier listening on http://") {
                    let _ = tx.send(addr.to_owned());
                }
            }
        });
        let err = child.stderr.take().expect("stderr");
        let stderr = self.stderr.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        match rx.recv_timeout(WAIT) {
            Ok(a) => self.addr = a.parse().expect("listen address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("crier did not start listening: {}", self.stderr.lock().unwrap()));
            }
        }
        self.child = Some(child);
        Ok(())
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// SIGKILL: no close frames, no goodbye.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the node again on the same port (after [`Node::kill`]). Binding is retried until
    /// the deadline: the kernel may hold the port for a moment.
    pub fn restart(&mut self) {
        self.kill();
        let listen = self.addr.to_string();
        let deadline = Instant::now() + WAIT;
        while let Err(e) = self.launch(&listen) {
            assert!(Instant::now() < deadline, "restart on {listen}: {e}");
            std::thread::sleep(Duration::from_millis(50));
        }
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
        text.lines()
            .filter_map(|l| l.strip_prefix(series))
            .filter_map(|rest| rest.strip_prefix(' '))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .next()
            .unwrap_or(0.0)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
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

/// Polls `check` until it holds, failing the test after [`WAIT`].
pub async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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
