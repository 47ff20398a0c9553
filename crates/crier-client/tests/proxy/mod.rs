//! A WebSocket proxy between the client and a real crier node, for what crier itself never does:
//! it can rewind the `recover` offset of the client's subscribes (so the real server replays
//! messages the client already delivered), close the client's connections with any code (1008,
//! which crier never sends, or 1012), and it records the offsets of the `message` frames it
//! forwards, per connection.

// The handshake callback's error type is tungstenite's, not ours.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::result_large_err)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

pub struct Proxy {
    pub addr: SocketAddr,
    /// Subtracted from the `recover.offset` of every subscribe passing through.
    pub rewind: Arc<AtomicU64>,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Offsets of the `message` frames forwarded to the client, per connection (in accept order).
    pub forwarded: Arc<Mutex<Vec<Vec<u64>>>>,
    /// The `type` of every frame the client sent, per connection.
    pub sent: Arc<Mutex<Vec<Vec<String>>>>,
    /// The connection (accept index) whose server → client frames are dropped: a connection
    /// that looks alive to TCP but never answers.
    pub mute: Arc<AtomicUsize>,
    close: broadcast::Sender<u16>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let rewind = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let forwarded: Arc<Mutex<Vec<Vec<u64>>>> = Default::default();
        let sent: Arc<Mutex<Vec<Vec<String>>>> = Default::default();
        let mute = Arc::new(AtomicUsize::new(usize::MAX));
        let (close, _) = broadcast::channel(16);
        let (r, a, f, c) = (rewind.clone(), accepted.clone(), forwarded.clone(), close.clone());
        let (s, m) = (sent.clone(), mute.clone());
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let index = a.fetch_add(1, Ordering::SeqCst);
                f.lock().unwrap().push(Vec::new());
                s.lock().unwrap().push(Vec::new());
                let conn = Conn {
                    upstream: upstream.clone(),
                    rewind: r.clone(),
                    forwarded: f.clone(),
                    sent: s.clone(),
                    mute: m.clone(),
                    index,
                };
                tokio::spawn(conn.run(tcp, c.subscribe()));
            }
        });
        Proxy { addr, rewind, accepted, forwarded, sent, mute, close, task }
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Closes every connection open now with `code`.
    pub fn close_all(&self, code: u16) {
        let _ = self.close.send(code);
    }

    pub fn sent(&self, connection: usize) -> Vec<String> {
        self.sent.lock().unwrap().get(connection).cloned().unwrap_or_default()
    }

    pub fn forwarded(&self, connection: usize) -> Vec<u64> {
        self.forwarded.lock().unwrap().get(connection).cloned().unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Conn {
    upstream: String,
    rewind: Arc<AtomicU64>,
    forwarded: Arc<Mutex<Vec<Vec<u64>>>>,
    sent: Arc<Mutex<Vec<Vec<String>>>>,
    mute: Arc<AtomicUsize>,
    index: usize,
}

impl Conn {
    async fn run(self, tcp: tokio::net::TcpStream, mut close: broadcast::Receiver<u16>) {
        let auth: Arc<Mutex<Option<HeaderValue>>> = Default::default();
        let auth2 = auth.clone();
        let callback = move |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            *auth2.lock().unwrap() = req.headers().get("authorization").cloned();
            Ok(resp)
        };
        let Ok(client) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else { return };
        let mut req = self.upstream.as_str().into_client_request().expect("upstream url");
        if let Some(v) = auth.lock().unwrap().take() {
            req.headers_mut().insert("authorization", v);
        }
        let Ok((server, _)) = tokio_tungstenite::connect_async(req).await else { return };
        let (mut to_client, mut from_client) = client.split();
        let (mut to_server, mut from_server) = server.split();
        loop {
            tokio::select! {
                m = from_client.next() => match m {
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                            let kind = v["type"].as_str().unwrap_or_default().to_owned();
                            self.sent.lock().unwrap()[self.index].push(kind);
                        }
                        let text = self.rewrite(t.as_str());
                        if to_server.send(Message::text(text)).await.is_err() { return }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                m = from_server.next() => match m {
                    Some(Ok(Message::Text(_))) if self.mute.load(Ordering::SeqCst) == self.index => {}
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(v) = serde_json::from_str::<Value>(t.as_str())
                            && v["type"] == "message"
                            && let Some(o) = v["offset"].as_u64()
                        {
                            self.forwarded.lock().unwrap()[self.index].push(o);
                        }
                        if to_client.send(Message::Text(t)).await.is_err() { return }
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let _ = to_client.send(Message::Close(frame)).await;
                        return;
                    }
                    Some(Err(_)) | None => return,
                    Some(Ok(_)) => {}
                },
                code = close.recv() => {
                    if let Ok(code) = code {
                        let frame = CloseFrame { code: code.into(), reason: "closed by the test proxy".into() };
                        let _ = to_client.send(Message::Close(Some(frame))).await;
                        // Let the client's close reply arrive before the socket goes.
                        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                            while let Some(Ok(_)) = from_client.next().await {}
                        }).await;
                    }
                    return;
                }
            }
        }
    }

    fn rewrite(&self, text: &str) -> String {
        let Ok(mut v) = serde_json::from_str::<Value>(text) else { return text.to_owned() };
        let rewind = self.rewind.load(Ordering::SeqCst);
        if v["type"] == "subscribe"
            && rewind > 0
            && let Some(o) = v["recover"]["offset"].as_u64()
        {
            v["recover"]["offset"] = Value::from(o.saturating_sub(rewind));
            return v.to_string();
        }
        text.to_owned()
    }
}
