//! Channel namespaces on the Redis broker: publishes to channels of different namespaces that
//! go to Redis in one batched script call each keep their own channel's history size and expiry
//! (the script's per-message history options), and reads follow the channel's namespace.

mod support;

use std::sync::Arc;
use std::time::Duration;

use crier_core::{Broker, ChannelPolicy, Namespaces};
use futures_util::future::join_all;
use support::RedisServer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_mixed_namespaces_keeps_each_channel_s_history() {
    let server = RedisServer::start();
    let mut o = support::options(&server, "ns");
    let default =
        ChannelPolicy { history_size: 100, history_ttl: Duration::from_secs(300), ..ChannelPolicy::default() };
    o.namespaces = Arc::new(
        Namespaces::new(default.clone())
            .with("big", ChannelPolicy { history_size: 5, history_ttl: Duration::from_secs(3600), ..default.clone() })
            .with("small", ChannelPolicy { history_size: 2, ..default.clone() })
            .with("none", ChannelPolicy { history_size: 0, ..default.clone() }),
    );
    let (b, h) = support::broker(o).await;
    let channels = ["big:x", "small:x", "none:x", "plain"];
    for c in channels {
        support::subscribe(&b, &h, c).await;
    }
    // 4 x 40 publishes in flight at once: they go to Redis in batches mixing the namespaces.
    let publishes = (1..=40).flat_map(|i| channels.map(|c| (c, i))).map(|(c, i)| {
        let b = b.clone();
        async move { support::publish(&b, c, &i.to_string()).await.map(|r| (c, r.offset)) }
    });
    let results = join_all(publishes).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let calls = b.publish_calls();
    assert!(calls < 160, "batched: {calls} calls for 160 messages");
    for (c, kept) in [("big:x", 5), ("small:x", 2), ("none:x", 0), ("plain", 40)] {
        let hist = b.history(c, None, 1000).await.unwrap_or_else(|e| panic!("history {c}: {e}"));
        assert_eq!(hist.offset, 40, "{c}");
        let offsets: Vec<u64> = hist.publications.iter().map(|p| p.offset).collect();
        assert_eq!(offsets, (41 - kept..=40).collect::<Vec<u64>>(), "{c} keeps its namespace's history");
    }
    // Every channel was delivered in order, whatever its history (none:x cannot gap-fill: it
    // has nothing to fill from, and needs nothing).
    crier_testkit::poll("all delivered", async || {
        let n: usize = channels.iter().map(|c| h.offsets(c).len()).sum();
        if n == 160 { Ok(()) } else { Err(format!("{n} of 160")) }
    })
    .await;
    for c in channels {
        assert_eq!(h.offsets(c), (1..=40).collect::<Vec<u64>>(), "{c}");
    }
    let pttl = |key: &str| -> i64 {
        let reply = server.cmd(&["PTTL", key]);
        reply.trim().trim_start_matches(':').parse().unwrap_or_else(|_| panic!("{key}: {reply:?}"))
    };
    assert!(pttl("crier:{big:x}:hist") > 3_000_000, "big:x keeps an hour");
    let small = pttl("crier:{small:x}:hist");
    assert!(small > 0 && small <= 330_000, "small:x keeps the default 5 min (+ slack): {small}");
    assert_eq!(pttl("crier:{none:x}:hist"), -2, "none:x keeps no history key");
}
