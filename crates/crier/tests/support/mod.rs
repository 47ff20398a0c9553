//! Test harness: runs the real `crier` binary on a free port and talks to it over real sockets.
//!
//! - [`Server::start`] spawns the binary with `--listen 127.0.0.1:0` and reads the port from
//!   its first stdout line; stderr (the logs) is captured for assertions; the process is killed
//!   on drop.
//! - [`Client`] is a WebSocket client (tokio-tungstenite) with deadline-bounded receives.
//! - Everything waits by polling with a deadline, never by sleeping a fixed time.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    /// One pooled HTTP client per node (keep-alive: no connection per request).
    pub http: reqwest::Client,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
}

impl Server {
    /// Starts a node with test defaults (HS256 secret, an API key, fast drain) plus `extra` args.
    pub async fn start(extra: &[&str]) -> Server {
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
        Server::start_raw(&args, &[]).await.expect("server starts")
    }

    /// Starts the binary with exactly these args and env; `Err(output)` if it exits first.
    pub async fn start_raw(args: &[&str], env: &[(&str, &str)]) -> Result<Server, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, _) in std::env::vars() {
            if k.starts_with("CRIER_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let stdout = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let stdout2 = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("crier listening on http://") {
                    let _ = tx.send(addr.to_owned());
                }
                stdout2.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let err = child.stderr.take().expect("stderr");
        let stderr2 = stderr.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(err);
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                stderr2.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(WAIT)).await.map_err(|e| e.to_string())?;
        match addr {
            Ok(a) => Ok(Server {
                child,
                addr: a.parse().map_err(|e| format!("{e}"))?,
                http: reqwest::Client::new(),
                stderr,
                stdout,
            }),
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().map_err(|e| e.to_string())?;
                Err(format!(
                    "exited {status:?} without listening\nstdout:\n{}\nstderr:\n{}",
                    stdout.lock().unwrap(),
                    stderr.lock().unwrap()
                ))
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn logs(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn stdout(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status();
    }

    /// Waits (bounded) for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if tokio::time::Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let v = self.metric(series).await;
            if v >= min {
                return v;
            }
            assert!(tokio::time::Instant::now() < deadline, "metric {series} stayed at {v}, wanted >= {min}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(series))
        .filter_map(|rest| rest.strip_prefix(' '))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

pub fn token_for(sub: &str, channels: &[&str], publish: &[&str], ttl: Duration) -> String {
    crier::auth::mint_hs256(SECRET.as_bytes(), sub, channels, publish, ttl).expect("mint")
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

    /// Skips frames until one of type `ty` arrives.
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
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
            loop {
                let m = self.recv().await;
                if m["type"] != "message" {
                    continue;
                }
                offsets.push(m["offset"].as_u64().expect("offset"));
                if m["data"] == "last" {
                    return offsets;
                }
            }
        })
    }

    /// Subscribes with recovery from `epoch`/`offset`; returns the reply (the ack, or an error).
    pub async fn resubscribe(&mut self, channel: &str, epoch: &str, offset: u64, id: u64) -> Value {
        self.request(json!({"type":"subscribe","channel":channel,"recover":{"epoch":epoch,"offset":offset}}), id).await
    }

    /// Waits for the close frame; returns its code (None if the connection just ended).
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Some(Message::Close(Some(CloseFrame { code, .. }))) => return Some(code.into()),
                Some(Message::Close(None)) | None => return None,
                Some(_) => continue,
            }
        }
    }
}
