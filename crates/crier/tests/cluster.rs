//! Many nodes, one cluster: real `redis-server` processes and several real crier nodes.
//! Cross-node fan-out in one order, recovery on another node, Redis restarts with and without
//! persistence, a node killed with SIGKILL, presence expiry, cluster-wide operations.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashSet;

use crier_testkit::redis::RedisServer;
use crier_testkit::until;
use serde_json::{Value, json};
use support::Server;

async fn node(redis: &RedisServer, name: &str, extra: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--redis-url", url.as_str(), "--node-id", name, "--presence-ttl", "2s"];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

async fn status(server: &Server, path: &str) -> u16 {
    reqwest::get(server.url(path)).await.map(|r| r.status().as_u16()).unwrap_or(0)
}

#[tokio::test]
async fn a_thousand_publishes_over_three_nodes_arrive_everywhere_in_one_order() {
    let redis = RedisServer::start();
    let nodes = [node(&redis, "n1", &[]).await, node(&redis, "n2", &[]).await, node(&redis, "n3", &[]).await];
    // Three concurrent publishers, one per node: 334 + 334 + 332.
    let _clients = support::concurrent_publishes_in_one_order(&nodes, "chat:big", &[334, 334, 332]).await;
    // The latency histogram is fed on every node.
    for n in &nodes {
        assert!(n.metric("crier_broadcast_latency_seconds_count").await >= 1000.0);
    }
}

#[tokio::test]
async fn recovery_after_reconnecting_to_another_node() {
    let redis = RedisServer::start();
    let (a, b, c) = (node(&redis, "a", &[]).await, node(&redis, "b", &[]).await, node(&redis, "c", &[]).await);
    let token = a.token("roamer", &["news"], &[]);
    let mut client = a.client(&token).await;
    let ack = client.subscribe("news", 1).await;
    let epoch = ack["epoch"].as_str().unwrap().to_owned();
    b.publish("news", json!(1)).await;
    assert_eq!(client.recv().await["offset"], 1);
    drop(client);
    for i in 2..=5 {
        b.publish("news", json!(i)).await;
    }
    let mut client = c.client(&token).await;
    let ack = client.resubscribe("news", &epoch, 1, 2).await;
    assert_eq!((ack["recovered"].as_bool(), ack["offset"].as_u64()), (Some(true), Some(5)));
    a.publish("news", json!(6)).await;
    let got: Vec<u64> = support::messages(&mut client, 5).await.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(got, vec![2, 3, 4, 5, 6]);
}

/// Publishes `data` through `server`; `Some(offset)` on 200, `None` on 503 (never anything else).
async fn try_publish(server: &Server, channel: &str, data: Value) -> Option<(String, u64)> {
    let r = server.post("/api/v1/publish", json!({"channel": channel, "data": data})).await;
    match r.status().as_u16() {
        200 => {
            let v: Value = r.json().await.unwrap();
            Some((v["epoch"].as_str().unwrap().to_owned(), v["offset"].as_u64().unwrap()))
        }
        503 => {
            assert_eq!(r.json::<Value>().await.unwrap()["error"], "unavailable");
            None
        }
        s => panic!("publish answered {s}"),
    }
}

#[tokio::test]
async fn redis_restart_with_persistence_loses_nothing_acknowledged() {
    let mut redis = RedisServer::start_persistent();
    let (a, b) = (node(&redis, "pa", &[]).await, node(&redis, "pb", &[]).await);
    let mut sub = b.client(&b.token("s", &["ev"], &[])).await;
    sub.subscribe("ev", 1).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.extend(try_publish(&a, "ev", json!(i)).await);
    }
    redis.kill();
    until("readyz 503 on both nodes", async || {
        status(&a, "/readyz").await == 503 && status(&b, "/readyz").await == 503
    })
    .await;
    assert_eq!(a.metric("crier_broker_up").await, 0.0);
    assert_eq!(try_publish(&a, "ev", json!("during")).await, None, "a publish during the outage is a 503");
    // The WebSocket stays open meanwhile.
    assert_eq!(sub.request(json!({"type":"ping"}), 2).await["type"], "pong");
    redis.restart();
    until("readyz 200 again", async || status(&a, "/readyz").await == 200 && status(&b, "/readyz").await == 200).await;
    for i in 20..40 {
        acked.extend(try_publish(&a, "ev", json!(i)).await);
    }
    assert_eq!(acked.len(), 40);
    // Nothing was lost, so nothing but messages arrives (no `gap` notice).
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let m = sub.recv().await;
        assert_eq!(m["type"], "message", "only messages: {m}");
        got.push((m["epoch"].as_str().unwrap().to_owned(), m["offset"].as_u64().unwrap()));
    }
    assert_eq!(got, acked, "every acknowledged message, once, in order, same epoch");
    assert!(b.metric("crier_broker_reconnects_total").await >= 1.0);
    // One script call per publish here (each waited for the last): the batching counter says so.
    let calls = a.metric("crier_broker_publish_calls_total").await;
    assert!((40.0..=41.0).contains(&calls), "40 acknowledged publishes (and the 503 one) in {calls} calls");
}

#[tokio::test]
async fn redis_restart_without_persistence_is_never_silent() {
    let mut redis = RedisServer::start();
    let (a, b) = (node(&redis, "va", &[]).await, node(&redis, "vb", &[]).await);
    let token = b.token("s", &["ev"], &[]);
    let mut sub = b.client(&token).await;
    let old_epoch = sub.subscribe("ev", 1).await["epoch"].as_str().unwrap().to_owned();
    let before = try_publish(&a, "ev", json!("before")).await.unwrap();
    assert_eq!(support::messages(&mut sub, 1).await[0]["offset"], before.1);
    redis.kill();
    until("unready", async || status(&a, "/readyz").await == 503).await;
    redis.restart();
    until("ready", async || status(&a, "/readyz").await == 200 && status(&b, "/readyz").await == 200).await;
    // Once ready again, publishes are accepted (readiness waits for the command connection too).
    let after = try_publish(&a, "ev", json!("after")).await.expect("accepted once ready");
    assert_ne!(after.0, old_epoch, "lost history means a new epoch");
    // The live subscriber is told before the next message: a `gap` frame with the new epoch.
    let gap = sub.recv().await;
    assert_eq!((gap["type"].as_str(), gap["channel"].as_str()), (Some("gap"), Some("ev")), "{gap}");
    assert_eq!(gap["epoch"].as_str(), Some(after.0.as_str()));
    let m = support::messages(&mut sub, 1).await.remove(0);
    assert_eq!((m["epoch"].as_str().unwrap(), m["offset"].as_u64().unwrap()), (after.0.as_str(), after.1));
    // A client recovering from the old epoch is told it cannot.
    let mut late = a.client(&token).await;
    let ack = late.resubscribe("ev", &old_epoch, 1, 1).await;
    assert_eq!(ack["recovered"], false);
}

#[tokio::test]
async fn a_killed_node_clients_recover_elsewhere_and_its_presence_expires() {
    let redis = RedisServer::start();
    let mut doomed = node(&redis, "doomed", &[]).await;
    let survivor = node(&redis, "survivor", &[]).await;
    let token = survivor.token("k", &["room"], &[]);
    let mut c = doomed.client(&token).await;
    let epoch = c.subscribe("room", 1).await["epoch"].as_str().unwrap().to_owned();
    let mut watcher = survivor.client(&survivor.token("w", &["room"], &[])).await;
    watcher.subscribe("room", 1).await;
    survivor.publish("room", json!(1)).await;
    assert_eq!(support::messages(&mut c, 1).await[0]["offset"], 1);
    let p: Value = survivor.get("/api/v1/channels/room/presence").await.json().await.unwrap();
    assert_eq!(p["clients"].as_array().map(Vec::len), Some(2));

    let _ = std::process::Command::new("kill").arg("-KILL").arg(doomed.pid().to_string()).status();
    assert!(doomed.wait_exit().await.is_none(), "killed by a signal, no exit code");
    assert_eq!(c.closed().await, None, "the connection just ends");
    for i in 2..=4 {
        survivor.publish("room", json!(i)).await;
    }
    let mut c = survivor.client(&token).await;
    let ack = c.resubscribe("room", &epoch, 1, 2).await;
    assert_eq!(ack["recovered"], true);
    let got: Vec<u64> = support::messages(&mut c, 3).await.iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(got, vec![2, 3, 4]);

    // The killed node's presence entry expires (presence_ttl 2s); the live ones stay.
    until("the dead node's presence expired", async || {
        let p: Value = survivor.get("/api/v1/channels/room/presence").await.json().await.unwrap();
        let nodes: Vec<&str> = p["clients"].as_array().unwrap().iter().map(|e| e["node"].as_str().unwrap()).collect();
        !nodes.contains(&"doomed") && nodes.len() == 2
    })
    .await;
    until("the dead node left the node registry", async || {
        let info: Value = survivor.get("/api/v1/info").await.json().await.unwrap();
        info["nodes"].as_array().unwrap().iter().all(|n| n["node"] != "doomed")
    })
    .await;
}

#[tokio::test]
async fn cluster_wide_disconnect_info_and_connection_limit() {
    let redis = RedisServer::start();
    let extra = ["--max-connections-per-user", "2"];
    let (a, b, c) =
        (node(&redis, "x1", &extra).await, node(&redis, "x2", &extra).await, node(&redis, "x3", &extra).await);
    let token = a.token("many", &[], &[]);
    let mut on_a = a.client(&token).await;
    let mut on_b = b.client(&token).await;
    // A third connection anywhere in the cluster is one too many.
    let r = reqwest::Client::new()
        .get(c.url("/ws"))
        .query(&[("token", &token)])
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "too_many_connections");

    let info: Value = c.get("/api/v1/info").await.json().await.unwrap();
    let mut names: Vec<String> =
        info["nodes"].as_array().unwrap().iter().map(|n| n["node"].as_str().unwrap().to_owned()).collect();
    names.sort();
    assert_eq!(names, vec!["x1", "x2", "x3"]);

    let d: Value = c.post("/api/v1/disconnect", json!({"user":"many"})).await.json().await.unwrap();
    assert_eq!(d["disconnected"], 2);
    assert_eq!(on_a.closed().await, Some(4003));
    assert_eq!(on_b.closed().await, Some(4003));
    // Their slots are released: the user can connect again.
    until("slots released", async || {
        let mut req =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(c.ws_url()).unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        support::Client::connect(req).await.is_ok()
    })
    .await;
}

#[tokio::test]
async fn a_broadcast_to_many_channels_is_a_few_script_calls_and_reaches_every_channel() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis, "ba", &[]).await, node(&redis, "bb", &[]).await);
    let mut sub = b.client(&b.token("s", &["fan:*"], &[])).await;
    for c in ["fan:0", "fan:99", "fan:199"] {
        sub.subscribe(c, 1).await;
    }
    let channels: Vec<String> = (0..200).map(|i| format!("fan:{i}")).collect();
    let calls_before = a.metric("crier_broker_publish_calls_total").await;
    let r = a.post("/api/v1/broadcast", json!({"channels": channels, "data": {"n": 1}})).await;
    assert_eq!(r.status(), 200);
    let results = r.json::<Value>().await.unwrap()["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 200);
    for (i, res) in results.iter().enumerate() {
        assert_eq!(res["channel"], format!("fan:{i}"), "results in the request's order");
        assert_eq!(res["offset"], 1, "{res}");
    }
    let calls = a.metric("crier_broker_publish_calls_total").await - calls_before;
    assert!((1.0..100.0).contains(&calls), "200 publishes went in {calls} script calls");
    let got: HashSet<String> =
        support::messages(&mut sub, 3).await.iter().map(|m| m["channel"].as_str().unwrap_or("").to_owned()).collect();
    assert_eq!(got, HashSet::from(["fan:0".to_owned(), "fan:99".to_owned(), "fan:199".to_owned()]));
}

/// Rebalancing on real nodes: 12 clients on one node, none on the other. The full node closes
/// clients with 1012 (the test plays the load balancer: each closed client reconnects to the other
/// node) until it is down to the mean; the receiving node closes nobody; every close is counted in
/// `crier_rebalanced_total`. Then the other node drains, and the node registry reports it not
/// ready at once (it no longer counts in anyone's mean).
#[tokio::test]
async fn a_node_above_its_share_sheds_with_1012_down_to_the_mean_and_a_draining_node_is_not_ready() {
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;

    let redis = RedisServer::start();
    let flags = ["--rebalance-rate", "100", "--rebalance-min-connections", "2"];
    let full = node(&redis, "full", &flags).await;
    let mut other = node(&redis, "other", &[&flags[..], &["--shutdown-drain", "30s"]].concat()).await;
    let mut on_full = Vec::new();
    for i in 0..12 {
        on_full.push(Some(full.client(&full.token(&format!("r{i}"), &["chat:*"], &[])).await));
    }
    let mut on_other = Vec::new();
    crier_testkit::poll_within("the two nodes balanced", std::time::Duration::from_secs(30), async || {
        // Whoever was closed reconnects to the other node, as a load balancer would place it.
        for slot in on_full.iter_mut() {
            let Some(c) = slot else { continue };
            match tokio::time::timeout(std::time::Duration::from_millis(20), c.next()).await {
                Err(_) => {}
                Ok(Some(Message::Close(Some(CloseFrame { code, .. })))) => {
                    assert_eq!(u16::from(code), 1012, "rebalancing closes with 1012");
                    *slot = None;
                    on_other.push(other.client(&other.token("moved", &["chat:*"], &[])).await);
                }
                Ok(m) => panic!("unexpected frame or end on the full node: {m:?}"),
            }
        }
        let (f, o) = (full.metric("crier_connections").await, other.metric("crier_connections").await);
        if f + o == 12.0 && f <= 6.0 { Ok(()) } else { Err(format!("{f} / {o} connections")) }
    })
    .await;
    assert!(on_other.len() >= 6, "down to the mean (6): {} moved", on_other.len());
    assert!(full.metric("crier_rebalanced_total").await >= on_other.len() as f64);
    assert_eq!(other.metric("crier_rebalanced_total").await, 0.0, "the emptier node closes nobody");

    other.sigterm();
    until("the draining node reported not ready", async || {
        let info: Value = full.get("/api/v1/info").await.json().await.unwrap();
        info["nodes"].as_array().unwrap().iter().any(|n| n["node"] == "other" && n["ready"] == false)
    })
    .await;
    drop(on_other);
    other.sigterm(); // a second signal ends the 30 s drain at once
    other.wait_exit().await;
}
