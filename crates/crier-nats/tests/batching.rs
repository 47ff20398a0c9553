//! Concurrent publishes on one channel from one node are stored in batches (one JetStream
//! message for what queued while the previous store was out): offsets stay contiguous, the
//! subscribed node gets each once in order, and history reads cut batches at any offset.

use std::sync::Arc;

use crier_core::Broker;
use crier_core::broker::PublishOptions;
use crier_nats::{NatsBroker, NatsOptions};
use crier_protocol::StreamPosition;
use crier_testkit::conformance::RecordingHandler;
use crier_testkit::nats::{NatsServer, nats_available};
use crier_testkit::until;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_are_batched_and_stay_contiguous() {
    if !nats_available("concurrent_publishes_are_batched_and_stay_contiguous") {
        return;
    }
    let server = NatsServer::start();
    let mut o = NatsOptions::new(vec![server.url()], "batching");
    o.history_size = 50;
    let b = NatsBroker::connect(o).await.unwrap_or_else(|e| panic!("connect: {e}"));
    let h = Arc::new(RecordingHandler::default());
    b.set_handler(h.clone());
    let ch = "batch:one.channel";
    h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(ch.to_owned());
    b.subscribe(ch).await.unwrap_or_else(|e| panic!("subscribe: {e}"));
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let b = b.clone();
        tasks.push(tokio::spawn(
            async move { b.publish(ch, &format!("{{\"i\":{i}}}"), PublishOptions::default()).await },
        ));
    }
    let mut offsets = Vec::new();
    for t in tasks {
        let r = t.await.unwrap_or_else(|e| panic!("task: {e}")).unwrap_or_else(|e| panic!("publish: {e}"));
        offsets.push(r.offset);
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=300).collect::<Vec<u64>>(), "one offset each, contiguous");
    let calls = b.publish_calls();
    assert!(calls < 300, "batched: 300 publishes in {calls} stores");
    until("the subscribed node got all 300", async || h.offsets(ch).len() >= 300).await;
    assert_eq!(h.offsets(ch), (1..=300).collect::<Vec<u64>>(), "each once, in order");
    // History cuts batches anywhere: the last 50 (history_size), and from inside a batch.
    let latest = b.history(ch, None, 7).await.unwrap_or_else(|e| panic!("history: {e}"));
    let offs = |h: &crier_core::History| h.publications.iter().map(|p| p.offset).collect::<Vec<_>>();
    assert_eq!((latest.offset, offs(&latest)), (300, (294..=300).collect::<Vec<_>>()));
    let pos = |o| StreamPosition { epoch: latest.epoch.clone(), offset: o };
    let h2 = b.history(ch, Some(&pos(260)), 100).await.unwrap_or_else(|e| panic!("history: {e}"));
    assert_eq!((offs(&h2), h2.gap), ((261..=300).collect::<Vec<_>>(), false));
    let h3 = b.history(ch, Some(&pos(249)), 100).await.unwrap_or_else(|e| panic!("history: {e}"));
    assert!(h3.gap, "history_size 50 keeps 251..=300");
    let h4 = b.history(ch, Some(&pos(250)), 100).await.unwrap_or_else(|e| panic!("history: {e}"));
    assert_eq!((offs(&h4).len(), h4.gap), (50, false));
}
