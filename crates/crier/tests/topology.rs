//! The real `crier` binary against Redis topologies beyond one plaintext Redis: TLS
//! (`rediss://` with a CA the test generates) and Sentinel (a master, a replica and three
//! Sentinels on loopback, the master killed under publish load).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use crier_testkit::redis::{RedisServer, SentinelGroup};
use crier_testkit::tls::TestCa;
use crier_testkit::{until, until_within};
use serde_json::{Value, json};
use support::Server;

async fn status(server: &Server, path: &str) -> u16 {
    reqwest::get(server.url(path)).await.map(|r| r.status().as_u16()).unwrap_or(0)
}

#[tokio::test]
async fn a_node_over_tls_publishes_and_delivers() {
    let ca = TestCa::generate(&["DNS:localhost"]);
    let redis = RedisServer::start_tls(&ca);
    let url = redis.tls_url("localhost");
    let ca_file = ca.ca_cert.display().to_string();
    let server = Server::start(&["--redis-url", &url, "--redis-tls-ca-file", &ca_file]).await;
    until("readyz 200 over TLS", async || status(&server, "/readyz").await == 200).await;
    let mut c = server.client(&server.token("u1", &["tls:*"], &[])).await;
    c.subscribe("tls:room", 1).await;
    let r = server.publish("tls:room", json!({"n": 1})).await;
    let m = c.recv_type("message").await;
    assert_eq!((m["data"]["n"].as_u64(), m["offset"].as_u64()), (Some(1), r["offset"].as_u64()), "{m}");
    // Its connections are on the TLS port.
    let clients = redis.cmd(&["CLIENT", "LIST"]);
    let tls_addr = format!("laddr=127.0.0.1:{}", redis.tls_port());
    let ours: Vec<&str> = clients.lines().filter(|l| l.contains("name=crier-pubsub-")).collect();
    assert!(!ours.is_empty() && ours.iter().all(|l| l.contains(&tls_addr)), "{clients}");
}

#[tokio::test]
async fn a_certificate_that_does_not_verify_stops_crier_with_exit_64() {
    let ca = TestCa::generate(&["DNS:localhost"]);
    let other = TestCa::generate(&["DNS:localhost"]);
    let redis = RedisServer::start_tls(&ca);
    let other_file = other.ca_cert.display().to_string();
    let ca_file = ca.ca_cert.display().to_string();
    let cases = [
        (redis.tls_url("localhost"), other_file.as_str(), "invalid peer certificate"),
        (redis.tls_url("127.0.0.1"), ca_file.as_str(), "not valid for name"),
    ];
    for (url, ca, expect) in cases {
        let args = ["--listen", "127.0.0.1:0", "--jwt-secret", support::SECRET, "--redis-url", &url];
        let mut server = Server::start_raw(&args, &[("CRIER_REDIS_TLS_CA_FILE", ca)]).await.expect("starts");
        assert_eq!(server.wait_exit().await, Some(64), "{}", server.logs());
        let logs = server.logs();
        assert!(logs.contains("invalid configuration") && logs.contains(expect), "{logs}");
    }
}

/// Publishes `chat:fo` messages `0..` until stopped; returns the acknowledged ones
/// ((epoch, offset, n)) and the statuses of the others (0: no answer).
async fn publish_until(url: String, stop: tokio::sync::watch::Receiver<bool>) -> (Vec<(String, u64, u64)>, Vec<u16>) {
    let (mut acked, mut refused) = (Vec::new(), Vec::new());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut n = 0u64;
    while !*stop.borrow() {
        let r = http.post(&url).bearer_auth(support::API_KEY).json(&json!({"channel":"chat:fo","data":n})).send().await;
        match r {
            Ok(r) if r.status() == 200 => {
                let v: Value = r.json().await.unwrap();
                acked.push((v["epoch"].as_str().unwrap().to_owned(), v["offset"].as_u64().unwrap(), n));
            }
            Ok(r) => {
                refused.push(r.status().as_u16());
                // Not a synchronisation: only paces the retries while there is no master.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => refused.push(0),
        }
        n += 1;
    }
    (acked, refused)
}

/// What a subscriber saw, in order.
#[derive(Debug)]
enum Seen {
    Message { epoch: String, offset: u64, data: Value },
    Gap,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_failover_under_publish_load_is_followed_and_nothing_is_lost_silently() {
    let mut group = SentinelGroup::start("crier-master");
    let urls = group.urls();
    let server = Server::start(&["--redis-sentinel-urls", &urls, "--redis-sentinel-master", "crier-master"]).await;
    until("readyz 200 via Sentinel", async || status(&server, "/readyz").await == 200).await;

    let mut c = server.client(&server.token("u1", &["chat:*"], &[])).await;
    c.subscribe("chat:fo", 1).await;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish_until(server.url("/api/v1/publish"), stop));
    let mut seen = Vec::new();
    let record = |seen: &mut Vec<Seen>, m: Value| match m["type"].as_str() {
        Some("gap") => seen.push(Seen::Gap),
        Some("message") => seen.push(Seen::Message {
            epoch: m["epoch"].as_str().unwrap().to_owned(),
            offset: m["offset"].as_u64().unwrap(),
            data: m["data"].clone(),
        }),
        _ => {}
    };
    // Traffic before the failover.
    while seen.len() < 20 {
        record(&mut seen, c.recv().await);
    }
    group.kill_master();
    until("readyz to turn 503 (no master)", async || status(&server, "/readyz").await == 503).await;
    until_within("crier to follow the promoted replica", Duration::from_secs(60), async || {
        status(&server, "/readyz").await == 200
    })
    .await;
    assert!(group.replica.cmd(&["ROLE"]).contains("master"), "the replica was promoted");
    // Traffic after the failover, on the new master.
    let old_epoch = match seen.first() {
        Some(Seen::Message { epoch, .. }) => epoch.clone(),
        _ => panic!("a message first: {seen:?}"),
    };
    // Every frame is read without a pause (see the marker below), until 20 of the new master.
    let new_master = async {
        loop {
            record(&mut seen, c.recv().await);
            let new = seen.iter().filter(|s| matches!(s, Seen::Message { epoch, .. } if *epoch != old_epoch)).count();
            if new >= 20 {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), new_master).await.is_err() {
        panic!("fewer than 20 messages of the new master within 30 s; {} frames read", seen.len());
    }
    stop_tx.send(true).unwrap();
    let (acked, refused) = publisher.await.unwrap();
    let marker = server.publish("chat:fo", json!("marker")).await;
    // 504 outcome_unknown: a publish out when the master died (it may have been applied).
    let expected = |s: &u16| matches!(*s, 503 | 504 | 0);
    assert!(refused.iter().all(expected), "only 503/504 (or no answer) meanwhile: {refused:?}");
    // Read every frame up to the marker, without a pause between frames: the publisher may have
    // got thousands ahead of this reader (polling one frame per 20 ms tick drained at most ~1,000
    // in 20 s — a loaded full run once timed out that way with 1,107 read).
    let read_to_marker = async {
        loop {
            record(&mut seen, c.recv().await);
            if matches!(seen.last(), Some(Seen::Message { data, .. }) if data == "marker") {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(30), read_to_marker).await.is_err() {
        panic!("the marker did not reach the subscriber within 30 s; {} frames read", seen.len());
    }

    // Within an epoch, offsets only go forward (no duplicate, no reused offset).
    let mut last: Option<(&str, u64)> = None;
    for s in &seen {
        if let Seen::Message { epoch, offset, .. } = s {
            if let Some((e, o)) = last
                && e == epoch
            {
                assert!(*offset > o, "{e}:{o} then {offset}: {seen:?}");
            }
            last = Some((epoch, *offset));
        }
    }
    // Every acknowledged message was delivered, or the subscriber was told after what it last
    // got of that epoch (a gap frame, or messages of a newer epoch).
    for (epoch, offset, n) in &acked {
        let delivered = seen.iter().any(|s| {
            matches!(s, Seen::Message { epoch: e, offset: o, data } if e == epoch && o == offset && data.as_u64() == Some(*n))
        });
        if delivered {
            continue;
        }
        let before = seen
            .iter()
            .rposition(|s| matches!(s, Seen::Message { epoch: e, offset: o, .. } if e == epoch && o < offset))
            .map_or(0, |i| i + 1);
        let told = seen[before..]
            .iter()
            .any(|s| matches!(s, Seen::Gap) || matches!(s, Seen::Message { epoch: e, .. } if e != epoch));
        assert!(told, "acknowledged {epoch}:{offset} ({n}) neither delivered nor told: {seen:?}");
    }
    let epochs: std::collections::BTreeSet<&str> = seen
        .iter()
        .filter_map(|s| if let Seen::Message { epoch, .. } = s { Some(epoch.as_str()) } else { None })
        .collect();
    assert_eq!(marker["epoch"].as_str().map(|e| epochs.contains(e)), Some(true));
    eprintln!(
        "failover: {} acknowledged, {} refused meanwhile, {} frames seen, epochs {epochs:?}",
        acked.len(),
        refused.len(),
        seen.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_a_redis_cluster_deliver_in_order_and_recover_across_nodes() {
    use crier_testkit::redis::RedisCluster;
    let cluster = RedisCluster::start(3);
    let urls = cluster.urls();
    let n1 = Server::start(&["--redis-cluster-urls", &urls, "--node-id", "n1"]).await;
    let n2 = Server::start(&["--redis-cluster-urls", &urls, "--node-id", "n2"]).await;
    for n in [&n1, &n2] {
        until("readyz 200 on the cluster", async || status(n, "/readyz").await == 200).await;
    }
    let channels: Vec<String> = (0..8).map(|i| format!("shard:{i}")).collect();
    let mut c2 = n2.client(&n2.token("u2", &["shard:*"], &[])).await;
    for (i, ch) in channels.iter().enumerate() {
        c2.subscribe(ch, i as u64 + 1).await;
    }
    for k in 0..10 {
        for ch in &channels {
            n1.publish(ch, json!(k)).await;
        }
    }
    let mut last: std::collections::HashMap<String, (String, u64)> = Default::default();
    let mut got = 0;
    while got < 80 {
        let m = c2.recv_type("message").await;
        let ch = m["channel"].as_str().unwrap().to_owned();
        let offset = m["offset"].as_u64().unwrap();
        let prev = last.get(&ch).map_or(0, |(_, o)| *o);
        assert_eq!(offset, prev + 1, "{ch} in order: {m}");
        assert_eq!(m["data"].as_u64(), Some(offset - 1));
        last.insert(ch, (m["epoch"].as_str().unwrap().to_owned(), offset));
        got += 1;
    }
    drop(c2);
    // Missed while away, recovered on the other node.
    for ch in &channels {
        n2.publish(ch, json!("missed")).await;
    }
    let mut c1 = n1.client(&n1.token("u2", &["shard:*"], &[])).await;
    for (i, ch) in channels.iter().enumerate() {
        let (epoch, offset) = &last[ch];
        let ack = c1.resubscribe(ch, epoch, *offset, 100 + i as u64).await;
        assert_eq!(ack["recovered"], true, "{ack}");
    }
    for _ in 0..channels.len() {
        let m = c1.recv_type("message").await;
        assert_eq!((m["data"].as_str(), m["offset"].as_u64()), (Some("missed"), Some(11)), "{m}");
    }
    let info: Value = n1.get("/api/v1/info").await.json().await.unwrap();
    assert_eq!(info["nodes"].as_array().map(Vec::len), Some(2), "{info}");
}
