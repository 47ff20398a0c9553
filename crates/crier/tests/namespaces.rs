//! Channel namespaces (`[namespaces.<name>]` in the TOML file) against the real binary, on the
//! memory broker and on a real redis-server: each namespace's history size and TTL, recovery
//! answered `recovered:false` with `reason: "no_history"`, presence off (not entered, requests
//! forbidden over WS and REST), client publishing off (JSON and MessagePack; REST unaffected),
//! `max_subscribers` (cluster-wide on Redis: two nodes share the bound), and a bad namespace
//! refused at start with exit 64.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use crier_testkit::redis::RedisServer;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{Client, ConfigFile, Server, WAIT};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const NAMESPACES: &str = r#"
history_size = 100
history_ttl = "5m"

[namespaces.big]
history_size = 5
history_ttl = "1h"

[namespaces.small]
history_size = 2

[namespaces.none]
history_size = 0

[namespaces.norec]
recovery = false

[namespaces.quiet]
presence = false

[namespaces.ro]
client_publish = false

[namespaces.room]
max_subscribers = 2

[namespaces.stage]
max_subscribers = 1
join_leave = true
"#;

/// A node with [`NAMESPACES`]; on `redis` when given.
async fn node(file: &ConfigFile, redis: Option<&RedisServer>, id: &str) -> Server {
    let url = redis.map(RedisServer::url);
    let mut args = vec!["--config", file.path(), "--node-id", id];
    if let Some(url) = &url {
        args.extend(["--redis-url", url.as_str()]);
    }
    Server::start(&args).await
}

async fn rest_history(server: &Server, channel: &str) -> Value {
    let r = server.get(&format!("/api/v1/channels/{channel}/history")).await;
    assert_eq!(r.status(), 200, "history of {channel}");
    r.json().await.unwrap()
}

/// An integer reply of a Redis command (`:<n>`).
fn int(redis: &RedisServer, args: &[&str]) -> i64 {
    let reply = redis.cmd(args);
    reply.trim().strip_prefix(':').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{args:?}: {reply:?}"))
}

fn data_of(messages: &Value) -> Vec<i64> {
    messages.as_array().unwrap().iter().map(|m| m["data"].as_i64().unwrap()).collect()
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A MessagePack connection (`crier.v1.msgpack`).
async fn mp_connect(server: &Server, token: &str) -> Ws {
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("crier.v1.msgpack"));
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// Sends `frame` (with `id`) in MessagePack and returns the reply with that id.
async fn mp_request(mp: &mut Ws, mut frame: Value, id: u64) -> Value {
    frame["id"] = json!(id);
    mp.send(Message::binary(rmp_serde::to_vec_named(&frame).unwrap())).await.unwrap();
    loop {
        let m = tokio::time::timeout(WAIT, mp.next()).await.expect("a frame in time");
        let Some(Ok(Message::Binary(b))) = m else { continue };
        let v: Value = rmp_serde::from_slice(&b).unwrap();
        if v["id"] == id {
            return v;
        }
    }
}

fn assert_error(reply: &Value, code: &str, channel: &str) {
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert_eq!(reply["channel"], channel, "{reply}");
}

async fn histories_follow_the_namespace(server: &Server) {
    for channel in ["big:a", "small:a", "plain", "none:a"] {
        for i in 1..=8 {
            server.publish(channel, json!(i)).await;
        }
    }
    assert_eq!(data_of(&rest_history(server, "big:a").await["messages"]), [4, 5, 6, 7, 8]);
    assert_eq!(data_of(&rest_history(server, "small:a").await["messages"]), [7, 8]);
    assert_eq!(data_of(&rest_history(server, "plain").await["messages"]), [1, 2, 3, 4, 5, 6, 7, 8]);
    let none = rest_history(server, "none:a").await;
    assert_eq!(data_of(&none["messages"]), Vec::<i64>::new(), "no history: an empty one");
    assert_eq!(none["offset"], 8, "the position still counts: {none}");

    // The socket's `history` (no limit: the namespace's size) says the same.
    let token = server.token("u1", &["*"], &[]);
    let mut c = server.client(&token).await;
    let h = c.request(json!({"type":"history","channel":"small:a"}), 1).await;
    assert_eq!(data_of(&h["messages"]), [7, 8], "{h}");
    let h = c.request(json!({"type":"history","channel":"none:a"}), 2).await;
    assert_eq!((h["type"].as_str(), data_of(&h["messages"]).len()), (Some("history"), 0), "{h}");
}

#[tokio::test]
async fn each_namespace_keeps_its_own_history_memory() {
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, None, "n1").await;
    histories_follow_the_namespace(&server).await;
}

#[tokio::test]
async fn each_namespace_keeps_its_own_history_redis() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, Some(&redis), "n1").await;
    histories_follow_the_namespace(&server).await;
    // The keys live by the channel's namespace: `big` keeps an hour, the rest 5 minutes (plus
    // the publish script's slack, at most 30 s); the meta outlives the longest history.
    let pttl = |key: &str| int(&redis, &["PTTL", key]);
    let big = pttl("crier:{big:a}:hist");
    assert!(big > 3_000_000 && big <= 3_630_000, "big:a history expiry {big} ms");
    let small = pttl("crier:{small:a}:hist");
    assert!(small > 200_000 && small <= 330_000, "small:a history expiry {small} ms");
    let meta = pttl("crier:{small:a}:meta");
    assert!(meta >= 3_600_000, "the meta outlives every history: {meta} ms");
    assert_eq!(int(&redis, &["EXISTS", "crier:{none:a}:hist"]), 0, "no history kept at all");
}

async fn recovery_without_history(server: &Server) {
    let token = server.token("u1", &["*"], &[]);
    for channel in ["none:a", "norec:a", "plain"] {
        let first = server.publish(channel, json!(1)).await;
        let epoch = first["epoch"].as_str().unwrap().to_owned();
        server.publish(channel, json!(2)).await;
        server.publish(channel, json!(3)).await;
        let mut c = server.client(&token).await;
        let ack = c.resubscribe(channel, &epoch, 1, 1).await;
        assert_eq!(ack["type"], "ack", "{channel}: {ack}");
        assert_eq!(ack["offset"], 3, "{channel}: {ack}");
        if channel == "plain" {
            assert_eq!(ack["recovered"], true, "{ack}");
            assert!(ack.get("reason").is_none(), "{ack}");
            assert_eq!(c.recv_type("message").await["data"], 2, "the missed messages follow");
            assert_eq!(c.recv_type("message").await["data"], 3);
        } else {
            assert_eq!(ack["recovered"], false, "{channel}: {ack}");
            assert_eq!(ack["reason"], "no_history", "{channel}: {ack}");
        }
        // Live from the top: the next message is the new one, nothing replayed before it.
        server.publish(channel, json!("live")).await;
        let m = c.recv_type("message").await;
        assert_eq!((m["data"].clone(), m["offset"].clone()), (json!("live"), json!(4)), "{channel}: {m}");
    }
    // MessagePack carries the same reason.
    let mut mp = mp_connect(server, &token).await;
    let top = rest_history(server, "none:a").await;
    let epoch = top["epoch"].as_str().unwrap();
    let recover = json!({"type":"subscribe","channel":"none:a","recover":{"epoch":epoch,"offset":1}});
    let ack = mp_request(&mut mp, recover, 5).await;
    assert_eq!((ack["type"].clone(), ack["recovered"].clone()), (json!("ack"), json!(false)), "{ack}");
    assert_eq!(ack["reason"], "no_history", "{ack}");
    // `norec` keeps history (it is only not recovered from).
    let kept = rest_history(server, "norec:a").await;
    let data: Vec<Value> = kept["messages"].as_array().unwrap().iter().map(|m| m["data"].clone()).collect();
    assert_eq!(data, [json!(1), json!(2), json!(3), json!("live")], "{kept}");
}

#[tokio::test]
async fn no_history_or_no_recovery_answers_recovered_false_no_history_memory() {
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, None, "n1").await;
    recovery_without_history(&server).await;
}

#[tokio::test]
async fn no_history_or_no_recovery_answers_recovered_false_no_history_redis() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, Some(&redis), "n1").await;
    recovery_without_history(&server).await;
}

async fn presence_off(server: &Server, redis: Option<&RedisServer>) {
    let token = server.token("u1", &["*"], &[]);
    let mut c = server.client(&token).await;
    c.subscribe("quiet:a", 1).await;
    c.subscribe("plain", 2).await;
    let p = c.request(json!({"type":"presence","channel":"quiet:a"}), 3).await;
    assert_error(&p, "forbidden", "quiet:a");
    let p = c.request(json!({"type":"presence","channel":"plain"}), 4).await;
    assert_eq!(p["clients"].as_array().map(Vec::len), Some(1), "{p}");

    let r = server.get("/api/v1/channels/quiet:a/presence").await;
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "forbidden", "{body}");
    assert!(body["message"].as_str().is_some_and(|m| m.contains("presence")), "{body}");
    let r = server.get("/api/v1/channels/plain/presence").await;
    assert_eq!(r.status(), 200);

    if let Some(redis) = redis {
        assert_eq!(int(redis, &["EXISTS", "crier:{quiet:a}:pres", "crier:{quiet:a}:pres:data"]), 0);
        assert_eq!(int(redis, &["EXISTS", "crier:{plain}:pres"]), 1);
    }
    // Messages still flow.
    server.publish("quiet:a", json!("hi")).await;
    assert_eq!(c.recv_type("message").await["data"], "hi");
}

#[tokio::test]
async fn presence_off_is_not_entered_and_forbidden_memory() {
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, None, "n1").await;
    presence_off(&server, None).await;
}

#[tokio::test]
async fn presence_off_is_not_entered_and_forbidden_redis() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, Some(&redis), "n1").await;
    presence_off(&server, Some(&redis)).await;
}

async fn client_publish_off(server: &Server) {
    let token = server.token("u1", &["*"], &["*"]);
    let mut c = server.client(&token).await;
    c.subscribe("ro:a", 1).await;
    let r = c.request(json!({"type":"publish","channel":"ro:a","data":1}), 2).await;
    assert_error(&r, "forbidden", "ro:a");
    let r = c.request(json!({"type":"publish","channel":"plain","data":1}), 3).await;
    assert_eq!(r["type"], "ack", "the token allows it elsewhere: {r}");

    // MessagePack: the same refusal.
    let mut mp = mp_connect(server, &token).await;
    let reply = mp_request(&mut mp, json!({"type":"publish","channel":"ro:a","data":1}), 7).await;
    assert_error(&reply, "forbidden", "ro:a");

    // The backend's REST publish is not affected.
    server.publish("ro:a", json!("from the backend")).await;
    assert_eq!(c.recv_type("message").await["data"], "from the backend");
    let errors = server.metric(r#"crier_client_errors_total{code="forbidden"}"#).await;
    assert!(errors >= 2.0, "refusals are counted: {errors}");
}

#[tokio::test]
async fn client_publish_off_is_forbidden_whatever_the_token_memory() {
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, None, "n1").await;
    client_publish_off(&server).await;
}

#[tokio::test]
async fn client_publish_off_is_forbidden_whatever_the_token_redis() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, Some(&redis), "n1").await;
    client_publish_off(&server).await;
}

/// `room` holds 2 subscribers: a third (on `b`, which may be another node) is refused with
/// `channel_full` until one leaves; another channel of the namespace has its own count.
async fn max_subscribers(a: &Server, b: &Server) {
    let token = a.token("u1", &["*"], &[]);
    let mut c1: Client = a.client(&token).await;
    let mut c2 = b.client(&token).await;
    let mut c3 = b.client(&token).await;
    c1.subscribe("room:1", 1).await;
    c2.subscribe("room:1", 1).await;
    let r = c3.request(json!({"type":"subscribe","channel":"room:1"}), 1).await;
    assert_error(&r, "channel_full", "room:1");
    assert!(r["message"].as_str().is_some_and(|m| m.contains("max_subscribers")), "{r}");
    c3.subscribe("room:2", 2).await;
    c3.subscribe("plain", 3).await;

    let r = c1.request(json!({"type":"unsubscribe","channel":"room:1"}), 2).await;
    assert_eq!(r["type"], "ack", "{r}");
    c3.subscribe("room:1", 4).await;
    // The refused client got nothing of the channel before; now it does.
    a.publish("room:1", json!("in")).await;
    assert_eq!(c3.recv_type("message").await["data"], "in");
    assert_eq!(c2.recv_type("message").await["data"], "in");
    // A connection that goes away frees its place too.
    drop(c2);
    let mut c4 = a.client(&token).await;
    crier_testkit::poll("a place frees up", async || {
        let r = c4.request(json!({"type":"subscribe","channel":"room:1"}), 9).await;
        if r["type"] == "ack" { Ok(()) } else { Err(r.to_string()) }
    })
    .await;
    let full = b.metric(r#"crier_client_errors_total{code="channel_full"}"#).await;
    assert!(full >= 1.0, "counted: {full}");
}

/// `stage` holds 1 subscriber and announces joins and leaves: a refused subscribe is no join
/// (nor leave) for the one inside, however often it is tried.
async fn refused_is_not_announced(a: &Server, b: &Server) {
    let token = a.token("u1", &["*"], &[]);
    let mut inside: Client = a.client(&token).await;
    let mut outside = b.client(&token).await;
    inside.subscribe("stage:1", 1).await;
    for id in 1..=3 {
        let r = outside.request(json!({"type":"subscribe","channel":"stage:1"}), id).await;
        assert_error(&r, "channel_full", "stage:1");
    }
    a.publish("stage:1", json!("after")).await;
    let next = inside.recv().await;
    assert_eq!((next["type"].as_str(), &next["data"]), (Some("message"), &json!("after")), "{next}");
}

#[tokio::test]
async fn a_refused_subscribe_is_not_announced_memory() {
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, None, "n1").await;
    refused_is_not_announced(&server, &server).await;
}

#[tokio::test]
async fn a_refused_subscribe_is_not_announced_on_redis() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(NAMESPACES);
    let a = node(&file, Some(&redis), "n1").await;
    let b = node(&file, Some(&redis), "n2").await;
    refused_is_not_announced(&a, &b).await;
}

#[tokio::test]
async fn max_subscribers_refuses_with_channel_full_memory() {
    let file = ConfigFile::new(NAMESPACES);
    let server = node(&file, None, "n1").await;
    max_subscribers(&server, &server).await;
}

#[tokio::test]
async fn max_subscribers_is_cluster_wide_on_redis() {
    let redis = RedisServer::start();
    let file = ConfigFile::new(NAMESPACES);
    let a = node(&file, Some(&redis), "n1").await;
    let b = node(&file, Some(&redis), "n2").await;
    max_subscribers(&a, &b).await;
}

#[tokio::test]
async fn a_bad_namespace_exits_64_naming_it() {
    let file = ConfigFile::new("[namespaces.chat]\nhistory_sise = 5\n[namespaces.\"a:b\"]\n");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["--listen", "127.0.0.1:0", "--jwt-secret", support::SECRET, "--config", file.path()])
        .env_remove("CRIER_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("namespaces.chat.history_sise: unknown namespace option"), "{err}");
    assert!(err.contains("did you mean `history_size`"), "{err}");
    assert!(err.contains("namespaces.a:b"), "{err}");
}
