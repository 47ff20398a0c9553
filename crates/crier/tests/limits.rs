//! Limits that need their own nodes: connections per node, REST rate per API key, per-IP
//! handshake limits behind trusted proxies, and the cluster-wide per-user rate in Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::Server;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn max_connections_per_node_answers_503_before_the_upgrade() {
    let server = Server::start(&["--max-connections", "2"]).await;
    let token = server.token("u", &[], &[]);
    let _a = server.client(&token).await;
    let _b = server.client(&token).await;
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    match support::Client::connect(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 503);
            let body: Value = serde_json::from_slice(r.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["error"], "unavailable");
        }
        other => panic!("expected a 503, got {other:?}", other = other.map(|_| ())),
    }
    assert!(server.metric("crier_handshakes_total{result=\"unavailable\"}").await >= 1.0);
}

#[tokio::test]
async fn rest_rate_is_per_api_key() {
    let server = Server::start(&["--api-keys", "k1,k2", "--api-rate", "1", "--api-burst", "2"]).await;
    let http = reqwest::Client::new();
    let publish = async |key: &str| {
        http.post(server.url("/api/v1/publish"))
            .bearer_auth(key)
            .json(&json!({"channel":"c","data":1}))
            .send()
            .await
            .unwrap()
    };
    assert_eq!(publish("k1").await.status(), 200);
    assert_eq!(publish("k1").await.status(), 200);
    let r = publish("k1").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "rate_limited");
    assert_eq!(publish("k2").await.status(), 200, "another key has its own budget");
    assert!(server.metric("crier_rate_limited_total{kind=\"api\"}").await >= 1.0);
}

/// Handshake attempts (not upgrades: enough to pass or hit the per-IP limiter).
async fn handshake_status(server: &Server, forwarded_for: Option<&str>) -> u16 {
    let mut req = reqwest::Client::new().get(server.url("/ws"));
    if let Some(ip) = forwarded_for {
        req = req.header("x-forwarded-for", ip);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn forwarded_for_counts_only_behind_trusted_proxies() {
    let limited = ["--handshake-rate", "1", "--handshake-burst", "1"];
    // Behind a trusted proxy (the test itself, on 127.0.0.1): each client IP has its own budget.
    let mut args = limited.to_vec();
    args.extend(["--trusted-proxies", "127.0.0.0/8"]);
    let server = Server::start(&args).await;
    assert_eq!(handshake_status(&server, Some("198.51.100.1")).await, 401);
    assert_eq!(handshake_status(&server, Some("198.51.100.2")).await, 401);
    assert_eq!(handshake_status(&server, Some("198.51.100.1")).await, 429);
    // Not trusted: the header is ignored and every request counts against 127.0.0.1.
    let server = Server::start(&limited).await;
    assert_eq!(handshake_status(&server, Some("198.51.100.1")).await, 401);
    assert_eq!(handshake_status(&server, Some("198.51.100.2")).await, 429);
}

/// Sends `n` pings and counts how many were answered with `pong` (the rest: `rate_limited`).
async fn pongs(c: &mut support::Client, n: u64) -> usize {
    let mut ok = 0;
    for id in 0..n {
        let r = c.request(json!({"type":"ping"}), id + 1).await;
        if r["type"] == "pong" {
            ok += 1;
        } else {
            assert_eq!(r["code"], "rate_limited", "{r}");
        }
    }
    ok
}

#[tokio::test]
async fn cluster_scope_shares_the_user_rate_across_nodes() {
    let redis = crier_testkit::redis::RedisServer::start();
    let url = redis.url();
    let common = ["--redis-url", url.as_str(), "--user-rate", "1", "--user-burst", "4"];
    let with = |scope: &'static str, name: &'static str| {
        let mut a = common.to_vec();
        a.extend(["--user-rate-scope", scope, "--node-id", name]);
        a
    };
    let (a, b) = (Server::start(&with("cluster", "c1")).await, Server::start(&with("cluster", "c2")).await);
    let token = a.token("busy", &[], &[]);
    let (mut on_a, mut on_b) = (a.client(&token).await, b.client(&token).await);
    let answered = pongs(&mut on_a, 3).await + pongs(&mut on_b, 3).await;
    assert!(answered <= 5, "a burst of 4 (+1 refilled at most) across the cluster, got {answered} of 6");

    // The same traffic with per-node limits passes entirely.
    let (c, d) = (Server::start(&with("node", "n1")).await, Server::start(&with("node", "n2")).await);
    let token = c.token("busy2", &[], &[]);
    let (mut on_c, mut on_d) = (c.client(&token).await, d.client(&token).await);
    assert_eq!(pongs(&mut on_c, 3).await + pongs(&mut on_d, 3).await, 6);
}
