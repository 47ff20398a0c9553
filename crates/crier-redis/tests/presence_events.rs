//! Presence that pushes, on Redis: a dead node's clients leave once each when their presence
//! expires, however many nodes race to sweep it; `presence_stats` counts without listing.

#![allow(clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use crier_core::{Broker, ChannelPolicy, Namespaces, PresenceStats};
use crier_protocol::frames::PresenceEntry;
use crier_redis::RedisOptions;
use crier_testkit::wait::poll_within;

const TTL: Duration = Duration::from_secs(1);

fn opts(server: &support::RedisServer, node: &str) -> RedisOptions {
    let mut o = support::options(server, node);
    let jl = ChannelPolicy { join_leave: true, ..ChannelPolicy::default() };
    o.namespaces = Arc::new(Namespaces::new(ChannelPolicy::default()).with("room", jl));
    o.presence_ttl = TTL;
    o.node_ttl = TTL;
    o
}

fn entry(client: &str, user: &str, node: &str) -> PresenceEntry {
    PresenceEntry { client: client.into(), user: user.into(), node: node.into() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_s_clients_leave_once_each_when_two_nodes_race_to_sweep() {
    let server = support::RedisServer::start();
    let ch = "room:dead-node";
    let (b, hb) = support::broker(opts(&server, "b")).await;
    let (c, hc) = support::broker(opts(&server, "c")).await;
    for (x, h) in [(&b, &hb), (&c, &hc)] {
        support::subscribe(x, h, ch).await;
    }
    // The node that dies: 20 clients of 10 users in the channel, then gone (no more refreshes).
    let (a, _ha) = support::broker(opts(&server, "a")).await;
    for i in 0..20 {
        a.presence_add(ch, &entry(&format!("a-{i}"), &format!("u{}", i % 10), "a")).await.expect("presence_add");
    }
    // The survivors' own clients (what makes them sweep the channel).
    b.presence_add(ch, &entry("b-1", "ub", "b")).await.expect("presence_add");
    c.presence_add(ch, &entry("c-1", "uc", "c")).await.expect("presence_add");
    let stats = b.presence_stats(ch).await.expect("presence_stats");
    assert_eq!(stats, PresenceStats { clients: 22, users: 12 });
    drop(a);
    // Both survivors sweep at once, over and over, until the dead node's entries are gone (their
    // background sweeps race too).
    poll_within("the dead node's presence expires", Duration::from_secs(10), async || {
        let (sb, sc) = tokio::join!(b.presence_stats(ch), c.presence_stats(ch));
        match (sb, sc) {
            (Ok(sb), Ok(sc)) if sb.clients == 2 && sc.clients == 2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let stats = c.presence_stats(ch).await.expect("presence_stats");
    assert_eq!(stats, PresenceStats { clients: 2, users: 2 }, "the dead node's users are gone from the count");
    // A marker after every sweep that found them: what precedes it in the channel's stream is
    // every leave there will be.
    support::publish(&b, ch, "\"marker\"").await.expect("publish");
    for (name, h) in [("b", &hb), ("c", &hc)] {
        poll_within("the marker arrives", Duration::from_secs(5), async || {
            let s = h.stream_of(ch);
            if s.iter().any(|e| e.starts_with("message:")) { Ok(()) } else { Err(format!("{name}: {s:?}")) }
        })
        .await;
        let s = h.stream_of(ch);
        let mut leaves: Vec<&String> = s.iter().filter(|e| e.starts_with("leave:")).collect();
        leaves.sort();
        let mut want: Vec<String> = (0..20).map(|i| format!("leave:a-{i}")).collect();
        want.sort();
        assert_eq!(leaves, want.iter().collect::<Vec<_>>(), "{name}: one leave per dead client, once: {s:?}");
        assert!(s.last().is_some_and(|e| e.starts_with("message:")), "{name}: leaves before the marker: {s:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_expired_and_is_refreshed_joins_again() {
    let server = support::RedisServer::start();
    let ch = "room:back";
    let (b, hb) = support::broker(opts(&server, "b")).await;
    support::subscribe(&b, &hb, ch).await;
    b.presence_add(ch, &entry("b-1", "u1", "b")).await.expect("presence_add");
    // Redis loses the entry (as after an expiry swept it, or a flush): the owner's next refresh
    // puts it back, counted and announced again.
    let mut con = redis::Client::open(server.url()).and_then(|c| c.get_connection()).expect("redis");
    let _: () = redis::cmd("FLUSHALL").query(&mut con).expect("flush");
    poll_within("the refresh re-adds the entry", Duration::from_secs(5), async || match b.presence_stats(ch).await {
        Ok(PresenceStats { clients: 1, users: 1 }) => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
    poll_within("joined again", Duration::from_secs(5), async || {
        let s = hb.stream_of(ch);
        if s.iter().filter(|e| *e == "join:b-1").count() == 2 { Ok(()) } else { Err(format!("{s:?}")) }
    })
    .await;
}

/// The presence scripts build join/leave frames in Lua byte-identical to
/// `crier_protocol::frames::encode_presence_event` (what the memory broker sends).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_join_and_leave_frames_are_byte_identical_to_the_rust_ones() {
    #[derive(Default)]
    struct Frames(std::sync::Mutex<Vec<bytes::Bytes>>);
    impl crier_core::BrokerHandler for Frames {
        fn on_publication(&self, _: &str, _: crier_core::Publication) {}
        fn on_presence_event(&self, _: &str, event: crier_core::PresenceEvent) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).push(event.frame);
        }
        fn on_disconnect_user(&self, _: &str) -> usize {
            0
        }
        fn has_subscribers(&self, _: &str) -> bool {
            true
        }
    }
    let server = support::RedisServer::start();
    let ch = "room:bytes";
    let b = crier_redis::RedisBroker::connect(opts(&server, "b")).await.expect("connect");
    let h = Arc::new(Frames::default());
    b.set_handler(h.clone());
    b.subscribe(ch).await.expect("subscribe");
    let e = entry("n-1-2", "ü \"quoted\" \\ /slash", "b");
    b.presence_add(ch, &e).await.expect("presence_add");
    b.presence_remove(ch, &e.client).await.expect("presence_remove");
    poll_within("both frames", Duration::from_secs(5), async || {
        let n = h.0.lock().unwrap_or_else(|e| e.into_inner()).len();
        if n == 2 { Ok(()) } else { Err(format!("{n} frames")) }
    })
    .await;
    let json = serde_json::to_string(&e).unwrap_or_default();
    let want = [
        crier_protocol::frames::encode_presence_event("join", ch, &json),
        crier_protocol::frames::encode_presence_event("leave", ch, &json),
    ];
    assert_eq!(*h.0.lock().unwrap_or_else(|e| e.into_inner()), want);
}
