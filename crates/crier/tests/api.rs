//! The REST API and the operational endpoints against the real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::{API_KEY, Server};

#[tokio::test]
async fn api_keys_and_bad_requests() {
    let server = Server::start(&[]).await;
    let http = reqwest::Client::new();
    let body = json!({"channel":"c","data":1});
    let r = http.post(server.url("/api/v1/publish")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "unauthorized");
    let r = http.post(server.url("/api/v1/publish")).bearer_auth("wrong").json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);

    let cases: [(&str, u16, &str); 4] = [
        ("{not json", 400, "bad_request"),
        (r#"{"channel":"c"}"#, 400, "bad_request"),
        (r#"{"channel":"no spaces","data":1}"#, 400, "invalid_channel"),
        (r#"{"channel":"","data":1}"#, 400, "invalid_channel"),
    ];
    for (raw, status, code) in cases {
        let r = http
            .post(server.url("/api/v1/publish"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{raw}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"], code, "{raw}");
    }
    let huge = "x".repeat(200_000);
    let r = server.post("/api/v1/publish", json!({"channel":"c","data":huge})).await;
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "message_too_large");
    let r = server.get("/api/v1/nope").await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn idempotent_publish_and_broadcast() {
    let server = Server::start(&[]).await;
    let mut c = server.client(&server.token("u", &["*"], &[])).await;
    c.subscribe("a", 1).await;
    c.subscribe("b", 2).await;
    let body = json!({"channel":"a","data":"once","idempotency_key":"k-1"});
    let first: Value = server.post("/api/v1/publish", body.clone()).await.json().await.unwrap();
    let again: Value = server.post("/api/v1/publish", body).await.json().await.unwrap();
    assert_eq!(first, again, "a retry returns the first result");
    let r: Value = server
        .post("/api/v1/broadcast", json!({"channels":["a","b","bad name"],"data":{"x":1}}))
        .await
        .json()
        .await
        .unwrap();
    let results = r["results"].as_array().unwrap();
    assert_eq!(results[0]["offset"], 2);
    assert_eq!(results[1]["offset"], 1);
    assert_eq!(results[2]["error"], "invalid_channel");
    // The retried publish was delivered once: next come the two broadcast messages.
    let m: Vec<Value> = vec![c.recv().await, c.recv().await, c.recv().await];
    assert_eq!(m[0]["data"], "once");
    assert_eq!((m[1]["channel"].as_str(), m[1]["offset"].as_u64()), (Some("a"), Some(2)));
    assert_eq!((m[2]["channel"].as_str(), m[2]["offset"].as_u64()), (Some("b"), Some(1)));
    let r = server.post("/api/v1/broadcast", json!({"channels":[],"data":1})).await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn history_presence_info_disconnect() {
    let server = Server::start(&[]).await;
    for i in 1..=4 {
        server.publish("log", json!(i)).await;
    }
    let h: Value = server.get("/api/v1/channels/log/history?limit=2").await.json().await.unwrap();
    assert_eq!(h["offset"], 4);
    let offs: Vec<_> = h["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offs, vec![3, 4]);
    let epoch = h["epoch"].as_str().unwrap().to_owned();
    let h: Value =
        server.get(&format!("/api/v1/channels/log/history?since_offset=1&epoch={epoch}")).await.json().await.unwrap();
    assert_eq!(h["messages"].as_array().map(Vec::len), Some(3));
    assert_eq!(h["messages"][0]["data"], 2);
    let r = server.get("/api/v1/channels/log/history?since_offset=1").await;
    assert_eq!(r.status(), 400);
    let r = server.get("/api/v1/channels/bad%20name/history").await;
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_channel");

    let token = server.token("victim", &["room"], &[]);
    let mut a = server.client(&token).await;
    let mut b = server.client(&token).await;
    let mut other = server.client(&server.token("bystander", &["room"], &[])).await;
    a.subscribe("room", 1).await;
    let p: Value = server.get("/api/v1/channels/room/presence").await.json().await.unwrap();
    assert_eq!(p["clients"][0]["user"], "victim");

    let info: Value = server.get("/api/v1/info").await.json().await.unwrap();
    assert_eq!(info["nodes"][0]["node"], "test-node");
    assert_eq!(info["nodes"][0]["connections"], 3);
    assert!(info["nodes"][0]["version"].is_string());

    let d: Value = server.post("/api/v1/disconnect", json!({"user":"victim"})).await.json().await.unwrap();
    assert_eq!(d["disconnected"], 2);
    assert_eq!(a.closed().await, Some(4003));
    assert_eq!(b.closed().await, Some(4003));
    assert_eq!(other.request(json!({"type":"ping"}), 1).await["type"], "pong");
}

#[tokio::test]
async fn health_readiness_metrics() {
    let server = Server::start(&[]).await;
    assert_eq!(reqwest::get(server.url("/healthz")).await.unwrap().status(), 200);
    assert_eq!(reqwest::get(server.url("/readyz")).await.unwrap().status(), 200);
    let _c = server.client(&server.token("m", &["x"], &[])).await;
    let m = server.metrics().await;
    for name in
        ["crier_connections", "crier_handshakes_total", "crier_subscriptions", "crier_channels", "crier_broker_up"]
    {
        assert!(m.lines().any(|l| l.starts_with(name)), "{name} missing in:\n{m}");
    }
    assert_eq!(support::metric_value(&m, "crier_connections"), 1.0);
    assert_eq!(support::metric_value(&m, "crier_broker_up"), 1.0);
    // The standard process metrics, under the names Prometheus' own clients use.
    let rss = support::metric_value(&m, "process_resident_memory_bytes");
    assert!(rss > 1e6, "a running node has more than 1 MB resident: {rss}");
    assert!(support::metric_value(&m, "process_open_fds") >= 3.0, "{m}");
    for name in ["process_cpu_seconds_total", "process_max_fds", "process_threads", "process_start_time_seconds"] {
        assert!(m.lines().any(|l| l.starts_with(name)), "{name} missing in:\n{m}");
    }
    // The demo page exists only in --dev.
    assert_eq!(reqwest::get(server.url("/")).await.unwrap().status(), 404);
}
