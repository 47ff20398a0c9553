//! Redis Cluster: a real 3-master, 3-replica cluster started by the test. The conformance
//! suite; many channels (on every shard) across two brokers, in order; a master killed → its
//! replica takes over, the brokers re-subscribe and every acknowledged message is delivered or
//! the subscriber told; a seed list that reaches no node.

#![allow(clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use crier_core::{Broker, BrokerError, ChannelPolicy, Namespaces};
use crier_redis::{RedisBroker, RedisOptions};
use crier_testkit::conformance;
use crier_testkit::poll_within;
use crier_testkit::redis::RedisCluster;
use support::{RecordingHandler, broker, cluster_options, publish, subscribe};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_conforms_on_a_cluster() {
    let cluster = RedisCluster::start(3);
    let cluster = &cluster;
    conformance::run(|s| async move {
        let mut o = cluster_options(cluster, "conformance");
        o.namespaces = s.namespaces.clone();
        let b = RedisBroker::start(o).await.expect("start");
        assert!(b.is_up(), "connected to the cluster");
        b as Arc<dyn Broker>
    })
    .await;
}

fn data(h: &RecordingHandler, channel: &str) -> Vec<(String, u64, String)> {
    let p = h.publications.lock().unwrap_or_else(|e| e.into_inner());
    p.iter()
        .filter(|(c, _)| c == channel)
        .map(|(_, p)| {
            let v: serde_json::Value = serde_json::from_slice(&p.frame).unwrap_or_default();
            (p.epoch.to_string(), p.offset, v["data"].to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_channels_on_every_shard_reach_both_nodes_in_order() {
    let cluster = RedisCluster::start(3);
    let (a, ha) = broker(cluster_options(&cluster, "a")).await;
    let (b, hb) = broker(cluster_options(&cluster, "b")).await;
    assert!(a.is_up() && b.is_up());
    let channels: Vec<String> = (0..30).map(|i| format!("room:{i}")).collect();
    for c in &channels {
        subscribe(&a, &ha, c).await;
        subscribe(&b, &hb, c).await;
    }
    // The channels really spread over the shards: each master holds some channel's meta.
    for round in 0..20 {
        for (i, c) in channels.iter().enumerate() {
            let node = if (i + round) % 2 == 0 { &a } else { &b };
            let r = publish(node, c, &round.to_string()).await.unwrap_or_else(|e| panic!("publish {c}: {e}"));
            assert_eq!(r.offset, round as u64 + 1);
        }
    }
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3);
    for m in masters {
        let n = cluster.nodes[m].as_ref().unwrap_or_else(|| panic!("master {m}"));
        let keys = n.cmd(&["DBSIZE"]);
        assert!(!keys.starts_with(":0"), "master {} holds no channel: {keys}", n.port());
    }
    for h in [&ha, &hb] {
        poll_within("every message on both nodes", Duration::from_secs(10), async || {
            for c in &channels {
                let got: Vec<u64> = data(h, c).iter().map(|(_, o, _)| *o).collect();
                if got != (1..=20).collect::<Vec<u64>>() {
                    return Err(format!("{c}: {got:?}"));
                }
            }
            Ok(())
        })
        .await;
    }
    // Presence, connection counts and the node registry across shards.
    let n = b.connection_opened("u1", "c1").await.unwrap_or_else(|e| panic!("{e}"));
    let n2 = a.connection_opened("u1", "c2").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((n, n2), (1, 2));
    let r = a.rate_limit("k", 1, 1).await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r, None);
    assert!(b.rate_limit("k", 1, 1).await.unwrap_or_else(|e| panic!("{e}")).is_some(), "shared across nodes");
    assert_eq!(a.disconnect_user("u1").await.unwrap_or_else(|e| panic!("{e}")), 2);
    poll_within("the disconnect on the other node", Duration::from_secs(5), async || {
        if hb.disconnected.lock().unwrap_or_else(|e| e.into_inner()).contains(&"u1".to_owned()) {
            Ok(())
        } else {
            Err("")
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_and_nothing_acknowledged_is_lost_silently() {
    let mut cluster = RedisCluster::start(3);
    let (a, ha) = broker(cluster_options(&cluster, "a")).await;
    let (b, _hb) = broker(cluster_options(&cluster, "b")).await;
    let channels: Vec<String> = (0..12).map(|i| format!("fo:{i}")).collect();
    for c in &channels {
        subscribe(&a, &ha, c).await;
    }
    let mut acked: Vec<(String, String, u64, String)> = Vec::new();
    for round in 0..5 {
        for c in &channels {
            let r = publish(&b, c, &round.to_string()).await.unwrap_or_else(|e| panic!("{e}"));
            acked.push((c.clone(), r.epoch, r.offset, round.to_string()));
        }
    }
    let victim = cluster.masters()[0];
    cluster.kill(victim);
    // Publish on through the failover: refused (Unavailable) until the replica took over.
    let mut refused = 0usize;
    let started = std::time::Instant::now();
    for round in 5.. {
        for c in &channels {
            match publish(&b, c, &round.to_string()).await {
                Ok(r) => acked.push((c.clone(), r.epoch, r.offset, round.to_string())),
                // Refused, or not confirmed (it may land: only acknowledged ones are checked).
                Err(BrokerError::Unavailable(_) | BrokerError::OutcomeUnknown(_)) => refused += 1,
                Err(e) => panic!("publish {c}: {e}"),
            }
        }
        if cluster.masters().len() == 3 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no replica promoted: {:?}", cluster.masters());
    }
    let last = poll_within("publishes on every channel after the failover", Duration::from_secs(30), async || {
        let mut out = Vec::new();
        for c in &channels {
            out.push(publish(&b, c, "\"last\"").await.map_err(|e| e.to_string())?);
        }
        Ok::<_, String>(out)
    })
    .await;
    for (c, r) in channels.iter().zip(&last) {
        acked.push((c.clone(), r.epoch.clone(), r.offset, "\"last\"".to_owned()));
    }
    assert!(a.wait_up(true, Duration::from_secs(20)).await);
    for c in &channels {
        poll_within(format!("{c}'s last message"), Duration::from_secs(20), async || {
            if data(&ha, c).iter().any(|(_, _, d)| d == "\"last\"") {
                Ok(())
            } else {
                Err(format!("{:?}", data(&ha, c)))
            }
        })
        .await;
        let got = data(&ha, c);
        let mut keys: Vec<(&str, u64)> = got.iter().map(|(e, o, _)| (e.as_str(), *o)).collect();
        let n = keys.len();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), n, "{c}: a position delivered twice: {got:?}");
        for (ch, epoch, offset, d) in acked.iter().filter(|(ch, ..)| ch == c) {
            let delivered = got.iter().any(|(e, o, gd)| e == epoch && o == offset && gd == d);
            let told = got.iter().any(|(e, _, _)| e != epoch);
            assert!(delivered || told, "{ch}: acknowledged {epoch}:{offset} ({d}) neither delivered nor told: {got:?}");
        }
    }
    eprintln!("cluster failover: {} acknowledged, {refused} refused meanwhile", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seed_list_that_reaches_no_node_starts_down_and_retries() {
    let port = crier_testkit::redis::free_port();
    let mut o = RedisOptions::cluster(vec![format!("redis://127.0.0.1:{port}/")], "n");
    o.connect_wait = Duration::from_millis(500);
    o.command_timeout = Duration::from_millis(500);
    let b = RedisBroker::start(o).await.expect("start");
    assert!(!b.is_up());
    let r = b.publish("c", "1", Default::default()).await;
    assert!(matches!(r, Err(BrokerError::Unavailable(_))), "{r:?}");
    // A plain Redis named as a cluster seed is a setting error.
    let plain = crier_testkit::redis::RedisServer::start();
    let o = RedisOptions::cluster(vec![plain.url()], "n");
    match RedisBroker::start(o).await {
        Err(crier_redis::StartError::Setting(why)) => assert!(why.contains("cluster support disabled"), "{why}"),
        Ok(_) => panic!("a non-cluster Redis accepted as a cluster seed"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_while_publishing_loses_nothing_and_duplicates_nothing() {
    let cluster = Arc::new(RedisCluster::start(3));
    // While the slot's keys sit on the new master but the old one still owns the slot, publishes
    // land there (ASK) and the subscriber hears them only through the gap-fill after the move:
    // the history must hold that window.
    let mut o = cluster_options(&cluster, "a");
    o.namespaces = Arc::new(Namespaces::new(ChannelPolicy { history_size: 10_000, ..ChannelPolicy::default() }));
    let (a, ha) = broker(o.clone()).await;
    o.node_id = "b".into();
    let (b, _hb) = broker(o).await;
    let channel = "mig:hot";
    subscribe(&a, &ha, channel).await;
    let slot = cluster.slot_of(&format!("{{{channel}}}"));
    let owner = cluster.owner_of(slot);
    let target = cluster
        .masters()
        .into_iter()
        .find(|m| Some(*m) != owner)
        .unwrap_or_else(|| panic!("a master without slot {slot}"));
    for i in 0..20 {
        publish(&b, channel, &i.to_string()).await.unwrap_or_else(|e| panic!("{e}"));
    }
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let publisher = {
        let b = b.clone();
        tokio::spawn(async move {
            let (mut acked, mut failed) = (Vec::new(), 0usize);
            let mut i = 20u64;
            while !*stop.borrow() {
                match publish(&b, channel, &i.to_string()).await {
                    Ok(r) => acked.push((r.epoch, r.offset, i)),
                    Err(_) => failed += 1,
                }
                i += 1;
            }
            (acked, failed)
        })
    };
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || c.migrate_slot(slot, target)).await.unwrap_or_else(|e| panic!("{e}"));
    // Keep publishing until some publishes landed on the new owner.
    poll_within("publishes after the migration", Duration::from_secs(20), async || {
        let n = cluster.nodes[target].as_ref().unwrap_or_else(|| panic!("target"));
        let top = n.cmd(&["HGET", &format!("crier:{{{channel}}}:meta"), "top"]);
        if top.starts_with('$') && ha.offsets(channel).len() > 60 { Ok(()) } else { Err(top) }
    })
    .await;
    stop_tx.send(true).unwrap_or_else(|e| panic!("{e}"));
    let (acked, failed) = publisher.await.unwrap_or_else(|e| panic!("{e}"));
    let last = acked.last().map(|(_, o, _)| *o).unwrap_or(20);
    poll_within("every acknowledged message on the subscriber", Duration::from_secs(20), async || {
        let got = ha.offsets(channel);
        if got.last().is_some_and(|o| *o >= last) { Ok(()) } else { Err(format!("{:?}", got.last())) }
    })
    .await;
    assert!(a.reconnects() >= 1, "the subscriber's node re-subscribed on the slot's new owner");
    let got = data(&ha, channel);
    // The slot's new master is another server process: the channel continues in a new epoch
    // (see docs/cluster.md, "lost writes"), whose offsets start at 1. Within each epoch: in
    // order, no duplicate, no hole.
    let mut epochs: Vec<&str> = Vec::new();
    for (e, _, _) in &got {
        if epochs.last() != Some(&e.as_str()) {
            assert!(!epochs.contains(&e.as_str()), "epoch {e} came back: {epochs:?}");
            epochs.push(e);
        }
    }
    assert!(epochs.len() <= 2, "at most one epoch change: {epochs:?}");
    for epoch in &epochs {
        let offsets: Vec<u64> = got.iter().filter(|(e, _, _)| e == epoch).map(|(_, o, _)| *o).collect();
        let first = offsets.first().copied().unwrap_or(1);
        let want: Vec<u64> = (first..first + offsets.len() as u64).collect();
        assert_eq!(offsets, want, "{epoch}: in order, no duplicate, no hole ({failed} failed)");
        if Some(epoch) != epochs.first() {
            assert_eq!(first, 1, "a new epoch is delivered from its start");
        }
    }
    for (epoch, offset, i) in &acked {
        assert!(
            got.iter().any(|(e, o, d)| e == epoch && o == offset && *d == i.to_string()),
            "acknowledged {epoch}:{offset} ({i}) not delivered"
        );
    }
    eprintln!(
        "migration: {} acknowledged during it, {failed} refused, {} delivered, epochs {epochs:?}",
        acked.len(),
        got.len()
    );
}
