//! The memory broker passes the broker conformance suite (the Redis broker runs the same one).

use std::sync::Arc;

use crier_core::{Broker, MemoryBroker};
use crier_testkit::conformance;

#[tokio::test]
async fn memory_broker_conforms() {
    conformance::run(|s| async move { MemoryBroker::with_namespaces(s.namespaces.clone(), 0) as Arc<dyn Broker> })
        .await;
}

/// Channel namespaces: each channel keeps its namespace's history size and TTL; a namespace
/// with a short TTL loses its history while the others keep theirs.
#[tokio::test]
async fn each_channel_keeps_its_namespace_s_history() {
    use std::time::Duration;

    use crier_core::broker::PublishOptions;
    use crier_core::{ChannelPolicy, Namespaces};

    let default = ChannelPolicy { history_size: 10, history_ttl: Duration::from_secs(60), ..ChannelPolicy::default() };
    let ns = Namespaces::new(default.clone())
        .with("small", ChannelPolicy { history_size: 2, ..default.clone() })
        .with("none", ChannelPolicy { history_size: 0, ..default.clone() })
        .with("brief", ChannelPolicy { history_ttl: Duration::from_millis(200), ..default.clone() });
    let b = MemoryBroker::with_namespaces(Arc::new(ns), 0);
    for c in ["small:a", "none:a", "brief:a", "plain"] {
        for i in 1..=5 {
            b.publish(c, &i.to_string(), PublishOptions::default()).await.expect("publish");
        }
    }
    let kept = async |c: &str| -> Vec<u64> {
        let h = b.history(c, None, 100).await.expect("history");
        h.publications.iter().map(|p| p.offset).collect()
    };
    assert_eq!(kept("small:a").await, [4, 5]);
    assert_eq!(kept("none:a").await, Vec::<u64>::new());
    assert_eq!(kept("plain").await, [1, 2, 3, 4, 5]);
    crier_testkit::poll("brief:a's history expires", async || {
        let k = kept("brief:a").await;
        if k.is_empty() { Ok(()) } else { Err(format!("still {k:?}")) }
    })
    .await;
    assert_eq!(kept("plain").await, [1, 2, 3, 4, 5], "the default TTL still holds");
    assert_eq!(kept("small:a").await, [4, 5]);
}
