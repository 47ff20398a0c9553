//! one file: one transport (`GET /sse`) and its raw-socket helpers (stuck streams, chunked reads), shared by every test.
//!
//! Server-Sent Events (`GET /sse`) against the real binary: the stream's events and ids, resuming
//! through `Last-Event-ID` (on one node, and across nodes on a real Redis while a node restarts),
//! SSE and WebSocket subscribers of one channel in one order, keep-alives, server closes, a
//! client that stops reading, and hostile requests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};

use crier_testkit::redis::RedisServer;
use crier_testkit::until;
use serde_json::{Value, json};
use support::{API_KEY, Server, WAIT};

/// One SSE event as a client sees it (a comment-only block is `event == ": comment"`).
#[derive(Debug, Clone)]
struct Event {
    id: Option<String>,
    event: String,
    data: String,
    /// The `retry:` field (ms), if any.
    retry: Option<u64>,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("event data is JSON ({e}): {:?}", self.data))
    }
}

/// A minimal SSE reader over reqwest's chunks (the `text/event-stream` grammar as crier writes it:
/// `\n` line ends, `field: value` lines, blank line ends an event).
struct Sse {
    resp: reqwest::Response,
    buf: Vec<u8>,
}

impl Sse {
    /// Opens `/sse` with these query parameters and headers; asserts 200 and the content type.
    async fn open(server: &Server, query: &str, headers: &[(&str, &str)]) -> Sse {
        let resp = request(server, query, headers).await;
        assert_eq!(resp.status(), 200, "/sse?{query} answered {}", resp.status());
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
        assert_eq!(resp.headers().get("x-accel-buffering").and_then(|v| v.to_str().ok()), Some("no"));
        Sse { resp, buf: Vec::new() }
    }

    /// The next event or comment; `None` once the stream ended. Fails the test after [`WAIT`].
    async fn next(&mut self) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(block).expect("UTF-8 stream");
                let (mut id, mut event, mut data, mut comment) = (None, String::new(), Vec::new(), false);
                let mut retry = None;
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("event: ") {
                        event = v.to_owned();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data.push(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("retry: ") {
                        retry = v.parse().ok();
                    } else if line.starts_with(':') {
                        comment = true;
                    } else if !line.is_empty() {
                        panic!("unexpected line {line:?}");
                    }
                }
                if event.is_empty() && data.is_empty() && comment {
                    event = ": comment".to_owned();
                }
                return Some(Event { id, event, data: data.join("\n"), retry });
            }
            let chunk =
                tokio::time::timeout_at(deadline, self.resp.chunk()).await.expect("SSE data within the deadline");
            match chunk {
                Ok(Some(bytes)) => self.buf.extend_from_slice(&bytes),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// The next event that is not a comment.
    async fn event(&mut self) -> Event {
        loop {
            let e = self.next().await.expect("stream still open");
            if e.event != ": comment" {
                return e;
            }
        }
    }

    /// Skips events until one named `name`.
    async fn until(&mut self, name: &str) -> Event {
        loop {
            let e = self.event().await;
            if e.event == name {
                return e;
            }
        }
    }

    /// Reads `n` message events.
    async fn messages(&mut self, n: usize) -> Vec<Event> {
        let mut out = Vec::new();
        while out.len() < n {
            let e = self.event().await;
            if e.event == "message" {
                out.push(e);
            }
        }
        out
    }
}

async fn request(server: &Server, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = server.http.get(server.url(&format!("/sse?{query}")));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("GET /sse")
}

fn offsets(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.json()["offset"].as_u64().expect("offset")).collect()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test]
async fn stream_has_welcome_subscribed_and_the_very_message_frames_with_cursor_ids() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["chat:*", "news"], &[]);
    let auth = bearer(&token);
    let mut sse =
        Sse::open(&server, "channel=chat:lobby&channel=news&channel=chat:lobby", &[("authorization", &auth)]).await;
    let mut ws = server.client(&token).await;
    ws.subscribe("chat:lobby", 1).await;

    let welcome = sse.event().await;
    assert_eq!(welcome.event, "welcome");
    assert_eq!(welcome.json()["user"], "u1");
    assert!(welcome.id.is_none());
    let mut subscribed = Vec::new();
    for _ in 0..2 {
        let e = sse.event().await;
        assert_eq!(e.event, "subscribed", "{e:?}");
        assert!(e.id.is_some(), "a subscribed event carries the cursor");
        subscribed.push(e.json()["channel"].as_str().unwrap().to_owned());
    }
    assert_eq!(subscribed, ["chat:lobby", "news"], "in the order named, repeats dropped");

    // Pretty-printed data keeps its line breaks in the frame: several data: lines, joined back.
    let body = "{\"channel\":\"chat:lobby\",\"data\":{\n  \"text\": \"hi\",\r\n  \"n\": [1,\n2]\n}}";
    let r = server
        .http
        .post(server.url("/api/v1/publish"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.publish("news", json!("n1")).await;
    let m = sse.event().await;
    assert_eq!(m.event, "message");
    let from_ws = ws.recv_type("message").await;
    assert_eq!(m.json(), from_ws, "the data of a message event is the WebSocket frame");
    assert_eq!(m.json()["data"], json!({"text":"hi","n":[1,2]}));
    let n = sse.event().await;
    assert_eq!((n.event.as_str(), n.json()["data"].clone()), ("message", json!("n1")));
    assert_ne!(m.id, n.id, "each message moves the cursor");
    assert_eq!(server.metric("crier_connections").await, 2.0, "SSE streams count as connections");
}

#[tokio::test]
async fn resumes_from_last_event_id_with_nothing_lost_or_repeated() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["a", "b"], &[]);
    let q = format!("channel=a&channel=b&token={token}");
    let mut sse = Sse::open(&server, &q, &[]).await;
    sse.until("subscribed").await;
    sse.until("subscribed").await;
    for i in 1..=3 {
        server.publish("a", json!(i)).await;
    }
    server.publish("b", json!("b1")).await;
    let got = sse.messages(4).await;
    let resume_at = got[1].id.clone().expect("id"); // after a:2, before a:3 and b:1
    drop(sse);
    for i in 4..=5 {
        server.publish("a", json!(i)).await;
    }

    // The header, as EventSource sends it.
    let mut again = Sse::open(&server, &q, &[("last-event-id", &resume_at)]).await;
    again.until("welcome").await;
    let a = again.event().await;
    assert_eq!(
        (a.event.as_str(), a.json()["channel"].as_str(), a.json()["recovered"].as_bool()),
        ("subscribed", Some("a"), Some(true))
    );
    let replay = again.messages(3).await;
    assert_eq!(offsets(&replay), [3, 4, 5], "a's missed messages, once each");
    let b = again.until("subscribed").await;
    assert_eq!(b.json()["recovered"], true);
    let b1 = again.messages(1).await;
    assert_eq!(b1[0].json()["data"], "b1", "b's missed message too");
    server.publish("a", json!(6)).await;
    let live = again.messages(1).await;
    assert_eq!(offsets(&live), [6], "then live");
    let final_id = live[0].id.clone().unwrap();
    drop(again);

    // The query parameter (for clients that cannot set headers), resuming from the end: nothing
    // is repeated.
    let q2 = format!("{q}&last_event_id={final_id}");
    let mut third = Sse::open(&server, &q2, &[]).await;
    third.until("subscribed").await;
    third.until("subscribed").await;
    server.publish("a", json!(7)).await;
    assert_eq!(offsets(&third.messages(1).await), [7]);
    assert!(server.metric("crier_recoveries_total{result=\"recovered\"}").await >= 4.0);
}

#[tokio::test]
async fn sse_and_websocket_subscribers_of_a_channel_get_every_message_in_order() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["c"], &[]);
    let auth = bearer(&token);
    let mut sse = Sse::open(&server, "channel=c", &[("authorization", &auth)]).await;
    sse.until("subscribed").await;
    let mut ws = server.client(&token).await;
    ws.subscribe("c", 1).await;
    let ws_task = ws.offsets_until_last();
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let (http, url) = (server.http.clone(), server.url("/api/v1/publish"));
            tokio::spawn(async move {
                for i in 0..50 {
                    let r =
                        http.post(&url).bearer_auth(API_KEY).json(&json!({"channel":"c","data":[p, i]})).send().await;
                    assert_eq!(r.unwrap().status(), 200);
                }
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    server.publish("c", json!("last")).await;
    let sse_offsets = offsets(&sse.messages(201).await);
    let ws_offsets = tokio::time::timeout(WAIT, ws_task).await.unwrap().unwrap();
    assert_eq!(sse_offsets, (1..=201).collect::<Vec<u64>>());
    assert_eq!(ws_offsets, sse_offsets, "one order for both transports");
}

#[tokio::test]
async fn keep_alive_comments_keep_a_silent_stream_open() {
    let server = Server::start(&["--ping-interval", "200ms", "--pong-timeout", "200ms"]).await;
    let token = server.token("u1", &["c"], &[]);
    let mut sse = Sse::open(&server, &format!("channel=c&token={token}"), &[]).await;
    sse.until("subscribed").await;
    let mut pings = 0;
    while pings < 5 {
        let e = sse.next().await.expect("open");
        if e.event == ": comment" {
            pings += 1;
        }
    }
    assert_eq!(server.metric("crier_heartbeat_timeouts_total").await, 0.0, "a reading SSE client is alive");
    server.publish("c", json!(1)).await;
    assert_eq!(offsets(&sse.messages(1).await), [1]);
}

#[tokio::test]
async fn server_closes_are_close_events_before_the_end() {
    let mut server = Server::start(&[]).await;
    let token = server.token("u1", &["c"], &[]);
    let q = format!("channel=c&token={token}");
    let mut kicked = Sse::open(&server, &q, &[]).await;
    kicked.until("subscribed").await;
    let r = server.post("/api/v1/disconnect", json!({"user":"u1"})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["disconnected"], 1);
    let close = kicked.until("close").await;
    assert_eq!(close.json()["code"], 4003);
    assert_eq!(close.retry, None, "4003 says stop: no retry hint");
    assert!(kicked.next().await.is_none(), "the stream ends after the close event");

    let mut drained = Sse::open(&server, &q, &[]).await;
    drained.until("subscribed").await;
    server.sigterm();
    let close = drained.until("close").await;
    assert_eq!(close.json()["code"], 1012);
    assert!(close.json()["reason"].as_str().is_some());
    // shutdown_drain (500ms here) plus a 0.5-3 s jitter: the EventSource comes back after the drain.
    assert!(close.retry.is_some_and(|ms| (1000..3500).contains(&ms)), "a jittered retry: {:?}", close.retry);
    assert!(drained.next().await.is_none());
    assert_eq!(server.wait_exit().await, Some(0));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_its_session_released() {
    let server = Server::start(&["--client-queue-max-bytes", "65536", "--max-message-bytes", "65536"]).await;
    let token = server.token("u1", &["c"], &[]);
    // A raw socket that sends the request and never reads.
    let mut raw = std::net::TcpStream::connect(server.addr).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(format!("GET /sse?channel=c&token={token} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let mut head = [0u8; 12];
    raw.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    until("the stream is subscribed", async || server.metric("crier_subscriptions").await == 1.0).await;
    let big = "x".repeat(60_000);
    let mut published = 0;
    until("the stuck stream is dropped as a slow consumer", async || {
        server.publish("c", json!(big)).await;
        published += 1;
        server.metric("crier_slow_consumers_total").await >= 1.0
    })
    .await;
    // Its session is gone (channels, registry) although the socket was never read.
    until("the session is released", async || {
        server.metric("crier_connections").await == 0.0 && server.metric("crier_subscriptions").await == 0.0
    })
    .await;
    assert!(published > 1);
    // The node serves others as before.
    let mut sse = Sse::open(&server, &format!("channel=c&token={token}"), &[]).await;
    sse.until("subscribed").await;
    server.publish("c", json!("after")).await;
    assert_eq!(sse.messages(1).await[0].json()["data"], "after");
}

#[tokio::test]
async fn refusals_come_before_the_stream_with_the_contract_codes_and_are_counted() {
    let server =
        Server::start(&["--max-subscriptions-per-connection", "2", "--allowed-origins", "https://ok.example"]).await;
    let token = server.token("u1", &["chat:*"], &[]);
    let mut bystander = server.client(&token).await;
    bystander.subscribe("chat:x", 1).await;
    let auth = bearer(&token);
    let bad_cursor_json = base64url(br#"{"chat:a":["e","x"]}"#);
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, u16, &'a str);
    let cases: Vec<Case<'_>> = vec![
        ("channel=chat:a".into(), vec![], 401, "token_missing"),
        ("channel=chat:a&token=nope".into(), vec![], 401, "token_invalid"),
        ("channel=secret".into(), vec![("authorization", &auth)], 403, "forbidden"),
        ("channel=chat:a&channel=secret".into(), vec![("authorization", &auth)], 403, "forbidden"),
        ("".into(), vec![("authorization", &auth)], 400, "bad_request"),
        ("channel=".into(), vec![("authorization", &auth)], 400, "invalid_channel"),
        ("channel=chat:%20a".into(), vec![("authorization", &auth)], 400, "invalid_channel"),
        (
            "channel=chat:a&channel=chat:b&channel=chat:c".into(),
            vec![("authorization", &auth)],
            400,
            "too_many_subscriptions",
        ),
        ("channel=chat:a".into(), vec![("authorization", &auth), ("last-event-id", "%%%")], 400, "bad_request"),
        (
            "channel=chat:a".into(),
            vec![("authorization", &auth), ("last-event-id", &bad_cursor_json)],
            400,
            "bad_request",
        ),
        ("channel=chat:a&last_event_id=W10".into(), vec![("authorization", &auth)], 400, "bad_request"),
        (
            "channel=chat:a".into(),
            vec![("authorization", &auth), ("origin", "https://evil.example")],
            403,
            "origin_not_allowed",
        ),
    ];
    for (query, headers, status, code) in &cases {
        let r = request(&server, query, headers).await;
        assert_eq!(r.status().as_u16(), *status, "{query} {headers:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], *code, "{query} {headers:?}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let huge = "A".repeat(13_000);
    let r = request(&server, "channel=chat:a", &[("authorization", &auth), ("last-event-id", &huge)]).await;
    assert_eq!(r.status(), 400, "an oversized cursor");
    // Raw bytes that are not visible ASCII in the header.
    let mut raw = std::net::TcpStream::connect(server.addr).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    raw.write_all(
        format!("GET /sse?channel=chat:a&token={token} HTTP/1.1\r\nHost: x\r\nLast-Event-ID: \u{e9}t\u{e9}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut answer = String::new();
    let _ = raw.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("bad_request"), "{answer}");

    for (code, min) in
        [("bad_request", 5.0), ("forbidden", 2.0), ("invalid_channel", 2.0), ("too_many_subscriptions", 1.0)]
    {
        let series = format!("crier_handshakes_total{{result=\"{code}\"}}");
        assert!(server.metric(&series).await >= min, "{series}");
    }
    // An allowed Origin gets the CORS header EventSource needs.
    let ok = Sse::open(&server, "channel=chat:a", &[("authorization", &auth), ("origin", "https://ok.example")]).await;
    assert_eq!(
        ok.resp.headers().get("access-control-allow-origin").and_then(|v| v.to_str().ok()),
        Some("https://ok.example")
    );
    drop(ok);
    // Nothing else was disturbed.
    server.publish("chat:x", json!("still here")).await;
    assert_eq!(bystander.recv_type("message").await["data"], "still here");
}

fn base64url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Two nodes on one real Redis: a stream on node 1, node 1 stopped (drain: close 1012), messages
/// published meanwhile through node 2, the stream resumed on node 2 with its `Last-Event-ID`,
/// then node 1 started again and the stream resumed there: every message once, in order.
#[tokio::test]
async fn resumes_on_another_node_and_on_a_restarted_node_on_redis() {
    let redis = RedisServer::start();
    let url = redis.url();
    let args =
        |name: &'static str| vec!["--redis-url".to_owned(), url.clone(), "--node-id".to_owned(), name.to_owned()];
    let start = async |name: &'static str| {
        let a = args(name);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Server::start(&a).await
    };
    let mut n1 = start("n1").await;
    let n2 = start("n2").await;
    let token = n1.token("u1", &["feed"], &[]);
    let q = format!("channel=feed&token={token}");

    let mut sse = Sse::open(&n1, &q, &[]).await;
    sse.until("subscribed").await;
    for i in 1..=5 {
        n2.publish("feed", json!(i)).await;
    }
    let first = sse.messages(5).await;
    assert_eq!(offsets(&first), [1, 2, 3, 4, 5]);
    let mut last_id = first[4].id.clone().unwrap();
    n1.sigterm();
    assert_eq!(sse.until("close").await.json()["code"], 1012);
    assert_eq!(n1.wait_exit().await, Some(0));
    for i in 6..=10 {
        n2.publish("feed", json!(i)).await;
    }

    let mut on_n2 = Sse::open(&n2, &q, &[("last-event-id", &last_id)]).await;
    assert_eq!(on_n2.until("welcome").await.json()["node"], "n2");
    assert_eq!(on_n2.until("subscribed").await.json()["recovered"], true);
    let got = on_n2.messages(5).await;
    assert_eq!(offsets(&got), [6, 7, 8, 9, 10]);
    last_id = got[4].id.clone().unwrap();
    drop(on_n2);
    n2.publish("feed", json!(11)).await;

    let n1 = start("n1").await;
    let mut back = Sse::open(&n1, &q, &[("last-event-id", &last_id)]).await;
    assert_eq!(back.until("subscribed").await.json()["recovered"], true);
    n2.publish("feed", json!(12)).await;
    let got = back.messages(2).await;
    assert_eq!(offsets(&got), [11, 12], "nothing lost or repeated across the restart");
    assert_eq!(got.iter().map(|e| e.json()["data"].clone()).collect::<Vec<_>>(), [json!(11), json!(12)]);
}

/// `curl -N` (no buffering) sees each event as it is written, over chunked HTTP/1.1.
#[tokio::test]
async fn curl_n_streams_events_as_they_happen_over_chunked_http() {
    use std::io::BufRead;
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["c"], &[]);
    let url = server.url(&format!("/sse?channel=c&token={token}"));
    let head = request(&server, &format!("channel=c&token={token}"), &[]).await;
    assert_eq!(head.headers().get("transfer-encoding").and_then(|v| v.to_str().ok()), Some("chunked"));
    drop(head);
    let mut curl = std::process::Command::new("curl")
        .args(["-sN", "--max-time", "20", &url])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("curl runs");
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = curl.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut until_line = async |want: &str| {
        loop {
            let line = tokio::time::timeout(WAIT, lines.recv()).await.expect("curl prints in time").expect("curl runs");
            if line.starts_with(want) {
                return line;
            }
        }
    };
    until_line("event: subscribed").await;
    for i in 1..=3 {
        // Each event reaches curl before the next is published.
        server.publish("c", json!(i)).await;
        until_line("event: message").await;
        let data = until_line("data: ").await;
        let v: Value = serde_json::from_str(&data["data: ".len()..]).unwrap();
        assert_eq!(v["data"], i);
    }
    let _ = curl.kill();
    let _ = curl.wait();
}

/// A raw SSE client that sends its request and never reads, with a 4 KiB receive buffer (so the
/// server's writes soon find no room).
fn stuck_sse(server: &Server, query: &str) -> std::net::TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&server.addr.into()).unwrap();
    let mut raw: std::net::TcpStream = sock.into();
    raw.write_all(format!("GET /sse?{query} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    raw
}

/// Reads (only now) what the server sent until it closed the socket: the end of the stream or a
/// reset. Fails the test if the socket is still open after [`WAIT`].
fn closed_by_server(raw: &mut std::net::TcpStream) {
    let deadline = std::time::Instant::now() + WAIT;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "the server still holds the socket open after {WAIT:?}");
        raw.set_read_timeout(Some(left)).unwrap();
        match raw.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the server still holds the socket open: {e}"),
        }
    }
}

/// The status a WebSocket handshake gets (101 when it connects).
async fn ws_status(server: &Server, token: &str) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let req = format!("{}?token={token}", server.ws_url()).into_client_request().unwrap();
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("websocket handshake failed: {e}"),
    }
}

/// A client that stops reading is dropped as a slow consumer, and crier closes its socket too
/// (it does not stay open for as long as the peer keeps it, and is not left to the kernel).
#[tokio::test]
async fn a_non_reading_client_s_socket_is_closed_when_its_session_ends() {
    let server = Server::start(&["--client-queue-max-bytes", "65536", "--max-message-bytes", "65536"]).await;
    let token = server.token("u1", &["c"], &[]);
    let mut raw = stuck_sse(&server, &format!("channel=c&token={token}"));
    until("the stream is subscribed", async || server.metric("crier_subscriptions").await == 1.0).await;
    let big = "x".repeat(60_000);
    until("the stuck stream is dropped as a slow consumer", async || {
        server.publish("c", json!(big)).await;
        server.metric("crier_slow_consumers_total").await >= 1.0
    })
    .await;
    // Without reading a byte, the client sees crier reset the socket it could not finish
    // (the close event does not fit): crier holds it no longer than its close grace.
    let mut reset = false;
    until("crier resets the stuck socket", async || {
        reset =
            reset || raw.take_error().ok().flatten().is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
        reset
    })
    .await;
    until("the connection is gone", async || server.metric("crier_connections").await == 0.0).await;
    closed_by_server(&mut raw);
}

/// SSE streams count against `max_connections` like WebSockets, for as long as their socket is
/// open; a slot comes back once crier closed the socket.
#[tokio::test]
async fn max_connections_counts_sse_sockets_until_they_are_closed() {
    let server = Server::start(&["--max-connections", "3"]).await;
    let token = server.token("u1", &["c"], &[]);
    let q = format!("channel=c&token={token}");
    let mut stuck: Vec<_> = (0..3).map(|_| stuck_sse(&server, &q)).collect();
    until("three streams", async || server.metric("crier_connections").await == 3.0).await;
    let refused = request(&server, &q, &[]).await;
    assert_eq!(refused.status(), 503, "a fourth SSE stream");
    assert_eq!(ws_status(&server, &token).await, 503, "a WebSocket beyond max_connections");

    let r = server.post("/api/v1/disconnect", json!({"user":"u1"})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["disconnected"], 3);
    for raw in &mut stuck {
        closed_by_server(raw);
    }
    until("the slots are free", async || server.metric("crier_connections").await == 0.0).await;
    let mut sse = Sse::open(&server, &q, &[]).await;
    sse.until("subscribed").await;
    assert_eq!(ws_status(&server, &token).await, 101);
    assert!(server.metric("crier_handshakes_total{result=\"unavailable\"}").await >= 2.0);
}

/// SSE streams count against `max_connections_per_user` like WebSockets, and give the slot back
/// once closed.
#[tokio::test]
async fn per_user_cap_counts_sse_sockets_until_they_are_closed() {
    let server = Server::start(&["--max-connections-per-user", "2"]).await;
    let token = server.token("u1", &["c"], &[]);
    let q = format!("channel=c&token={token}");
    let mut stuck: Vec<_> = (0..2).map(|_| stuck_sse(&server, &q)).collect();
    until("two streams", async || server.metric("crier_connections").await == 2.0).await;
    let refused = request(&server, &q, &[]).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.json::<Value>().await.unwrap()["error"], "too_many_connections");
    assert_eq!(ws_status(&server, &token).await, 429, "a WebSocket of the same user");
    let other = server.token("u2", &["c"], &[]);
    Sse::open(&server, &format!("channel=c&token={other}"), &[]).await.until("subscribed").await;

    let r = server.post("/api/v1/disconnect", json!({"user":"u1"})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["disconnected"], 2);
    for raw in &mut stuck {
        closed_by_server(raw);
    }
    until("u1's slots are free", async || request(&server, &q, &[]).await.status() == 200).await;
    assert_eq!(ws_status(&server, &token).await, 101);
}

/// A resume whose missed messages exceed the outbox's byte bound (20 x ~65,000 bytes against the
/// default 1 MiB) still delivers every one: recovery is paced by the stream's writes.
#[tokio::test]
async fn a_resume_larger_than_the_queue_delivers_every_message() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["c"], &[]);
    let q = format!("channel=c&token={token}");
    let mut first = Sse::open(&server, &q, &[]).await;
    let at = first.until("subscribed").await.id.expect("the ack has an id");
    drop(first);
    let big = "x".repeat(65_000);
    for _ in 0..20 {
        server.publish("c", json!(big)).await;
    }
    let mut again = Sse::open(&server, &q, &[("last-event-id", &at)]).await;
    let mut got = Vec::new();
    while got.len() < 20 {
        let e = again.event().await;
        assert_ne!(e.event, "close", "the stream was closed ({}) after {} messages", e.data, got.len());
        if e.event == "message" {
            assert_eq!(e.json()["data"].as_str().map(str::len), Some(65_000));
            got.push(e);
        }
    }
    assert_eq!(offsets(&got), (1..=20).collect::<Vec<u64>>());
}

/// Reads from a raw socket until `want` appears (within [`WAIT`]); returns everything read.
fn read_until(raw: &mut std::net::TcpStream, want: &str) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(want) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        assert!(!left.is_zero(), "no {want:?} within {WAIT:?}: {:?}", String::from_utf8_lossy(&seen));
        raw.set_read_timeout(Some(left)).unwrap();
        let n = raw.read(&mut buf).unwrap_or_else(|e| panic!("reading for {want:?}: {e}"));
        assert!(n > 0, "the stream ended before {want:?}: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// The stream takes its connection over from hyper wherever it comes: after other requests on
/// the same keep-alive connection (a browser reuses its connections), and for an HTTP/1.0 client
/// (no chunked coding: the body ends with the connection).
#[tokio::test]
async fn a_stream_after_other_requests_on_a_connection_and_over_http_1_0() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["c"], &[]);
    let mut raw = std::net::TcpStream::connect(server.addr).unwrap();
    raw.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let health = read_until(&mut raw, "\r\n\r\nok");
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    raw.write_all(format!("GET /sse?channel=c&token={token} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).unwrap();
    let head = read_until(&mut raw, "event: subscribed");
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("transfer-encoding: chunked\r\n") && lower.contains("connection: close\r\n"), "{head}");
    server.publish("c", json!("reused")).await;
    read_until(&mut raw, "\"data\":\"reused\"");

    let mut old = std::net::TcpStream::connect(server.addr).unwrap();
    old.write_all(format!("GET /sse?channel=c&token={token} HTTP/1.0\r\n\r\n").as_bytes()).unwrap();
    let head = read_until(&mut old, "event: subscribed");
    assert!(!head.to_ascii_lowercase().contains("transfer-encoding"), "{head}");
    let (_, body) = head.split_once("\r\n\r\n").unwrap();
    assert!(body.starts_with("event: welcome\ndata: {"), "events as they are, no chunk sizes: {body:?}");
    let r = server.post("/api/v1/disconnect", json!({"user":"u1"})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["disconnected"], 2);
    let close = read_until(&mut old, "event: close");
    assert!(close.contains("4003"), "{close}");
    closed_by_server(&mut old);
    read_until(&mut raw, "0\r\n\r\n");
}

/// Channel namespaces: resuming a stream on a channel whose namespace keeps no history gets the
/// `subscribed` event with `recovered:false` and `reason:"no_history"` (as a WebSocket ack), and
/// the stream goes on live.
#[tokio::test]
async fn resuming_in_a_namespace_without_history_says_no_history() {
    let config = std::env::temp_dir().join(format!("crier-sse-ns-{}.toml", std::process::id()));
    std::fs::write(&config, "[namespaces.live]\nhistory_size = 0\n").unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]).await;
    let _ = std::fs::remove_file(&config);
    let token = server.token("u1", &["live:*"], &[]);
    let q = format!("channel=live:a&token={token}");
    let mut sse = Sse::open(&server, &q, &[]).await;
    sse.until("subscribed").await;
    server.publish("live:a", json!(1)).await;
    let got = sse.messages(1).await;
    let resume_at = got[0].id.clone().expect("id");
    drop(sse);
    server.publish("live:a", json!(2)).await;

    let mut again = Sse::open(&server, &q, &[("last-event-id", &resume_at)]).await;
    let s = again.until("subscribed").await.json();
    assert_eq!((s["recovered"].clone(), s["reason"].clone()), (json!(false), json!("no_history")), "{s}");
    assert_eq!(s["offset"], 2, "{s}");
    server.publish("live:a", json!(3)).await;
    assert_eq!(offsets(&again.messages(1).await), [3], "nothing replayed, then live");
}

/// Join/leave (a `--dev` node: `chat` has join_leave) are SSE events named `join`/`leave` with the
/// frame as data, in order with the messages; they carry no `id` (not messages: the resume cursor
/// does not move).
#[tokio::test]
async fn join_and_leave_are_events_without_a_cursor_id() {
    let server = Server::start(&["--dev"]).await;
    let auth = bearer(&server.token("watcher", &["chat:*"], &[]));
    let mut sse = Sse::open(&server, "channel=chat:sse", &[("authorization", &auth)]).await;
    sse.until("subscribed").await;
    let mut ws = server.client(&server.token("visitor", &["chat:*"], &[])).await;
    ws.subscribe("chat:sse", 1).await;
    drop(ws);
    crier_testkit::until("the visitor left", async || {
        let r =
            server.http.get(server.url("/api/v1/channels/chat:sse/presence_stats")).bearer_auth(API_KEY).send().await;
        match r {
            Ok(r) => r.json::<Value>().await.is_ok_and(|v| v["clients"] == 1),
            Err(_) => false,
        }
    })
    .await;
    server.publish("chat:sse", json!("after")).await;
    let (join, leave, message) = (sse.event().await, sse.event().await, sse.event().await);
    assert_eq!((join.event.as_str(), join.json()["user"].as_str()), ("join", Some("visitor")), "{join:?}");
    assert_eq!((leave.event.as_str(), leave.json()["user"].as_str()), ("leave", Some("visitor")), "{leave:?}");
    assert_eq!((join.id.as_deref(), leave.id.as_deref()), (None, None), "no cursor id on join/leave");
    assert_eq!((message.event.as_str(), message.json()["data"].as_str()), ("message", Some("after")));
    assert!(message.id.is_some(), "a message moves the cursor");
}
