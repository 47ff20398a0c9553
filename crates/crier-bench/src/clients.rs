//! Lean WebSocket subscribers: one tokio task per connection, a 4 KiB read buffer, no write
//! buffering, and a `message` frame is read by finding `"offset":` and `"ts":` in the text rather
//! than by parsing the JSON (the generator shares the CPUs with the gateway).
//!
//! A connection binds its local address before connecting (one of several 127.0.0.x, see
//! [`SourceAddrs`]), so the generator is not limited to the ~28k ephemeral ports of one address.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{WebSocketStream, client_async_with_config};

use crate::stats::{Stats, new_histogram, now_us};

pub type Ws = WebSocketStream<TcpStream>;

/// How long one connection may take to connect, authenticate and subscribe (retries included).
const CONNECT_DEADLINE: Duration = Duration::from_secs(30);

/// The local addresses connections are made from: `127.0.0.<first>` … `127.0.0.<first+n-1>`.
#[derive(Debug, Clone)]
pub struct SourceAddrs(Vec<IpAddr>);

impl SourceAddrs {
    pub fn new(count: usize) -> SourceAddrs {
        let n = count.clamp(1, 250);
        SourceAddrs((0..n).map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i as u8))).collect())
    }
    pub fn get(&self, i: usize) -> IpAddr {
        self.0[i % self.0.len()]
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

/// The client side's WebSocket settings: small buffers, frames written at once.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(1 << 20))
        .max_frame_size(Some(1 << 20))
}

/// An I/O error, short enough to count by kind.
fn io_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(24) => "io EMFILE (too many open files: RLIMIT_NOFILE)".into(),
        _ => format!("io {:?}", e.kind()),
    }
}

/// Why a connection attempt failed, short enough to count by kind.
fn classify(e: &WsError) -> String {
    match e {
        WsError::Http(resp) => format!("http {}", resp.status().as_u16()),
        WsError::Io(io) => io_name(io),
        other => format!("ws {}", other.to_string().chars().take(60).collect::<String>()),
    }
}

/// Opens a WebSocket to `server` from `local`, with `token` in `Authorization`, and waits for
/// `welcome`. A 429 (handshake rate limit) is retried with a short backoff until the deadline.
pub async fn connect(server: SocketAddr, local: IpAddr, token: &str) -> Result<Ws, String> {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    let mut backoff = Duration::from_millis(50);
    loop {
        match tokio::time::timeout_at(deadline.into(), connect_once(server, local, token)).await {
            Err(_) => return Err("timeout".into()),
            Ok(Ok(ws)) => return Ok(ws),
            Ok(Err(e)) => {
                let retry = e == "http 429" || e == "io AddrInUse" || e == "io AddrNotAvailable";
                if !retry || Instant::now() + backoff > deadline {
                    return Err(e);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn connect_once(server: SocketAddr, local: IpAddr, token: &str) -> Result<Ws, String> {
    let io = |e: std::io::Error| io_name(&e);
    let sock = TcpSocket::new_v4().map_err(io)?;
    sock.bind(SocketAddr::new(local, 0)).map_err(io)?;
    let tcp = sock.connect(server).await.map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    let mut req = format!("ws://{server}/ws").into_client_request().map_err(|e| classify(&e))?;
    let auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|e| format!("header {e}"))?;
    req.headers_mut().insert(header::AUTHORIZATION, auth);
    let (mut ws, _resp) = client_async_with_config(req, tcp, Some(ws_config())).await.map_err(|e| classify(&e))?;
    match ws.next().await {
        Some(Ok(Message::Text(t))) if t.as_str().starts_with(r#"{"type":"welcome""#) => Ok(ws),
        Some(Ok(other)) => Err(format!("unexpected first frame {:.40}", other.to_string())),
        Some(Err(e)) => Err(classify(&e)),
        None => Err("closed before welcome".into()),
    }
}

/// Subscribes and waits for the ack (frames before it are skipped; an error frame fails).
pub async fn subscribe(ws: &mut Ws, channel: &str) -> Result<(), String> {
    let frame = format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#);
    ws.send(Message::text(frame)).await.map_err(|e| classify(&e))?;
    let wait = async {
        while let Some(m) = ws.next().await {
            match m {
                Ok(Message::Text(t)) => {
                    let t = t.as_str();
                    if t.starts_with(r#"{"type":"ack""#) {
                        return Ok(());
                    }
                    if t.starts_with(r#"{"type":"error""#) {
                        return Err(format!("subscribe refused: {:.80}", t));
                    }
                }
                Ok(Message::Close(c)) => return Err(format!("closed {:?}", c.map(|c| u16::from(c.code)))),
                Ok(_) => {}
                Err(e) => return Err(classify(&e)),
            }
        }
        Err("closed before ack".into())
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.map_err(|_| "subscribe timeout".to_string())?
}

/// Reads `"key":<digits>` from `text` starting at `from`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = &text.as_bytes()[start..];
    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// `(offset, ts)` of a `message` frame; `None` for any other frame.
pub fn parse_message(text: &str) -> Option<(u64, Option<u64>)> {
    if !text.starts_with(r#"{"type":"message""#) {
        return None;
    }
    let offset = number_after(text, r#""offset":"#)?;
    let data = text.find(r#""data":"#)?;
    Some((offset, number_after(&text[data..], r#""ts":"#)))
}

/// Counts one received message: its latency (when it carries a send timestamp), and whether its
/// offset skipped ahead (a gap) or was seen already (a duplicate) after `last`.
fn record_delivery(stats: &Stats, conn: usize, last: &mut Option<u64>, offset: u64, ts: Option<u64>) {
    let latency = ts.map(|ts| now_us().saturating_sub(ts));
    let (gap, dup) = match *last {
        Some(l) => (offset > l + 1, offset <= l),
        None => (false, false),
    };
    *last = Some(last.map_or(offset, |l| l.max(offset)));
    stats.record(conn, latency, gap, dup);
}

/// Reads a subscribed connection until it ends, recording every message.
pub async fn receive(mut ws: Ws, conn: usize, stats: Arc<Stats>) {
    let mut last: Option<u64> = None;
    while let Some(m) = ws.next().await {
        match m {
            Ok(Message::Text(t)) => {
                // The frame as it travelled: header (2, 4 or 10 bytes) and payload.
                let n = t.len();
                WIRE_BYTES.fetch_add(
                    (n + if n < 126 {
                        2
                    } else if n <= 65535 {
                        4
                    } else {
                        10
                    }) as u64,
                    Ordering::Relaxed,
                );
                if let Some((offset, ts)) = parse_message(t.as_str()) {
                    record_delivery(&stats, conn, &mut last, offset, ts);
                }
            }
            Ok(Message::Close(c)) => {
                stats.connection_ended(format!("close {}", c.map(|c| u16::from(c.code)).unwrap_or(1005)));
                return;
            }
            Ok(_) => {}
            Err(e) => {
                stats.connection_ended(classify(&e));
                return;
            }
        }
    }
    stats.connection_ended("eof".into());
}

/// How to open one subscriber.
pub struct Target {
    pub server: SocketAddr,
    pub local: IpAddr,
    pub token: String,
    pub channel: Option<String>,
}

/// The outcome of opening a batch of subscribers.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct ConnectSummary {
    pub requested: usize,
    pub connected: usize,
    pub failed: usize,
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    pub connects_per_s: f64,
    /// Connect + handshake + welcome + subscribe ack, per connection.
    pub setup_latency: crate::stats::Latency,
    /// Indices of the connections that are up.
    #[serde(skip)]
    pub ok_indices: Vec<usize>,
}

/// Live subscribers: aborting them drops their sockets.
#[derive(Default)]
pub struct Subscribers {
    handles: Vec<AbortHandle>,
}

impl Subscribers {
    /// Drops every connection (TCP close, no WebSocket close handshake).
    pub fn abort_all(&mut self) {
        for h in self.handles.drain(..) {
            h.abort();
        }
    }
}

impl Drop for Subscribers {
    fn drop(&mut self) {
        self.abort_all();
    }
}

/// How a subscriber connects (the `idle` scenario compares them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Transport {
    /// WebSocket, JSON.
    Ws,
    /// WebSocket with permessage-deflate (the gateway must run with `--websocket-compression`):
    /// a raw client that inflates compressed frames.
    WsDeflate,
    /// Server-Sent Events (`GET /sse?channel=`).
    Sse,
}

/// Opens `count` subscribers (indices `first..first+count`), `concurrency` handshakes at a time;
/// each then receives until aborted. `target(i)` says where and as whom connection `i` connects,
/// `on_subscribed(i)` is called once it is subscribed.
pub async fn open_many(
    first: usize,
    count: usize,
    concurrency: usize,
    target: impl Fn(usize) -> Target,
    stats: &Arc<Stats>,
    subs: &mut Subscribers,
    progress: bool,
) -> ConnectSummary {
    open_many_over(Transport::Ws, first, count, concurrency, target, stats, subs, progress).await
}

/// Bytes subscribers read off their sockets (WebSocket frames; counted for `ws` and `ws-deflate`).
static WIRE_BYTES: AtomicU64 = AtomicU64::new(0);

/// Total of [`WIRE_BYTES`] so far.
pub fn wire_bytes() -> u64 {
    WIRE_BYTES.load(Ordering::Relaxed)
}

/// A masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    crier_protocol::ws::encode_masked(0x80 | opcode, payload, [0x5a, 0xa5, 0x3c, 0xc3])
}

/// Takes one server frame (unmasked, never fragmented by crier) off the front of `buf`:
/// (rsv1, opcode, payload).
fn server_frame(buf: &mut Vec<u8>) -> Option<(bool, u8, Vec<u8>)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let (len, at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    let payload = buf[at..at + len].to_vec();
    buf.drain(..at + len);
    Some((b0 & 0x40 != 0, b0 & 0x0f, payload))
}

/// A permessage-deflate WebSocket (raw: tungstenite has no permessage-deflate): the upgrade with
/// the offer, then subscribed. Returns the socket and what was read past the ack.
async fn deflate_connect(
    server: SocketAddr,
    local: IpAddr,
    token: &str,
    channel: &str,
) -> Result<(TcpStream, Vec<u8>), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |e: std::io::Error| io_name(&e);
    let sock = TcpSocket::new_v4().map_err(io)?;
    sock.bind(SocketAddr::new(local, 0)).map_err(io)?;
    let mut tcp = sock.connect(server).await.map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.map_err(io)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let wait = async {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let n = tcp.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err("closed during the upgrade".to_string());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 101") {
            return Err(format!("http {}", head.get(9..12).unwrap_or("?")));
        }
        if !head.contains("permessage-deflate") {
            return Err("permessage-deflate not negotiated (--crier-arg=--websocket-compression?)".into());
        }
        buf.drain(..end);
        let sub = format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#);
        tcp.write_all(&client_frame(0x1, sub.as_bytes())).await.map_err(io)?;
        loop {
            while let Some((_, op, payload)) = server_frame(&mut buf) {
                if op == 0x1 && payload.starts_with(br#"{"type":"ack""#) {
                    return Ok(());
                }
                if op == 0x1 && payload.starts_with(br#"{"type":"error""#) {
                    return Err(format!("subscribe refused: {:.80}", String::from_utf8_lossy(&payload)));
                }
            }
            let n = tcp.read(&mut chunk).await.map_err(io)?;
            if n == 0 {
                return Err("closed before ack".into());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(CONNECT_DEADLINE, wait).await.map_err(|_| "timeout".to_string())??;
    Ok((tcp, buf))
}

/// Reads a permessage-deflate subscriber until it ends: counts wire bytes, inflates compressed
/// frames, records every message, answers pings.
async fn deflate_receive(mut tcp: TcpStream, mut buf: Vec<u8>, conn: usize, stats: Arc<Stats>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut last: Option<u64> = None;
    let mut chunk = vec![0u8; 16384];
    loop {
        while let Some((rsv1, op, payload)) = server_frame(&mut buf) {
            match op {
                0x1 => {
                    let text = if rsv1 {
                        match crier_protocol::ws::inflate(&payload, 1 << 24) {
                            Ok(t) => t,
                            Err(_) => return stats.connection_ended("bad compressed frame".into()),
                        }
                    } else {
                        payload
                    };
                    if let Some((offset, ts)) = std::str::from_utf8(&text).ok().and_then(parse_message) {
                        record_delivery(&stats, conn, &mut last, offset, ts);
                    }
                }
                0x9 => {
                    let _ = tcp.write_all(&client_frame(0xA, &payload)).await;
                }
                0x8 => {
                    let code = payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                    return stats.connection_ended(format!("close {code}"));
                }
                _ => {}
            }
        }
        match tcp.read(&mut chunk).await {
            Ok(0) => return stats.connection_ended("eof".into()),
            Ok(n) => {
                WIRE_BYTES.fetch_add(n as u64, Ordering::Relaxed);
                buf.extend_from_slice(&chunk[..n]);
            }
            Err(e) => return stats.connection_ended(io_name(&e)),
        }
    }
}

/// An SSE stream to `server` from `local`: the request, the 200, and everything up to the
/// `subscribed` event; then the socket, to be read until it ends.
async fn sse_connect(server: SocketAddr, local: IpAddr, token: &str, channel: &str) -> Result<TcpStream, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |e: std::io::Error| io_name(&e);
    let sock = TcpSocket::new_v4().map_err(io)?;
    sock.bind(SocketAddr::new(local, 0)).map_err(io)?;
    let mut tcp = sock.connect(server).await.map_err(io)?;
    tcp.set_nodelay(true).map_err(io)?;
    let req = format!(
        "GET /sse?channel={channel} HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.map_err(io)?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let wait = async {
        loop {
            let n = tcp.read(&mut buf).await.map_err(io)?;
            if n == 0 {
                return Err("closed before subscribed".to_string());
            }
            seen.extend_from_slice(&buf[..n]);
            if !seen.starts_with(b"HTTP/1.1 200") && seen.len() >= 12 {
                return Err(format!("http {}", String::from_utf8_lossy(&seen[9..12])));
            }
            if seen.windows(17).any(|w| w == b"event: subscribed") {
                return Ok(());
            }
        }
    };
    tokio::time::timeout(CONNECT_DEADLINE, wait).await.map_err(|_| "timeout".to_string())??;
    Ok(tcp)
}

/// Reads an SSE stream until it ends (the bench's idle streams receive only keep-alives).
async fn sse_receive(mut tcp: TcpStream, stats: Arc<Stats>) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 4096];
    loop {
        match tcp.read(&mut buf).await {
            Ok(0) => return stats.connection_ended("eof".into()),
            Ok(_) => {}
            Err(e) => return stats.connection_ended(io_name(&e)),
        }
    }
}

/// [`open_many`] over a chosen transport.
#[allow(clippy::too_many_arguments)]
pub async fn open_many_over(
    transport: Transport,
    first: usize,
    count: usize,
    concurrency: usize,
    target: impl Fn(usize) -> Target,
    stats: &Arc<Stats>,
    subs: &mut Subscribers,
    progress: bool,
) -> ConnectSummary {
    let started = Instant::now();
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Result<u64, String>)>();
    for i in first..first + count {
        let t = target(i);
        let (sem, tx, stats) = (sem.clone(), tx.clone(), stats.clone());
        let h = tokio::spawn(async move {
            let Ok(permit) = sem.acquire_owned().await else { return };
            let t0 = Instant::now();
            if transport == Transport::WsDeflate {
                let channel = t.channel.clone().unwrap_or_else(|| "bench:deflate".into());
                let r = deflate_connect(t.server, t.local, &t.token, &channel).await;
                drop(permit);
                match r {
                    Ok((tcp, rest)) => {
                        let _ = tx.send((i, Ok(t0.elapsed().as_micros() as u64)));
                        drop(tx);
                        deflate_receive(tcp, rest, i, stats).await;
                    }
                    Err(e) => {
                        let _ = tx.send((i, Err(e)));
                    }
                }
                return;
            }
            if transport == Transport::Sse {
                let channel = t.channel.clone().unwrap_or_else(|| "bench:sse".into());
                let r = sse_connect(t.server, t.local, &t.token, &channel).await;
                drop(permit);
                match r {
                    Ok(tcp) => {
                        let _ = tx.send((i, Ok(t0.elapsed().as_micros() as u64)));
                        drop(tx);
                        sse_receive(tcp, stats).await;
                    }
                    Err(e) => {
                        let _ = tx.send((i, Err(e)));
                    }
                }
                return;
            }
            let ws = match connect(t.server, t.local, &t.token).await {
                Ok(mut ws) => match &t.channel {
                    Some(c) => subscribe(&mut ws, c).await.map(|()| ws),
                    None => Ok(ws),
                },
                Err(e) => Err(e),
            };
            drop(permit);
            match ws {
                Ok(ws) => {
                    let _ = tx.send((i, Ok(t0.elapsed().as_micros() as u64)));
                    drop(tx);
                    receive(ws, i, stats).await;
                }
                Err(e) => {
                    let _ = tx.send((i, Err(e)));
                }
            }
        });
        subs.handles.push(h.abort_handle());
    }
    drop(tx);
    let mut summary = ConnectSummary { requested: count, ..Default::default() };
    let mut hist = new_histogram();
    let mut last_report = Instant::now();
    while let Some((i, r)) = rx.recv().await {
        match r {
            Ok(us) => {
                summary.connected += 1;
                summary.ok_indices.push(i);
                hist.saturating_record(us.max(1));
            }
            Err(e) => {
                summary.failed += 1;
                *summary.errors.entry(e).or_default() += 1;
            }
        }
        if progress && last_report.elapsed() > Duration::from_secs(2) {
            last_report = Instant::now();
            let done = summary.connected + summary.failed;
            eprintln!(
                "  connecting: {done}/{count} ({:.0}/s, {} failed)",
                done as f64 / started.elapsed().as_secs_f64(),
                summary.failed
            );
        }
        if summary.connected + summary.failed == count {
            break;
        }
    }
    summary.elapsed_s = started.elapsed().as_secs_f64();
    summary.connects_per_s = summary.connected as f64 / summary.elapsed_s.max(1e-9);
    summary.setup_latency = crate::stats::Latency::from_histogram(&hist);
    summary
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_message_frames() {
        let f = r#"{"type":"message","channel":"bench:1","epoch":"x1","offset":58,"data":{"ts":1700000000123456,"pad":"ab"}}"#;
        assert_eq!(parse_message(f), Some((58, Some(1_700_000_000_123_456))));
        let no_ts = r#"{"type":"message","channel":"c","epoch":"e","offset":7,"data":"hello"}"#;
        assert_eq!(parse_message(no_ts), Some((7, None)));
        assert_eq!(parse_message(r#"{"type":"ack","id":1,"offset":3}"#), None);
    }

    #[test]
    fn source_addresses_rotate() {
        let s = SourceAddrs::new(3);
        assert_eq!(s.get(0), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        assert_eq!(s.get(4), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3)));
        assert_eq!(s.len(), 3);
    }
}
