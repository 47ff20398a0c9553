//! Promises kept at the edges: a publish's outcome is never misreported (`outcome_unknown` when
//! the broker did not confirm it, a keyed retry delivered once), per-user connection slots come
//! back on every path a handshake can die, half-open handshakes and unfinished fragmented
//! messages are bounded, and the memory broker's history has a node-wide byte cap. Everything
//! against the real binary over real sockets, with a real (SIGSTOPped) redis-server where it
//! matters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use crier_testkit::poll;
use crier_testkit::redis::RedisServer;
use serde_json::{Value, json};
use support::{Client, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

async fn redis_node(redis: &RedisServer, name: &str, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str(), "--node-id", name];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

/// Reads `message` frames until the one whose data is `"last"`; returns every data seen.
async fn datas_until_last(c: &mut Client) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let m = c.recv_type("message").await;
        out.push(m["data"].clone());
        if m["data"] == "last" {
            return out;
        }
    }
}

/// Waits for the `message` frame whose data is `data` (other messages fail the test).
async fn expect_message(c: &mut Client, data: &str) -> Value {
    let m = c.recv_type("message").await;
    assert_eq!(m["data"], data, "the next message: {m}");
    m
}

#[tokio::test]
async fn ws_publish_during_a_wedged_redis_is_outcome_unknown_and_a_keyed_retry_delivers_once() {
    let redis = RedisServer::start();
    let node = redis_node(&redis, "n1", &[]).await;
    let mut sub = node.client(&node.token("reader", &["chat:*"], &[])).await;
    sub.subscribe("chat:wedge", 1).await;
    let mut publisher = node.client(&node.token("writer", &[], &["chat:*"])).await;
    // The command connection is up and the script loaded before Redis wedges.
    node.publish("chat:wedge", json!("warm")).await;
    expect_message(&mut sub, "warm").await;

    redis.pause(true);
    let frame = json!({"type":"publish","channel":"chat:wedge","data":"m1","idempotency_key":"k-1"});
    let reply = publisher.request(frame.clone(), 10).await;
    redis.pause(false);
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "outcome_unknown", "not `unavailable`: the message may be stored: {reply}");
    assert_eq!(reply["channel"], "chat:wedge", "{reply}");

    // Redis resumes and applies the publish it had already received.
    let first = expect_message(&mut sub, "m1").await;
    // The retry with the same key gets the first publish's ack and is not delivered again.
    let ack = publisher.request(frame, 11).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["offset"], first["offset"], "the retry's ack carries the first offset: {ack} vs {first}");
    assert_eq!(ack["epoch"], first["epoch"], "{ack}");
    let last = publisher.request(json!({"type":"publish","channel":"chat:wedge","data":"last"}), 12).await;
    assert_eq!(last["type"], "ack", "{last}");
    assert_eq!(datas_until_last(&mut sub).await, vec![json!("last")], "m1 delivered once");
    assert!(node.metric("crier_client_errors_total{code=\"outcome_unknown\"}").await >= 1.0);
}

#[tokio::test]
async fn rest_publish_during_a_wedged_redis_is_504_outcome_unknown_and_a_keyed_retry_delivers_once() {
    let redis = RedisServer::start();
    let node = redis_node(&redis, "n1", &[]).await;
    let mut sub = node.client(&node.token("reader", &["chat:*"], &[])).await;
    sub.subscribe("chat:rest", 1).await;
    node.publish("chat:rest", json!("warm")).await;
    expect_message(&mut sub, "warm").await;

    let body = json!({"channel":"chat:rest","data":"r1","idempotency_key":"rest-1"});
    redis.pause(true);
    let r = node.post("/api/v1/publish", body.clone()).await;
    redis.pause(false);
    assert_eq!(r.status(), 504, "the broker did not answer: outcome unknown");
    let err: Value = r.json().await.unwrap();
    assert_eq!(err["error"], "outcome_unknown", "{err}");

    let first = expect_message(&mut sub, "r1").await;
    let r = node.post("/api/v1/publish", body).await;
    assert_eq!(r.status(), 200, "the retry succeeds");
    let again: Value = r.json().await.unwrap();
    assert_eq!(again["offset"], first["offset"], "{again} vs {first}");
    node.publish("chat:rest", json!("last")).await;
    assert_eq!(datas_until_last(&mut sub).await, vec![json!("last")], "r1 delivered once");

    // Broadcast says so per channel, too.
    redis.pause(true);
    let r = node.post("/api/v1/broadcast", json!({"channels":["chat:rest"],"data":"b1"})).await;
    redis.pause(false);
    assert_eq!(r.status(), 200);
    let results: Value = r.json().await.unwrap();
    assert_eq!(results["results"][0]["error"], "outcome_unknown", "{results}");
}

#[tokio::test]
async fn ws_publish_with_an_idempotency_key_is_delivered_once_and_acked_with_the_first_offset() {
    let node = Server::start(&[]).await;
    let mut sub = node.client(&node.token("reader", &["chat:*"], &[])).await;
    sub.subscribe("chat:idem", 1).await;
    let mut publisher = node.client(&node.token("writer", &[], &["chat:*"])).await;
    let frame = json!({"type":"publish","channel":"chat:idem","data":"once","idempotency_key":"key-A"});
    let a = publisher.request(frame.clone(), 2).await;
    let b = publisher.request(frame, 3).await;
    assert_eq!(a["type"], "ack", "{a}");
    assert_eq!((b["type"].clone(), b["offset"].clone()), (json!("ack"), a["offset"].clone()), "{b}");
    // The key is per channel: another channel publishes anew.
    let other = json!({"type":"publish","channel":"chat:idem2","data":"x","idempotency_key":"key-A"});
    let c = publisher.request(other, 4).await;
    assert_eq!((c["type"].clone(), c["offset"].clone()), (json!("ack"), json!(1)), "{c}");
    // Bounds as the REST API's: 1-256 bytes.
    for bad in [json!(""), json!("k".repeat(257)), json!(5)] {
        let f = json!({"type":"publish","channel":"chat:idem","data":"x","idempotency_key":bad});
        let e = publisher.request(f, 5).await;
        assert_eq!((e["type"].clone(), e["code"].clone()), (json!("error"), json!("bad_request")), "{e}");
    }
    let last = publisher.request(json!({"type":"publish","channel":"chat:idem","data":"last"}), 6).await;
    assert_eq!(last["offset"], 2, "{last}");
    assert_eq!(datas_until_last(&mut sub).await, vec![json!("once"), json!("last")]);
}

/// SO_LINGER 0: closing the socket sends a TCP RST instead of a FIN.
#[allow(deprecated)]
fn reset_on_drop(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

fn upgrade_request(server: &Server, token: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        server.addr
    )
}

/// Reads until the end of the response head (or the connection ends); returns it.
async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut chunk = [0u8; 512];
    let deadline = Instant::now() + support::WAIT;
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await.expect("an answer within the deadline") {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Tries to open a WebSocket: `Ok` with the client, or `Err` with the HTTP status.
async fn try_client(server: &Server, token: &str) -> Result<Client, String> {
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
    match tokio::time::timeout(Duration::from_secs(3), Client::connect(req)).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("no answer within 3 s".into()),
    }
}

#[tokio::test]
async fn per_user_slots_come_back_after_sixty_handshakes_reset_mid_way_on_both_redis_nodes() {
    let redis = RedisServer::start();
    // A leaked count would outlive this test's waits (presence_ttl bounds it in Redis).
    let extra = ["--max-connections-per-user", "2", "--presence-ttl", "120s", "--handshake-burst", "1000"];
    let nodes = [redis_node(&redis, "n1", &extra).await, redis_node(&redis, "n2", &extra).await];
    let token = nodes[0].token("victim", &["chat:*"], &[]);
    let mut tasks = Vec::new();
    for i in 0..60 {
        let node = &nodes[i % 2];
        let (addr, request) = (node.addr, upgrade_request(node, &token));
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            if i % 4 >= 2 {
                // After the 101, before reading a single frame.
                let head = read_head(&mut s).await;
                assert!(head.is_empty() || head.starts_with("HTTP/1.1 "), "{head}");
            }
            // Otherwise right after the request head: while the node is taking the slot.
            reset_on_drop(&s);
            drop(s);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // The same user on both nodes at once (max 2): both are let in, no 429. The releases are
    // asynchronous (the node hears of the reset a moment later), hence the poll.
    poll("the user to connect on both nodes at once", async || {
        let a = try_client(&nodes[0], &token).await;
        let b = try_client(&nodes[1], &token).await;
        match (a, b) {
            (Ok(mut a), Ok(mut b)) => {
                assert_eq!(a.recv().await["type"], "welcome");
                assert_eq!(b.recv().await["type"], "welcome");
                Ok(())
            }
            (a, b) => Err(format!("n1: {:?}, n2: {:?}", a.err(), b.err())),
        }
    })
    .await;
}

/// Sends `request` on a fresh connection and reads the response head.
async fn raw_request(server: &Server, request: &str) -> String {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    read_head(&mut s).await
}

#[tokio::test]
async fn half_open_handshakes_beyond_max_pending_handshakes_get_503_and_time_out_counted() {
    let node = Server::start(&["--max-pending-handshakes", "8"]).await;
    // Eight connections that never finish their request head hold every pending place.
    let mut half_open = Vec::new();
    for _ in 0..8 {
        let mut s = TcpStream::connect(node.addr).await.unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websock").await.unwrap();
        half_open.push(s);
    }
    let healthz = "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    // The accept loop sees them in order: the ninth connection is refused at once, cheaply.
    poll("a connection beyond the cap to be refused with 503", async || {
        let head = raw_request(&node, healthz).await;
        if head.starts_with("HTTP/1.1 503") { Ok(()) } else { Err(head) }
    })
    .await;
    // One gives up: its place is free again.
    drop(half_open.pop());
    poll("a complete request to be served again", async || {
        let head = raw_request(&node, healthz).await;
        if head.starts_with("HTTP/1.1 200") { Ok(()) } else { Err(head) }
    })
    .await;
    // The others are closed at the header read timeout.
    let deadline = Instant::now() + crier::HEADER_READ_TIMEOUT + support::WAIT;
    for mut s in half_open {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout_at(deadline, s.read(&mut buf)).await;
        assert!(r.is_ok(), "a half-open handshake outlived the header read timeout");
    }
    assert!(node.wait_metric("crier_incomplete_request_heads_total{reason=\"over_cap\"}", 1.0).await >= 1.0);
    node.wait_metric("crier_incomplete_request_heads_total{reason=\"abandoned\"}", 1.0).await;
    node.wait_metric("crier_incomplete_request_heads_total{reason=\"timeout\"}", 7.0).await;
    let pending = node.metric("crier_pending_handshakes").await;
    assert!(pending <= 1.0, "only the scrape's own connection may be pending: {pending}");
}

#[tokio::test]
async fn a_fragmented_message_left_unfinished_is_closed_1008_even_while_the_client_pings() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let node = Server::start(&[]).await;
    let mut c = node.client(&node.token("frag", &["chat:*"], &[])).await;
    let first = Frame::message(&b"{\"type\":\"ping\",\"pad\":\""[..], OpCode::Data(Data::Text), false);
    c.send_raw(Message::Frame(first)).await;
    // The client keeps the connection busy with pings and more fragments, never the last one;
    // the node answers the pings until the message's time is up, then closes with 1008.
    let mut pongs = 0;
    let code = tokio::time::timeout(support::WAIT * 3, async {
        loop {
            let more = Frame::message(&b"xxxxxxxx"[..], OpCode::Data(Data::Continue), false);
            if c.ws.send(Message::Frame(more)).await.is_err() || c.ws.send(Message::Ping("p".into())).await.is_err() {
                return c.closed().await;
            }
            // Paces the client (the adversary); the wait is for its next reply, bounded.
            match tokio::time::timeout(Duration::from_millis(500), c.ws.next()).await {
                Ok(Some(Ok(Message::Pong(_)))) => pongs += 1,
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(other))) => panic!("unexpected {other:?}"),
                Ok(Some(Err(_)) | None) => return None,
                Err(_) => {}
            }
        }
    })
    .await
    .expect("the unfinished message ends the connection within its bound");
    assert_eq!(code, Some(1008), "policy violation");
    assert!(pongs >= 2, "the connection lived on while the message was young ({pongs} pongs)");
    node.wait_metric("crier_message_assembly_timeouts_total", 1.0).await;
    // Other connections are unaffected.
    let mut other = node.client(&node.token("other", &["chat:*"], &[])).await;
    other.subscribe("chat:fine", 1).await;
}

/// The node's resident memory, in bytes.
fn rss(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kb = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().trim().trim_end_matches(" kB");
    kb.trim().parse::<u64>().unwrap() * 1024
}

#[tokio::test]
async fn memory_history_cap_drops_the_oldest_first_bounds_rss_and_recovery_says_so() {
    const CAP: u64 = 4 << 20;
    let cap = CAP.to_string();
    let node = Server::start(&["--memory-history-max-bytes", &cap, "--api-rate", "0"]).await;
    let first = node.publish("chat:c0", json!("first")).await;
    let baseline = rss(&node);
    // 48 MB of history asked for (1500 × 32 KB over 150 channels, 100 kept per channel), 4 MiB
    // allowed.
    let payload = "x".repeat(32 * 1024);
    let mut last = json!(null);
    for k in 0..1500 {
        last = node.publish(&format!("chat:c{}", k % 150), json!(payload)).await;
    }
    let grown = rss(&node).saturating_sub(baseline);
    assert!(grown < 32 << 20, "RSS grew {grown} bytes for a {CAP}-byte history cap (48 MB published)");

    let mut c = node.client(&node.token("reader", &["chat:*"], &[])).await;
    // chat:c0's oldest messages were dropped for the cap: said so.
    let old = c.resubscribe("chat:c0", first["epoch"].as_str().unwrap(), 1, 1).await;
    assert_eq!((old["type"].clone(), old["recovered"].clone()), (json!("ack"), json!(false)), "{old}");
    // The most recent message is still there.
    let (channel, offset) = (last["channel"].as_str().unwrap(), last["offset"].as_u64().unwrap());
    let recent = c.resubscribe(channel, last["epoch"].as_str().unwrap(), offset - 1, 2).await;
    assert_eq!((recent["type"].clone(), recent["recovered"].clone()), (json!("ack"), json!(true)), "{recent}");
    let m = c.recv_type("message").await;
    assert_eq!((m["channel"].as_str(), m["offset"].as_u64()), (Some(channel), Some(offset)), "{m}");
}

#[tokio::test]
async fn a_client_whose_frames_keep_straddling_reads_is_not_mistaken_for_an_unfinished_message() {
    // Every write completes the previous frame and starts the next, so the node always holds a
    // partial frame between reads — for longer than the unfinished-message bound. Each message
    // completes, so each starts its own clock: the connection lives.
    let node = Server::start(&[]).await;
    let token = node.token("streamer", &["chat:*"], &[]);
    let mut s = TcpStream::connect(node.addr).await.unwrap();
    s.write_all(upgrade_request(&node, &token).as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 101"));
    // A masked Ping (mask 0: the payload as is), cut after 3 bytes.
    let ping: &[u8] = b"\x89\x84\x00\x00\x00\x00ping";
    let (head, tail) = ping.split_at(3);
    s.write_all(head).await.unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(12) {
        // Paces the client; nothing waits on the node here.
        tokio::time::sleep(Duration::from_millis(500)).await;
        s.write_all(&[tail, head].concat()).await.unwrap();
    }
    s.write_all(tail).await.unwrap();
    let frame = br#"{"type":"ping","id":9}"#;
    let mut text = vec![0x81, 0x80 | frame.len() as u8, 0, 0, 0, 0];
    text.extend_from_slice(frame);
    s.write_all(&text).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + support::WAIT;
    while !got.windows(6).any(|w| w == b"\"pong\"") {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await.expect("a reply in time") {
            Ok(0) | Err(_) => panic!("the connection was closed: {:?}", String::from_utf8_lossy(&got)),
            Ok(n) => got.extend_from_slice(&chunk[..n]),
        }
    }
    assert!(!got.windows(2).any(|w| w == [0x88, 0x02]), "no close frame: {got:?}");
}

/// The unfinished-message bound counts the client's time, not the server's: while frames wait
/// behind a request in flight (here a paced recovery the client has not read yet), the node does
/// not read the socket, and a frame it left half-read meanwhile is not held against the client
/// when reading resumes — even after more than the 10 s bound.
#[tokio::test]
async fn a_frame_the_node_left_unread_during_backpressure_is_not_an_unfinished_message() {
    use tokio_tungstenite::MaybeTlsStream;

    // No heartbeat during the test: the client reads nothing for a while on purpose.
    let node = Server::start(&["--history-size", "1000", "--ping-interval", "120s", "--pong-timeout", "120s"]).await;
    // ~60 MB of history: far more than the socket buffers and the 1 MiB queue hold, so the
    // recovery below stays in flight until the client reads.
    let data = "r".repeat(60_000);
    let first = node.publish("chat:big", json!(data)).await;
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    for _ in 1..1000 {
        node.publish("chat:big", json!(data)).await;
    }
    let mut c = node.client(&node.token("slow", &["chat:*"], &[])).await;
    let subscribe = json!({"type":"subscribe","id":1,"channel":"chat:big","recover":{"epoch":epoch,"offset":0}});
    let waiting: Vec<Value> = (2..6).map(|id| json!({"type":"presence","id":id,"channel":"chat:big"})).collect();
    let last = serde_json::to_vec(&json!({"type":"presence","id":6,"channel":"chat:big"})).unwrap();
    // The subscribe, the four frames that fill the queue behind it, and half of a sixth frame,
    // in one write: the node reads them together and leaves the half frame in its buffer.
    let mut bytes = Vec::new();
    for v in std::iter::once(&subscribe).chain(&waiting) {
        bytes.extend(crier_protocol::ws::encode_masked(0x81, &serde_json::to_vec(v).unwrap(), [1, 2, 3, 4]));
    }
    let frame = crier_protocol::ws::encode_masked(0x81, &last, [1, 2, 3, 4]);
    let (head, tail) = frame.split_at(frame.len() / 2);
    bytes.extend_from_slice(head);
    let MaybeTlsStream::Plain(tcp) = c.ws.get_mut() else { panic!("plain TCP") };
    tcp.write_all(&bytes).await.unwrap();
    // More than the bound passes while the node is not reading (this wait is the scenario: the
    // time that must not count), then the client reads its recovery.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let mut messages = 0;
    while messages < 1000 {
        match c.next().await {
            Some(tokio_tungstenite::tungstenite::Message::Text(t)) => {
                if serde_json::from_str::<Value>(&t).unwrap()["type"] == "message" {
                    messages += 1;
                }
            }
            Some(tokio_tungstenite::tungstenite::Message::Close(f)) => panic!("closed during the recovery: {f:?}"),
            Some(_) => {}
            None => panic!("the connection ended after {messages} messages"),
        }
    }
    // The rest of the sixth frame: answered like the other five, no 1008.
    let MaybeTlsStream::Plain(tcp) = c.ws.get_mut() else { panic!("plain TCP") };
    tcp.write_all(tail).await.unwrap();
    loop {
        let v = c.recv().await;
        assert_ne!(v["type"], "close", "{v}");
        if v["type"] == "presence" && v["id"] == 6 {
            break;
        }
    }
    assert_eq!(node.metric("crier_message_assembly_timeouts_total").await, 0.0);
}
