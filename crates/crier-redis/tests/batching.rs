//! Publishes that arrive together are batched into one script call (`publisher.rs`); each
//! message of a batch keeps every guarantee of a lone publish: its own offset, contiguous per
//! channel, the channel's epoch, its place in the history, idempotency (also between two
//! messages of one batch), delivery in offset order, its own error — and a batch's results go
//! to the right callers. On one server and on a Redis Cluster (a batch per hash slot).

#![allow(clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crier_core::broker::PublishOptions;
use crier_core::{Broker, BrokerError, ChannelPolicy, Namespaces};
use crier_protocol::StreamPosition;
use crier_protocol::frames::encode_message;
use crier_redis::RedisBroker;
use crier_testkit::redis::RedisCluster;
use crier_testkit::{poll, poll_within};
use support::{RecordingHandler, RedisServer, broker, cluster_options, options, subscribe};

const CHANNELS: usize = 8;
const PER_CHANNEL: usize = 60;

/// EVALSHA calls that ran (not counting the first tries that met NOSCRIPT and were sent again
/// after loading the script).
fn evalsha_calls(server: &RedisServer) -> u64 {
    let stats = server.cmd(&["INFO", "commandstats"]);
    let Some(line) = stats.lines().find_map(|l| l.strip_prefix("cmdstat_evalsha:")) else { return 0 };
    let field = |name: &str| -> u64 {
        line.split(',').find_map(|f| f.strip_prefix(name)).and_then(|n| n.trim().parse().ok()).unwrap_or(0)
    };
    field("calls=") - field("failed_calls=")
}

/// Publishes `per_channel` messages `{"c":c,"n":n}` on each of `channels`, all at once.
async fn publish_all_at_once(
    a: &Arc<RedisBroker>,
    channels: &[String],
    per_channel: usize,
) -> Vec<(String, String, Result<crier_core::PublishResult, BrokerError>)> {
    let total = channels.len() * per_channel;
    futures_util::future::join_all((0..total).map(|i| {
        let a = a.clone();
        let (c, n) = (i % channels.len(), i / channels.len());
        let channel = channels[c].clone();
        async move {
            let data = format!("{{\"c\":{c},\"n\":{n}}}");
            let r = a.publish(&channel, &data, PublishOptions::default()).await;
            (channel, data, r)
        }
    }))
    .await
}

/// Each caller got its own offset; per channel the offsets are exactly `1..=per_channel` in
/// one epoch; the history holds each message at its offset, byte-identical; `h` (another node)
/// got all of them live, in offset order.
async fn check_each_message(
    a: &RedisBroker,
    h: &RecordingHandler,
    results: Vec<(String, String, Result<crier_core::PublishResult, BrokerError>)>,
    per_channel: usize,
) {
    let mut by_channel: HashMap<String, Vec<(u64, String, String)>> = HashMap::new();
    for (channel, data, r) in results {
        let r = r.unwrap_or_else(|e| panic!("publish on {channel}: {e}"));
        by_channel.entry(channel).or_default().push((r.offset, r.epoch, data));
    }
    for (channel, mut got) in by_channel {
        got.sort();
        let offsets: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(offsets, (1..=per_channel as u64).collect::<Vec<_>>(), "{channel}");
        let epoch = got[0].1.clone();
        assert!(got.iter().all(|g| g.1 == epoch), "{channel}: one epoch");
        let since = StreamPosition { epoch: epoch.clone(), offset: 0 };
        let hist = a.history(&channel, Some(&since), 1000).await.expect("history");
        assert_eq!(hist.publications.len(), per_channel, "{channel}");
        for (p, (offset, _, data)) in hist.publications.iter().zip(&got) {
            assert_eq!(p.offset, *offset);
            assert_eq!(p.frame, encode_message(&channel, &epoch, *offset, data), "{channel} #{offset}");
        }
        poll("every message live on the other node, in order", async || {
            let seen = h.offsets(&channel);
            if seen == offsets { Ok(()) } else { Err(format!("{channel}: {seen:?}")) }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_are_batched_and_each_keeps_its_guarantees() {
    let server = RedisServer::start();
    let (a, _ha) = broker(options(&server, "a")).await;
    let (b, hb) = broker(options(&server, "b")).await;
    let channels: Vec<String> = (0..CHANNELS).map(|c| format!("batch:{c}")).collect();
    for c in &channels {
        subscribe(&b, &hb, c).await;
    }
    server.cmd(&["CONFIG", "RESETSTAT"]);
    let calls_before = Broker::publish_calls(&*a);

    let results = publish_all_at_once(&a, &channels, PER_CHANNEL).await;
    let total = (CHANNELS * PER_CHANNEL) as u64;
    let calls = Broker::publish_calls(&*a) - calls_before;
    assert!(calls > 0 && calls < total / 2, "{total} publishes in {calls} script calls");
    assert_eq!(evalsha_calls(&server), calls, "Redis saw one EVALSHA per batch");
    check_each_message(&a, &hb, results, PER_CHANNEL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_hold_inside_a_batch() {
    let server = RedisServer::start();
    let (a, _ha) = broker(options(&server, "a")).await;
    let (b, hb) = broker(options(&server, "b")).await;
    subscribe(&b, &hb, "idem").await;
    // 40 publishes at once, 4 per key: each key publishes once, its repeats get the first result.
    let results = futures_util::future::join_all((0..40).map(|i| {
        let a = a.clone();
        async move {
            let key = format!("k{}", i % 10);
            let r = a.publish("idem", &format!("{i}"), PublishOptions { idempotency_key: Some(&key) }).await;
            (key, r)
        }
    }))
    .await;
    let mut first: HashMap<String, (String, u64)> = HashMap::new();
    for (key, r) in results {
        let r = r.expect("publish");
        let seen = first.entry(key.clone()).or_insert((r.epoch.clone(), r.offset));
        assert_eq!(*seen, (r.epoch, r.offset), "{key}: every repeat gets the first result");
    }
    let mut offsets: Vec<u64> = first.values().map(|v| v.1).collect();
    offsets.sort();
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>(), "one message per key");
    poll("the 10 messages on the other node", async || {
        let seen = hb.offsets("idem");
        if seen == (1..=10).collect::<Vec<_>>() { Ok(()) } else { Err(format!("{seen:?}")) }
    })
    .await;
    let h = a.history("idem", None, 100).await.expect("history");
    assert_eq!(h.publications.len(), 10, "repeats are not in the history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_channel_fails_only_its_own_messages() {
    let server = RedisServer::start();
    let (a, _ha) = broker(options(&server, "a")).await;
    // Somebody else's string where the channel's meta hash belongs: HGET fails with WRONGTYPE.
    server.cmd(&["SET", "crier:{broken}:meta", "not a hash"]);
    let channels: Vec<String> = vec!["broken".into(), "fine:1".into(), "fine:2".into()];
    let results = publish_all_at_once(&a, &channels, 20).await;
    let mut fine = HashMap::<String, Vec<u64>>::new();
    for (channel, _, r) in results {
        match (channel.as_str(), r) {
            ("broken", Err(BrokerError::Internal(why))) => assert!(why.contains("WRONGTYPE"), "{why}"),
            ("broken", other) => panic!("a publish on the broken channel: {other:?}"),
            (_, Ok(r)) => fine.entry(channel).or_default().push(r.offset),
            (_, Err(e)) => panic!("a publish on {channel} failed with the broken one: {e}"),
        }
    }
    for (channel, mut offsets) in fine {
        offsets.sort();
        assert_eq!(offsets, (1..=20).collect::<Vec<_>>(), "{channel}");
    }
    let kept = server.cmd(&["GET", "crier:{broken}:meta"]);
    assert!(kept.contains("not a hash"), "nothing written over it: {kept}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_fails_every_caller_with_unavailable() {
    let mut server = RedisServer::start();
    let (a, _ha) = broker(options(&server, "a")).await;
    assert!(a.publish("x", "1", PublishOptions::default()).await.is_ok());
    server.kill();
    let results = futures_util::future::join_all((0..20).map(|i| {
        let a = a.clone();
        async move { (i, a.publish("x", "1", PublishOptions::default()).await) }
    }))
    .await;
    for (i, r) in results {
        assert!(matches!(r, Err(BrokerError::Unavailable(_))), "caller {i}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_a_batch_holds_one_slot_and_every_message_keeps_its_guarantees() {
    let cluster = RedisCluster::start(3);
    let (a, _ha) = broker(cluster_options(&cluster, "a")).await;
    let (b, hb) = broker(cluster_options(&cluster, "b")).await;
    assert!(a.is_up() && b.is_up());
    // 24 channels spread over the three masters' slots, 25 messages each, all at once: a
    // batch mixing slots would fail with CROSSSLOT.
    let channels: Vec<String> = (0..24).map(|c| format!("shard:{c}")).collect();
    for c in &channels {
        subscribe(&b, &hb, c).await;
    }
    let before = Broker::publish_calls(&*a);
    let results = publish_all_at_once(&a, &channels, 25).await;
    let calls = Broker::publish_calls(&*a) - before;
    assert!(calls < 24 * 25, "messages of one channel went together: {calls} calls for 600");
    check_each_message(&a, &hb, results, 25).await;
    poll_within("both nodes still up", Duration::from_secs(5), async || {
        if a.is_up() && b.is_up() { Ok(()) } else { Err("down") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_history_is_exactly_history_size_though_the_list_is_trimmed_in_steps() {
    let server = RedisServer::start();
    let mut o = options(&server, "a");
    o.namespaces = Arc::new(Namespaces::new(ChannelPolicy { history_size: 16, ..ChannelPolicy::default() }));
    let (a, _ha) = broker(o).await;
    for i in 1..=41 {
        let r = a.publish("steps", &i.to_string(), PublishOptions::default()).await;
        assert_eq!(r.unwrap_or_else(|e| panic!("publish {i}: {e}")).offset, i);
    }
    // Trimmed back to 16 whenever it outgrew 16 + 16/8: after 41 publishes it holds 17.
    let len = server.cmd(&["LLEN", "crier:{steps}:hist"]);
    assert!(len.trim().ends_with("17"), "the list holds 17 entries: {len}");
    let latest = a.history("steps", None, 100).await.expect("history");
    let offsets: Vec<u64> = latest.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (26..=41).collect::<Vec<_>>(), "the newest 16");
    let since = StreamPosition { epoch: latest.epoch.clone(), offset: 5 };
    let h = a.history("steps", Some(&since), 100).await.expect("history");
    let offsets: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!((offsets, h.gap), ((26..=41).collect::<Vec<_>>(), true), "6..=25 are gone: a gap");
    let since = StreamPosition { epoch: latest.epoch.clone(), offset: 30 };
    let h = a.history("steps", Some(&since), 3).await.expect("history");
    let offsets: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!((offsets, h.gap), (vec![31, 32, 33], false));
}

/// Unsubscribes that arrive together are batched too (one UNSUBSCRIBE for many channels), and
/// per channel the order asked is kept: a channel unsubscribed then subscribed again at once is
/// subscribed in the end (it gets publications), one only unsubscribed gets none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_unsubscribes_are_batched_and_keep_each_channels_order() {
    let server = RedisServer::start();
    let (a, _ha) = broker(options(&server, "a")).await;
    let (b, hb) = broker(options(&server, "b")).await;
    let reset = || {
        server.cmd(&["CONFIG", "RESETSTAT"]);
    };
    unsubscribe_all_at_once(&a, &b, &hb, "unsub", reset).await;
    let stats = server.cmd(&["INFO", "commandstats"]);
    let unsubscribe_calls: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_unsubscribe:calls="))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!((1..40).contains(&unsubscribe_calls), "40 unsubscribes in {unsubscribe_calls} UNSUBSCRIBE calls");
}

/// The same on a Redis Cluster: unsubscribes batched per shard (SUNSUBSCRIBE, pipelined). A
/// channel re-subscribed before the confirmation push of its SUNSUBSCRIBE was read used to
/// take that push for its slot moving away: the pub/sub connections were reconnected and the
/// subscribe failed (`redis moved the slot of …`; this test failed every time before).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_concurrent_unsubscribes_keep_each_channels_order() {
    let cluster = RedisCluster::start(3);
    let (a, _ha) = broker(cluster_options(&cluster, "a")).await;
    let (b, hb) = broker(cluster_options(&cluster, "b")).await;
    unsubscribe_all_at_once(&a, &b, &hb, "unsub", || {}).await;
}

/// Subscribes `b` to 20 channels to leave and 20 to leave and come back (names start with
/// `prefix`), calls `reset`, then unsubscribes all 40 at once (re-subscribing the second 20
/// right after each's unsubscribe) and checks, by publishing from `a`, which ones `b` holds.
async fn unsubscribe_all_at_once(
    a: &Arc<RedisBroker>,
    b: &Arc<RedisBroker>,
    hb: &RecordingHandler,
    prefix: &str,
    reset: impl FnOnce(),
) {
    let gone: Vec<String> = (0..20).map(|c| format!("{prefix}:gone:{c}")).collect();
    let back: Vec<String> = (0..20).map(|c| format!("{prefix}:back:{c}")).collect();
    for c in gone.iter().chain(&back) {
        subscribe(b, hb, c).await;
    }
    reset();
    let set = |c: &str, on: bool| {
        let mut s = hb.subscribed.lock().unwrap_or_else(|e| e.into_inner());
        if on { s.insert(c.to_owned()) } else { s.remove(c) }
    };
    for c in gone.iter().chain(&back) {
        set(c, false);
    }
    let unsubs = gone.iter().map(|c| {
        let b = b.clone();
        async move { b.unsubscribe(c).await.unwrap_or_else(|e| panic!("unsubscribe {c}: {e}")) }
    });
    let again = back.iter().map(|c| {
        let (b, set) = (b.clone(), &set);
        async move {
            b.unsubscribe(c).await.unwrap_or_else(|e| panic!("unsubscribe {c}: {e}"));
            set(c, true);
            b.subscribe(c).await.unwrap_or_else(|e| panic!("subscribe {c}: {e}"));
        }
    });
    futures_util::future::join(futures_util::future::join_all(unsubs), futures_util::future::join_all(again)).await;
    // The channels gone first, then those back: pub/sub keeps a connection's order, so once
    // every channel back has its message, any message of a channel gone would be there (on a
    // Cluster, per shard: 20 channels back spread over every shard).
    for c in gone.iter().chain(&back) {
        support::publish(a, c, "1").await.unwrap_or_else(|e| panic!("publish {c}: {e}"));
    }
    for c in &back {
        poll_within(format!("{c} gets its publication"), Duration::from_secs(10), async || {
            if support::data(hb, c).len() == 1 { Ok(()) } else { Err(format!("{:?}", support::data(hb, c))) }
        })
        .await;
    }
    for c in &gone {
        assert!(support::data(hb, c).is_empty(), "{c} was unsubscribed: {:?}", support::data(hb, c));
    }
}
