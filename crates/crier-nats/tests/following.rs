//! Following (follow.rs): two nodes publishing to one channel in turn, with nobody subscribed.
//! The node that loses the race for the next offset follows the channel (a live subscription
//! of its own), its publishes stop losing, offsets stay contiguous; `follow_for` after its last
//! lost race it lets the channel go, unless a client subscribed meanwhile — then the
//! subscription stays and delivers.

use std::sync::Arc;
use std::time::Duration;

use crier_core::Broker;
use crier_core::broker::PublishOptions;
use crier_nats::{NatsBroker, NatsOptions};
use crier_testkit::conformance::RecordingHandler;
use crier_testkit::nats::{NatsServer, nats_available};
use crier_testkit::until;

async fn node(server: &NatsServer, name: &str) -> (Arc<NatsBroker>, Arc<RecordingHandler>) {
    let mut o = NatsOptions::new(vec![server.url()], name);
    o.follow_for = Duration::from_secs(1);
    o.presence_ttl = Duration::from_millis(300);
    let b = NatsBroker::connect(o).await.unwrap_or_else(|e| panic!("connect: {e}"));
    let h = Arc::new(RecordingHandler::default());
    b.set_handler(h.clone());
    (b, h)
}

async fn publish(b: &NatsBroker, ch: &str, i: u32) -> u64 {
    b.publish(ch, &format!("{{\"i\":{i}}}"), PublishOptions::default())
        .await
        .unwrap_or_else(|e| panic!("publish: {e}"))
        .offset
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_a_race_follows_the_channel_then_lets_it_go() {
    if !nats_available("a_node_that_lost_a_race_follows_the_channel_then_lets_it_go") {
        return;
    }
    let server = NatsServer::start();
    let (a, _) = node(&server, "fa").await;
    let (b, hb) = node(&server, "fb").await;
    let (x, y) = ("follow:x", "follow:y");
    let mut offsets = Vec::new();
    for i in 0..4 {
        offsets.push(publish(&a, x, i).await);
        offsets.push(publish(&b, x, i).await);
    }
    assert_eq!(offsets, (1..=8).collect::<Vec<u64>>(), "contiguous across both nodes");
    // a published first, so b's second publish found a's newer one: b lost the race.
    assert!(b.followed().contains(&x.to_owned()), "b follows {x}: {:?}", b.followed());
    assert!(b.holds_live(x), "b holds a live subscription to {x}");
    // Following, b's tail stays current: its publish after one of a is one store (polled: a's
    // message may not have reached b live yet when b publishes, a race lost by timing).
    until("a publish of b after one of a costs b one store", async || {
        publish(&a, x, 9).await;
        let calls = b.publish_calls();
        publish(&b, x, 9).await;
        b.publish_calls() == calls + 1
    })
    .await;
    // Nobody subscribes to x: b lets it go about a second after its last lost race.
    until("b no longer follows x", async || b.followed().is_empty() && !b.holds_live(x)).await;
    // The same on y, but a client subscribes on b while it follows: the subscription stays.
    publish(&a, y, 0).await;
    publish(&b, y, 0).await;
    publish(&a, y, 1).await;
    publish(&b, y, 1).await;
    assert!(b.followed().contains(&y.to_owned()), "b follows {y}: {:?}", b.followed());
    hb.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(y.to_owned());
    b.subscribe(y).await.unwrap_or_else(|e| panic!("subscribe: {e}"));
    until("b's following of y ended", async || b.followed().is_empty()).await;
    assert!(b.holds_live(y), "y keeps its live subscription: a client subscribed to it on b");
    let next = publish(&a, y, 2).await;
    until("b's subscriber gets a's next publish of y", async || hb.offsets(y).contains(&next)).await;
}
