//! Presence that pushes, against the real binary: `join`/`leave` frames in order with the
//! channel's messages (memory broker, and 3 nodes on Redis and on NATS, including a killed node
//! whose clients leave once each after `presence_ttl`), and `presence_stats` over the socket and
//! REST.
//!
//! `--dev` declares the `chat` namespace with `join_leave` (the demo page's channel); channels
//! outside it (`news`) have no join/leave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use crier_testkit::redis::RedisServer;
use crier_testkit::until;
use serde_json::{Value, json};
use support::{Client, Server};

/// A frame in short: `message:<data>`, `join:<user>`, `leave:<user>`, or its type.
fn short(v: &Value) -> String {
    match v["type"].as_str().unwrap_or_default() {
        "message" => format!("message:{}", v["data"]),
        kind @ ("join" | "leave") => format!("{kind}:{}", v["user"].as_str().unwrap_or_default()),
        other => other.to_owned(),
    }
}

/// Frames (in short) until and including the message whose `data` is `last`.
async fn until_message(c: &mut Client, last: &str) -> Vec<String> {
    let mut seen = Vec::new();
    loop {
        let v = c.recv().await;
        seen.push(short(&v));
        if v["type"] == "message" && v["data"] == last {
            return seen;
        }
    }
}

async fn stats_ws(c: &mut Client, channel: &str, id: u64) -> Value {
    c.request(json!({"type":"presence_stats","channel":channel}), id).await
}

async fn stats_rest(s: &Server, channel: &str) -> Value {
    let r = s.get(&format!("/api/v1/channels/{channel}/presence_stats")).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn join_and_leave_arrive_in_order_with_messages_on_one_node() {
    let s = Server::start(&["--dev"]).await;
    let all = ["chat:*", "news"];
    let mut alice = s.client(&s.token("alice", &all, &[])).await;
    alice.subscribe("chat:room", 1).await;
    alice.subscribe("news", 2).await;
    s.publish("chat:room", json!("m1")).await;
    let mut bob = s.client(&s.token("bob", &all, &[])).await;
    bob.subscribe("chat:room", 1).await;
    bob.subscribe("news", 2).await;
    s.publish("chat:room", json!("m2")).await;
    // Bob is not told of his own join: his first frame after the ack is the next message.
    assert_eq!(until_message(&mut bob, "m2").await, ["message:\"m2\""]);
    let r = bob.request(json!({"type":"unsubscribe","channel":"chat:room"}), 3).await;
    assert_eq!(r["type"], "ack");
    s.publish("chat:room", json!("m3")).await;
    let mut carol = s.client(&s.token("carol", &all, &[])).await;
    carol.subscribe("chat:room", 1).await;
    drop(carol); // the connection ends: carol leaves
    until("carol's presence is gone", async || stats_rest(&s, "chat:room").await["clients"] == 1).await;
    s.publish("chat:room", json!("m4")).await;
    assert_eq!(
        until_message(&mut alice, "m4").await,
        [
            "message:\"m1\"",
            "join:bob",
            "message:\"m2\"",
            "leave:bob",
            "message:\"m3\"",
            "join:carol",
            "leave:carol",
            "message:\"m4\""
        ]
    );
    // A channel outside a join_leave namespace: messages only.
    s.publish("news", json!("n1")).await;
    assert_eq!(until_message(&mut alice, "n1").await, ["message:\"n1\""]);
    assert_eq!(until_message(&mut bob, "n1").await, ["message:\"n1\""]);
    // The join frame carries the entry: client, user, node.
    let mut dave = s.client(&s.token("dave", &all, &[])).await;
    let dave_id = dave.request(json!({"type":"ping"}), 9).await;
    assert_eq!(dave_id["type"], "pong");
    dave.subscribe("chat:room", 1).await;
    let join = alice.recv_type("join").await;
    assert_eq!((join["channel"].as_str(), join["user"].as_str()), (Some("chat:room"), Some("dave")));
    assert!(join["client"].as_str().is_some_and(|c| c.starts_with("test-node-")), "{join}");
    assert_eq!(join["node"], "test-node");
    assert!(join.get("offset").is_none(), "not a message: no offset");
    let metrics = s.metrics().await;
    assert!(support::metric_value(&metrics, r#"crier_presence_events_total{kind="join"}"#) >= 3.0, "{metrics}");
    assert!(support::metric_value(&metrics, r#"crier_presence_events_total{kind="leave"}"#) >= 2.0, "{metrics}");
    assert!(support::metric_value(&metrics, "crier_presence_event_frames_total") >= 5.0, "{metrics}");
    // History holds the messages only.
    let h: Value = s.get("/api/v1/channels/chat:room/history?limit=10").await.json().await.unwrap();
    let types: Vec<&str> = h["messages"].as_array().unwrap().iter().map(|m| m["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["message"; 4]);
}

#[tokio::test]
async fn presence_stats_over_the_socket_and_rest() {
    let s = Server::start(&[]).await;
    let mut u1a = s.client(&s.token("u1", &["room", "other"], &[])).await;
    let mut u1b = s.client(&s.token("u1", &["room"], &[])).await;
    let mut u2 = s.client(&s.token("u2", &["room"], &[])).await;
    let empty = stats_ws(&mut u1a, "room", 1).await;
    assert_eq!(empty, json!({"type":"presence_stats","id":1,"channel":"room","clients":0,"users":0}));
    for c in [&mut u1a, &mut u1b, &mut u2] {
        c.subscribe("room", 2).await;
    }
    let r = stats_ws(&mut u1a, "room", 3).await;
    assert_eq!(r, json!({"type":"presence_stats","id":3,"channel":"room","clients":3,"users":2}));
    assert_eq!(stats_rest(&s, "room").await, json!({"clients":3,"users":2}));
    drop(u1b);
    until("u1's second connection left", async || stats_rest(&s, "room").await == json!({"clients":2,"users":2})).await;
    // Refusals: a channel the token does not cover, a bad name; REST: a bad name.
    let r = stats_ws(&mut u2, "other", 4).await;
    assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some("forbidden")), "{r}");
    let r = stats_ws(&mut u2, "bad channel!", 5).await;
    assert_eq!(r["code"], "invalid_channel", "{r}");
    let r = u2.request(json!({"type":"presence_stats"}), 6).await;
    assert_eq!(r["code"], "bad_request", "{r}");
    let r = s.get("/api/v1/channels/bad%20channel/presence_stats").await;
    assert_eq!(r.status(), 400);
    let r = reqwest::get(s.url("/api/v1/channels/room/presence_stats")).await.unwrap();
    assert_eq!(r.status(), 401, "the API key is required");
}

async fn node(redis: &RedisServer, name: &str) -> Server {
    let url = redis.url();
    Server::start(&["--dev", "--redis-url", url.as_str(), "--node-id", name, "--presence-ttl", "1s"]).await
}

#[tokio::test]
async fn two_nodes_on_redis_a_drained_node_s_client_leaves_now_a_killed_one_s_once_after_presence_ttl() {
    let redis = RedisServer::start();
    let (a, b, c) = (node(&redis, "a").await, node(&redis, "b").await, node(&redis, "c").await);
    drained_now_killed_once(a, b, c, true).await;
}

/// The same on NATS, where an entry is live while its writer's liveness key is (one write per
/// node per period, not one per entry): the killed node's entries drop out once its key lapses.
#[tokio::test]
async fn three_nodes_on_nats_a_drained_node_s_client_leaves_now_a_killed_one_s_once_after_presence_ttl() {
    use crier_testkit::nats::{NatsServer, nats_available};
    if !nats_available("three_nodes_on_nats_a_drained_node_s_client_leaves_now_a_killed_one_s_once_after_presence_ttl")
    {
        return;
    }
    let nats = NatsServer::start();
    let node = async |name: &str| {
        Server::start(&["--dev", "--nats-url", &nats.url(), "--node-id", name, "--presence-ttl", "1s"]).await
    };
    let (a, b, c) = (node("a").await, node("b").await, node("c").await);
    until("ready", async || {
        for s in [&a, &b, &c] {
            if reqwest::get(s.url("/readyz")).await.map(|r| r.status().as_u16()).unwrap_or(0) != 200 {
                return false;
            }
        }
        true
    })
    .await;
    drained_now_killed_once(a, b, c, false).await;
}

/// alice on a, bob on b, carol on c in one `join_leave` channel; c drains (carol leaves at
/// once), b is SIGKILLed (bob leaves once, after `presence_ttl`; with `leave_first`, before a
/// message published after his entry dropped out).
async fn drained_now_killed_once(a: Server, mut b: Server, mut c: Server, leave_first: bool) {
    let mut alice = a.client(&a.token("alice", &["chat:*"], &[])).await;
    alice.subscribe("chat:x", 1).await;
    let mut bob = b.client(&b.token("bob", &["chat:*"], &[])).await;
    bob.subscribe("chat:x", 1).await;
    let mut carol = c.client(&c.token("carol", &["chat:*"], &[])).await;
    carol.subscribe("chat:x", 1).await;
    a.publish("chat:x", json!("m1")).await;
    assert_eq!(until_message(&mut alice, "m1").await, ["join:bob", "join:carol", "message:\"m1\""]);
    assert_eq!(until_message(&mut bob, "m1").await, ["join:carol", "message:\"m1\""], "joins cross nodes");
    assert_eq!(stats_rest(&b, "chat:x").await, json!({"clients":3,"users":3}));

    // Node c drains: carol's leave comes at once (not after presence_ttl).
    c.sigterm();
    assert_eq!(carol.closed().await, Some(1012));
    assert_eq!(c.wait_exit().await, Some(0));
    a.publish("chat:x", json!("m2")).await;
    assert_eq!(until_message(&mut alice, "m2").await, ["leave:carol", "message:\"m2\""]);

    // Node b dies: bob's entry expires after presence_ttl and a and the sweeps announce it once.
    let _ = std::process::Command::new("kill").arg("-KILL").arg(b.pid().to_string()).status();
    assert!(b.wait_exit().await.is_none(), "killed by a signal");
    until("bob's presence expired", async || stats_rest(&a, "chat:x").await == json!({"clients":1,"users":1})).await;
    a.publish("chat:x", json!("m3")).await;
    if leave_first {
        assert_eq!(until_message(&mut alice, "m3").await, ["leave:bob", "message:\"m3\""], "one leave, once");
    } else {
        // On NATS the entry drops out of listings before a sweep announces its leave: the
        // leave may come after a message published meanwhile, still once.
        let mut seen = until_message(&mut alice, "m3").await;
        while !seen.contains(&"leave:bob".to_owned()) {
            seen.push(short(&alice.recv().await));
        }
        seen.sort();
        assert_eq!(seen, ["leave:bob", "message:\"m3\""], "one leave");
        a.publish("chat:x", json!("m4")).await;
        assert_eq!(until_message(&mut alice, "m4").await, ["message:\"m4\""], "once");
    }
    let r = stats_ws(&mut alice, "chat:x", 7).await;
    assert_eq!((r["clients"].as_u64(), r["users"].as_u64()), (Some(1), Some(1)));
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next MessagePack frame, decoded.
async fn mp_recv(ws: &mut Ws) -> Value {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(support::WAIT, ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Binary(b))) => return rmp_serde::from_slice(&b).expect("MessagePack"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    }
}

async fn mp_send(ws: &mut Ws, v: Value) {
    use futures_util::SinkExt;
    let m = tokio_tungstenite::tungstenite::Message::binary(rmp_serde::to_vec_named(&v).unwrap());
    ws.send(m).await.unwrap();
}

/// MessagePack (`crier.v1.msgpack`) carries the same fields: a `join`, a `leave` and a
/// `presence_stats` reply decode to what a JSON client gets.
#[tokio::test]
async fn messagepack_carries_join_leave_and_presence_stats() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;

    let s = Server::start(&["--dev"]).await;
    let mut req = s.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("crier.v1.msgpack"));
    let token = s.token("mp", &["chat:*"], &[]);
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("connects");
    assert_eq!(mp_recv(&mut ws).await["type"], "welcome");
    mp_send(&mut ws, json!({"type":"subscribe","id":1,"channel":"chat:mp"})).await;
    assert_eq!(mp_recv(&mut ws).await["type"], "ack");
    let mut json_client = s.client(&s.token("js", &["chat:*"], &[])).await;
    json_client.subscribe("chat:mp", 1).await;
    let join = mp_recv(&mut ws).await;
    assert_eq!(join["type"], "join");
    let fields = (join["channel"].as_str(), join["user"].as_str(), join["node"].as_str());
    assert_eq!(fields, (Some("chat:mp"), Some("js"), Some("test-node")));
    assert!(join["client"].as_str().is_some_and(|c| !c.is_empty()));
    mp_send(&mut ws, json!({"type":"presence_stats","id":2,"channel":"chat:mp"})).await;
    let stats = mp_recv(&mut ws).await;
    assert_eq!(stats, json!({"type":"presence_stats","id":2,"channel":"chat:mp","clients":2,"users":2}));
    drop(json_client);
    let leave = mp_recv(&mut ws).await;
    assert_eq!((leave["type"].as_str(), leave["user"].as_str()), (Some("leave"), Some("js")));
}

/// Namespaces from the TOML file (`[namespaces.X]`):
/// a namespace's `join_leave` and `presence` reach this feature from the settings.
#[tokio::test]
async fn namespaces_from_the_toml_file_turn_join_leave_on_and_presence_off() {
    let dir = std::env::temp_dir().join(format!("crier-presence-ns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("crier.toml");
    std::fs::write(&file, "[namespaces.room]\njoin_leave = true\n\n[namespaces.quiet]\npresence = false\n").unwrap();
    let s = Server::start(&["--config", file.to_str().unwrap()]).await;
    let mut a = s.client(&s.token("a", &["room:*", "quiet:*"], &[])).await;
    a.subscribe("room:1", 1).await;
    let mut b = s.client(&s.token("b", &["room:*"], &[])).await;
    b.subscribe("room:1", 1).await;
    let join = a.recv_type("join").await;
    assert_eq!(join["user"], "b");
    let r = stats_ws(&mut a, "quiet:1", 2).await;
    assert_eq!(r["code"], "forbidden", "{r}");
    let r = s.get("/api/v1/channels/quiet:1/presence_stats").await;
    assert_eq!(r.status(), 403);
    let _ = std::fs::remove_dir_all(&dir);
}
