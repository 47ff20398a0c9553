//! The node's own subscriber connection for the live subjects: one TCP connection speaking the
//! NATS client protocol (`CONNECT`, `SUB`/`UNSUB`, `MSG`/`HMSG`, `PING`/`PONG`), dispatching
//! messages by subscription id to each channel's sink, inline in its read loop (the node's one
//! dispatcher: no task and no queue per channel) — as the Redis broker owns its pub/sub
//! connection. It exists for memory: the async-nats client gives every subscription its own
//! queue whose first block (32 messages) is allocated at once, ~6 KiB per subscribed channel.
//!
//! Used for plain `nats://` servers without credentials or with a token; with TLS, a `.creds`
//! file, an nkey or a user in the URL the broker subscribes through async-nats instead.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;

use crate::history::RawHeaders;

/// A message of a live subject: its header block and payload (slices of one buffer).
pub(crate) type Live = (Option<RawHeaders>, Bytes);

/// Where a subscription's messages go: called inline by the connection's read loop (the
/// node's one dispatcher), in the order the server sent them.
pub(crate) trait Sink: Send + Sync {
    fn push(self: Arc<Self>, m: Live);
    /// The subject it subscribes (asked again when the connection is re-established; `None`:
    /// no longer wanted).
    fn subject(&self) -> Option<String>;
}

/// The subscriber connection.
pub(crate) struct RawSub {
    writer: tokio::sync::Mutex<Option<OwnedWriteHalf>>,
    /// Waiters for the server's `PONG`s, in the order their `PING`s were written.
    pongs: Mutex<VecDeque<tokio::sync::oneshot::Sender<()>>>,
    /// Subscription id → where its messages go (the subject is asked of the sink when needed).
    subs: Mutex<HashMap<u64, Arc<dyn Sink>>>,
    next_sid: AtomicU64,
}

/// `host:port` of a `nats://` URL this connection can serve (no user in it), else `None`.
pub(crate) fn plain_addr(url: &str) -> Option<String> {
    let rest = url.strip_prefix("nats://")?;
    let rest = rest.trim_end_matches('/');
    (!rest.contains('@') && !rest.is_empty()).then(|| rest.to_owned())
}

impl RawSub {
    /// Starts the connection task (it connects, and reconnects with backoff, on its own);
    /// `on_reconnect` runs after every (re)connection once the subscriptions are re-established.
    pub(crate) fn start(
        addrs: Vec<String>,
        token: Option<String>,
        name: String,
        on_reconnect: impl Fn() + Send + Sync + 'static,
    ) -> Arc<RawSub> {
        let me = Arc::new(RawSub {
            writer: tokio::sync::Mutex::new(None),
            pongs: Mutex::new(VecDeque::new()),
            subs: Mutex::new(HashMap::new()),
            next_sid: AtomicU64::new(1),
        });
        tokio::spawn(conn_loop(Arc::downgrade(&me), addrs, token, name, on_reconnect));
        me
    }

    /// Subscribes `subject`; its messages go to `sink`. Returns the subscription id once the
    /// server has the subscription (a `PING` after the `SUB` was answered), or after 2 s.
    pub(crate) async fn subscribe(&self, subject: &str, sink: Arc<dyn Sink>) -> u64 {
        let sid = self.next_sid.fetch_add(1, Ordering::Relaxed);
        self.subs.lock().unwrap_or_else(|e| e.into_inner()).insert(sid, sink);
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            // Not connected: the connection task sends it (and every channel resyncs) once up.
            let mut w = self.writer.lock().await;
            if let Some(wr) = w.as_mut() {
                self.pongs.lock().unwrap_or_else(|e| e.into_inner()).push_back(tx);
                if wr.write_all(format!("SUB {subject} {sid}\r\nPING\r\n").as_bytes()).await.is_err() {
                    // The read side notices and reconnects; the subscription is re-sent then.
                    *w = None;
                }
            } else {
                drop(tx);
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
        sid
    }

    /// Whether the connection is up (subscriptions take effect at once).
    pub(crate) async fn connected(&self) -> bool {
        self.writer.lock().await.is_some()
    }

    /// Waits (at most `within`) for the connection to be up.
    pub(crate) async fn wait_connected(&self, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        while !self.connected().await && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(crate) async fn unsubscribe(&self, sid: u64) {
        self.subs.lock().unwrap_or_else(|e| e.into_inner()).remove(&sid);
        let mut w = self.writer.lock().await;
        if let Some(wr) = w.as_mut()
            && wr.write_all(format!("UNSUB {sid}\r\n").as_bytes()).await.is_err()
        {
            *w = None;
        }
    }
}

async fn conn_loop(
    me: Weak<RawSub>,
    addrs: Vec<String>,
    token: Option<String>,
    name: String,
    on_reconnect: impl Fn() + Send + Sync + 'static,
) {
    let mut failures = 0u32;
    loop {
        for addr in &addrs {
            let Some(sub) = me.upgrade() else { return };
            match connect(addr, token.as_deref(), &name).await {
                Ok((reader, mut writer)) => {
                    failures = 0;
                    // Every subscription again (under the writer's lock: a subscribe meanwhile
                    // waits, then sends its own), then the channels re-read what they missed.
                    let mut w = sub.writer.lock().await;
                    sub.pongs.lock().unwrap_or_else(|e| e.into_inner()).clear();
                    let all: Vec<(u64, Arc<dyn Sink>)> = {
                        let s = sub.subs.lock().unwrap_or_else(|e| e.into_inner());
                        s.iter().map(|(sid, sink)| (*sid, sink.clone())).collect()
                    };
                    let mut out = String::new();
                    for (sid, sink) in all {
                        if let Some(subject) = sink.subject() {
                            out.push_str(&format!("SUB {subject} {sid}\r\n"));
                        }
                    }
                    if writer.write_all(out.as_bytes()).await.is_err() {
                        continue;
                    }
                    *w = Some(writer);
                    drop(w);
                    on_reconnect();
                    drop(sub);
                    read_loop(&me, reader).await;
                    if let Some(sub) = me.upgrade() {
                        *sub.writer.lock().await = None;
                    }
                }
                Err(e) => {
                    tracing::debug!(addr, error = %e, "nats subscriber connection failed");
                }
            }
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(Duration::from_millis((50u64 << failures.min(5)).min(2000))).await;
    }
}

type Reader = BufReader<tokio::net::tcp::OwnedReadHalf>;

async fn connect(addr: &str, token: Option<&str>, name: &str) -> std::io::Result<(Reader, OwnedWriteHalf)> {
    let stream = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = String::new();
    r.read_line(&mut line).await?;
    if !line.starts_with("INFO") {
        return Err(std::io::Error::other(format!("unexpected greeting: {}", line.trim())));
    }
    let mut connect = serde_json::json!({
        "verbose": false, "pedantic": false, "headers": true, "no_responders": false,
        "protocol": 1, "lang": "rust-crier", "version": env!("CARGO_PKG_VERSION"), "name": name,
    });
    if let Some(t) = token {
        connect["auth_token"] = serde_json::Value::String(t.to_owned());
    }
    w.write_all(format!("CONNECT {connect}\r\nPING\r\n").as_bytes()).await?;
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            return Err(std::io::Error::other("closed during the handshake"));
        }
        match line.trim_end() {
            "PONG" => return Ok((r, w)),
            l if l.starts_with("-ERR") => return Err(std::io::Error::other(l.to_owned())),
            _ => {}
        }
    }
}

async fn read_loop(me: &Weak<RawSub>, mut r: Reader) {
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let l = line.trim_end();
        let (hdr, rest) = if let Some(rest) = l.strip_prefix("HMSG ") {
            (true, rest)
        } else if let Some(rest) = l.strip_prefix("MSG ") {
            (false, rest)
        } else {
            if l == "PONG" {
                let Some(sub) = me.upgrade() else { return };
                let waiter = sub.pongs.lock().unwrap_or_else(|e| e.into_inner()).pop_front();
                if let Some(tx) = waiter {
                    let _ = tx.send(());
                }
            } else if l == "PING" {
                let Some(sub) = me.upgrade() else { return };
                let mut w = sub.writer.lock().await;
                if let Some(wr) = w.as_mut()
                    && wr.write_all(b"PONG\r\n").await.is_err()
                {
                    return;
                }
            } else if l.starts_with("-ERR") {
                tracing::warn!(error = l, "nats subscriber connection: server error");
            }
            continue;
        };
        // MSG <subject> <sid> [reply] <bytes> ; HMSG <subject> <sid> [reply] <hdr bytes> <total bytes>
        let mut t = [""; 5];
        let mut n = 0;
        for word in rest.split_ascii_whitespace() {
            if n == t.len() {
                return;
            }
            t[n] = word;
            n += 1;
        }
        let (sid, hlen, total) = match (hdr, n) {
            (false, 3 | 4) => (t[1], "0", t[n - 1]),
            (true, 4 | 5) => (t[1], t[n - 2], t[n - 1]),
            _ => return,
        };
        let (Ok(sid), Ok(hlen), Ok(total)) = (sid.parse::<u64>(), hlen.parse::<usize>(), total.parse::<usize>()) else {
            return;
        };
        if hlen > total {
            return;
        }
        let mut buf = vec![0u8; total + 2];
        if r.read_exact(&mut buf).await.is_err() {
            return;
        }
        buf.truncate(total);
        let Some(sub) = me.upgrade() else { return };
        let sink = sub.subs.lock().unwrap_or_else(|e| e.into_inner()).get(&sid).cloned();
        if let Some(sink) = sink {
            let buf = Bytes::from(buf);
            let headers = (hlen > 0).then(|| RawHeaders(buf.slice(..hlen)));
            sink.push((headers, buf.slice(hlen..)));
        }
    }
}
