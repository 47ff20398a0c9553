//! Sentinel: a real master, a replica and three Sentinels on loopback. The conformance suite
//! through Sentinel; a failover that loses the last acknowledged writes (the replica was paused
//! while they were made) becomes a new epoch, never a reused offset; bad settings.

#![allow(clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use crier_core::{Broker, BrokerError};
use crier_redis::{RedisBroker, RedisOptions, StartError};
use crier_testkit::conformance;
use crier_testkit::poll_within;
use crier_testkit::redis::{RedisServer, SentinelGroup};
use support::{RecordingHandler, broker, publish, subscribe};

fn options(group: &SentinelGroup, node: &str) -> RedisOptions {
    let urls = group.sentinels.iter().map(RedisServer::url).collect();
    let mut o = RedisOptions::sentinel(urls, group.name.clone(), node);
    o.command_timeout = Duration::from_secs(1);
    o.probe_interval = Duration::from_millis(200);
    o.reconnect_max = Duration::from_millis(500);
    o
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_conforms_through_sentinel() {
    let group = SentinelGroup::start("conformance");
    let group = &group;
    conformance::run(|s| async move {
        let mut o = options(group, "conformance");
        o.namespaces = s.namespaces.clone();
        let b = RedisBroker::start(o).await.expect("start");
        assert!(b.is_up(), "found the master through Sentinel");
        b as Arc<dyn Broker>
    })
    .await;
}

fn pairs(h: &RecordingHandler, channel: &str) -> Vec<(String, u64, String)> {
    let p = h.publications.lock().unwrap_or_else(|e| e.into_inner());
    p.iter()
        .filter(|(c, _)| c == channel)
        .map(|(_, p)| (p.epoch.to_string(), p.offset, String::from_utf8_lossy(&p.frame).into_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_acknowledged_writes_starts_a_new_epoch() {
    let mut group = SentinelGroup::start("lossy");
    let (b, h) = broker(options(&group, "lossy")).await;
    assert!(b.is_up());
    subscribe(&b, &h, "c").await;
    for i in 0..10 {
        publish(&b, "c", &i.to_string()).await.expect("publish");
    }
    poll_within("the replica to have offset 10", Duration::from_secs(10), async || {
        let r = group.replica.cmd(&["HGET", "crier:{c}:meta", "top"]);
        if r.contains("\r\n10\r\n") { Ok(()) } else { Err(r) }
    })
    .await;
    // The replica stops hearing; the master acknowledges five more that it will never get.
    group.replica.pause(true);
    let mut lost = Vec::new();
    for i in 10..15 {
        lost.push(publish(&b, "c", &i.to_string()).await.expect("publish"));
    }
    let old_epoch = lost[0].epoch.clone();
    assert_eq!(lost.last().map(|r| r.offset), Some(15));
    group.kill_master();
    group.replica.pause(false);
    assert!(b.wait_up(false, Duration::from_secs(5)).await, "down without a master");
    let after = poll_within("a publish on the promoted replica", Duration::from_secs(60), async || {
        publish(&b, "c", "\"after\"").await.map_err(|e| e.to_string())
    })
    .await;
    assert_ne!(after.epoch, old_epoch, "the promoted replica had only 10 of 15: a new epoch, not offset 11 again");
    assert_eq!(after.offset, 1);
    // Recovery from the last acknowledged position is refused (recovered: false), not faked.
    let since = crier_protocol::StreamPosition { epoch: old_epoch.clone(), offset: 15 };
    let hist = b.history("c", Some(&since), 100).await.expect("history");
    assert!(hist.gap && hist.epoch == after.epoch, "{:?}", (hist.gap, &hist.epoch));
    // The subscriber: 1..=15 of the old epoch (live before the failover), then the new epoch;
    // no (epoch, offset) twice.
    poll_within("the new epoch's message on the subscriber", Duration::from_secs(10), async || {
        let p = pairs(&h, "c");
        if p.iter().any(|(e, _, _)| *e == after.epoch) { Ok(()) } else { Err(format!("{} so far", p.len())) }
    })
    .await;
    let p = pairs(&h, "c");
    let mut keys: Vec<(&str, u64)> = p.iter().map(|(e, o, _)| (e.as_str(), *o)).collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "no position delivered twice: {p:?}");
    let old: Vec<u64> = p.iter().filter(|(e, _, _)| *e == old_epoch).map(|(_, o, _)| *o).collect();
    assert_eq!(old, (1..=15).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_master_name_is_a_setting_error_and_no_sentinel_is_an_outage() {
    let group = SentinelGroup::start("known");
    let urls = group.sentinels.iter().map(RedisServer::url).collect();
    let mut o = RedisOptions::sentinel(urls, "unknown", "n");
    o.connect_wait = Duration::from_secs(3);
    match RedisBroker::start(o).await {
        Err(StartError::Setting(why)) => assert!(why.contains("knows no master named `unknown`"), "{why}"),
        Ok(_) => panic!("started with a master name no Sentinel knows"),
    }
    // Nothing listening: an outage, not a setting error — the broker starts down and retries.
    let nobody = format!("redis://127.0.0.1:{}/", crier_testkit::redis::free_port());
    let mut o = RedisOptions::sentinel(vec![nobody], "known", "n");
    o.connect_wait = Duration::from_millis(500);
    o.command_timeout = Duration::from_millis(500);
    let b = RedisBroker::start(o).await.expect("start");
    assert!(!b.is_up());
    let r = b.publish("c", "1", Default::default()).await;
    assert!(matches!(r, Err(BrokerError::Unavailable(_))), "{r:?}");
}
