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
    Client::connect(req).await.map_err(|e| e.to_string())
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
