//! The bystander: a subscriber that must see every message published during the abuse; and the
//! gauges a misbehaving client could leak.

use serde_json::json;
use tokio::task::JoinHandle;

use crier_testkit::poll;

use crate::support::{self, API_KEY, Server};
use crate::{MAX_BYSTANDER_MESSAGES, NEWS, PUBLISH_TICK, assert_healthy};

/// A well-behaved subscriber of [`NEWS`] plus a publisher that keeps publishing to it (REST)
/// for as long as the abuse lasts. [`Bystander::finish`] stops the publisher, publishes a last
/// message and asserts the subscriber received exactly offsets `1..=N`, in order.
pub(crate) struct Bystander {
    stop: tokio::sync::oneshot::Sender<()>,
    publisher: JoinHandle<u64>,
    reader: JoinHandle<Vec<u64>>,
}

impl Bystander {
    pub(crate) async fn start(server: &Server) -> Bystander {
        let mut c = server.client(&server.token("bystander", &[NEWS], &[])).await;
        let ack = c.subscribe(NEWS, 1).await;
        assert_eq!(ack["offset"], 0, "the bystander's channel starts empty");
        let reader = c.offsets_until_last();
        let url = server.url("/api/v1/publish");
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let publisher = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut tick = tokio::time::interval(PUBLISH_TICK);
            let mut sent = 0;
            while sent < MAX_BYSTANDER_MESSAGES {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let r = http
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .json(&json!({"channel": NEWS, "data": sent}))
                    .send()
                    .await
                    .expect("publish during the abuse");
                assert_eq!(r.status(), 200, "a publish during the abuse was refused");
                sent += 1;
            }
            sent
        });
        Bystander { stop, publisher, reader }
    }

    /// Stops publishing; asserts the bystander got every message and the node is healthy.
    pub(crate) async fn finish(self, server: &Server) {
        let _ = self.stop.send(());
        let sent = self.publisher.await.unwrap();
        let last = server.publish(NEWS, json!("last")).await;
        assert_eq!(last["offset"], sent + 1);
        let offsets = self.reader.await.unwrap();
        assert_eq!(offsets, (1..=sent + 1).collect::<Vec<_>>(), "the bystander got every message, in order");
        assert_healthy(server).await;
    }
}

/// The three gauges a misbehaving client could leak.
pub(crate) async fn gauges(server: &Server) -> [f64; 3] {
    let m = server.metrics().await;
    ["crier_connections", "crier_subscriptions", "crier_channels"].map(|s| support::metric_value(&m, s))
}

pub(crate) async fn wait_gauges(server: &Server, want: [f64; 3]) {
    poll(format!("gauges (connections, subscriptions, channels) to be {want:?}"), async || {
        let now = gauges(server).await;
        if now == want { Ok(()) } else { Err(format!("stayed {now:?}")) }
    })
    .await
}
