//! The node's race-free subscribe (subscribe live, read history, merge by offset) through the
//! Redis broker: clients that join, recover and leave while another node publishes see, after
//! their ack, every message exactly once and in order.

#![allow(clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use crier_core::{Broker, History, Hub, Next, Node, Out, Outbox};
use crier_protocol::StreamPosition;
use crier_testkit::{until, until_within};
use serde_json::Value;
use support::{RedisServer, broker, options, publish};

/// One client: its outbox and every frame taken out of it so far.
struct Client {
    outbox: Arc<Outbox>,
    frames: Vec<Value>,
    recover: Option<StreamPosition>,
}

impl Client {
    async fn drain(&mut self) {
        while self.outbox.queued_bytes() > 0 {
            let mut batch = Vec::new();
            if self.outbox.next(&mut batch).await != Next::Batch {
                return;
            }
            for out in batch {
                if let Out::Frame(f) = out {
                    self.frames.push(serde_json::from_slice(&f).unwrap_or(Value::Null));
                }
            }
        }
    }

    fn offsets(&self) -> Vec<u64> {
        self.frames.iter().filter(|f| f["type"] == "message").filter_map(|f| f["offset"].as_u64()).collect()
    }

    /// The ack's offset, or the recovery position when recovery succeeded: where messages start.
    fn start(&self) -> u64 {
        let ack = &self.frames[0];
        assert_eq!(ack["type"], "ack", "the ack comes first");
        match (&self.recover, ack["recovered"].as_bool()) {
            (Some(pos), Some(true)) => pos.offset,
            _ => ack["offset"].as_u64().unwrap_or(0),
        }
    }
}

fn ack(h: &History, recovered: Option<bool>) -> Bytes {
    let v = serde_json::json!({"type": "ack", "epoch": h.epoch, "offset": h.offset, "recovered": recovered});
    Bytes::from(v.to_string())
}

/// A Redis, a publishing broker, and a second broker with a real hub and node on top.
async fn two_nodes() -> (RedisServer, Arc<crier_redis::RedisBroker>, Arc<crier_redis::RedisBroker>, Arc<Hub>, Node) {
    let server = RedisServer::start();
    let (publisher, _) = broker(options(&server, "pub")).await;
    let broker_b = crier_redis::RedisBroker::connect(options(&server, "sub")).await;
    let broker_b = broker_b.expect("connect");
    let hub = Arc::new(Hub::new());
    broker_b.set_handler(hub.clone());
    let node = Node::new(hub.clone(), broker_b.clone());
    (server, publisher, broker_b, hub, node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_joining_recovering_and_leaving_under_load_miss_nothing() {
    let (_server, publisher, _broker_b, hub, node) = two_nodes().await;
    const N: u64 = 400;
    let ch = "live:merge";
    let first = publish(&publisher, ch, "0").await.expect("publish");
    let pub_task = {
        let p = publisher.clone();
        tokio::spawn(async move {
            for i in 2..=N {
                let _ = publish(&p, ch, &i.to_string()).await;
                tokio::time::sleep(Duration::from_millis(2)).await; // pacing
            }
        })
    };

    let mut clients: Vec<Client> = Vec::new();
    let mut live: Vec<u64> = Vec::new();
    for round in 0..16u64 {
        let seen = clients.iter().flat_map(|c| c.offsets()).max().unwrap_or(1);
        let recover =
            (round % 2 == 1).then(|| StreamPosition { epoch: first.epoch.clone(), offset: seen.saturating_sub(3) });
        let outbox = Arc::new(Outbox::new(1 << 20));
        let s = node.subscribe(ch, round, &outbox, recover.as_ref(), ack).await;
        assert!(s.is_ok(), "subscribe {round}: {:?}", s.err());
        clients.push(Client { outbox, frames: Vec::new(), recover });
        live.push(round);
        // Every third round, everyone leaves: the node drops its broker subscription and the
        // next client makes it again while messages keep coming.
        if round % 3 == 2 {
            for id in live.drain(..) {
                node.unsubscribe(ch, id).await;
            }
            assert!(!hub.has_channel(ch));
        }
        let target = seen + 10;
        until(format!("messages keep flowing in round {round}"), async || {
            for c in clients.iter_mut() {
                c.drain().await;
            }
            clients.iter().flat_map(|c| c.offsets()).max().unwrap_or(0) >= target.min(N) || live.is_empty()
        })
        .await;
    }
    let _ = pub_task.await;
    let still: Vec<usize> = live.iter().map(|id| *id as usize).collect();
    assert!(!still.is_empty());
    until(format!("clients {still:?}, still subscribed, to get message {N}"), async || {
        for c in clients.iter_mut() {
            c.drain().await;
        }
        still.iter().all(|i| clients[*i].offsets().last() == Some(&N))
    })
    .await;
    for (i, c) in clients.iter().enumerate() {
        let offsets = c.offsets();
        let start = c.start();
        let expected: Vec<u64> = (start + 1..start + 1 + offsets.len() as u64).collect();
        assert_eq!(offsets, expected, "client {i}: every message after its start, once, in order");
        if still.contains(&i) {
            assert_eq!(offsets.last(), Some(&N), "client {i} is still subscribed and got everything");
        }
        if c.recover.is_some() {
            assert_eq!(c.frames[0]["recovered"], true, "client {i}: the history held the gap");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_clients_get_a_gap_filled_stream_through_pubsub_kills() {
    let (server, publisher, broker_b, _hub, node) = two_nodes().await;
    let ch = "live:kill";
    let mut clients = Vec::new();
    for id in 0..3u64 {
        let outbox = Arc::new(Outbox::new(1 << 20));
        let s = node.subscribe(ch, id, &outbox, None, ack).await;
        assert!(s.is_ok(), "subscribe: {:?}", s.err());
        clients.push(Client { outbox, frames: Vec::new(), recover: None });
    }
    const N: u64 = 300;
    let pub_task = {
        let p = publisher.clone();
        tokio::spawn(async move {
            for i in 1..=N {
                let _ = publish(&p, ch, &i.to_string()).await;
                tokio::time::sleep(Duration::from_millis(2)).await; // pacing
            }
        })
    };
    let mut kills = 0;
    until_within(
        format!("every client to get {N} messages through two pub/sub kills"),
        Duration::from_secs(30),
        async || {
            for c in clients.iter_mut() {
                c.drain().await;
            }
            let seen = clients[0].offsets().len() as u64;
            if (kills == 0 && seen >= 60) || (kills == 1 && seen >= 180) {
                server.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]);
                kills += 1;
            }
            clients.iter().all(|c| c.offsets().len() as u64 >= N)
        },
    )
    .await;
    let _ = pub_task.await;
    assert_eq!(kills, 2);
    let expected: Vec<u64> = (1..=N).collect();
    for (i, c) in clients.iter().enumerate() {
        assert_eq!(c.offsets(), expected, "client {i}: one stream, in order, exactly once");
    }
    assert!(broker_b.gap_filled() > 0 && broker_b.reconnects() >= 2);
}
