//! The memory broker passes the broker conformance suite (the Redis broker runs the same one).

use std::sync::Arc;

use crier_core::{Broker, MemoryBroker};
use crier_testkit::conformance;

#[tokio::test]
async fn memory_broker_conforms() {
    conformance::run(|s| async move { MemoryBroker::with_namespaces(s.namespaces.clone(), 0) as Arc<dyn Broker> })
        .await;
}
