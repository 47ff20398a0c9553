//! Test harness: runs the real `crier` binary on a free port and talks to it over real sockets.
//!
//! - [`Server::start`] spawns the binary (a [`crier_testkit::process::Process`]) with
//!   `--listen 127.0.0.1:0` and reads the port from its first stdout line; stderr (the logs) is
//!   captured for assertions; the process is killed on drop.
//! - [`Client`] is a WebSocket client (tokio-tungstenite) with deadline-bounded receives.
//! - Everything waits by polling with a deadline ([`crier_testkit::wait`]), never by sleeping a
//!   fixed time.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crier_testkit::poll;
use crier_testkit::process::Process;
pub use crier_testkit::process::metric_value;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, Request};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SECRET: &str = "test-secret-test-secret-test-secret-0123456789";
pub const API_KEY: &str = "test-api-key";
/// How long any single wait may take before the test fails.
pub use crier_testkit::WAIT;

/// A TOML config file of its own for each test (a unique temp path; removed on drop).
pub struct ConfigFile(pub std::path::PathBuf);

impl ConfigFile {
    pub fn new(contents: &str) -> ConfigFile {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "crier-test-{}-{}.toml",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        ConfigFile(path)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub struct Server {
    /// The `crier` process: its captured stdout and stderr (the logs), SIGTERM, exit.
    pub process: Process,
    pub addr: SocketAddr,
    /// One pooled HTTP client per node (keep-alive: no connection per request).
    pub http: reqwest::Client,
}

impl Server {
    /// Starts a node with test defaults (HS256 secret, an API key, fast drain) plus `extra` args.
    pub async fn start(extra: &[&str]) -> Server {
        Server::try_start(extra).await.expect("server starts")
    }

    /// [`Server::start`] for a start that may fail: the output of a node that exited (or
    /// never said it listens), instead of a panic.
    pub async fn try_start(extra: &[&str]) -> Result<Server, String> {
        let mut args = vec![
            "--listen",
            "127.0.0.1:0",
            "--jwt-secret",
            SECRET,
            "--api-keys",
            API_KEY,
            "--node-id",
            "test-node",
            "--shutdown-drain",
            "500ms",
        ];
        args.extend_from_slice(extra);
        Server::start_raw(&args, &[]).await
    }

    /// Starts the binary with exactly these args and env; `Err(output)` if it exits first.
    pub async fn start_raw(args: &[&str], env: &[(&str, &str)]) -> Result<Server, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
        cmd.args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("CRIER_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (process, addr) = Process::start(cmd, "crier listening on http://", WAIT).await?;
        let addr = addr.parse().map_err(|e| format!("{e}: {addr:?}"))?;
        Ok(Server { process, addr, http: reqwest::Client::new() })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn logs(&self) -> String {
        self.process.logs()
    }

    pub fn stdout(&self) -> String {
        self.process.stdout()
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        self.process.sigterm();
    }

    /// Waits (bounded: fails the test after [`WAIT`]) for the process to exit; its exit code,
    /// `None` when a signal ended it.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        self.process.wait_exit().await
    }

    /// A token for `sub`, valid for an hour.
    pub fn token(&self, sub: &str, channels: &[&str], publish: &[&str]) -> String {
        token_for(sub, channels, publish, Duration::from_secs(3600))
    }

    /// Connects with a token in the Authorization header; asserts the welcome frame.
    pub async fn client(&self, token: &str) -> Client {
        let mut req = self.ws_url().into_client_request().unwrap();
        req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        let mut c = Client::connect(req).await.expect("websocket connects");
        let w = c.recv().await;
        assert_eq!(w["type"], "welcome", "the first frame is welcome: {w}");
        c
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).bearer_auth(API_KEY).send().await.expect("GET")
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(self.url(path)).bearer_auth(API_KEY).json(&body).send().await.expect("POST")
    }

    /// REST publish; returns the JSON answer (asserting 200).
    pub async fn publish(&self, channel: &str, data: Value) -> Value {
        let r = self.post("/api/v1/publish", json!({"channel": channel, "data": data})).await;
        assert_eq!(r.status(), 200, "publish answered {}", r.status());
        r.json().await.unwrap()
    }

    pub async fn metrics(&self) -> String {
        self.http.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// The value of a metric line (`name{labels}` exactly as rendered), or 0.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// Polls `/metrics` until `series` reaches at least `min`.
    pub async fn wait_metric(&self, series: &str, min: f64) -> f64 {
        poll(format!("metric {series} >= {min}"), async || {
            let v = self.metric(series).await;
            if v >= min { Ok(v) } else { Err(format!("{series} stayed at {v}")) }
        })
        .await
    }
}

pub fn token_for(sub: &str, channels: &[&str], publish: &[&str], ttl: Duration) -> String {
    crier::auth::mint_hs256(SECRET.as_bytes(), sub, channels, publish, ttl).expect("mint")
}

/// Attempts a handshake that must be refused; returns (status, JSON body), the body asserted to
/// carry a `message`.
pub async fn rejected(server: &Server, path_and_query: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let mut req = format!("ws://{}{}", server.addr, path_and_query).into_client_request().unwrap();
    for (k, v) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut().insert(name, HeaderValue::from_str(v).unwrap());
    }
    match Client::connect(req).await {
        Ok(_) => panic!("handshake unexpectedly succeeded"),
        Err(WsError::Http(resp)) => {
            let status = resp.status().as_u16();
            let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).expect("JSON body");
            assert!(body["message"].is_string(), "the body has a message: {body}");
            (status, body)
        }
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// A WebSocket client with deadline-bounded receives.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub response_protocol: Option<String>,
    /// Frames received while [`Client::request`] waited for its reply; [`Client::recv`] returns
    /// them first, in order.
    pending: std::collections::VecDeque<Value>,
}

impl Client {
    pub async fn connect(req: Request<()>) -> Result<Client, WsError> {
        let (ws, resp) = tokio_tungstenite::connect_async(req).await?;
        let response_protocol =
            resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Ok(Client { ws, response_protocol, pending: Default::default() })
    }

    pub async fn send(&mut self, v: Value) {
        self.ws.send(Message::text(v.to_string())).await.expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// The next text frame as JSON (fails the test after [`WAIT`]).
    pub async fn recv(&mut self) -> Value {
        if let Some(v) = self.pending.pop_front() {
            return v;
        }
        self.recv_wire().await
    }

    async fn recv_wire(&mut self) -> Value {
        match self.next().await {
            Some(Message::Text(t)) => serde_json::from_str(t.as_str()).expect("frame is JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next data or close message, skipping pings/pongs; `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Message> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next()).await.expect("frame within the deadline");
            match m {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return Some(m),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Skips frames until one of type `ty` arrives (fails the test after [`WAIT`], even while
    /// other frames keep coming).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let mut skipped = std::collections::BTreeMap::<String, usize>::new();
        let found = tokio::time::timeout(WAIT, async {
            loop {
                let v = self.recv().await;
                if v["type"] == ty {
                    return v;
                }
                *skipped.entry(v["type"].to_string()).or_default() += 1;
            }
        })
        .await;
        found.unwrap_or_else(|_| panic!("no {ty:?} frame within {WAIT:?}; skipped (type: count) {skipped:?}"))
    }

    /// Sends a frame and returns the reply with the same id.
    pub async fn request(&mut self, mut v: Value, id: u64) -> Value {
        v["id"] = json!(id);
        self.send(v).await;
        loop {
            let r = self.recv_wire().await;
            if r["id"] == json!(id) {
                return r;
            }
            self.pending.push_back(r);
        }
    }

    pub async fn subscribe(&mut self, channel: &str, id: u64) -> Value {
        let ack = self.request(json!({"type":"subscribe","channel":channel}), id).await;
        assert_eq!(ack["type"], "ack", "subscribe {channel}: {ack}");
        ack
    }

    /// Reads on in a task: every `message` offset, until the message whose `data` is `"last"`.
    pub fn offsets_until_last(mut self) -> tokio::task::JoinHandle<Vec<u64>> {
        tokio::spawn(async move {
            let mut offsets = Vec::new();
            let all = async {
                loop {
                    let m = self.recv().await;
                    if m["type"] != "message" {
                        continue;
                    }
                    offsets.push(m["offset"].as_u64().expect("offset"));
                    if m["data"] == "last" {
                        return;
                    }
                }
            };
            // Bounded overall, not only per frame: a stream that never says "last" fails.
            if tokio::time::timeout(4 * WAIT, all).await.is_err() {
                panic!("no \"last\" message within {:?}", 4 * WAIT);
            }
            offsets
        })
    }

    /// Subscribes with recovery from `epoch`/`offset`; returns the reply (the ack, or an error).
    pub async fn resubscribe(&mut self, channel: &str, epoch: &str, offset: u64, id: u64) -> Value {
        self.request(json!({"type":"subscribe","channel":channel,"recover":{"epoch":epoch,"offset":offset}}), id).await
    }

    /// Waits for the close frame; returns its code (None if the connection just ended).
    pub async fn closed(&mut self) -> Option<u16> {
        let close = async {
            loop {
                match self.next().await {
                    Some(Message::Close(Some(CloseFrame { code, .. }))) => return Some(code.into()),
                    Some(Message::Close(None)) | None => return None,
                    Some(_) => continue,
                }
            }
        };
        // Bounded overall, not only per frame: a connection that keeps sending never closes.
        tokio::time::timeout(WAIT, close).await.unwrap_or_else(|_| panic!("no close within {WAIT:?}"))
    }
}

/// Collects `n` message frames from a client (skipping other frames).
#[allow(dead_code)]
pub async fn messages(c: &mut Client, n: usize) -> Vec<serde_json::Value> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let m = c.recv().await;
        if m["type"] == "message" {
            out.push(m);
        }
    }
    out
}

/// Every node gets a subscriber of `channel`, then each node publishes `per_node[i]` messages
/// through its REST API concurrently with the others: every publish must get its own offset
/// (1..=total, contiguous) and every subscriber all of them once, in offset order, in one order
/// across the nodes. Returns the subscribers.
#[allow(dead_code)]
pub async fn concurrent_publishes_in_one_order(nodes: &[Server], channel: &str, per_node: &[u64]) -> Vec<Client> {
    use serde_json::{Value, json};
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut c = n.client(&n.token(&format!("u{i}"), &["chat:*"], &[])).await;
        c.subscribe(channel, 1).await;
        clients.push(c);
    }
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let url = n.url("/api/v1/publish");
        let (channel, count) = (channel.to_owned(), per_node[i]);
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut offsets = Vec::new();
            for k in 0..count {
                let r = http
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .json(&json!({"channel":channel,"data":{"from":i,"k":k}}))
                    .send()
                    .await
                    .expect("the publish is answered");
                assert_eq!(r.status(), 200);
                offsets.push(r.json::<Value>().await.expect("a JSON answer")["offset"].as_u64().expect("an offset"));
            }
            offsets
        }));
    }
    let total: u64 = per_node.iter().sum();
    let mut acked = std::collections::HashSet::new();
    for t in tasks {
        acked.extend(t.await.expect("the publisher task"));
    }
    assert_eq!(acked, (1..=total).collect(), "every publish got its own offset, contiguous");
    let mut orders = Vec::new();
    for c in &mut clients {
        let got = messages(c, total as usize).await;
        let offsets: Vec<u64> = got.iter().map(|m| m["offset"].as_u64().expect("an offset")).collect();
        assert_eq!(offsets, (1..=total).collect::<Vec<_>>(), "no gap, no duplicate, in offset order");
        orders.push(got.iter().map(|m| m["data"].clone()).collect::<Vec<_>>());
    }
    assert!(orders.windows(2).all(|w| w[0] == w[1]), "every node delivered the same order");
    clients
}
