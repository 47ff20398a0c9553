//! Server-side control against the real binary, on the memory broker and on two nodes sharing a
//! real redis-server: REST `subscribe`/`unsubscribe` reaching every WebSocket and SSE connection
//! of a user, the `subs` claim, `disconnect` with a code and reason, token invalidation (at the
//! handshake, on refresh, for live connections, across nodes and a node restart) and a user's
//! connections, cluster-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use crier_testkit::redis::RedisServer;
use crier_testkit::until;
use futures_util::StreamExt;
use serde_json::{Value, json};
use support::{Client, SECRET, Server, WAIT};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A token with any claims (`exp` an hour ahead unless given).
fn token(mut claims: Value) -> String {
    if claims.get("exp").is_none() {
        claims["exp"] = json!(now() + 3600);
    }
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

async fn ws(server: &Server, token: &str) -> Client {
    server.client(token).await
}

/// A minimal SSE reader: `(event, data)` pairs.
struct Sse {
    resp: reqwest::Response,
    buf: Vec<u8>,
    /// The last `id:` seen (the resume cursor).
    last_id: Option<String>,
}

impl Sse {
    async fn open(server: &Server, token: &str, channel: &str) -> Sse {
        Sse::resume(server, token, channel, None).await
    }

    async fn resume(server: &Server, token: &str, channel: &str, last_id: Option<&str>) -> Sse {
        let mut req = server.http.get(server.url(&format!("/sse?channel={channel}"))).bearer_auth(token);
        if let Some(id) = last_id {
            req = req.header("last-event-id", id);
        }
        let resp = req.send().await.expect("GET /sse");
        assert_eq!(resp.status(), 200);
        Sse { resp, buf: Vec::new(), last_id: None }
    }

    /// The next event that is not a comment: (name, JSON data). `None` once the stream ended.
    async fn event(&mut self) -> Option<(String, Value)> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let block: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8(block).unwrap();
                let name = text.lines().find_map(|l| l.strip_prefix("event: ")).map(str::to_owned);
                if let Some(id) = text.lines().find_map(|l| l.strip_prefix("id: ")) {
                    self.last_id = Some(id.to_owned());
                }
                let data: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
                match name {
                    Some(name) => return Some((name, serde_json::from_str(&data.join("\n")).unwrap())),
                    None => continue,
                }
            }
            match tokio::time::timeout_at(deadline, self.resp.chunk()).await.expect("SSE data within the deadline") {
                Ok(Some(bytes)) => self.buf.extend_from_slice(&bytes),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    async fn until(&mut self, name: &str) -> Value {
        loop {
            let (n, data) = self.event().await.unwrap_or_else(|| panic!("stream ended before a {name} event"));
            if n == name {
                return data;
            }
        }
    }
}

async fn post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = server.post(path, body).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get(server: &Server, path: &str) -> (u16, Value) {
    let r = server.get(path).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Waits for the close frame: (code, reason).
async fn close_of(c: &mut Client) -> (u16, String) {
    let close = async {
        loop {
            match c.ws.next().await {
                Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                    return (code.into(), reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None | Some(Err(_)) => return (0, String::new()),
                Some(Ok(_)) => continue,
            }
        }
    };
    tokio::time::timeout(WAIT, close).await.expect("a close within the deadline")
}

/// Handshake status and body for a token (expecting a refusal).
async fn refused(server: &Server, token: &str) -> (u16, Value) {
    support::rejected(server, "/ws", &[("authorization", &format!("Bearer {token}"))]).await
}

#[tokio::test]
async fn server_subscribe_and_unsubscribe_reach_every_websocket_and_sse_connection_of_the_user() {
    let server = Server::start(&[]).await;
    // The token allows only "own": the server's subscribe bypasses it.
    let t1 = token(json!({"sub": "u1", "channels": ["own"], "iat": now()}));
    let mut a = ws(&server, &t1).await;
    let mut sse = Sse::open(&server, &t1, "own").await;
    assert_eq!(sse.until("welcome").await["user"], "u1");
    sse.until("subscribed").await;
    let mut other = ws(&server, &token(json!({"sub": "u2", "channels": ["*"]}))).await;
    other.subscribe("u2:ch", 1).await;
    server.publish("team:1", json!("before")).await;

    let (status, body) = post(&server, "/api/v1/subscribe", json!({"user": "u1", "channel": "team:1"})).await;
    assert_eq!((status, body), (200, json!({"subscribed": 2})));
    let f = a.recv_type("subscribed").await;
    assert_eq!(
        (f["channel"].clone(), f["server"].clone(), f["offset"].clone()),
        (json!("team:1"), json!(true), json!(1))
    );
    assert!(f["epoch"].is_string(), "{f}");
    let e = sse.until("subscribed").await;
    assert_eq!(
        (e["type"].clone(), e["channel"].clone(), e["server"].clone()),
        (json!("subscribed"), json!("team:1"), json!(true))
    );

    server.publish("team:1", json!("hello")).await;
    let m = a.recv_type("message").await;
    assert_eq!(
        (m["channel"].clone(), m["data"].clone(), m["offset"].clone()),
        (json!("team:1"), json!("hello"), json!(2))
    );
    assert_eq!(sse.until("message").await["data"], "hello");
    // The other user was not subscribed: its next message is its own channel's.
    server.publish("u2:ch", json!("mine")).await;
    assert_eq!(other.recv_type("message").await["channel"], "u2:ch");

    // A user's connections, with their transports and channels.
    let (status, body) = get(&server, "/api/v1/users/u1/connections").await;
    assert_eq!(status, 200);
    let mut conns: Vec<Value> = body["connections"].as_array().unwrap().clone();
    conns.sort_by_key(|c| c["transport"].as_str().unwrap().to_owned());
    assert_eq!(conns.len(), 2, "{body}");
    assert_eq!(conns[0]["transport"], "sse");
    assert_eq!(conns[0]["channels"], json!(["own", "team:1"]));
    assert_eq!(conns[1]["transport"], "websocket");
    assert_eq!(conns[1]["channels"], json!(["team:1"]));
    assert!(conns.iter().all(|c| c["node"] == "test-node" && c["client"].as_str().unwrap().starts_with("test-node-")));
    assert_eq!(get(&server, "/api/v1/users/nobody/connections").await, (200, json!({"connections": []})));

    // Subscribing again is not a second subscription; the count says who was asked.
    let (status, _) = post(&server, "/api/v1/subscribe", json!({"user": "u1", "channel": "team:1"})).await;
    assert_eq!(status, 200);
    let (status, body) = post(&server, "/api/v1/unsubscribe", json!({"user": "u1", "channel": "team:1"})).await;
    assert_eq!((status, body), (200, json!({"unsubscribed": 2})));
    let u = a.recv_type("unsubscribed").await;
    assert_eq!((u["channel"].clone(), u["server"].clone()), (json!("team:1"), json!(true)));
    assert_eq!(sse.until("unsubscribed").await["server"], true);
    until("the channel left on both connections", async || {
        let (_, body) = get(&server, "/api/v1/users/u1/connections").await;
        body["connections"].as_array().is_some_and(|c| c.iter().all(|c| !c["channels"].to_string().contains("team:1")))
    })
    .await;
    // Nothing more arrives on the channel: the next frame is the pong.
    server.publish("team:1", json!("after")).await;
    let pong = a.request(json!({"type": "ping"}), 9).await;
    assert_eq!(pong["type"], "pong");

    // Bad input: clear 400s.
    for (body, code) in [
        (json!({"user": "", "channel": "c"}), "bad_request"),
        (json!({"user": "u1", "channel": "bad channel"}), "invalid_channel"),
        (json!({"user": "u1"}), "bad_request"),
    ] {
        let (status, b) = post(&server, "/api/v1/subscribe", body.clone()).await;
        assert_eq!((status, b["error"].as_str()), (400, Some(code)), "{body}: {b}");
    }
    let (status, b) = post(&server, "/api/v1/unsubscribe", json!({"user": "u1", "channel": "{x}"})).await;
    assert_eq!((status, b["error"].as_str()), (400, Some("invalid_channel")));
}

#[tokio::test]
async fn server_subscribe_recovers_and_respects_max_subscriptions() {
    let server = Server::start(&["--max-subscriptions-per-connection", "1"]).await;
    let mut a = ws(&server, &token(json!({"sub": "u1", "channels": ["*"]}))).await;
    let first = server.publish("room", json!(1)).await;
    server.publish("room", json!(2)).await;
    let epoch = first["epoch"].as_str().unwrap();
    let (status, body) = post(
        &server,
        "/api/v1/subscribe",
        json!({"user": "u1", "channel": "room", "recover": {"epoch": epoch, "offset": 1}}),
    )
    .await;
    assert_eq!((status, body), (200, json!({"subscribed": 1})));
    let f = a.recv_type("subscribed").await;
    assert_eq!((f["recovered"].clone(), f["offset"].clone()), (json!(true), json!(2)));
    let m = a.recv().await;
    assert_eq!((m["type"].clone(), m["offset"].clone()), (json!("message"), json!(2)), "the missed message follows");
    // Over the limit: the connection is told with an error frame naming the channel.
    post(&server, "/api/v1/subscribe", json!({"user": "u1", "channel": "second"})).await;
    let e = a.recv_type("error").await;
    assert_eq!((e["code"].clone(), e["channel"].clone()), (json!("too_many_subscriptions"), json!("second")));
    assert!(e.get("id").is_none(), "no id: no request of the client's: {e}");
}

#[tokio::test]
async fn subs_claim_subscribes_at_connect_after_welcome_and_bad_names_invalidate_the_token() {
    let server = Server::start(&[]).await;
    server.publish("news", json!("old")).await;
    let t = token(json!({"sub": "u1", "subs": ["news", "team:7"]}));
    let mut a = ws(&server, &t).await;
    let mut got = [a.recv().await, a.recv().await];
    got.sort_by_key(|f| f["channel"].as_str().unwrap_or("").to_owned());
    assert_eq!(got[0]["type"], "subscribed");
    assert_eq!(
        (got[0]["channel"].clone(), got[0]["offset"].clone(), got[0]["server"].clone()),
        (json!("news"), json!(1), json!(true))
    );
    assert_eq!((got[1]["channel"].clone(), got[1]["server"].clone()), (json!("team:7"), json!(true)));
    server.publish("team:7", json!("hi")).await;
    assert_eq!(a.recv_type("message").await["data"], "hi");
    // A refresh whose token allows none of them keeps the server's subscriptions.
    let r = a.request(json!({"type": "refresh", "token": token(json!({"sub": "u1"}))}), 5).await;
    assert_eq!(r["type"], "ack", "{r}");
    server.publish("news", json!("still")).await;
    assert_eq!(a.recv_type("message").await["data"], "still");

    // SSE too: the named channel's event, then the claim's.
    let mut sse = Sse::open(&server, &token(json!({"sub": "u3", "channels": ["own"], "subs": ["news"]})), "own").await;
    sse.until("welcome").await;
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let e = sse.until("subscribed").await;
        seen.push((e["channel"].as_str().unwrap().to_owned(), e["server"].as_bool()));
    }
    seen.sort();
    assert_eq!(seen, [("news".to_owned(), Some(true)), ("own".to_owned(), None)]);

    let (status, body) = refused(&server, &token(json!({"sub": "u1", "subs": ["ok", "bad name"]}))).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("token_invalid")));
    assert!(body["message"].as_str().unwrap().contains("subs"), "{body}");
    let (status, _) = refused(&server, &token(json!({"sub": "u1", "subs": "news"}))).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn disconnect_takes_a_code_and_reason_from_the_table() {
    let server = Server::start(&[]).await;
    let t = token(json!({"sub": "u1"}));
    let mut a = ws(&server, &t).await;
    let (status, body) =
        post(&server, "/api/v1/disconnect", json!({"user": "u1", "code": 1012, "reason": "moving you"})).await;
    assert_eq!((status, body), (200, json!({"disconnected": 1})));
    assert_eq!(close_of(&mut a).await, (1012, "moving you".to_owned()));

    let mut b = ws(&server, &t).await;
    let mut sse = Sse::open(&server, &token(json!({"sub": "u1", "channels": ["c"]})), "c").await;
    sse.until("subscribed").await;
    let (status, body) = post(&server, "/api/v1/disconnect", json!({"user": "u1"})).await;
    assert_eq!((status, body), (200, json!({"disconnected": 2})));
    assert_eq!(close_of(&mut b).await.0, 4003, "the default stays 4003");
    assert_eq!(sse.until("close").await["code"], 4003);

    let mut c = ws(&server, &t).await;
    post(&server, "/api/v1/disconnect", json!({"user": "u1", "code": 4001})).await;
    assert_eq!(close_of(&mut c).await.0, 4001);

    for body in [
        json!({"user": "u1", "code": 1000}),
        json!({"user": "u1", "code": 4009}),
        json!({"user": "u1", "code": "4003"}),
        json!({"user": "u1", "reason": "x".repeat(124)}),
        json!({"user": ""}),
    ] {
        let (status, b) = post(&server, "/api/v1/disconnect", body.clone()).await;
        assert_eq!((status, b["error"].as_str()), (400, Some("bad_request")), "{body}: {b}");
    }
}

#[tokio::test]
async fn invalidate_refuses_older_tokens_at_the_handshake_and_on_refresh_and_closes_live_ones() {
    let server = Server::start(&[]).await;
    let old = token(json!({"sub": "u1", "iat": now() - 30}));
    let no_iat = token(json!({"sub": "u1"}));
    let mut a = ws(&server, &old).await;
    let mut b = ws(&server, &no_iat).await;
    let mut other = ws(&server, &token(json!({"sub": "u2", "iat": now() - 30}))).await;

    let r =
        server.http.post(server.url("/api/v1/users/u1/invalidate")).bearer_auth(support::API_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200, "an empty body means before = now");
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"disconnected": 2}));
    assert_eq!(close_of(&mut a).await.0, 4001);
    assert_eq!(close_of(&mut b).await.0, 4001, "a token without iat counts as issued before");
    assert_eq!(other.request(json!({"type": "ping"}), 1).await["type"], "pong", "other users are untouched");

    let (status, body) = refused(&server, &old).await;
    assert_eq!((status, body["error"].as_str()), (401, Some("token_revoked")));
    assert_eq!(refused(&server, &no_iat).await.0, 401);
    server.wait_metric("crier_refusals_total{surface=\"handshake\",reason=\"token_revoked\"}", 2.0).await;
    // SSE is refused the same way.
    let r = server.http.get(server.url("/sse?channel=c")).bearer_auth(&old).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "token_revoked");

    // A token issued since is accepted; refreshing to a revoked one is refused.
    let fresh = token(json!({"sub": "u1", "iat": now()}));
    let mut c = ws(&server, &fresh).await;
    let r = c.request(json!({"type": "refresh", "token": old}), 2).await;
    assert_eq!((r["type"].clone(), r["code"].clone()), (json!("error"), json!("token_invalid")));
    assert!(r["message"].as_str().unwrap().contains("token_revoked"), "{r}");

    // An earlier `before` does not lower the bar; a future one is refused.
    let (status, body) = post(&server, "/api/v1/users/u1/invalidate", json!({"before": now() - 3600})).await;
    assert_eq!((status, body), (200, json!({"disconnected": 0})));
    assert_eq!(refused(&server, &old).await.0, 401);
    let (status, _) = post(&server, "/api/v1/users/u1/invalidate", json!({"before": now() + 3600})).await;
    assert_eq!(status, 400);
    let (status, _) = post(&server, "/api/v1/users/u1/invalidate", json!({"before": "yesterday"})).await;
    assert_eq!(status, 400);
}

async fn node(redis: &RedisServer, name: &str) -> Server {
    let url = redis.url();
    Server::start(&["--redis-url", url.as_str(), "--node-id", name, "--presence-ttl", "2s"]).await
}

#[tokio::test]
async fn on_two_nodes_every_operation_counts_and_reaches_the_whole_cluster() {
    let redis = RedisServer::start();
    every_operation_on_two_nodes(|name| node(&redis, name)).await;
}

#[tokio::test]
async fn on_two_nodes_on_nats_every_operation_counts_and_reaches_the_whole_cluster() {
    if !crier_testkit::nats::nats_available("on_two_nodes_on_nats_every_operation") {
        return;
    }
    let nats = crier_testkit::nats::NatsServer::start();
    let url = nats.url();
    let url = url.as_str();
    every_operation_on_two_nodes(|name| async move {
        Server::start(&["--nats-url", url, "--node-id", name, "--presence-ttl", "2s"]).await
    })
    .await;
}

/// Two nodes (a third one joins later) on a shared broker, started by `node`.
async fn every_operation_on_two_nodes<F, Fut>(node: F)
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = Server>,
{
    let n1 = node("n1").await;
    let n2 = node("n2").await;
    let old = token(json!({"sub": "u1", "channels": ["own"], "iat": now() - 30}));
    let mut a = n1.client(&old).await;
    let mut sse = Sse::open(&n2, &old, "own").await;
    sse.until("subscribed").await;
    let mut c = n2.client(&old).await;

    // Subscribe through n1: the connections on n2 are counted and subscribed too.
    let (status, body) = post(&n1, "/api/v1/subscribe", json!({"user": "u1", "channel": "team:x"})).await;
    assert_eq!((status, body), (200, json!({"subscribed": 3})));
    assert_eq!(a.recv_type("subscribed").await["server"], true);
    assert_eq!(c.recv_type("subscribed").await["server"], true);
    assert_eq!(sse.until("subscribed").await["channel"], "team:x");
    n2.publish("team:x", json!("all")).await;
    assert_eq!(a.recv_type("message").await["data"], "all");
    assert_eq!(c.recv_type("message").await["data"], "all");
    assert_eq!(sse.until("message").await["data"], "all");

    let (status, body) = get(&n2, "/api/v1/users/u1/connections").await;
    assert_eq!(status, 200);
    let mut seen: Vec<(String, String)> = body["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["node"].as_str().unwrap().to_owned(), c["transport"].as_str().unwrap().to_owned()))
        .collect();
    seen.sort();
    let want = [("n1", "websocket"), ("n2", "sse"), ("n2", "websocket")].map(|(n, t)| (n.to_owned(), t.to_owned()));
    assert_eq!(seen, want, "{body}");

    let (status, body) = post(&n2, "/api/v1/unsubscribe", json!({"user": "u1", "channel": "team:x"})).await;
    assert_eq!((status, body), (200, json!({"unsubscribed": 3})));
    assert_eq!(a.recv_type("unsubscribed").await["server"], true);

    // Invalidate through n2: every connection using the old token closes with 4001, and both
    // nodes refuse it, also a node started afterwards (loaded from Redis).
    let (status, body) = post(&n2, "/api/v1/users/u1/invalidate", json!({})).await;
    assert_eq!((status, body), (200, json!({"disconnected": 3})));
    assert_eq!(close_of(&mut a).await.0, 4001);
    assert_eq!(close_of(&mut c).await.0, 4001);
    assert_eq!(sse.until("close").await["code"], 4001);
    assert_eq!(refused(&n1, &old).await.1["error"], "token_revoked");
    assert_eq!(refused(&n2, &old).await.1["error"], "token_revoked");
    let n3 = node("n3").await;
    assert_eq!(refused(&n3, &old).await.1["error"], "token_revoked");

    // Disconnect with a code, cluster-wide.
    let fresh = token(json!({"sub": "u1", "iat": now()}));
    let mut d = n1.client(&fresh).await;
    let mut e = n3.client(&fresh).await;
    let (status, body) = post(&n2, "/api/v1/disconnect", json!({"user": "u1", "code": 1012})).await;
    assert_eq!((status, body), (200, json!({"disconnected": 2})));
    assert_eq!(close_of(&mut d).await.0, 1012);
    assert_eq!(close_of(&mut e).await.0, 1012);
}

#[tokio::test]
async fn revocations_survive_a_node_restart_on_redis() {
    let redis = RedisServer::start();
    let old = token(json!({"sub": "u9", "iat": now() - 30}));
    {
        let n1 = node(&redis, "r1").await;
        let (status, _) = post(&n1, "/api/v1/users/u9/invalidate", json!({"before": now() - 10})).await;
        assert_eq!(status, 200);
    }
    let n1 = node(&redis, "r1").await;
    assert_eq!(refused(&n1, &old).await.1["error"], "token_revoked");
    let newer = token(json!({"sub": "u9", "iat": now() - 5}));
    let mut req = n1.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {newer}")).unwrap());
    assert!(Client::connect(req).await.is_ok(), "a token issued after `before` connects");
}

#[tokio::test]
async fn a_client_takes_over_a_server_subscription_to_recover_from_its_own_position() {
    let server = Server::start(&[]).await;
    // The token does not allow "feed" by pattern: only the `subs` claim gives it.
    let t = token(json!({"sub": "u1", "subs": ["feed"]}));
    let mut a = ws(&server, &t).await;
    let s = a.recv_type("subscribed").await;
    let epoch = s["epoch"].as_str().unwrap().to_owned();
    server.publish("feed", json!(1)).await;
    server.publish("feed", json!(2)).await;
    assert_eq!(a.recv_type("message").await["offset"], 1);
    assert_eq!(a.recv_type("message").await["offset"], 2);
    drop(a);
    server.publish("feed", json!(3)).await;
    server.publish("feed", json!(4)).await;

    // Reconnected: the claim subscribes again (no position), then the client recovers from 2.
    let mut b = ws(&server, &t).await;
    assert_eq!(b.recv_type("subscribed").await["offset"], 4);
    let ack = b.resubscribe("feed", &epoch, 2, 7).await;
    assert_eq!((ack["type"].clone(), ack["recovered"].clone()), (json!("ack"), json!(true)), "{ack}");
    let m = b.recv_type("message").await;
    assert_eq!(m["offset"], 3, "the missed messages follow the ack");
    assert_eq!(b.recv_type("message").await["offset"], 4);
    server.publish("feed", json!(5)).await;
    assert_eq!(b.recv_type("message").await["offset"], 5);
    // Still the server's: a client subscribe without the server's grant is refused as before.
    let r =
        b.request(json!({"type": "subscribe", "channel": "other", "recover": {"epoch": epoch, "offset": 0}}), 8).await;
    assert_eq!(r["code"], "forbidden");
    // And the server can still take it away.
    let (_, body) = post(&server, "/api/v1/unsubscribe", json!({"user": "u1", "channel": "feed"})).await;
    assert_eq!(body, json!({"unsubscribed": 1}));
    assert_eq!(b.recv_type("unsubscribed").await["server"], true);
}

#[tokio::test]
async fn messagepack_connections_get_the_same_server_frames() {
    let server = Server::start(&[]).await;
    let t = token(json!({"sub": "mp"}));
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("crier.v1.msgpack"));
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {t}")).unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("connects");
    let mut recv = async || loop {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time") {
            Some(Ok(Message::Binary(b))) => return rmp_serde::from_slice::<Value>(&b).expect("MessagePack"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a binary frame, got {other:?}"),
        }
    };
    assert_eq!(recv().await["type"], "welcome");
    post(&server, "/api/v1/subscribe", json!({"user": "mp", "channel": "c"})).await;
    let f = recv().await;
    assert_eq!(f["type"], "subscribed");
    assert_eq!((f["channel"].clone(), f["offset"].clone(), f["server"].clone()), (json!("c"), json!(0), json!(true)));
    assert!(f["epoch"].is_string());
    post(&server, "/api/v1/unsubscribe", json!({"user": "mp", "channel": "c"})).await;
    let u = recv().await;
    assert_eq!((u["type"].clone(), u["server"].clone()), (json!("unsubscribed"), json!(true)));
}

#[tokio::test]
async fn an_sse_stream_resumes_its_subs_channels_from_last_event_id() {
    let server = Server::start(&[]).await;
    let t = token(json!({"sub": "u5", "channels": ["own"], "subs": ["feed"]}));
    let mut sse = Sse::open(&server, &t, "own").await;
    let mut seen = 0;
    while seen < 2 {
        sse.until("subscribed").await;
        seen += 1;
    }
    server.publish("feed", json!(1)).await;
    assert_eq!(sse.until("message").await["offset"], 1);
    let id = sse.last_id.clone().expect("message events carry an id");
    drop(sse);
    server.publish("feed", json!(2)).await;
    server.publish("feed", json!(3)).await;

    let mut sse = Sse::resume(&server, &t, "own", Some(&id)).await;
    let feed = loop {
        let e = sse.until("subscribed").await;
        if e["channel"] == "feed" {
            break e;
        }
    };
    assert_eq!((feed["recovered"].clone(), feed["server"].clone()), (json!(true), json!(true)), "{feed}");
    let m = sse.until("message").await;
    assert_eq!((m["channel"].clone(), m["offset"].clone()), (json!("feed"), json!(2)), "the missed messages come");
    assert_eq!(sse.until("message").await["offset"], 3);
}
