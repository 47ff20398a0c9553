//! crier on NATS with JetStream: real `nats-server` processes (one, or a 3-server cluster with
//! R3 streams) and several real crier nodes. Cross-node fan-out in one order, recovery on
//! another node after a node is killed, a NATS restart with readiness following the broker,
//! one server of a NATS cluster killed under publish load (no silent loss), config checks.
//! Skipped, saying so, only when `nats-server` is not installed (scripts/test installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use crier_testkit::nats::{NatsServer, nats_available};
use crier_testkit::{until, until_within};
use serde_json::{Value, json};
use support::Server;

async fn node(urls: &str, name: &str, extra: &[&str]) -> Server {
    let mut args = vec!["--nats-url", urls, "--node-id", name, "--presence-ttl", "2s"];
    args.extend_from_slice(extra);
    Server::start(&args).await
}

/// Two nodes on `url`, both ready.
async fn ready_pair(url: &str, a: &str, b: &str) -> (Server, Server) {
    let (a, b) = (node(url, a, &[]).await, node(url, b, &[]).await);
    until("ready", async || status(&a, "/readyz").await == 200 && status(&b, "/readyz").await == 200).await;
    (a, b)
}

async fn status(server: &Server, path: &str) -> u16 {
    reqwest::get(server.url(path)).await.map(|r| r.status().as_u16()).unwrap_or(0)
}

/// `Some((epoch, offset))` on 200, `None` on 503 (unavailable) or 504 (outcome unknown).
async fn try_publish(server: &Server, channel: &str, data: Value) -> Option<(String, u64)> {
    let r = server.post("/api/v1/publish", json!({"channel":channel,"data":data})).await;
    match r.status().as_u16() {
        200 => {
            let v: Value = r.json().await.unwrap();
            Some((v["epoch"].as_str().unwrap().to_owned(), v["offset"].as_u64().unwrap()))
        }
        503 | 504 => None,
        s => panic!("publish answered {s}: {}", r.text().await.unwrap_or_default()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_one_nats_deliver_concurrent_publishes_everywhere_in_one_order() {
    if !nats_available("three_nodes_on_one_nats") {
        return;
    }
    let nats = NatsServer::start();
    let url = nats.url();
    let nodes = [node(&url, "n1", &[]).await, node(&url, "n2", &[]).await, node(&url, "n3", &[]).await];
    // Three concurrent publishers, one per node, on one channel whose name is no valid NATS
    // subject token (dots).
    let _clients = support::concurrent_publishes_in_one_order(&nodes, "chat:big.one/x@y=z", &[100, 100, 100]).await;
    // The node registry lists the three; the broker is named in the metrics.
    until("/api/v1/info lists the three nodes", async || {
        let info: Value = nodes[0]
            .http
            .get(nodes[0].url("/api/v1/info"))
            .bearer_auth(support::API_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap_or_default();
        info["nodes"].as_array().is_some_and(|n| n.len() == 3)
    })
    .await;
    assert_eq!(nodes[1].metric("crier_broker_info{broker=\"nats\"}").await, 1.0);
    assert_eq!(nodes[1].metric("crier_broker_up").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_clients_recover_on_another_node() {
    if !nats_available("a_killed_node_clients_recover_on_another_node") {
        return;
    }
    let nats = NatsServer::start();
    let url = nats.url();
    let doomed = node(&url, "doomed", &[]).await;
    let other = node(&url, "other", &[]).await;
    let token = doomed.token("u", &["ev"], &[]);
    let mut c = doomed.client(&token).await;
    c.subscribe("ev", 1).await;
    let first = try_publish(&other, "ev", json!(1)).await.unwrap();
    let m = support::messages(&mut c, 1).await.remove(0);
    assert_eq!(m["offset"].as_u64(), Some(first.1));
    drop(c);
    drop(doomed); // SIGKILL
    let mut missed = Vec::new();
    for i in 2..=6 {
        missed.push(try_publish(&other, "ev", json!(i)).await.unwrap());
    }
    let mut c = other.client(&token).await;
    let ack = c.resubscribe("ev", &first.0, first.1, 1).await;
    assert_eq!(ack["recovered"], true, "{ack}");
    let got: Vec<(String, u64)> = support::messages(&mut c, 5)
        .await
        .iter()
        .map(|m| (m["epoch"].as_str().unwrap().to_owned(), m["offset"].as_u64().unwrap()))
        .collect();
    assert_eq!(got, missed, "the missed messages, in order, from JetStream");
    // A recovery from an unknown epoch is refused honestly.
    let mut late = other.client(&token).await;
    assert_eq!(late.resubscribe("ev", "nope", 1, 1).await["recovered"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restart_readiness_follows_and_nothing_acknowledged_is_lost() {
    if !nats_available("nats_restart_readiness_follows") {
        return;
    }
    let mut nats = NatsServer::start();
    let url = nats.url();
    let (a, b) = ready_pair(&url, "ra", "rb").await;
    let mut sub = b.client(&b.token("s", &["ev"], &[])).await;
    sub.subscribe("ev", 1).await;
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.extend(try_publish(&a, "ev", json!(i)).await);
    }
    nats.kill();
    until("readyz 503 on both nodes", async || {
        status(&a, "/readyz").await == 503 && status(&b, "/readyz").await == 503
    })
    .await;
    assert_eq!(a.metric("crier_broker_up").await, 0.0);
    assert_eq!(try_publish(&a, "ev", json!("during")).await, None, "a publish during the outage is refused");
    assert_eq!(sub.request(json!({"type":"ping"}), 2).await["type"], "pong", "the WebSocket stays open");
    nats.restart();
    until_within("readyz 200 again", Duration::from_secs(30), async || {
        status(&a, "/readyz").await == 200 && status(&b, "/readyz").await == 200
    })
    .await;
    for i in 20..40 {
        acked.extend(try_publish(&a, "ev", json!(i)).await);
    }
    assert_eq!(acked.len(), 40);
    // JetStream kept the stream on disk: same epoch, nothing lost, nothing but messages.
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let m = sub.recv().await;
        assert_eq!(m["type"], "message", "only messages: {m}");
        got.push((m["epoch"].as_str().unwrap().to_owned(), m["offset"].as_u64().unwrap()));
    }
    assert_eq!(got, acked, "every acknowledged message, once, in order, same epoch");
    assert!(b.metric("crier_broker_reconnects_total").await >= 1.0);
}

/// A nats-server that hangs with its sockets open (SIGSTOP): the nodes notice within seconds
/// (the subscriber connection's PING goes unanswered) and turn unready; a publish meanwhile is
/// answered within the command timeout, never hangs; once the server runs again the nodes turn
/// ready by themselves, and a keyed publish retried after its unknown outcome is delivered once,
/// in order with everything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_nats_server_turns_the_nodes_unready_and_a_keyed_retry_delivers_once() {
    if !nats_available("a_wedged_nats_server_turns_the_nodes_unready") {
        return;
    }
    let nats = NatsServer::start();
    let url = nats.url();
    let (a, b) = ready_pair(&url, "wa", "wb").await;
    let mut sub = b.client(&b.token("s", &["wedge"], &[])).await;
    sub.subscribe("wedge", 1).await;
    let keyed = async |key: &str| -> u16 {
        let r = a.post("/api/v1/publish", json!({"channel":"wedge","data":key,"idempotency_key":key}));
        tokio::time::timeout(Duration::from_secs(10), r).await.expect("answered, never hangs").status().as_u16()
    };
    assert_eq!(keyed("before").await, 200);
    nats.pause(true);
    until_within("readyz 503 on both nodes", Duration::from_secs(15), async || {
        status(&a, "/readyz").await == 503 && status(&b, "/readyz").await == 503
    })
    .await;
    assert_eq!(a.metric("crier_broker_up").await, 0.0);
    let during = keyed("during").await;
    assert!(during == 503 || during == 504, "refused or outcome unknown: {during}");
    nats.pause(false);
    until_within("readyz 200 again", Duration::from_secs(30), async || {
        status(&a, "/readyz").await == 200 && status(&b, "/readyz").await == 200
    })
    .await;
    until_within("the retry with the same key", Duration::from_secs(10), async || keyed("during").await == 200).await;
    assert_eq!(keyed("after").await, 200);
    let mut got = Vec::new();
    while got.len() < 3 {
        let m = sub.recv().await;
        assert_eq!(m["type"], "message", "only messages: {m}");
        got.push((m["offset"].as_u64().unwrap(), m["data"].as_str().unwrap().to_owned()));
    }
    assert_eq!(got, [(1, "before".into()), (2, "during".into()), (3, "after".into())], "once each, in order");
}

/// A node started while NATS is down starts anyway, unready (`/readyz` 503, publishes refused
/// with 503), and becomes ready by itself once NATS is up: its streams and buckets are laid out
/// then, and a message published after reaches a subscriber of the other node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_before_nats_is_unready_until_nats_is_up() {
    if !nats_available("a_node_started_before_nats") {
        return;
    }
    let mut nats = NatsServer::start();
    let url = nats.url();
    nats.kill();
    let a = node(&url, "ua", &[]).await;
    assert_eq!(status(&a, "/readyz").await, 503, "unready while NATS is down");
    assert_eq!(status(&a, "/healthz").await, 200, "alive: the process serves");
    assert_eq!(a.metric("crier_broker_up").await, 0.0);
    assert_eq!(try_publish(&a, "late", json!("before")).await, None, "a publish is refused while unready");
    nats.restart();
    until_within("ready once NATS is up", Duration::from_secs(30), async || status(&a, "/readyz").await == 200).await;
    let b = node(&url, "ub", &[]).await;
    until("b ready", async || status(&b, "/readyz").await == 200).await;
    let mut sub = b.client(&b.token("s", &["late"], &[])).await;
    sub.subscribe("late", 1).await;
    let (epoch, offset) = try_publish(&a, "late", json!("after")).await.expect("published once ready");
    let m = sub.recv().await;
    assert_eq!((m["type"].as_str(), m["data"].as_str()), (Some("message"), Some("after")), "{m}");
    assert_eq!((m["epoch"].as_str().unwrap(), m["offset"].as_u64().unwrap()), (epoch.as_str(), offset));
}

/// A NATS server restarted with its store lost (streams and buckets gone): once ready again
/// publishes are accepted in a new epoch, the live subscriber is told (a `gap` frame with the
/// new epoch) before anything of it, and a client recovering from the old epoch is told it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_that_lost_its_store_is_never_silent() {
    if !nats_available("a_nats_restart_that_lost_its_store_is_never_silent") {
        return;
    }
    let mut nats = NatsServer::start();
    let url = nats.url();
    let (a, b) = ready_pair(&url, "la", "lb").await;
    let token = b.token("s", &["ev"], &[]);
    let mut sub = b.client(&token).await;
    let old_epoch = sub.subscribe("ev", 1).await["epoch"].as_str().unwrap().to_owned();
    let before = try_publish(&a, "ev", json!("before")).await.unwrap();
    assert_eq!(support::messages(&mut sub, 1).await[0]["offset"], before.1);
    nats.restart_with_empty_store();
    until_within("both nodes reconnected", Duration::from_secs(30), async || {
        a.metric("crier_broker_reconnects_total").await >= 1.0 && b.metric("crier_broker_reconnects_total").await >= 1.0
    })
    .await;
    until("ready again", async || status(&a, "/readyz").await == 200 && status(&b, "/readyz").await == 200).await;
    // Once ready again, publishes are accepted (the streams and buckets are laid out again).
    let after = try_publish(&a, "ev", json!("after")).await.expect("accepted once ready");
    assert_ne!(after.0, old_epoch, "lost history means a new epoch");
    // The live subscriber is told before anything of the new epoch: a `gap` frame with it.
    let gap = sub.recv().await;
    assert_eq!((gap["type"].as_str(), gap["channel"].as_str()), (Some("gap"), Some("ev")), "{gap}");
    assert_eq!(gap["epoch"].as_str(), Some(after.0.as_str()), "{gap}");
    // Told a position at or past the publish (the node re-read the channel after it), or the
    // publish arrives next.
    if gap["offset"].as_u64().unwrap_or(0) < after.1 {
        let m = support::messages(&mut sub, 1).await.remove(0);
        assert_eq!((m["epoch"].as_str().unwrap(), m["offset"].as_u64().unwrap()), (after.0.as_str(), after.1));
    }
    // The subscriber's presence entry, lost with the store, is written again by its node (every
    // entry after a reconnect), without a new subscribe.
    until("the presence entry back", async || {
        let r = a.get("/api/v1/channels/ev/presence_stats").await;
        r.status() == 200 && r.json::<Value>().await.is_ok_and(|v| v["clients"] == 1)
    })
    .await;
    // A client recovering from the old epoch is told it cannot.
    let mut late = a.client(&token).await;
    let ack = late.resubscribe("ev", &old_epoch, 1, 1).await;
    assert_eq!(ack["recovered"], false, "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_cluster_server_killed_under_publish_load_loses_nothing_silently() {
    if !nats_available("a_nats_cluster_server_killed_under_publish_load") {
        return;
    }
    let mut cluster = NatsServer::start_cluster(3);
    let urls = cluster.iter().map(|s| s.url()).collect::<Vec<_>>().join(",");
    let a = node(&urls, "ca", &["--nats-replicas", "3"]).await;
    let b = node(&urls, "cb", &["--nats-replicas", "3"]).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !(status(&a, "/readyz").await == 200 && status(&b, "/readyz").await == 200) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not ready on the cluster:\n{}\n{}",
            a.logs(),
            cluster[1].log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut subs = Vec::new();
    for n in [&a, &b] {
        let mut c = n.client(&n.token("s", &["load"], &[])).await;
        c.subscribe("load", 1).await;
        subs.push(c);
    }
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let url = a.url("/api/v1/publish");
    let publisher = tokio::spawn(async move {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
        let (mut acked, mut refused) = (Vec::new(), Vec::new());
        let mut n = 0u64;
        while !*stop.borrow() {
            let r =
                http.post(&url).bearer_auth(support::API_KEY).json(&json!({"channel":"load","data":n})).send().await;
            match r {
                Ok(r) if r.status() == 200 => {
                    let v: Value = r.json().await.unwrap();
                    acked.push((v["epoch"].as_str().unwrap().to_owned(), v["offset"].as_u64().unwrap(), n));
                }
                Ok(r) => {
                    refused.push(r.status().as_u16());
                    // Not a synchronisation: only paces retries while the stream has no leader.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(_) => refused.push(0),
            }
            n += 1;
        }
        (acked, refused)
    });
    // Traffic before the kill, then one server (of three) is killed.
    let before = support::messages(&mut subs[0], 30).await;
    let epoch = before[0]["epoch"].as_str().unwrap().to_owned();
    cluster[0].kill();
    // Traffic after: 50 more messages reach the first subscriber.
    let mut seen: Vec<Vec<Value>> = vec![before, Vec::new()];
    let after = async {
        loop {
            let m = subs[0].recv().await;
            let done = m["type"] == "message" && m["offset"].as_u64().unwrap() >= 80;
            seen[0].push(m);
            if done {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(60), after).await.is_err() {
        panic!("publishing did not continue after a server was killed: {:?}", seen[0].last());
    }
    stop_tx.send(true).unwrap();
    let (acked, refused) = publisher.await.unwrap();
    assert!(refused.iter().all(|s| matches!(*s, 503 | 504 | 0)), "only 503/504 meanwhile: {refused:?}");
    let marker = try_publish(&a, "load", json!("marker")).await.expect("the marker is accepted");
    for (i, c) in subs.iter_mut().enumerate() {
        let read = async {
            loop {
                let m = c.recv().await;
                let done = m["data"] == "marker";
                seen[i].push(m);
                if done {
                    break;
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(30), read).await.is_err() {
            panic!("subscriber {i}: no marker within 30s");
        }
    }
    for (i, frames) in seen.iter().enumerate() {
        let gaps = frames.iter().filter(|m| m["type"] == "gap").count();
        let got: Vec<(String, u64)> = frames
            .iter()
            .filter(|m| m["type"] == "message")
            .map(|m| (m["epoch"].as_str().unwrap().to_owned(), m["offset"].as_u64().unwrap()))
            .collect();
        // R3: the stream survives one server; nothing is lost, so no gap either.
        assert_eq!(gaps, 0, "subscriber {i}: no gap with R3 streams: {frames:?}");
        let first = got.first().map_or(1, |g| g.1);
        let want: Vec<(String, u64)> = (first..=marker.1).map(|o| (epoch.clone(), o)).collect();
        assert_eq!(got, want, "subscriber {i}: every offset once, in order, one epoch");
        for (e, o, n) in &acked {
            assert!(got.contains(&(e.clone(), *o)), "subscriber {i}: acknowledged {e}:{o} ({n}) not delivered");
        }
    }
    eprintln!("nats cluster kill: {} acknowledged, {} refused meanwhile ({refused:?})", acked.len(), refused.len());
}

#[tokio::test]
async fn nats_url_with_a_redis_broker_is_refused_with_exit_64() {
    let both = Server::start_raw(
        &["--listen", "127.0.0.1:0", "--nats-url", "nats://127.0.0.1:1", "--redis-url", "redis://127.0.0.1:1/"],
        &[],
    )
    .await;
    let out = both.err().expect("refused");
    assert!(out.contains("set one broker"), "{out}");
    let bad = Server::start_raw(&["--listen", "127.0.0.1:0", "--nats-url", "http://x:4222"], &[]).await;
    assert!(bad.err().expect("refused").contains("nats_url"), "a non-NATS URL is named");
}

/// A node given one seed of a 3-server cluster: when that server dies, both of its NATS
/// connections (the async-nats client, and its own subscriber connection, which learns the
/// others from the seed's `INFO`) move to another server, and live delivery goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_given_one_seed_of_a_nats_cluster_follows_the_cluster_when_the_seed_dies() {
    if !nats_available("a_node_given_one_seed_of_a_nats_cluster_follows_the_cluster_when_the_seed_dies") {
        return;
    }
    let mut cluster = NatsServer::start_cluster(3);
    let all = cluster.iter().map(|s| s.url()).collect::<Vec<_>>().join(",");
    let a = node(&cluster[0].url(), "seed1", &["--nats-replicas", "3"]).await;
    let b = node(&all, "seedall", &["--nats-replicas", "3"]).await;
    until_within("both ready on the cluster", Duration::from_secs(30), async || {
        status(&a, "/readyz").await == 200 && status(&b, "/readyz").await == 200
    })
    .await;
    let mut c = a.client(&a.token("s", &["ev"], &[])).await;
    c.subscribe("ev", 1).await;
    let first = try_publish(&b, "ev", json!("before")).await.unwrap();
    assert_eq!(support::messages(&mut c, 1).await[0]["offset"].as_u64(), Some(first.1));
    cluster[0].kill();
    let mut after = None;
    until_within("a publish accepted after the seed died", Duration::from_secs(30), async || {
        after = try_publish(&b, "ev", json!("after")).await;
        after.is_some()
    })
    .await;
    let after = after.unwrap();
    let m = support::messages(&mut c, 1).await.remove(0);
    assert_eq!((m["epoch"].as_str(), m["offset"].as_u64()), (Some(after.0.as_str()), Some(after.1)), "{m}");
    until_within("the seed-only node ready again", Duration::from_secs(30), async || {
        status(&a, "/readyz").await == 200
    })
    .await;
    // The re-read after the client's reconnect may have brought the messages so far: once the
    // next one has come (by either way), a message more can only come live.
    for data in ["then", "live"] {
        let p = try_publish(&b, "ev", json!(data)).await.expect("accepted");
        let m = support::messages(&mut c, 1).await.remove(0);
        assert_eq!((m["offset"].as_u64(), &m["data"]), (Some(p.1), &json!(data)), "{m}");
    }
}

/// Two nodes publishing the same channels in turn, with no client subscribed anywhere: each
/// node follows the channels it lost a race for, so its tail stays current and a publish costs
/// one JetStream operation (without following, every publish after the other node's would lose
/// the race: two or three operations); offsets stay contiguous throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_follows_the_channels_another_node_publishes_to_as_well() {
    if !nats_available("a_node_follows_the_channels_another_node_publishes_to_as_well") {
        return;
    }
    let nats = NatsServer::start();
    let url = nats.url();
    let a = node(&url, "fa", &[]).await;
    let b = node(&url, "fb", &[]).await;
    let calls = async || {
        a.metric("crier_broker_publish_calls_total").await + b.metric("crier_broker_publish_calls_total").await
    };
    let mut offsets: std::collections::HashMap<String, Vec<u64>> = Default::default();
    let mut round = async || {
        for i in 0..20 {
            let channel = format!("user-{i}");
            for via in [&a, &b] {
                let (_, offset) = try_publish(via, &channel, json!(i)).await.expect("published");
                offsets.entry(channel.clone()).or_default().push(offset);
            }
        }
    };
    // Each node loses a race or two per channel, and follows it.
    round().await;
    round().await;
    let before = calls().await;
    for _ in 0..3 {
        round().await;
    }
    let stored = calls().await - before;
    assert!(
        (120.0..150.0).contains(&stored),
        "120 publishes took {stored} JetStream publishes (about one each, a race lost now and then)"
    );
    for (channel, o) in &offsets {
        assert_eq!(o.len(), 10);
        assert!(o.windows(2).all(|w| w[1] == w[0] + 1), "{channel}: contiguous offsets {o:?}");
    }
}
