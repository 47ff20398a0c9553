//! The NATS broker passes the broker conformance suite, unchanged, against a real nats-server
//! with JetStream.

use std::sync::Arc;

use crier_core::Broker;
use crier_nats::{NatsBroker, NatsOptions};
use crier_testkit::conformance;
use crier_testkit::nats::{NatsServer, nats_available};

/// Runs the broker conformance suite on brokers connected to `url` of `server`.
async fn conforms(server: &NatsServer, url: &str) {
    conformance::run(|s| async move {
        let mut o = NatsOptions::new(vec![url.to_owned()], "conformance");
        o.history_size = s.history_size;
        o.history_ttl = s.history_ttl;
        o.namespaces = s.namespaces.clone();
        let b = NatsBroker::connect(o).await.unwrap_or_else(|e| panic!("connect: {e}\n{}", server.log()));
        assert!(b.is_up(), "connected to a running nats-server");
        b as Arc<dyn Broker>
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_broker_conforms() {
    if !nats_available("nats_broker_conforms") {
        return;
    }
    let server = NatsServer::start();
    conforms(&server, &server.url()).await;
}

/// The same suite through async-nats subscriptions (a user in the URL: the broker's own
/// subscriber connection serves only plain URLs), driven by the one dispatcher task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_broker_conforms_through_async_nats_subscriptions() {
    if !nats_available("nats_broker_conforms_through_async_nats_subscriptions") {
        return;
    }
    let server = NatsServer::start();
    let url = server.url().replacen("nats://", "nats://crier:unused@", 1);
    conforms(&server, &url).await;
}
