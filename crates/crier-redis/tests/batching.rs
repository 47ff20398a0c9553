//! Publishes that arrive together are batched into one script call (`publisher.rs`); each
//! message of a batch keeps every guarantee of a lone publish: its own offset, contiguous per
//! channel, the channel's epoch, its place in the history, idempotency (also between two
//! messages of one batch), delivery in offset order — and a batch's results go to the right
//! callers.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use crier_core::Broker;
use crier_core::broker::PublishOptions;
use crier_core::broker::conformance::eventually;
use crier_protocol::StreamPosition;
use crier_protocol::frames::encode_message;
use support::{RedisServer, broker, options, subscribe};

const WAIT: Duration = Duration::from_secs(10);
const CHANNELS: usize = 8;
const PER_CHANNEL: usize = 60;

fn evalsha_calls(server: &RedisServer) -> u64 {
    let stats = server.cmd(&["INFO", "commandstats"]);
    stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_are_batched_and_each_keeps_its_guarantees() {
    let server = RedisServer::start();
    let (a, _ha) = broker(options(&server, "a")).await;
    let (b, hb) = broker(options(&server, "b")).await;
    for c in 0..CHANNELS {
        subscribe(&b, &hb, &format!("batch:{c}")).await;
    }
    server.cmd(&["CONFIG", "RESETSTAT"]);

    // Every publish at once: channel c gets PER_CHANNEL messages "{c}-{n}".
    let total = CHANNELS * PER_CHANNEL;
    let results = futures_util::future::join_all((0..total).map(|i| {
        let a = a.clone();
        async move {
            let (c, n) = (i % CHANNELS, i / CHANNELS);
            let channel = format!("batch:{c}");
            let data = format!("{{\"c\":{c},\"n\":{n}}}");
            let r = a.publish(&channel, &data, PublishOptions::default()).await;
            (channel, data, r)
        }
    }))
    .await;
    let calls = evalsha_calls(&server);
    assert!(calls > 0 && calls < total as u64 / 2, "{total} publishes in {calls} script calls");

    // Each caller got its own offset; per channel the offsets are exactly 1..=PER_CHANNEL.
    let mut by_channel: HashMap<String, Vec<(u64, String, String)>> = HashMap::new();
    for (channel, data, r) in results {
        let r = r.unwrap_or_else(|e| panic!("publish: {e}"));
        by_channel.entry(channel).or_default().push((r.offset, r.epoch, data));
    }
    for (channel, mut got) in by_channel {
        got.sort();
        let offsets: Vec<u64> = got.iter().map(|g| g.0).collect();
        assert_eq!(offsets, (1..=PER_CHANNEL as u64).collect::<Vec<_>>(), "{channel}");
        let epoch = got[0].1.clone();
        assert!(got.iter().all(|g| g.1 == epoch), "{channel}: one epoch");
        // The history holds each message at the offset its caller was told, byte-identical.
        let since = StreamPosition { epoch: epoch.clone(), offset: 0 };
        let h = a.history(&channel, Some(&since), 1000).await.unwrap_or_else(|e| panic!("history: {e}"));
        assert_eq!(h.publications.len(), PER_CHANNEL, "{channel}");
        for (p, (offset, _, data)) in h.publications.iter().zip(&got) {
            assert_eq!(p.offset, *offset);
            assert_eq!(p.frame, encode_message(&channel, &epoch, *offset, data), "{channel} #{offset}");
        }
        // The other node got all of them live, in offset order.
        let want: Vec<u64> = offsets.clone();
        assert!(eventually(WAIT, || hb.offsets(&channel) == want).await, "{channel}: {:?}", hb.offsets(&channel));
    }
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
        let r = r.unwrap_or_else(|e| panic!("publish: {e}"));
        let seen = first.entry(key.clone()).or_insert((r.epoch.clone(), r.offset));
        assert_eq!(*seen, (r.epoch, r.offset), "{key}: every repeat gets the first result");
    }
    let mut offsets: Vec<u64> = first.values().map(|v| v.1).collect();
    offsets.sort();
    assert_eq!(offsets, (1..=10).collect::<Vec<_>>(), "one message per key");
    assert!(eventually(WAIT, || hb.offsets("idem") == (1..=10).collect::<Vec<_>>()).await);
    let h = a.history("idem", None, 100).await.unwrap_or_else(|e| panic!("history: {e}"));
    assert_eq!(h.publications.len(), 10, "repeats are not in the history");
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
        assert!(matches!(r, Err(crier_core::BrokerError::Unavailable(_))), "caller {i}: {r:?}");
    }
}
