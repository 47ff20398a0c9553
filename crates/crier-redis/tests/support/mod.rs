//! Redis broker test support: the `redis-server` launcher is crier-testkit's
//! ([`crier_testkit::redis::RedisServer`]); here, brokers configured for tests and readers of
//! what their [`RecordingHandler`] saw.

#![allow(dead_code, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use crier_core::{Broker, BrokerError, PublishResult};
use crier_redis::{RedisBroker, RedisOptions};
pub use crier_testkit::conformance::RecordingHandler;
pub use crier_testkit::redis::RedisServer;

/// Options for a test broker: fast probes and reconnects, short command timeout.
pub fn options(server: &RedisServer, node: &str) -> RedisOptions {
    let mut o = RedisOptions::new(server.url(), node);
    o.command_timeout = Duration::from_secs(1);
    o.probe_interval = Duration::from_millis(200);
    o.reconnect_max = Duration::from_millis(500);
    o
}

/// Options for a test broker on a Redis Cluster (seeds from `cluster`), as fast as [`options`].
pub fn cluster_options(cluster: &crier_testkit::redis::RedisCluster, node: &str) -> RedisOptions {
    let mut o = RedisOptions::cluster(cluster.seeds(), node);
    o.command_timeout = Duration::from_secs(1);
    o.probe_interval = Duration::from_millis(200);
    o.reconnect_max = Duration::from_millis(500);
    o.connect_wait = Duration::from_secs(5);
    o
}

/// A connected broker with a recording handler installed.
pub async fn broker(opts: RedisOptions) -> (Arc<RedisBroker>, Arc<RecordingHandler>) {
    let b = RedisBroker::connect(opts).await.expect("connect");
    let h = Arc::new(RecordingHandler::default());
    b.set_handler(h.clone());
    (b, h)
}

/// Subscribes the broker (and marks the handler as having local subscribers).
pub async fn subscribe(b: &RedisBroker, h: &RecordingHandler, channel: &str) {
    h.subscribed.lock().unwrap_or_else(|e| e.into_inner()).insert(channel.to_owned());
    b.subscribe(channel).await.unwrap_or_else(|e| panic!("subscribe {channel}: {e}"));
}

pub async fn publish(b: &RedisBroker, channel: &str, data: &str) -> Result<PublishResult, BrokerError> {
    b.publish(channel, data, Default::default()).await
}

/// The epochs the handler saw for `channel`, in delivery order.
pub fn epochs(h: &RecordingHandler, channel: &str) -> Vec<String> {
    let p = h.publications.lock().unwrap_or_else(|e| e.into_inner());
    p.iter().filter(|(c, _)| c == channel).map(|(_, p)| p.epoch.to_string()).collect()
}

/// The `data` values (as JSON text) the handler saw for `channel`, in delivery order.
pub fn data(h: &RecordingHandler, channel: &str) -> Vec<String> {
    let p = h.publications.lock().unwrap_or_else(|e| e.into_inner());
    p.iter()
        .filter(|(c, _)| c == channel)
        .filter_map(|(_, p)| serde_json::from_slice::<serde_json::Value>(&p.frame).ok())
        .map(|v| v["data"].to_string())
        .collect()
}
