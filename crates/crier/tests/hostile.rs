//! Hostile and buggy clients against the real binary (issue 4): junk on the raw socket, broken
//! WebSocket framing, invalid UTF-8, binary and fragmented frames, deeply nested JSON, unknown
//! fields, absurd numbers, subscription churn, thousands of abandoned handshakes, slowloris and
//! oversized request heads.
//!
//! Every case checks three things: the abuse is answered as docs/protocol.md says (HTTP status,
//! error frame or close code), the node stays up (`/healthz`), and a bystander subscribed to a
//! channel receives every message published while the abuse goes on — exact offsets `1..=N`,
//! nothing lost, nothing duplicated (see [`Bystander`]).
//!
//! Raw sockets speak WebSocket by hand ([`RawWs`], [`frame`]) because no client library will
//! send malformed frames. Waits poll with deadlines; nothing sleeps to synchronise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{API_KEY, Server, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};

/// The bystander's channel.
const NEWS: &str = "news";
/// The bystander's publisher publishes one message per tick, at most this many.
const MAX_BYSTANDER_MESSAGES: u64 = 5_000;
const PUBLISH_TICK: Duration = Duration::from_millis(20);

/// Limits that keep the rate limiters out of the way: these tests abuse other things.
const NO_RATE_LIMITS: [&str; 8] =
    ["--user-rate", "100000", "--user-burst", "100000", "--handshake-rate", "100000", "--handshake-burst", "100000"];

async fn start(extra: &[&str]) -> Server {
    let mut args: Vec<&str> = NO_RATE_LIMITS.to_vec();
    args.extend_from_slice(extra);
    Server::start(&args).await
}

// ---------------------------------------------------------------------------------------------
// The bystander: a subscriber that must see every message published during the abuse.

/// A well-behaved subscriber of [`NEWS`] plus a publisher that keeps publishing to it (REST)
/// for as long as the abuse lasts. [`Bystander::finish`] stops the publisher, publishes a last
/// message and asserts the subscriber received exactly offsets `1..=N`, in order.
struct Bystander {
    stop: tokio::sync::oneshot::Sender<()>,
    publisher: JoinHandle<u64>,
    reader: JoinHandle<Vec<u64>>,
}

impl Bystander {
    async fn start(server: &Server) -> Bystander {
        let mut c = server.client(&server.token("bystander", &[NEWS], &[])).await;
        let ack = c.subscribe(NEWS, 1).await;
        assert_eq!(ack["offset"], 0, "the bystander's channel starts empty");
        let reader = c.offsets_until_last();
        let url = server.url("/api/v1/publish");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let publisher = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut tick = tokio::time::interval(PUBLISH_TICK);
            let mut sent = 0;
            while sent < MAX_BYSTANDER_MESSAGES {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let r = http
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .json(&json!({"channel": NEWS, "data": sent}))
                    .send()
                    .await
                    .expect("publish during the abuse");
                assert_eq!(r.status(), 200, "a publish during the abuse was refused");
                sent += 1;
            }
            sent
        });
        Bystander { stop, publisher, reader }
    }

    /// Stops publishing; asserts the bystander got every message and the node is healthy.
    async fn finish(self, server: &Server) {
        let _ = self.stop.send(());
        let sent = self.publisher.await.unwrap();
        let last = server.publish(NEWS, json!("last")).await;
        assert_eq!(last["offset"], sent + 1);
        let offsets = self.reader.await.unwrap();
        assert_eq!(offsets, (1..=sent + 1).collect::<Vec<_>>(), "the bystander got every message, in order");
        assert_healthy(server).await;
    }
}

async fn assert_healthy(server: &Server) {
    let r = reqwest::get(server.url("/healthz")).await.expect("the node answers /healthz");
    assert_eq!(r.status(), 200);
}

/// The three gauges a misbehaving client could leak.
async fn gauges(server: &Server) -> [f64; 3] {
    let m = server.metrics().await;
    ["crier_connections", "crier_subscriptions", "crier_channels"].map(|s| support::metric_value(&m, s))
}

async fn wait_gauges(server: &Server, want: [f64; 3]) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = gauges(server).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gauges (connections, subscriptions, channels) stayed {now:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Raw WebSocket, by hand.

const OP_CONT: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A client → server frame: masked, as clients must send, any opcode, FIN as given.
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match payload.len() {
        n if n < 126 => f.push(0x80 | n as u8),
        n if n <= u16::MAX as usize => {
            f.push(0x80 | 126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(0x80 | 127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn text(s: &str) -> Vec<u8> {
    frame(true, OP_TEXT, s.as_bytes())
}

/// The bytes of a WebSocket upgrade request for `token`.
fn upgrade_request(server: &Server, token: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        server.addr
    )
}

/// A WebSocket connection on a raw TCP socket: writes whatever bytes a test wants, parses the
/// server's (unmasked) frames.
struct RawWs {
    s: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

impl RawWs {
    /// Upgrades and reads the welcome frame.
    async fn connect(server: &Server, token: &str) -> RawWs {
        RawWs::connect_with(server, token, &[]).await
    }

    /// Upgrades with `early` bytes sent in the same write as the request (before the 101), and
    /// reads the welcome frame.
    async fn connect_with(server: &Server, token: &str, early: &[u8]) -> RawWs {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(&[upgrade_request(server, token).as_bytes(), early].concat()).await.unwrap();
        let mut ws = RawWs { s, buf: Vec::new() };
        let deadline = Instant::now() + WAIT;
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(ws.fill(deadline).await, "the server closed during the handshake");
        };
        let head: Vec<u8> = ws.buf.drain(..end).collect();
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        assert_eq!(ws.text().await["type"], "welcome");
        ws
    }

    /// Reads more bytes into the buffer; `false` on EOF or a socket error.
    async fn fill(&mut self, deadline: Instant) -> bool {
        let mut chunk = [0u8; 8192];
        match timeout_at(deadline, self.s.read(&mut chunk)).await.expect("the server answered within the deadline") {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed (that is what some tests provoke): ignore errors.
        let _ = self.s.write_all(bytes).await;
    }

    /// The next server frame; `None` when the connection ended.
    async fn frame(&mut self) -> Option<Frame> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((f, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(f);
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    /// The next text frame as JSON, skipping control frames; panics on close.
    async fn text(&mut self) -> Value {
        loop {
            match self.frame().await {
                Some(Frame { opcode: OP_TEXT, payload }) => return serde_json::from_slice(&payload).unwrap(),
                Some(Frame { opcode, payload }) if opcode >= OP_CLOSE => {
                    assert_ne!(opcode, OP_CLOSE, "closed unexpectedly: {payload:?}");
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Sends a text frame and returns the next text frame that is not a `message`.
    async fn request(&mut self, s: &str) -> Value {
        self.send(&text(s)).await;
        loop {
            let v = self.text().await;
            if v["type"] != "message" {
                return v;
            }
        }
    }

    /// Proves the connection is alive and in sync: a ping frame gets its pong.
    async fn assert_alive(&mut self, id: u64) {
        let pong = self.request(&json!({"type":"ping","id":id}).to_string()).await;
        assert_eq!(pong, json!({"type":"pong","id":id}));
    }

    /// Reads until the close frame; its code, or `None` if the socket just ended.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.frame().await {
                Some(Frame { opcode: OP_CLOSE, payload }) => {
                    return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
                Some(_) => continue,
                None => return None,
            }
        }
    }
}

/// Parses one unmasked server frame from the front of `buf`: the frame and the bytes it used.
fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    assert_eq!(b1 & 0x80, 0, "the server never masks");
    let (len, mut at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    at += len;
    assert_ne!(b0 & 0x80, 0, "the server does not fragment");
    Some((Frame { opcode: b0 & 0x0f, payload }, at))
}

/// Sends `bytes` on a fresh TCP connection and reads whatever comes back until the server
/// closes. Returns the response's status line (empty if the server closed without answering).
async fn raw_exchange(server: &Server, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => {
                panic!("the server neither answered nor closed within {WAIT:?}: {:?}", String::from_utf8_lossy(&got))
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap_or_default().to_owned()
}

fn hostile_token(server: &Server) -> String {
    server.token("mallory", &["junk:*"], &["junk:*"])
}

// ---------------------------------------------------------------------------------------------
// HTTP-level abuse.

#[tokio::test]
async fn junk_bytes_instead_of_an_http_request_get_400_and_a_close() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut random = Vec::with_capacity(64 * 1024);
    let mut x: u32 = 0x2545_f491;
    for _ in 0..64 * 1024 {
        // xorshift: reproducible junk.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        random.push(x as u8);
    }
    random[0] = 0x00; // not a token character: hyper refuses at once.
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("binary junk", random, &["HTTP/1.1 400"]),
        ("a TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00".to_vec(), &["HTTP/1.1 400"]),
        ("NUL bytes", vec![0u8; 1024], &["HTTP/1.1 400"]),
        ("a control character in a header", b"GET /ws HTTP/1.1\r\nHost: x\r\nX-A: \x01\x02\r\n\r\n".to_vec(), &["HTTP/1.1 400"]),
        ("a header without a colon", b"GET /ws HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n".to_vec(), &["HTTP/1.1 400"]),
        ("an unknown HTTP version", b"GET /ws HTTP/7.1\r\nHost: x\r\n\r\n".to_vec(), &["HTTP/1.1 400", "HTTP/1.1 505"]),
        ("a negative Content-Length", b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(), &["HTTP/1.1 400"]),
        // Both framings: hyper lets Transfer-Encoding win (RFC 9112 §6.3), answers once (401:
        // no API key) and closes the connection, so nothing can be smuggled behind it.
        (
            "Content-Length with Transfer-Encoding (request smuggling)",
            b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            &["HTTP/1.1 400", "HTTP/1.1 401"],
        ),
    ];
    for (name, bytes, statuses) in cases {
        let status = raw_exchange(&server, &bytes).await;
        assert!(
            statuses.iter().any(|s| status.starts_with(s) && (!s.is_empty() || status.is_empty())),
            "{name}: answered {status:?}, expected one of {statuses:?}"
        );
    }
    // A well-formed request on a fresh connection still works.
    assert_eq!(
        raw_exchange(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await,
        "HTTP/1.1 200 OK"
    );
    by.finish(&server).await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_a_bad_request_not_413() {
    // read_json turns any error of `to_bytes(body, limit)` into 413 "request body over N bytes";
    // only a LengthLimitError means that. A broken chunked encoding is the client's malformed
    // request: 400 bad_request (the contract's REST errors), like malformed JSON.
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let req = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
    );
    let status = raw_exchange(&server, req.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 400"), "a broken chunk size was answered {status:?}");
    by.finish(&server).await;
}

#[tokio::test]
async fn a_request_head_over_max_header_bytes_gets_431() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let limit = crier::MAX_HEADER_BYTES;
    let token = hostile_token(&server);
    // One huge header, on the WebSocket route and on the API.
    let big = "a".repeat(limit + 1024);
    for path in ["/ws", "/api/v1/info", "/healthz"] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\nX-Padding: {big}\r\n\r\n"
        );
        let status = raw_exchange(&server, req.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 431"), "{path} with a {} byte head: {status:?}", req.len());
    }
    // A huge request line (e.g. a query string) and many small headers adding up.
    let req = format!("GET /ws?token={big} HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(raw_exchange(&server, req.as_bytes()).await.starts_with("HTTP/1.1 431"));
    let many: String = (0..400).map(|i| format!("X-H{i}: {}\r\n", "b".repeat(40))).collect();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert!(req.len() > limit);
    assert!(raw_exchange(&server, req.as_bytes()).await.starts_with("HTTP/1.1 431"));
    // More headers than hyper's header count limit, while the head stays small: refused too.
    let many: String = (0..120).map(|i| format!("X-{i}: 1\r\n")).collect();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert!(req.len() < limit);
    assert!(raw_exchange(&server, req.as_bytes()).await.starts_with("HTTP/1.1 431"));
    // Just under the bound: served.
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Padding: {}\r\n\r\n",
        "c".repeat(limit - 1024)
    );
    assert_eq!(raw_exchange(&server, req.as_bytes()).await, "HTTP/1.1 200 OK");
    by.finish(&server).await;
}

#[tokio::test]
async fn slowloris_is_cut_off_at_the_header_read_timeout() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let timeout = crier::HEADER_READ_TIMEOUT;
    let margin = Duration::from_secs(3);
    let request = upgrade_request(&server, &hostile_token(&server));
    // Several slow clients at once, each dribbling its request head a byte at a time at a pace
    // that would need far longer than the timeout to finish; plus one that connects and sends
    // only a partial request line.
    let mut lorises = Vec::new();
    for i in 0..8 {
        let addr = server.addr;
        let request = request.clone();
        lorises.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = s.split();
            let mut answer = Vec::new();
            let mut chunk = [0u8; 1024];
            let pace = Duration::from_millis(300 + 50 * i);
            let mut bytes = request.bytes();
            // Bounded: at most the request's length in writes, and the deadline below.
            let deadline = started + timeout + margin;
            loop {
                tokio::select! {
                    r = rd.read(&mut chunk) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&chunk[..n]),
                    },
                    _ = tokio::time::sleep(pace) => {
                        if let Some(b) = bytes.next() && wr.write_all(&[b]).await.is_err() {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => panic!("slowloris {i} still open after {:?}", timeout + margin),
                }
            }
            (started.elapsed(), String::from_utf8_lossy(&answer).into_owned())
        }));
    }
    for l in lorises {
        let (elapsed, answer) = l.await.unwrap();
        assert!(elapsed + Duration::from_secs(1) >= timeout, "cut off after {elapsed:?}, before the timeout");
        assert!(elapsed <= timeout + margin, "cut off only after {elapsed:?}");
        // hyper closes the connection; it may say 408 first.
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "answered {answer:?}");
    }
    by.finish(&server).await;
}

// ---------------------------------------------------------------------------------------------
// Connection churn below and at the handshake.

/// How a connection is abandoned.
#[derive(Clone, Copy, Debug)]
enum Abandon {
    /// Connects and closes without sending anything.
    Silent,
    /// Half a request line.
    PartialRequestLine,
    /// The request line and some headers, no blank line.
    PartialHeaders,
    /// A complete upgrade request, closed before reading the 101.
    FullUpgrade,
    /// The same, closed with a TCP RST (SO_LINGER 0).
    FullUpgradeReset,
}

/// SO_LINGER 0: closing the socket sends a TCP RST instead of a FIN (and never blocks, which
/// is what tokio's deprecation of `set_linger` warns about for non-zero values).
#[allow(deprecated)]
fn reset_on_drop(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

#[tokio::test]
async fn thousands_of_connections_dropped_mid_handshake() {
    const TOTAL: usize = 2000;
    const CONCURRENCY: usize = 50;
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let baseline = gauges(&server).await;
    assert_eq!(baseline, [1.0, 1.0, 1.0], "the bystander: one connection, one subscription, one channel");
    let fds = || std::fs::read_dir(format!("/proc/{}/fd", server.pid())).map(|d| d.count()).unwrap_or(0);
    let fds_before = fds();
    let full = upgrade_request(&server, &hostile_token(&server));
    let kinds = [
        Abandon::Silent,
        Abandon::PartialRequestLine,
        Abandon::PartialHeaders,
        Abandon::FullUpgrade,
        Abandon::FullUpgradeReset,
    ];
    let started = Instant::now();
    let mut done = 0;
    while done < TOTAL {
        let batch: Vec<_> = (done..(done + CONCURRENCY).min(TOTAL))
            .map(|i| {
                let kind = kinds[i % kinds.len()];
                let (addr, full) = (server.addr, full.clone());
                tokio::spawn(async move {
                    let mut s = TcpStream::connect(addr).await.unwrap();
                    let bytes: &[u8] = match kind {
                        Abandon::Silent => b"",
                        Abandon::PartialRequestLine => b"GET /ws HT",
                        Abandon::PartialHeaders => b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websock",
                        Abandon::FullUpgrade | Abandon::FullUpgradeReset => full.as_bytes(),
                    };
                    let _ = s.write_all(bytes).await;
                    if let Abandon::FullUpgradeReset = kind {
                        reset_on_drop(&s);
                    }
                    drop(s);
                })
            })
            .collect();
        done += batch.len();
        for t in batch {
            t.await.unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "2000 connects took over a minute");
    }
    // Everything abandoned is cleaned up: gauges and file descriptors go back to where they were.
    wait_gauges(&server, baseline).await;
    let deadline = Instant::now() + WAIT;
    while fds() > fds_before + 4 {
        assert!(Instant::now() < deadline, "the node holds {} descriptors, {fds_before} before", fds());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // A new client still gets in and works.
    let mut c = server.client(&server.token("after", &["junk:*"], &[])).await;
    assert_eq!(c.request(json!({"type":"ping"}), 1).await["type"], "pong");
    drop(c);
    wait_gauges(&server, baseline).await;
    by.finish(&server).await;
}

#[tokio::test]
async fn abandoned_upgrades_release_the_per_user_connection_slot() {
    // With max_connections_per_user, the handshake takes a slot (Broker::connection_opened)
    // before the upgrade; the session gives it back in Session::cleanup. When the upgrade never
    // completes (here: the client resets the connection before the 101 is written), no session
    // runs, nothing gives the slot back, and after `max` such handshakes the user is refused with
    // 429 too_many_connections forever (memory broker) or until the count expires (Redis) —
    // while crier_connections says 0.
    let server = start(&["--max-connections-per-user", "2"]).await;
    let token = server.token("victim", &[], &[]);
    let request = upgrade_request(&server, &token);
    for _ in 0..200 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        reset_on_drop(&s);
        drop(s);
    }
    wait_gauges(&server, [0.0, 0.0, 0.0]).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut head = vec![0u8; 1024];
        let n = timeout_at(Instant::now() + WAIT, s.read(&mut head)).await.expect("answered").unwrap_or(0);
        let answer = String::from_utf8_lossy(&head[..n]).into_owned();
        if answer.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "the user stayed locked out with no connection open: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_healthy(&server).await;
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_at_the_header_read_timeout() {
    // The cheapest slowloris: connect and say nothing. hyper_util's auto::Builder first reads
    // the connection's opening bytes to choose HTTP/1 or HTTP/2, and that read has no timeout:
    // hyper's header_read_timeout only starts once the HTTP/1 connection runs. Each such
    // connection holds a task and a file descriptor for ever.
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let started = Instant::now();
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(TcpStream::connect(server.addr).await.unwrap());
    }
    let deadline = started + crier::HEADER_READ_TIMEOUT + Duration::from_secs(3);
    for mut s in idle {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout_at(deadline, s.read(&mut buf)).await;
        assert!(r.is_ok(), "a silent connection was still open after {:?}", started.elapsed());
    }
    by.finish(&server).await;
}

#[tokio::test]
async fn an_http2_preface_is_refused_by_the_http1_only_listener() {
    // accept_loop says "HTTP/1.1 only" and calls auto::Builder::http1_only(), but hyper_util
    // documents that http1_only "does not do anything if used with serve_connection_with_upgrades".
    // An HTTP/2 client (h2c prior knowledge) is served: it gets a SETTINGS frame, and the
    // connection is then held open with neither the header read timeout nor the 16 KiB head
    // bound of the HTTP/1 path applying to it.
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00").await.unwrap();
    let deadline = started + crier::HEADER_READ_TIMEOUT + Duration::from_secs(3);
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("an HTTP/2 connection was still open after {:?}: got {got:?}", started.elapsed()),
        }
    }
    // Refused as HTTP/1 (hyper answers an HTTP/2 preface with an error and closes).
    assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 "), "answered in HTTP/2: {got:?}");
    by.finish(&server).await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket framing abuse.

#[tokio::test]
async fn junk_after_the_upgrade_is_a_protocol_error_closed_with_1002() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let token = hostile_token(&server);
    let mut unmasked = vec![0x81u8, 0x05];
    unmasked.extend_from_slice(b"hello");
    let mut fragmented_then_new = frame(false, OP_TEXT, b"{\"type\":");
    fragmented_then_new.extend(text("{\"type\":\"ping\"}"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("0xff bytes (reserved bits and opcode)", vec![0xff; 32]),
        ("an HTTP request after the upgrade", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("an unmasked frame", unmasked),
        ("a reserved data opcode", frame(true, 0x3, b"x")),
        ("a reserved control opcode", frame(true, 0xb, b"x")),
        ("RSV1 without an extension", {
            let mut f = text("{\"type\":\"ping\"}");
            f[0] |= 0x40;
            f
        }),
        ("a continuation with nothing to continue", frame(true, OP_CONT, b"x")),
        ("a new message inside a fragmented one", fragmented_then_new),
        ("a fragmented ping", frame(false, OP_PING, b"x")),
        ("a ping over 125 bytes", frame(true, OP_PING, &[b'p'; 126])),
    ];
    for (name, bytes) in cases {
        let mut ws = RawWs::connect(&server, &token).await;
        ws.send(&bytes).await;
        assert_eq!(ws.close_code().await, Some(1002), "{name}");
    }
    by.finish(&server).await;
}

#[tokio::test]
async fn early_frames_pings_and_closes_are_answered_as_rfc_6455_says() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let token = hostile_token(&server);
    // A frame sent together with the upgrade request (the HTTP layer read it) is not lost.
    let mut ws = RawWs::connect_with(&server, &token, &text(r#"{"type":"ping","id":1}"#)).await;
    assert_eq!(ws.text().await, json!({"type":"pong","id":1}));
    // A WebSocket ping gets a pong with its payload.
    ws.send(&frame(true, OP_PING, b"are you there")).await;
    let f = ws.frame().await.expect("a pong");
    assert_eq!((f.opcode, f.payload.as_slice()), (OP_PONG, &b"are you there"[..]));
    ws.assert_alive(2).await;
    // The client's close is echoed with its code.
    ws.send(&frame(true, OP_CLOSE, &[&4321u16.to_be_bytes()[..], b"bye"].concat())).await;
    assert_eq!(ws.close_code().await, Some(4321));
    // Close codes that must not be sent (1005, 1006, 1015, 1004, 2999, 5000) and a one-byte close
    // payload are protocol errors.
    for bad in [
        vec![0x03u8, 0xED],
        vec![0x03, 0xEE],
        vec![0x03, 0xF7],
        vec![0x03, 0xEC],
        vec![0x0B, 0xB7],
        vec![0x13, 0x88],
        vec![3],
    ] {
        let mut ws = RawWs::connect(&server, &token).await;
        ws.send(&frame(true, OP_CLOSE, &bad)).await;
        assert_eq!(ws.close_code().await, Some(1002), "close payload {bad:?}");
    }
    by.finish(&server).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let token = hostile_token(&server);
    let ping = br#"{"type":"ping","id":1,"x":""#;
    let with = |bad: &[u8]| [&ping[..], bad, b"\"}"].concat();
    let mut split_bad = frame(false, OP_TEXT, &with(b"ok"));
    split_bad.extend(frame(true, OP_CONT, b"\xff\xfe"));
    let mut truncated = frame(false, OP_TEXT, br#"{"type":"ping","x":""#);
    truncated.extend(frame(true, OP_CONT, b"\xc3"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an invalid byte", frame(true, OP_TEXT, &with(b"\xff"))),
        ("a broken two-byte sequence", frame(true, OP_TEXT, &with(b"\xc3\x28"))),
        ("an overlong encoding of '/'", frame(true, OP_TEXT, &with(b"\xc0\xaf"))),
        ("a UTF-16 surrogate", frame(true, OP_TEXT, &with(b"\xed\xa0\x80"))),
        ("a code point above U+10FFFF", frame(true, OP_TEXT, &with(b"\xf4\x90\x80\x80"))),
        ("invalid bytes in a continuation frame", split_bad),
        ("a message ending mid-character", truncated),
    ];
    for (name, bytes) in cases {
        let mut ws = RawWs::connect(&server, &token).await;
        ws.send(&bytes).await;
        assert_eq!(ws.close_code().await, Some(1007), "{name}");
    }
    // A multi-byte character split across two fragments is valid UTF-8 and is accepted.
    let mut ws = RawWs::connect(&server, &token).await;
    let whole = r#"{"type":"ping","id":5,"note":"é"}"#.as_bytes();
    let cut = whole.iter().position(|&b| b == 0xc3).unwrap() + 1;
    ws.send(&frame(false, OP_TEXT, &whole[..cut])).await;
    ws.send(&frame(true, OP_CONT, &whole[cut..])).await;
    assert_eq!(ws.text().await, json!({"type":"pong","id":5}));
    by.finish(&server).await;
}

#[tokio::test]
async fn binary_frames_get_bad_request_and_the_connection_lives() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    let mut fragmented = frame(false, OP_BINARY, b"{\"type\":");
    fragmented.extend(frame(true, OP_CONT, b"\"ping\"}"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an empty binary frame", frame(true, OP_BINARY, b"")),
        ("JSON in a binary frame is not executed", frame(true, OP_BINARY, br#"{"type":"ping","id":9}"#)),
        ("random bytes", frame(true, OP_BINARY, &[0, 159, 146, 150, 255, 0])),
        ("a large binary frame", frame(true, OP_BINARY, &vec![0xab; 60_000])),
        ("a fragmented binary message", fragmented),
    ];
    for (i, (name, bytes)) in cases.into_iter().enumerate() {
        ws.send(&bytes).await;
        let e = ws.text().await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_request")), "{name}: {e}");
        assert!(e.get("id").is_none(), "{name}: a binary frame has no id to echo: {e}");
        ws.assert_alive(100 + i as u64).await;
    }
    assert!(server.metric("crier_client_errors_total{code=\"bad_request\"}").await >= 5.0);
    by.finish(&server).await;
}

#[tokio::test]
async fn fragmented_messages_are_one_frame_and_oversized_ones_close_with_1009() {
    let server = start(&["--max-message-bytes", "1024"]).await;
    let by = Bystander::start(&server).await;
    let token = hostile_token(&server);
    let mut ws = RawWs::connect(&server, &token).await;
    // A ping split in three, with a control frame (allowed) between the fragments.
    let msg = br#"{"type":"ping","id":7}"#;
    ws.send(&frame(false, OP_TEXT, &msg[..5])).await;
    ws.send(&frame(false, OP_CONT, &msg[5..12])).await;
    ws.send(&frame(true, OP_PING, b"mid")).await;
    ws.send(&frame(true, OP_CONT, &msg[12..])).await;
    assert_eq!(ws.text().await, json!({"type":"pong","id":7}));
    // A publish in one-byte fragments (and one empty fragment): one ack, one message.
    let sub = ws.request(r#"{"type":"subscribe","id":1,"channel":"junk:frag"}"#).await;
    assert_eq!(sub["type"], "ack");
    let publish = br#"{"type":"publish","id":2,"channel":"junk:frag","data":{"text":"in pieces"}}"#;
    let mut bytes = frame(false, OP_TEXT, &publish[..1]);
    bytes.extend(frame(false, OP_CONT, b""));
    for (i, b) in publish[1..].iter().enumerate() {
        bytes.extend(frame(i + 2 == publish.len(), OP_CONT, &[*b]));
    }
    ws.send(&bytes).await;
    let (mut acked, mut delivered) = (false, false);
    while !(acked && delivered) {
        let f = ws.text().await;
        match f["type"].as_str() {
            Some("ack") => acked = f["id"] == 2 && f["offset"] == 1,
            Some("message") => delivered = f["data"]["text"] == "in pieces",
            _ => panic!("unexpected {f}"),
        }
    }
    ws.assert_alive(3).await;

    // Fragments each under max_message_bytes whose total is over it: 1009.
    let mut ws = RawWs::connect(&server, &token).await;
    let part = vec![b' '; 600];
    ws.send(&frame(false, OP_TEXT, br#"{"type":"ping","pad":""#)).await;
    ws.send(&frame(false, OP_CONT, &part)).await;
    ws.send(&frame(false, OP_CONT, &part)).await;
    ws.send(&frame(true, OP_CONT, b"\"}")).await;
    assert_eq!(ws.close_code().await, Some(1009), "fragmented total over max_message_bytes");
    // A frame header announcing an absurd length (2^63 - 1 bytes): 1009 at once, no allocation.
    let mut ws = RawWs::connect(&server, &token).await;
    let mut header = vec![0x81u8, 0x80 | 127];
    header.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    ws.send(&header).await;
    assert_eq!(ws.close_code().await, Some(1009), "a 2^63 byte frame header");
    // A single frame just over the limit: 1009 (also covered in frames.rs, here on a raw socket).
    let mut ws = RawWs::connect(&server, &token).await;
    ws.send(&frame(true, OP_TEXT, &[b' '; 1025])).await;
    assert_eq!(ws.close_code().await, Some(1009));
    assert!(server.metric("crier_client_errors_total{code=\"message_too_large\"}").await >= 3.0);
    by.finish(&server).await;
}

// ---------------------------------------------------------------------------------------------
// JSON abuse: every case gets a precise answer and the connection lives.

/// What a frame must be answered with.
enum Want {
    /// A reply of this `type` (and, for `error`, this code); `id` echoed as given.
    Reply(&'static str, Option<Value>),
    Error(&'static str, Option<Value>),
    /// `bad_request` for a frame that does not decode; its `id` is not checked here (a valid one
    /// is carried: `errors_for_malformed_frames_carry_a_valid_id` in
    /// crates/crier-protocol/tests/decode_props.rs).
    Malformed,
}

async fn check_replies(ws: &mut RawWs, cases: Vec<(String, Want)>) {
    for (i, (frame_text, want)) in cases.into_iter().enumerate() {
        let r = ws.request(&frame_text).await;
        let shown = if frame_text.len() > 200 { format!("{}…", &frame_text[..200]) } else { frame_text.clone() };
        match want {
            Want::Reply(ty, id) => {
                assert_eq!(r["type"], ty, "{shown} -> {r}");
                assert_eq!(r.get("id"), id.as_ref(), "{shown} -> {r}");
            }
            Want::Malformed => {
                assert_eq!(
                    (r["type"].as_str(), r["code"].as_str()),
                    (Some("error"), Some("bad_request")),
                    "{shown} -> {r}"
                );
            }
            Want::Error(code, id) => {
                assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some(code)), "{shown} -> {r}");
                assert_eq!(r.get("id"), id.as_ref(), "{shown} -> {r}");
                assert!(r["message"].as_str().is_some_and(|m| !m.is_empty() && m.len() < 300), "{shown} -> {r}");
            }
        }
        ws.assert_alive(10_000 + i as u64).await;
    }
}

#[tokio::test]
async fn deeply_nested_json_is_refused_with_bad_request() {
    let server = start(&["--max-message-bytes", "262144"]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    let publish = |data: String| format!(r#"{{"type":"publish","id":1,"channel":"junk:deep","data":{data}}}"#);
    let arrays = |n: usize| "[".repeat(n) + &"]".repeat(n);
    let objects = |n: usize| "{\"a\":".repeat(n) + "1" + &"}".repeat(n);
    let mixed = |n: usize| {
        (0..n).map(|i| if i % 2 == 0 { "[" } else { "{\"k\":" }).collect::<String>()
            + "0"
            + &(0..n).rev().map(|i| if i % 2 == 0 { "]" } else { "}" }).collect::<String>()
    };
    let one = || Some(json!(1));
    let cases = vec![
        (publish(arrays(64)), Want::Reply("ack", one())),
        (publish(objects(64)), Want::Reply("ack", one())),
        (publish(arrays(65)), Want::Error("bad_request", one())),
        (publish(objects(65)), Want::Error("bad_request", one())),
        (publish(mixed(65)), Want::Error("bad_request", one())),
        (publish(arrays(100_000)), Want::Error("bad_request", one())),
        (publish(objects(20_000)), Want::Error("bad_request", one())),
        // Brackets inside strings are not nesting.
        (publish(format!("\"{}\"", "[{".repeat(10_000))), Want::Reply("ack", one())),
        (publish(format!("[\"\\\"{}\"]", "[".repeat(1000))), Want::Reply("ack", one())),
        // Nesting outside `data`: in an unknown field, in `recover`, at the top level.
        // An unknown field is skipped without recursion, however deep (and never forwarded).
        (format!(r#"{{"type":"ping","id":1,"junk":{}}}"#, arrays(10_000)), Want::Reply("pong", one())),
        (
            format!(r#"{{"type":"subscribe","id":1,"channel":"junk:x","recover":{}}}"#, objects(10_000)),
            Want::Error("bad_request", one()),
        ),
        (arrays(50_000), Want::Error("bad_request", None)),
        // Unbalanced.
        (publish("[".repeat(1000)), Want::Error("bad_request", None)),
    ];
    check_replies(&mut ws, cases).await;
    by.finish(&server).await;
}

#[tokio::test]
async fn unknown_fields_are_ignored() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    let cases = vec![
        (
            r#"{"type":"ping","id":1,"extra":true,"nested":{"a":[1,{"b":null}]},"__proto__":{"x":1}}"#.into(),
            Want::Reply("pong", Some(json!(1))),
        ),
        (r#"{"Type":"subscribe","TYPE":"x","type":"ping","id":2}"#.into(), Want::Reply("pong", Some(json!(2)))),
        (
            r#"{"type":"subscribe","id":3,"channel":"junk:u","priority":"high","recover_from":7}"#.into(),
            Want::Reply("ack", Some(json!(3))),
        ),
        (
            r#"{"type":"publish","id":4,"channel":"junk:u","data":{"t":1},"meta":{"trace":"abc"},"ttl":-1}"#.into(),
            Want::Reply("ack", Some(json!(4))),
        ),
        (
            r#"{"type":"history","id":5,"channel":"junk:u","limit":10,"order":"desc"}"#.into(),
            Want::Reply("history", Some(json!(5))),
        ),
        (
            r#"{"type":"presence","id":6,"channel":"junk:u","verbose":[1,2,3]}"#.into(),
            Want::Reply("presence", Some(json!(6))),
        ),
        (r#"{"type":"unsubscribe","id":7,"channel":"junk:u","force":true}"#.into(), Want::Reply("ack", Some(json!(7)))),
        // A field whose name is a known one with a different case is unknown, hence ignored.
        (r#"{"type":"ping","ID":"not-a-number","id":8}"#.into(), Want::Reply("pong", Some(json!(8)))),
        // Known fields that do not belong to the frame type are ignored too...
        (
            r#"{"type":"ping","id":9,"channel":"bad channel","data":{"x":[]},"limit":3}"#.into(),
            Want::Reply("pong", Some(json!(9))),
        ),
        // ...but their types are still checked: a malformed frame is refused whole.
        (r#"{"type":"ping","id":10,"token":5}"#.into(), Want::Error("bad_request", Some(json!(10)))),
    ];
    check_replies(&mut ws, cases).await;
    // The publish above went through: its message was delivered to the subscriber (us, before
    // the unsubscribe); the bystander's channel is untouched.
    by.finish(&server).await;
}

#[tokio::test]
async fn absurd_numbers_and_wrong_types_get_precise_errors() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    let ping = |id: &str| format!(r#"{{"type":"ping","id":{id}}}"#);
    let recover = |offset: &str| {
        format!(r#"{{"type":"subscribe","id":2,"channel":"junk:n","recover":{{"epoch":"e","offset":{offset}}}}}"#)
    };
    let history = |limit: &str| format!(r#"{{"type":"history","id":3,"channel":"junk:n","limit":{limit}}}"#);
    let since = |offset: &str| {
        format!(r#"{{"type":"history","id":4,"channel":"junk:n","since":{{"epoch":"e","offset":{offset}}}}}"#)
    };
    let bad = || Want::Malformed;
    let mut cases = vec![
        (ping("18446744073709551615"), Want::Reply("pong", Some(json!(u64::MAX)))),
        (ping("0"), Want::Reply("pong", Some(json!(0)))),
        (ping("null"), Want::Reply("pong", None)),
        (ping("18446744073709551616"), bad()),
        (ping("99999999999999999999999999999999999999"), bad()),
        (ping("-1"), bad()),
        (ping("1.5"), bad()),
        (ping("1e3"), bad()),
        (ping("1e400"), bad()),
        (ping("-0"), bad()),
        (ping("\"1\""), bad()),
        (ping("true"), bad()),
        (ping("[1]"), bad()),
        (ping("{\"id\":1}"), bad()),
        // Subscribe with an absurd recovery position: an ack that says recovery failed.
        (recover("-1"), bad()),
        (recover("\"41\""), bad()),
        (recover("1e999"), bad()),
        (r#"{"type":"subscribe","id":2,"channel":"junk:n","recover":"yesterday"}"#.into(), bad()),
        (r#"{"type":"subscribe","id":2,"channel":"junk:n","recover":{"epoch":7,"offset":1}}"#.into(), bad()),
        (r#"{"type":"subscribe","id":2,"channel":"junk:n","recover":{"offset":1}}"#.into(), bad()),
        (recover("18446744073709551615"), Want::Reply("ack", Some(json!(2)))),
        // History limits and positions.
        (history("18446744073709551615"), Want::Reply("history", Some(json!(3)))),
        (history("0"), Want::Reply("history", Some(json!(3)))),
        (history("-1"), bad()),
        (history("2.5"), bad()),
        (history("\"10\""), bad()),
        (history("1e400"), bad()),
        (history("18446744073709551616"), bad()),
        (since("18446744073709551615"), Want::Reply("history", Some(json!(4)))),
        (since("-5"), bad()),
        // Wrong types and shapes for the rest.
        (r#"{"type":"subscribe","id":5,"channel":42}"#.into(), bad()),
        (r#"{"type":"subscribe","id":5,"channel":null}"#.into(), Want::Error("bad_request", Some(json!(5)))),
        (r#"{"type":"subscribe","id":5,"channel":["junk:a"]}"#.into(), bad()),
        (r#"{"type":"subscribe","id":5,"channel":""}"#.into(), Want::Error("invalid_channel", Some(json!(5)))),
        (
            format!(r#"{{"type":"subscribe","id":5,"channel":"junk:{}"}}"#, "x".repeat(300)),
            Want::Error("invalid_channel", Some(json!(5))),
        ),
        (
            r#"{"type":"subscribe","id":5,"channel":"junk:\u0000"}"#.into(),
            Want::Error("invalid_channel", Some(json!(5))),
        ),
        (r#"{"type":"subscribe","id":5,"channel":"junk:é"}"#.into(), Want::Error("invalid_channel", Some(json!(5)))),
        (r#"{"type":"subscribe","id":5,"channel":"junk:\ud800"}"#.into(), bad()),
        (r#"{"type":"publish","id":6,"channel":"junk:n"}"#.into(), Want::Error("bad_request", Some(json!(6)))),
        (r#"{"type":"refresh","id":7,"token":12345}"#.into(), bad()),
        (r#"{"type":42,"id":8}"#.into(), bad()),
        (r#"{"type":null,"id":8}"#.into(), Want::Error("bad_request", Some(json!(8)))),
        (r#"{"type":"PING","id":8}"#.into(), Want::Error("unknown_type", Some(json!(8)))),
        (format!(r#"{{"type":"{}","id":8}}"#, "x".repeat(10_000)), Want::Error("unknown_type", Some(json!(8)))),
        (r#"{"type":"ping","id":9,"id":10}"#.into(), bad()),
    ];
    // Not an object at all.
    for top in ["[]", "1", "\"ping\"", "null", "", " ", "{", "}", "{\"type\":\"ping\"", "\u{feff}{\"type\":\"ping\"}"] {
        cases.push((top.to_owned(), bad()));
    }
    check_replies(&mut ws, cases).await;
    by.finish(&server).await;
}

#[tokio::test]
async fn data_that_serde_json_refuses_is_refused() {
    // `data` is checked as JSON grammar only (RawValue). "\ud800" and 1e400 are grammatical,
    // but strict parsers (serde_json: the Rust client, this harness) refuse the whole message
    // frame: one publisher can poison a channel for such subscribers.
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    for data in [r#"{"t":"\ud800"}"#, "[1e400]"] {
        let e = ws.request(&format!(r#"{{"type":"publish","id":1,"channel":"junk:s","data":{data}}}"#)).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_request")), "{data}: {e}");
        let r = reqwest::Client::new()
            .post(server.url("/api/v1/publish"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(format!(r#"{{"channel":"junk:s","data":{data}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "REST publish of {data}");
    }
    by.finish(&server).await;
}

// ---------------------------------------------------------------------------------------------
// Subscription churn.

#[tokio::test]
async fn subscribe_unsubscribe_churn_leaves_the_gauges_where_they_were() {
    const CYCLES: u64 = 300;
    let server = start(&["--max-subscriptions-per-connection", "1000"]).await;
    let by = Bystander::start(&server).await;
    let baseline = gauges(&server).await;
    assert_eq!(baseline, [1.0, 1.0, 1.0]);
    let token = server.token("churner", &["junk:*", NEWS], &[]);
    let mut c = server.client(&token).await;
    // One at a time, including the bystander's channel: the node must keep its broker
    // subscription for the bystander while the churner comes and goes.
    let mut id = 0;
    for i in 0..CYCLES {
        let channel = if i % 3 == 0 { NEWS.to_owned() } else { format!("junk:{}", i % 7) };
        id += 1;
        c.subscribe(&channel, id).await;
        id += 1;
        let ack = c.request(json!({"type":"unsubscribe","channel":channel}), id).await;
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    // Pipelined: many subscribes, then many unsubscribes, without waiting for replies.
    let channels: Vec<String> = (0..200).map(|i| format!("junk:p{i}")).collect();
    for (i, ch) in channels.iter().enumerate() {
        c.send(json!({"type":"subscribe","id":100_000 + i,"channel":ch})).await;
    }
    for (i, ch) in channels.iter().enumerate() {
        c.send(json!({"type":"unsubscribe","id":200_000 + i,"channel":ch})).await;
    }
    let mut acks = 0;
    while acks < 2 * channels.len() {
        let r = c.recv().await;
        if r["type"] == "message" {
            continue; // the churner's NEWS subscriptions may have caught a message
        }
        assert_eq!(r["type"], "ack", "{r}");
        acks += 1;
    }
    wait_gauges(&server, [2.0, 1.0, 1.0]).await;
    // Connections that die while subscribed to many channels.
    for round in 0..10 {
        let mut d = server.client(&token).await;
        for i in 0..50 {
            d.send(json!({"type":"subscribe","id":i,"channel":format!("junk:r{}", (round * 50 + i) % 120)})).await;
        }
        d.subscribe(NEWS, 1000).await; // waits for the replies above (frames are answered in order)
        drop(d);
    }
    drop(c);
    wait_gauges(&server, baseline).await;
    by.finish(&server).await;
}
