//! Several brokers ("nodes") on one Redis: publications cross nodes, every node sees one order,
//! frames are byte-identical to the protocol's encoder, user disconnects reach every node.

#![allow(clippy::expect_used)]

mod support;

use std::time::Duration;

use crier_core::broker::PublishOptions;
use crier_core::{Broker, NodeInfo};
use crier_protocol::StreamPosition;
use crier_protocol::frames::encode_message;
use crier_testkit::conformance::RecordingHandler;
use crier_testkit::{poll_within, until_within};
use support::{RedisServer, broker, options, publish, subscribe};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_on_one_node_reaches_the_other_byte_identical() {
    let server = RedisServer::start();
    let (a, _ha) = broker(options(&server, "a")).await;
    let (b, hb) = broker(options(&server, "b")).await;
    subscribe(&b, &hb, "chat:lobby").await;
    let before = crier_core::now_micros();
    let data = r#"{"text":"héllo \"there\"","n":[1,2.5,null]}"#;
    let r = publish(&a, "chat:lobby", data).await.expect("publish");
    until_within("delivered to the other node", WAIT, async || hb.offsets("chat:lobby") == [r.offset]).await;
    let p = hb.publications.lock().unwrap_or_else(|e| e.into_inner())[0].1.clone();
    assert_eq!(p.frame, encode_message("chat:lobby", &r.epoch, r.offset, data), "byte-identical frame");
    assert_eq!(&*p.epoch, r.epoch);
    let now = crier_core::now_micros();
    assert!(p.published_at_us + 1_000_000 >= before && p.published_at_us <= now + 1_000_000, "timestamp is sane");
    // The history holds the same bytes.
    let h = a.history("chat:lobby", Some(&StreamPosition { epoch: r.epoch.clone(), offset: 0 }), 10).await;
    let h = h.expect("history");
    assert_eq!(h.publications.len(), 1);
    assert_eq!(h.publications[0].frame, p.frame);
    assert_eq!(h.publications[0].published_at_us, p.published_at_us);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_publishes_over_three_nodes_arrive_everywhere_in_one_order() {
    let server = RedisServer::start();
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let (b, h) = broker(options(&server, name)).await;
        subscribe(&b, &h, "load:one").await;
        nodes.push((b, h));
    }
    let mut publishers = Vec::new();
    for (i, (b, _)) in nodes.iter().enumerate() {
        let b = b.clone();
        publishers.push(tokio::spawn(async move {
            let mut ok = 0;
            for n in 0..1000 {
                if n % 3 == i && publish(&b, "load:one", &format!("{{\"from\":{i},\"n\":{n}}}")).await.is_ok() {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut published = 0;
    for p in publishers {
        published += p.await.unwrap_or(0);
    }
    assert_eq!(published, 1000, "every publish succeeded");
    let expected: Vec<u64> = (1..=1000).collect();
    for (b, h) in &nodes {
        until_within("all 1000 reached a node", WAIT, async || h.offsets("load:one").len() >= 1000).await;
        assert_eq!(h.offsets("load:one"), expected, "in offset order, no gap, no duplicate");
        assert!(b.is_up());
    }
    let order = support::data(&nodes[0].1, "load:one");
    for (_, h) in &nodes[1..] {
        assert_eq!(support::data(h, "load:one"), order, "every node sees the same order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_user_counts_cluster_wide_and_reaches_every_node() {
    let server = RedisServer::start();
    let (a, ha) = broker(options(&server, "a")).await;
    let (b, hb) = broker(options(&server, "b")).await;
    assert_eq!(a.connection_opened("u1", "a-1").await.ok(), Some(1));
    assert_eq!(b.connection_opened("u1", "b-1").await.ok(), Some(2), "counted across nodes");
    assert_eq!(b.connection_opened("u1", "b-2").await.ok(), Some(3));
    assert_eq!(a.connection_opened("u2", "a-2").await.ok(), Some(1));
    assert_eq!(a.disconnect_user("u1").await.ok(), Some(3), "the user's connections, cluster-wide");
    let got = |h: &RecordingHandler| h.disconnected.lock().unwrap_or_else(|e| e.into_inner()).clone();
    poll_within("the other node was told", WAIT, async || {
        let g = got(&hb);
        if g == ["u1"] { Ok(()) } else { Err(format!("{g:?}")) }
    })
    .await;
    assert_eq!(got(&ha), ["u1"], "the calling node closes its own directly, once");
    // Same client id on two nodes: two connections, not one.
    assert_eq!(a.connection_opened("u3", "c").await.ok(), Some(1));
    assert_eq!(b.connection_opened("u3", "c").await.ok(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_hold_across_nodes() {
    let server = RedisServer::start();
    let (a, _) = broker(options(&server, "a")).await;
    let (b, hb) = broker(options(&server, "b")).await;
    subscribe(&b, &hb, "idem:x").await;
    let k = PublishOptions { idempotency_key: Some("order-42") };
    let r1 = a.publish("idem:x", "1", k).await.expect("publish");
    let r2 = b.publish("idem:x", "1", k).await.expect("publish");
    assert_eq!(r1, r2, "the retry on another node returns the first result");
    let r3 = publish(&a, "idem:x", "2").await.expect("publish");
    until_within("the second publish delivered", WAIT, async || hb.offsets("idem:x").contains(&r3.offset)).await;
    assert_eq!(hb.offsets("idem:x"), [1, 2], "delivered once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registry_lists_every_node_and_presence_is_shared() {
    let server = RedisServer::start();
    let (a, _) = broker(options(&server, "a")).await;
    let (b, _) = broker(options(&server, "b")).await;
    let na = NodeInfo { node: "a".into(), connections: 1, version: "t".into(), ready: true, ..Default::default() };
    let nb = NodeInfo { node: "b".into(), connections: 2, version: "t".into(), ready: true, ..Default::default() };
    a.report_node(&na).await.expect("report_node");
    b.report_node(&nb).await.expect("report_node");
    let mut nodes = a.nodes().await.expect("nodes");
    nodes.sort_by(|x, y| x.node.cmp(&y.node));
    assert_eq!(nodes, [na, nb]);
    let e = crier_protocol::frames::PresenceEntry { client: "c1".into(), user: "u".into(), node: "b".into() };
    b.presence_add("room:1", &e).await.expect("presence_add");
    assert_eq!(a.presence("room:1").await.ok(), Some(vec![e]), "presence is cluster-wide");
    b.presence_remove("room:1", "c1").await.expect("presence_remove");
    assert_eq!(a.presence("room:1").await.ok(), Some(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_not_published() {
    let server = RedisServer::start();
    let (a, _) = broker(options(&server, "a")).await;
    assert!(publish(&a, "bad channel\"", "1").await.is_err(), "an invalid channel never reaches the script");
    let r = publish(&a, "ok", "1").await.expect("publish");
    // A recovery position with an empty or foreign epoch is a gap, never "the latest".
    for epoch in ["", "x'y", &r.epoch] {
        let pos = StreamPosition { epoch: epoch.to_owned(), offset: u64::MAX };
        let h = a.history("ok", Some(&pos), 10).await.expect("history");
        assert!(h.gap, "epoch {epoch:?}");
    }
}
