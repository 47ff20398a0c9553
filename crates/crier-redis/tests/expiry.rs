//! Cluster state of a node that is gone expires within a bounded time, while a live node's
//! entries are kept alive by its broker's refresh.

#![allow(clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use crier_core::{Broker, NodeInfo, UserOp};
use crier_protocol::frames::PresenceEntry;
use crier_testkit::{poll_within, until};
use support::{RedisServer, broker, options};

const TTL: Duration = Duration::from_secs(1);

/// The user's live connection count, read through `observer` (open + close a probe connection).
async fn connections(observer: &dyn Broker, user: &str) -> u64 {
    let n = observer.connection_opened(user, "probe").await.expect("connection_opened");
    observer.connection_closed(user, "probe").await.expect("connection_closed");
    n - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_nodes_entries_expire_and_a_live_nodes_do_not() {
    let server = RedisServer::start();
    let short = |name: &str| {
        let mut o = options(&server, name);
        o.presence_ttl = TTL;
        o.node_ttl = TTL;
        o
    };
    let (dying, _) = broker(short("dying")).await;
    let (living, _) = broker(short("living")).await;
    let (observer, _) = broker(options(&server, "observer")).await;
    for (b, name) in [(&dying, "dying"), (&living, "living")] {
        let e = PresenceEntry { client: format!("{name}-c"), user: "u".into(), node: name.into() };
        b.presence_add("room", &e).await.expect("presence_add");
        b.connection_opened("u", &format!("{name}-c")).await.expect("connection_opened");
        let info =
            NodeInfo { node: name.into(), connections: 1, version: "t".into(), ready: true, ..Default::default() };
        b.report_node(&info).await.expect("report_node");
    }
    assert_eq!(observer.presence("room").await.map(|p| p.len()).ok(), Some(2));
    assert_eq!(connections(&*observer, "u").await, 2);

    // Well past the TTL, the refresh keeps both alive.
    let deadline = Instant::now() + TTL * 3;
    while Instant::now() < deadline {
        assert_eq!(observer.presence("room").await.map(|p| p.len()).ok(), Some(2), "refreshed presence stays");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(connections(&*observer, "u").await, 2, "refreshed connections stay");
    assert_eq!(observer.nodes().await.map(|n| n.len()).ok(), Some(2), "refreshed nodes stay");

    drop(dying);
    let dropped = Instant::now();
    let bound = TTL * 2 + Duration::from_secs(1);
    let (presence, nodes) = poll_within("the dropped node's entries to expire", bound, async || {
        let presence = observer.presence("room").await.unwrap_or_default();
        let nodes = observer.nodes().await.unwrap_or_default();
        if presence.len() == 1 && nodes.len() == 1 && connections(&*observer, "u").await == 1 {
            Ok((presence, nodes))
        } else {
            Err(format!("{presence:?} {nodes:?}"))
        }
    })
    .await;
    assert_eq!(presence[0].node, "living");
    assert_eq!(nodes[0].node, "living");
    assert!(dropped.elapsed() >= TTL / 2, "and they did not vanish before their time");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_come_back_after_redis_lost_them() {
    let mut server = RedisServer::start();
    let mut o = options(&server, "n");
    o.presence_ttl = TTL;
    o.node_ttl = TTL;
    let (b, _) = broker(o).await;
    let e = PresenceEntry { client: "c".into(), user: "u".into(), node: "n".into() };
    b.presence_add("room", &e).await.expect("presence_add");
    server.restart(); // no persistence: everything is gone
    until("the refresh to re-create the entry", async || b.presence("room").await.ok() == Some(vec![e.clone()])).await;
}

/// The refresh goes in pipelines of 500: entries in every chunk (presence on many channels,
/// connections, the node entry last) are kept alive, with the JSON rebuilt from what the node
/// remembers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_larger_than_one_pipeline_keeps_every_entry() {
    let server = RedisServer::start();
    let mut o = options(&server, "big");
    o.presence_ttl = TTL;
    o.node_ttl = TTL;
    let (big, _) = broker(o).await;
    let (observer, _) = broker(options(&server, "observer")).await;
    const CHANNELS: usize = 700;
    for i in 0..CHANNELS {
        let e = PresenceEntry { client: format!("c{i}"), user: format!("u{}", i % 3), node: "big".into() };
        big.presence_add(&format!("room:{i}"), &e).await.expect("presence_add");
        big.connection_opened(&format!("u{}", i % 3), &format!("c{i}")).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let info = NodeInfo {
        node: "big".into(),
        connections: CHANNELS as u64,
        version: "t".into(),
        ready: true,
        ..Default::default()
    };
    big.report_node(&info).await.expect("report_node");
    // Three TTLs: only refreshed entries are still there.
    tokio::time::sleep(TTL * 3).await;
    for i in [0, 1, CHANNELS / 2, CHANNELS - 1] {
        let p = observer.presence(&format!("room:{i}")).await.expect("presence");
        assert_eq!(p.len(), 1, "room:{i}");
        assert_eq!(
            (p[0].client.as_str(), p[0].user.as_str(), p[0].node.as_str()),
            (&*format!("c{i}"), &*format!("u{}", i % 3), "big")
        );
    }
    for u in 0..3 {
        assert_eq!(
            connections(&*observer, &format!("u{u}")).await,
            (CHANNELS / 3 + usize::from(u < CHANNELS % 3)) as u64
        );
    }
    assert_eq!(observer.nodes().await.map(|n| n.len()).ok(), Some(1), "the node entry, sent with the last chunk");
}

/// A token revocation (`UserOp::Invalidate`) is stored by one script call: the later `before`
/// wins, the set's expiry is `revocation_ttl`, and revocations older than it are pruned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_keeps_the_later_before_sets_the_expiry_and_prunes_stale_ones() {
    let server = RedisServer::start();
    let mut o = options(&server, "a");
    o.revocation_ttl = Duration::from_secs(100);
    let (b, _h) = broker(o).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    server.cmd(&["ZADD", "crier:revoked", "1", "stale"]);
    for before in [now, now - 10] {
        b.user_op("u", &UserOp::Invalidate { before }).await.expect("invalidate");
    }
    let score = server.cmd(&["ZSCORE", "crier:revoked", "u"]);
    assert!(score.contains(&now.to_string()), "the later before wins: {score:?}");
    assert!(server.cmd(&["ZSCORE", "crier:revoked", "stale"]).starts_with("$-1"), "the stale one is pruned");
    let ttl: i64 = server.cmd(&["TTL", "crier:revoked"]).trim().trim_start_matches(':').parse().unwrap_or(-9);
    assert!((1..=100).contains(&ttl), "the set expires after revocation_ttl: {ttl}");
}
