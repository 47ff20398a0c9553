//! History reads and the read cache (cache.rs): many readers of one channel — a failover's
//! recoveries — read each stored message from JetStream once per node; a later reader reads
//! only what was stored since. Counted with `stored_reads` on a real
//! nats-server; every read still answers exactly what JetStream holds.

use std::sync::Arc;

use crier_core::Broker;
use crier_core::broker::{History, PublishOptions};
use crier_nats::{NatsBroker, NatsOptions};
use crier_protocol::StreamPosition;
use crier_testkit::conformance::RecordingHandler;
use crier_testkit::nats::{NatsServer, nats_available};
use crier_testkit::until;

async fn node(server: &NatsServer, name: &str, cache: usize) -> (Arc<NatsBroker>, Arc<RecordingHandler>) {
    let mut o = NatsOptions::new(vec![server.url()], name);
    o.read_cache_bytes = cache;
    let b = NatsBroker::connect(o).await.unwrap_or_else(|e| panic!("connect: {e}"));
    let h = Arc::new(RecordingHandler::default());
    b.set_handler(h.clone());
    (b, h)
}

async fn publish_n(b: &NatsBroker, ch: &str, n: u64) -> String {
    let mut epoch = String::new();
    for i in 1..=n {
        let r = b
            .publish(ch, &format!("{{\"i\":{i}}}"), PublishOptions::default())
            .await
            .unwrap_or_else(|e| panic!("publish: {e}"));
        assert_eq!(r.offset, i);
        epoch = r.epoch;
    }
    epoch
}

async fn since(b: &NatsBroker, ch: &str, epoch: &str, offset: u64) -> History {
    let pos = StreamPosition { epoch: epoch.to_owned(), offset };
    b.history(ch, Some(&pos), 1000).await.unwrap_or_else(|e| panic!("history: {e}"))
}

fn check(h: &History, ch: &str, from: u64, to: u64) {
    assert!(!h.gap, "{ch}: no gap");
    assert_eq!(h.offset, to, "{ch}: the top");
    let offsets: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, (from..=to).collect::<Vec<_>>(), "{ch}: every missed message, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readers_of_a_channel_read_each_stored_message_once() {
    if !nats_available("many_readers_of_a_channel_read_each_stored_message_once") {
        return;
    }
    let server = NatsServer::start();
    let (a, _) = node(&server, "ra", 8 << 20).await;
    let (b, _) = node(&server, "rb", 8 << 20).await;
    let ch = "reads:walk";
    let epoch = publish_n(&a, ch, 50).await;
    // b never saw the channel: its first read walks the 50 stored messages; 20 readers more,
    // all at once, each read the channel's last message and nothing else.
    let before = b.stored_reads();
    check(&since(&b, ch, &epoch, 0).await, ch, 1, 50);
    let first = b.stored_reads() - before;
    assert!((50..=53).contains(&first), "the first read walks the channel once: {first} reads");
    let before = b.stored_reads();
    let reads: Vec<History> = futures_util::future::join_all((0..20).map(|i| since(&b, ch, &epoch, i))).await;
    for (i, h) in reads.iter().enumerate() {
        check(h, ch, i as u64 + 1, 50);
    }
    let more = b.stored_reads() - before;
    assert!(more <= 20, "20 readers more: one read each (the channel's last message), {more} in all");

    // Without the cache every reader walks again: the same answers, 20 × 50 reads.
    let (c, _) = node(&server, "rc", 0).await;
    let before = c.stored_reads();
    for i in 0..5 {
        check(&since(&c, ch, &epoch, i).await, ch, i + 1, 50);
    }
    assert!(c.stored_reads() - before >= 5 * 46, "without a cache each read walks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_reader_reads_only_what_was_stored_since_the_previous_one() {
    if !nats_available("a_later_reader_reads_only_what_was_stored_since_the_previous_one") {
        return;
    }
    let server = NatsServer::start();
    let (a, _) = node(&server, "la", 8 << 20).await;
    let (b, hb) = node(&server, "lb", 8 << 20).await;
    let ch = "reads:later";
    b.subscribe(ch).await.unwrap_or_else(|e| panic!("subscribe: {e}"));
    let epoch = publish_n(&a, ch, 30).await;
    until("b delivered the 30 messages live", async || hb.offsets(ch).len() == 30).await;
    check(&since(&b, ch, &epoch, 0).await, ch, 1, 30);
    // Five more: the next reader walks them and finds the rest in memory.
    for i in 31..=35 {
        let r = a.publish(ch, &format!("{{\"i\":{i}}}"), PublishOptions::default()).await;
        assert_eq!(r.map(|r| r.offset).ok(), Some(i));
    }
    until("b delivered the 35 messages live", async || hb.offsets(ch).len() == 35).await;
    let before = b.stored_reads();
    check(&since(&b, ch, &epoch, 10).await, ch, 11, 35);
    let reads = b.stored_reads() - before;
    assert!(reads <= 6, "the last message and the four before it: {reads} reads");

    // The history deleted on a: a recovery on b, which still holds the old messages in
    // memory, reports the gap instead of replaying them (the channel's last message always
    // comes from JetStream).
    a.delete_history(ch).await.unwrap_or_else(|e| panic!("delete_history: {e}"));
    let h = since(&b, ch, &epoch, 10).await;
    assert!(h.gap && h.publications.is_empty(), "deleted history is not replayed from memory: {h:?}");
}

/// On a 3-server cluster with R3 streams a walk's direct gets may reach a replica: every
/// history read still answers exactly what was stored, from a node on another server than the
/// publisher's, and again once a server is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_reads_on_a_replicated_stream_answer_every_message() {
    if !nats_available("history_reads_on_a_replicated_stream_answer_every_message") {
        return;
    }
    let mut cluster = NatsServer::start_cluster(3);
    let on = |i: usize, name: &str| {
        let mut o = NatsOptions::new(vec![cluster[i].url()], name);
        o.replicas = 3;
        o.layout_wait = std::time::Duration::from_secs(30);
        o
    };
    let (oa, ob) = (on(0, "r3a"), on(1, "r3b"));
    let a = NatsBroker::connect(oa).await.unwrap_or_else(|e| panic!("connect: {e}"));
    let b = NatsBroker::connect(ob).await.unwrap_or_else(|e| panic!("connect: {e}"));
    until("both up on the cluster", async || a.is_up() && b.is_up()).await;
    let ch = "reads:r3";
    let mut epoch = String::new();
    for i in 1..=30u64 {
        // A publish refused while the cluster settles is tried again (refused: not stored),
        // for up to 30 s.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        let r = loop {
            match a.publish(ch, &format!("{{\"i\":{i}}}"), PublishOptions::default()).await {
                Ok(r) => break r,
                Err(crier_core::BrokerError::Unavailable(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::task::yield_now().await;
                }
                Err(e) => panic!("publish {i}: {e}"),
            }
        };
        assert_eq!(r.offset, i);
        epoch = r.epoch;
    }
    for i in [0, 12, 29] {
        check(&since(&b, ch, &epoch, i).await, ch, i + 1, 30);
    }
    cluster[2].kill();
    until("b reads again with a server gone", async || {
        let pos = StreamPosition { epoch: epoch.clone(), offset: 5 };
        b.history(ch, Some(&pos), 1000).await.is_ok_and(|h| h.publications.len() == 25 && !h.gap)
    })
    .await;
}
