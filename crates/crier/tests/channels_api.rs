//! The cluster's channels (`GET /api/v1/channels`), history deletion
//! (`DELETE /api/v1/channels/{channel}/history`), the node details of `/api/v1/info`, the admin
//! page's switch and the REST API's browser-Origin rule — against the real binary, on the memory
//! broker and on two nodes sharing a real redis-server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use crier_testkit::poll;
use crier_testkit::redis::RedisServer;
use serde_json::{Value, json};
use support::{API_KEY, Server};

async fn redis_node(redis: &RedisServer, name: &str) -> Server {
    let url = redis.url();
    Server::start(&["--redis-url", url.as_str(), "--node-id", name, "--presence-ttl", "2s"]).await
}

/// `GET path` → (status, body).
async fn get(server: &Server, path: &str) -> (u16, Value) {
    let r = server.get(path).await;
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The listing as `[(channel, subscribers)]`, asserting 200.
async fn listing(server: &Server, query: &str) -> (Vec<(String, u64)>, Value) {
    let (status, body) = get(server, &format!("/api/v1/channels{query}")).await;
    assert_eq!(status, 200, "GET /api/v1/channels{query}: {body}");
    let list = body["channels"]
        .as_array()
        .expect("channels")
        .iter()
        .map(|c| (c["channel"].as_str().expect("channel").to_owned(), c["subscribers"].as_u64().expect("count")))
        .collect();
    (list, body["cursor"].clone())
}

/// Polls the listing until it equals `want`.
async fn wait_listing(server: &Server, query: &str, want: &[(&str, u64)]) {
    let want: Vec<(String, u64)> = want.iter().map(|(c, n)| ((*c).to_owned(), *n)).collect();
    poll(format!("GET /api/v1/channels{query} lists {want:?}"), async || {
        let (got, _) = listing(server, query).await;
        if got == want { Ok(()) } else { Err(format!("{got:?}")) }
    })
    .await;
}

#[tokio::test]
async fn the_memory_broker_lists_active_channels_by_prefix_and_page() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["*"], &[]);
    let mut a = server.client(&token).await;
    let mut b = server.client(&token).await;
    a.subscribe("chat:a", 1).await;
    b.subscribe("chat:a", 1).await;
    a.subscribe("chat:b", 2).await;
    b.subscribe("news", 2).await;
    wait_listing(&server, "", &[("chat:a", 2), ("chat:b", 1), ("news", 1)]).await;
    wait_listing(&server, "?prefix=chat:", &[("chat:a", 2), ("chat:b", 1)]).await;

    // Paging: one at a time, the cursor of the last page is null.
    let mut seen = Vec::new();
    let mut cursor = Value::Null;
    for _ in 0..4 {
        let q = match cursor.as_str() {
            Some(c) => format!("?limit=1&cursor={c}"),
            None => "?limit=1".to_owned(),
        };
        let (page, next) = listing(&server, &q).await;
        seen.extend(page);
        cursor = next;
        if cursor.is_null() {
            break;
        }
    }
    assert_eq!(seen.iter().map(|(c, _)| c.as_str()).collect::<Vec<_>>(), ["chat:a", "chat:b", "news"]);
    assert!(cursor.is_null(), "the last page says there is no more");

    // Bad input: 400 with the contract's codes.
    for (q, code) in [
        ("?limit=0", "bad_request"),
        ("?limit=1001", "bad_request"),
        ("?limit=ten", "bad_request"),
        ("?prefix=a%20b", "invalid_channel"),
        ("?cursor=%7Bx%7D", "bad_request"),
        ("?unknown=1", "bad_request"),
    ] {
        let (status, body) = get(&server, &format!("/api/v1/channels{q}")).await;
        assert_eq!((status, body["error"].as_str()), (400, Some(code)), "{q}: {body}");
    }
    let r = reqwest::get(server.url("/api/v1/channels")).await.expect("GET");
    assert_eq!(r.status(), 401, "the API key is required");

    // Leaving updates the counts; a channel without subscribers leaves the list.
    a.request(json!({"type":"unsubscribe","channel":"chat:b"}), 3).await;
    drop(b);
    wait_listing(&server, "", &[("chat:a", 1)]).await;
}

#[tokio::test]
async fn two_nodes_on_redis_sum_their_counts_and_a_dead_node_s_channels_go() {
    let redis = RedisServer::start();
    let n1 = redis_node(&redis, "n1").await;
    let n2 = redis_node(&redis, "n2").await;
    let t = n1.token("u1", &["*"], &[]);
    let mut c1 = n1.client(&t).await;
    c1.subscribe("room:1", 1).await;
    let mut c2 = n2.client(&t).await;
    let mut c3 = n2.client(&t).await;
    c2.subscribe("room:1", 1).await;
    c3.subscribe("room:1", 1).await;
    c3.subscribe("room:9", 2).await;
    c1.subscribe("lobby", 2).await;
    for node in [&n1, &n2] {
        wait_listing(node, "", &[("lobby", 1), ("room:1", 3), ("room:9", 1)]).await;
    }
    wait_listing(&n1, "?prefix=room:&limit=1", &[("room:1", 3)]).await;
    let (_, cursor) = listing(&n1, "?prefix=room:&limit=1").await;
    assert_eq!(cursor, "room:1");
    let (page, cursor) = listing(&n1, "?prefix=room:&limit=1&cursor=room:1").await;
    assert_eq!((page, cursor), (vec![("room:9".to_owned(), 1)], Value::Null));

    // Redis loses everything (FLUSHALL: as a restart without persistence would, without a
    // reconnect): each node sees its counts were lost and reports them all again.
    redis.cmd(&["FLUSHALL"]);
    for node in [&n1, &n2] {
        wait_listing(node, "", &[("lobby", 1), ("room:1", 3), ("room:9", 1)]).await;
    }

    // n2 dies without a word: its counts leave the listing when its registry entry expires.
    drop(n2);
    wait_listing(&n1, "", &[("lobby", 1), ("room:1", 1)]).await;
    drop(c2);
    drop(c3);
}

/// Publishes 3 messages to a subscribed client, deletes the history, and checks what the
/// subscriber, a recovery from before and the REST history see.
async fn delete_history_on(publisher: &Server, subscriber: &Server) {
    let t = subscriber.token("u1", &["*"], &[]);
    let mut c = subscriber.client(&t).await;
    c.subscribe("doc:1", 1).await;
    let mut last = Value::Null;
    for i in 1..=3 {
        last = publisher.publish("doc:1", json!(i)).await;
    }
    for _ in 1..=3 {
        c.recv_type("message").await;
    }
    let old_epoch = last["epoch"].as_str().expect("epoch").to_owned();

    let r = publisher
        .http
        .delete(publisher.url("/api/v1/channels/doc:1/history"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.expect("json"), json!({"removed": true}));

    let (status, h) = get(publisher, "/api/v1/channels/doc:1/history").await;
    assert_eq!(status, 200);
    assert_eq!(h["messages"], json!([]), "no history left: {h}");
    assert_ne!(h["epoch"], old_epoch.as_str(), "a new epoch: {h}");

    // The next message: the live subscriber is told (gap, new epoch) before it.
    let next = publisher.publish("doc:1", json!("after")).await;
    assert_eq!(next["offset"], 1, "the channel starts over in the new epoch: {next}");
    let gap = c.recv_type("gap").await;
    assert_eq!(gap["epoch"], next["epoch"], "{gap}");
    let m = c.recv_type("message").await;
    assert_eq!((m["data"].clone(), m["epoch"].clone()), (json!("after"), next["epoch"].clone()));

    // A recovery from before the deletion: recovered false.
    let mut r = subscriber.client(&t).await;
    let ack = r.resubscribe("doc:1", &old_epoch, 2, 1).await;
    assert_eq!(ack["recovered"], false, "{ack}");

    // Bad channel names: 400 invalid_channel.
    let r = publisher
        .http
        .delete(publisher.url("/api/v1/channels/a%20b/history"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .expect("DELETE");
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.expect("json")["error"], "invalid_channel");
}

#[tokio::test]
async fn deleting_history_on_the_memory_broker_starts_a_new_epoch() {
    let server = Server::start(&[]).await;
    delete_history_on(&server, &server).await;
}

#[tokio::test]
async fn deleting_history_on_redis_starts_a_new_epoch_on_every_node() {
    let redis = RedisServer::start();
    let n1 = redis_node(&redis, "n1").await;
    let n2 = redis_node(&redis, "n2").await;
    delete_history_on(&n1, &n2).await;
}

#[tokio::test]
async fn deleting_history_on_nats_starts_a_new_epoch_on_every_node() {
    if !crier_testkit::nats::nats_available("deleting_history_on_nats") {
        return;
    }
    let nats = crier_testkit::nats::NatsServer::start();
    let url = nats.url();
    let n1 = Server::start(&["--nats-url", &url, "--node-id", "n1"]).await;
    let n2 = Server::start(&["--nats-url", &url, "--node-id", "n2"]).await;
    delete_history_on(&n1, &n2).await;
}

#[tokio::test]
async fn info_shows_uptime_connections_by_transport_and_memory() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["*"], &[]);
    let _ws = server.client(&token).await;
    let sse = server.http.get(server.url("/sse?channel=feed")).bearer_auth(&token).send().await.expect("GET /sse");
    assert_eq!(sse.status(), 200);
    let node = poll("info shows one WebSocket and one SSE connection", async || {
        let (_, body) = get(&server, "/api/v1/info").await;
        let n = body["nodes"][0].clone();
        if n["transports"] == json!({"ws": 1, "sse": 1}) { Ok(n) } else { Err(body.to_string()) }
    })
    .await;
    assert_eq!(node["connections"], 2, "{node}");
    assert!(node["uptime_s"].is_u64(), "{node}");
    assert!(node["memory_bytes"].as_u64().unwrap_or(0) > 1 << 20, "resident memory in bytes: {node}");
    assert!(node["version"].is_string() && node["node"] == "test-node", "{node}");
    drop(sse);
    poll("the closed SSE stream is no longer counted", async || {
        let (_, body) = get(&server, "/api/v1/info").await;
        let t = &body["nodes"][0]["transports"];
        if *t == json!({"ws": 1, "sse": 0}) { Ok(()) } else { Err(t.to_string()) }
    })
    .await;
}

#[tokio::test]
async fn the_admin_page_is_off_by_default_and_served_with_its_module_when_on() {
    let off = Server::start(&[]).await;
    for path in ["/admin", "/admin/admin.js"] {
        let r = reqwest::get(off.url(path)).await.expect("GET");
        assert_eq!(r.status(), 404, "{path} without `admin`");
    }
    let on = Server::start(&["--admin"]).await;
    let r = reqwest::get(on.url("/admin")).await.expect("GET /admin");
    assert_eq!(r.status(), 200);
    let csp = r.headers().get("content-security-policy").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("connect-src 'self'"), "{csp}");
    assert!(r.headers()["content-type"].to_str().unwrap_or("").starts_with("text/html"));
    let html = r.text().await.expect("body");
    assert!(html.contains(r#"src="/admin/admin.js""#), "the page loads its module");
    let r = reqwest::get(on.url("/admin/admin.js")).await.expect("GET /admin/admin.js");
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"].to_str().unwrap_or("").starts_with("text/javascript"));
    let js = r.text().await.expect("body");
    assert!(!js.contains("localStorage") && !js.contains("sessionStorage"), "the key stays in memory");
}

#[tokio::test]
async fn the_rest_api_refuses_browser_origins_other_than_its_own_host() {
    let server = Server::start(&[]).await;
    let call = async |origin: Option<&str>| {
        let mut req = server.http.get(server.url("/api/v1/info")).bearer_auth(API_KEY);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let r = req.send().await.expect("GET");
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    };
    assert_eq!(call(None).await.0, 200, "servers send no Origin");
    let own = format!("http://{}", server.addr);
    assert_eq!(call(Some(&own)).await.0, 200, "the node's own pages (the admin page)");
    for foreign in ["http://evil.example", "null", "http://127.0.0.1:1"] {
        let (status, body) = call(Some(foreign)).await;
        assert_eq!((status, body["error"].as_str()), (403, Some("forbidden")), "{foreign}: {body}");
    }
    // Also with a wrong key (nothing about the key is revealed to a foreign page).
    let r = server
        .http
        .post(server.url("/api/v1/publish"))
        .header("origin", "http://evil.example")
        .json(&json!({}))
        .send()
        .await
        .expect("POST");
    assert_eq!(r.status(), 403);
    assert!(server.metrics().await.contains(r#"reason="cross_origin""#), "counted as a refusal");

    // An origin the node allows (`allowed_origins`, the handshake's list) may call it too: a
    // browser app that called the API before this rule keeps working.
    let server = Server::start(&["--allowed-origins", "https://app.example"]).await;
    let r = server.http.get(server.url("/api/v1/info")).bearer_auth(API_KEY).header("origin", "https://app.example");
    assert_eq!(r.send().await.expect("GET").status(), 200, "an allowed origin");
    let r = server.http.get(server.url("/api/v1/info")).bearer_auth(API_KEY).header("origin", "https://other.example");
    assert_eq!(r.send().await.expect("GET").status(), 403, "another one");
}
