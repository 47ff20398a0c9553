//! Presence on NATS (state.rs): an entry is live while its writer's liveness key is. A node's
//! periodic work is one liveness write, not a rewrite of each of its entries; a node that dies
//! takes its entries out of every listing once its key lapses.

use std::sync::Arc;
use std::time::Duration;

use crier_core::Broker;
use crier_nats::{NatsBroker, NatsOptions};
use crier_protocol::frames::PresenceEntry;
use crier_testkit::conformance::RecordingHandler;
use crier_testkit::nats::{NatsServer, nats_available};
use crier_testkit::until;

const TTL: Duration = Duration::from_millis(300);

async fn node(server: &NatsServer, name: &str) -> Arc<NatsBroker> {
    let mut o = NatsOptions::new(vec![server.url()], name);
    o.presence_ttl = TTL;
    let b = NatsBroker::connect(o).await.unwrap_or_else(|e| panic!("connect: {e}"));
    b.set_handler(Arc::new(RecordingHandler::default()));
    b
}

/// The last sequence of a key-value bucket's stream: one more per write.
async fn writes(js: &async_nats::jetstream::Context, bucket: &str) -> u64 {
    let mut s = js.get_stream(format!("KV_crier_{bucket}")).await.unwrap_or_else(|e| panic!("{bucket}: {e}"));
    s.info().await.unwrap_or_else(|e| panic!("{bucket}: {e}")).state.last_sequence
}

/// A JetStream context of its own on `server` (to read the buckets' streams).
async fn jetstream(server: &NatsServer) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap_or_else(|e| panic!("{e}")))
}

/// Waits for `n` more liveness writes (of any node): refresh periods going by.
async fn beats(js: &async_nats::jetstream::Context, n: u64) {
    let from = writes(js, "alive").await;
    until("liveness writes", async || writes(js, "alive").await >= from + n).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_entries_cost_one_liveness_write_per_period_and_a_dead_writer_s_entries_drop_out() {
    if !nats_available("idle_entries_cost_one_liveness_write_per_period_and_a_dead_writer_s_entries_drop_out") {
        return;
    }
    let server = NatsServer::start();
    let a = node(&server, "pa").await;
    let b = node(&server, "pb").await;
    let js = jetstream(&server).await;
    for i in 0..50 {
        let e = PresenceEntry { client: format!("pb-{i}"), user: format!("u{i}"), node: "pb".into() };
        b.presence_add("room", &e).await.unwrap_or_else(|e| panic!("presence_add: {e}"));
    }
    let e = PresenceEntry { client: "pa-0".into(), user: "ua".into(), node: "pa".into() };
    a.presence_add("room", &e).await.unwrap_or_else(|e| panic!("presence_add: {e}"));
    until("51 entries listed", async || a.presence("room").await.is_ok_and(|p| p.len() == 51)).await;

    // A few refreshes of both nodes pass; from then on, five more beats of each node write no
    // presence entry.
    beats(&js, 6).await;
    let before = writes(&js, "presence").await;
    beats(&js, 10).await;
    assert_eq!(writes(&js, "presence").await, before, "no presence entry rewritten while idle");

    // b dies (dropped: its connections close, its timers stop): its 50 entries drop out of a's
    // listings once its liveness key lapses; a's own entry stays.
    drop(b);
    until("b's entries out", async || a.presence("room").await.is_ok_and(|p| p.len() == 1)).await;
    let p = a.presence("room").await.unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(p[0].client, "pa-0");
}

/// Webhook occupancy (hooks.rs) likewise: a node holding channels writes them once, when it
/// takes them, not again every period (before: a compare-and-set per held channel per period).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_channels_are_not_written_again_every_period() {
    if !nats_available("held_channels_are_not_written_again_every_period") {
        return;
    }
    let server = NatsServer::start();
    let a = node(&server, "ha").await;
    a.enable_hooks(crier_core::HookConfig {
        events: vec!["channel_occupied".into(), "channel_vacated".into()],
        max_queue: 10_000,
        claim_idle: Duration::from_secs(5),
        lease: Duration::from_secs(5),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for i in 0..50 {
        a.subscribe(&format!("held:{i}")).await.unwrap_or_else(|e| panic!("subscribe: {e}"));
    }
    let js = jetstream(&server).await;
    until("50 occupied channels written", async || writes(&js, "hooknodes").await >= 50).await;
    beats(&js, 3).await;
    let before = writes(&js, "hooknodes").await;
    beats(&js, 10).await;
    assert_eq!(writes(&js, "hooknodes").await, before, "no held channel written again while idle");
}
