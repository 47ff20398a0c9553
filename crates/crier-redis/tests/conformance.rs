//! The Redis broker passes the broker conformance suite, unchanged, against a real redis-server.

#![allow(clippy::expect_used)]

mod support;

use std::sync::Arc;

use crier_core::Broker;
use crier_redis::RedisBroker;
use crier_testkit::conformance;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_conforms() {
    let server = support::RedisServer::start();
    let server = &server;
    conformance::run(|s| async move {
        let mut o = support::options(server, "conformance");
        o.namespaces = s.namespaces.clone();
        let b = RedisBroker::connect(o).await.expect("connect");
        assert!(b.is_up(), "connected to a running redis");
        b as Arc<dyn Broker>
    })
    .await;
}
