//! crier's drain with the project's own Rust client (`crier-client`) on the other end: a node
//! that is stopped (SIGTERM: 1012 closes spread over `shutdown_drain`) hands its clients to
//! another node of the cluster, and they lose nothing that was acknowledged meanwhile.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../../crier-redis/tests/support/mod.rs"]
mod redis_support;
mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crier_client::{Client, Event};
use crier_testkit::until;
use serde_json::json;
use support::{Server, WAIT};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_nodes_clients_resume_on_another_node_without_loss() {
    let redis = redis_support::RedisServer::start();
    let url = redis.url();
    let mut a = Server::start(&["--redis-url", &url, "--node-id", "node-a"]).await;
    let b = Arc::new(Server::start(&["--redis-url", &url, "--node-id", "node-b"]).await);

    let clients: Vec<Client> = (0..3)
        .map(|i| {
            Client::builder(a.ws_url())
                .also_url(b.ws_url())
                .token(a.token(&format!("u{i}"), &["live:*"], &[]))
                .backoff(Duration::from_millis(50), Duration::from_millis(500))
                .connect()
                .unwrap()
        })
        .collect();
    let mut readers = Vec::new();
    let received: Vec<Arc<Mutex<Vec<u64>>>> = (0..3).map(|_| Arc::default()).collect();
    for (c, got) in clients.iter().zip(&received) {
        let mut sub = c.subscribe("live:scores");
        assert!(matches!(tokio::time::timeout(WAIT, sub.next()).await.unwrap(), Some(Event::Subscribed { .. })));
        let got = got.clone();
        readers.push(tokio::spawn(async move {
            while let Some(ev) = sub.next().await {
                match ev {
                    Event::Message(m) => {
                        got.lock().unwrap().push(m.offset);
                        if m.data == "last" {
                            return;
                        }
                    }
                    Event::Gap(g) => panic!("nothing may be lost: {g:?}"),
                    _ => {}
                }
            }
        }));
    }
    assert!(clients.iter().all(|c| c.welcome().is_some_and(|w| w.node == "node-a")));

    // A publisher on node b that keeps going through the drain.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let acked: Arc<Mutex<Vec<u64>>> = Default::default();
    let (pb, pa) = (b.clone(), acked.clone());
    let publisher = tokio::spawn(async move {
        let mut i = 0u64;
        loop {
            let last = *stopped.borrow();
            let r = pb.publish("live:scores", if last { json!("last") } else { json!(i) }).await;
            pa.lock().unwrap().push(r["offset"].as_u64().unwrap());
            if last {
                return;
            }
            i += 1;
            tokio::time::sleep(Duration::from_millis(3)).await; // pacing, not synchronisation
        }
    });

    until("messages before the drain", async || received.iter().all(|r| r.lock().unwrap().len() >= 10)).await;
    a.sigterm();
    assert_eq!(a.wait_exit().await, Some(0), "the drained node exits 0");
    until("every client resumed on node b", async || {
        clients.iter().all(|c| c.connections() == 2 && c.welcome().is_some_and(|w| w.node == "node-b"))
    })
    .await;
    let after: Vec<usize> = received.iter().map(|r| r.lock().unwrap().len()).collect();
    until("messages after the drain", async || {
        received.iter().zip(&after).all(|(r, n)| r.lock().unwrap().len() >= n + 10)
    })
    .await;
    stop.send(true).unwrap();
    publisher.await.unwrap();
    for r in readers {
        tokio::time::timeout(WAIT, r).await.expect("the last message arrives").unwrap();
    }

    let acked = acked.lock().unwrap().clone();
    for got in &received {
        let got = got.lock().unwrap().clone();
        let want: Vec<u64> = acked.iter().copied().filter(|o| *o >= got[0]).collect();
        assert_eq!(got, want, "every acknowledged message exactly once, in order");
    }
}
