//! Faults against real redis-server processes: killed and restarted (with and without
//! persistence), pub/sub connections killed under load, a wedged (SIGSTOPped) server, and a
//! broker started while Redis is down.

#![allow(clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use crier_core::{Broker, BrokerError};
use crier_protocol::StreamPosition;
use crier_testkit::{poll_within, until_within};
use support::{RedisServer, broker, epochs, options, publish, subscribe};

const WAIT: Duration = Duration::from_secs(15);

/// Publishes until it succeeds (the command connection reconnects on demand), with a deadline.
async fn publish_eventually(b: &crier_redis::RedisBroker, channel: &str, data: &str) -> crier_core::PublishResult {
    poll_within(format!("a publish on {channel} to succeed"), WAIT, async || publish(b, channel, data).await).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_without_persistence_starts_a_new_epoch_and_delivery_resumes() {
    let mut server = RedisServer::start();
    // The subscriber reconnects slowly, so the publisher's first messages after the restart
    // happen before it is back: they must come through the gap-fill.
    let mut slow = options(&server, "sub");
    slow.reconnect_min = Duration::from_millis(1500);
    slow.reconnect_max = Duration::from_millis(2000);
    let (a, ha) = broker(slow).await;
    let (b, _) = broker(options(&server, "pub")).await;
    subscribe(&a, &ha, "r:1").await;
    let mut old_epoch = String::new();
    for i in 1..=3 {
        old_epoch = publish(&b, "r:1", &i.to_string()).await.expect("publish").epoch;
    }
    until_within("1..=3 delivered", WAIT, async || ha.offsets("r:1") == [1, 2, 3]).await;

    server.kill();
    assert!(a.wait_up(false, WAIT).await, "is_up goes false");
    let started = Instant::now();
    match publish(&b, "r:1", "4").await {
        Err(BrokerError::Unavailable(_)) => {}
        other => panic!("a publish during the outage must fail as unavailable, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(3), "and fail fast: {:?}", started.elapsed());
    assert!(a.subscribe("r:2").await.is_err(), "a new subscription fails while down");

    server.restart();
    let r = publish_eventually(&b, "r:1", "5").await;
    assert_ne!(r.epoch, old_epoch, "all keys lost: a new epoch");
    assert_eq!(r.offset, 1);
    publish_eventually(&b, "r:1", "6").await;
    assert!(a.wait_up(true, WAIT).await, "is_up comes back by itself");
    let r = publish_eventually(&b, "r:1", "7").await;
    poll_within("the old epoch's 1..=3 then the new one's 1..=3", WAIT, async || {
        let got = ha.offsets("r:1");
        if got == [1, 2, 3, 1, 2, 3] { Ok(()) } else { Err(format!("got {got:?}")) }
    })
    .await;
    assert_eq!(support::data(&ha, "r:1"), ["1", "2", "3", "5", "6", "7"]);
    let e = epochs(&ha, "r:1");
    assert!(e[..3].iter().all(|x| *x == old_epoch) && e[3..].iter().all(|x| *x == r.epoch));
    assert!(a.reconnects() >= 1);
    assert!(a.gap_filled() >= 1, "the subscriber was still away when 5 was published: gap-filled");
    // A client holding the old position learns it cannot recover.
    let old = StreamPosition { epoch: old_epoch, offset: 3 };
    assert!(b.history("r:1", Some(&old), 10).await.map(|h| h.gap).unwrap_or(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pubsub_connections_are_gap_filled_in_order_exactly_once() {
    let server = RedisServer::start_persistent();
    let (a, ha) = broker(options(&server, "sub")).await;
    let (b, _) = broker(options(&server, "pub")).await;
    subscribe(&a, &ha, "wedge:1").await;
    const N: u64 = 400;
    let publisher = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut failed = 0;
            for i in 1..=N {
                if publish(&b, "wedge:1", &i.to_string()).await.is_err() {
                    failed += 1;
                }
                // Spread the publishes over the kills below (pacing, not synchronisation).
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            failed
        })
    };
    for at in [50, 150, 250] {
        until_within(format!("{at} deliveries (stalled before?)"), WAIT, async || ha.offsets("wedge:1").len() >= at)
            .await;
        let killed = server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert!(killed.starts_with(':') && !killed.starts_with(":0"), "killed pub/sub clients: {killed}");
    }
    assert_eq!(publisher.await.ok(), Some(0), "the publisher's own connection was never touched");
    let expected: Vec<u64> = (1..=N).collect();
    poll_within(format!("all {N} delivered"), WAIT, async || {
        let n = ha.offsets("wedge:1").len();
        if n >= N as usize { Ok(()) } else { Err(format!("got {n}")) }
    })
    .await;
    assert_eq!(ha.offsets("wedge:1"), expected, "in order, no gap, no duplicate");
    assert!(a.reconnects() >= 3, "reconnected after every kill: {}", a.reconnects());
    assert!(a.gap_filled() > 0, "publications missed while reconnecting came from the history");
    assert!(a.is_up());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_persistence_keeps_the_epoch_and_fills_the_gap() {
    let mut server = RedisServer::start_persistent();
    let mut slow = options(&server, "sub");
    slow.reconnect_min = Duration::from_millis(1500);
    slow.reconnect_max = Duration::from_millis(2000);
    let (a, ha) = broker(slow).await;
    let (b, _) = broker(options(&server, "pub")).await;
    subscribe(&a, &ha, "p:1").await;
    let first = publish(&b, "p:1", "1").await.expect("publish");
    until_within("1 delivered", WAIT, async || ha.offsets("p:1") == [1]).await;
    server.restart();
    for i in 2..=5 {
        let r = publish_eventually(&b, "p:1", &i.to_string()).await;
        assert_eq!((r.epoch.as_str(), r.offset), (first.epoch.as_str(), i), "same epoch, offsets go on");
    }
    poll_within("1..=5 delivered", WAIT, async || {
        let got = ha.offsets("p:1");
        if got.len() >= 5 { Ok(()) } else { Err(format!("got {got:?}")) }
    })
    .await;
    assert_eq!(ha.offsets("p:1"), [1, 2, 3, 4, 5]);
    assert!(epochs(&ha, "p:1").iter().all(|e| *e == first.epoch));
    assert!(a.reconnects() >= 1);
    assert!(a.gap_filled() >= 1, "2.. were published while the subscriber was away");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_redis_is_detected_and_never_hangs_callers() {
    let server = RedisServer::start();
    let (a, ha) = broker(options(&server, "a")).await;
    subscribe(&a, &ha, "w:1").await;
    publish(&a, "w:1", "0").await.expect("publish before the wedge");
    server.pause(true);
    let started = Instant::now();
    // Redis holds the call unanswered: it may apply it once it resumes, so the outcome is unknown.
    let wedged = publish(&a, "w:1", "1").await;
    assert!(matches!(wedged, Err(BrokerError::OutcomeUnknown(_))), "{wedged:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "bounded by the command timeout: {:?}", started.elapsed());
    assert!(a.wait_up(false, Duration::from_secs(5)).await, "the probe notices");
    assert!(a.presence("w:1").await.is_err());
    server.pause(false);
    assert!(a.wait_up(true, WAIT).await, "back by itself");
    let r = publish_eventually(&a, "w:1", "2").await;
    until_within("the publish after the wedge delivered", WAIT, async || ha.offsets("w:1").contains(&r.offset)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_starts_while_redis_is_down_and_comes_up_later() {
    let mut server = RedisServer::start();
    server.kill();
    let mut o = options(&server, "early");
    o.connect_wait = Duration::from_millis(300);
    let started = Instant::now();
    let (a, ha) = broker(o).await;
    assert!(started.elapsed() < Duration::from_secs(2), "connect does not block on a dead redis");
    assert!(!a.is_up());
    assert!(matches!(publish(&a, "s:1", "1").await, Err(BrokerError::Unavailable(_))));
    assert!(a.subscribe("s:1").await.is_err());
    server.restart();
    assert!(a.wait_up(true, WAIT).await, "comes up by itself");
    subscribe(&a, &ha, "s:1").await;
    let r = publish_eventually(&a, "s:1", "2").await;
    until_within("the first publish delivered", WAIT, async || ha.offsets("s:1") == [r.offset]).await;
}

#[test]
fn a_malformed_url_is_a_clear_error() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build();
    let rt = rt.expect("runtime");
    let r = rt.block_on(crier_redis::RedisBroker::connect(crier_redis::RedisOptions::new("nope://x", "n")));
    assert!(matches!(r, Err(BrokerError::Internal(m)) if m.contains("invalid redis url")));
}
