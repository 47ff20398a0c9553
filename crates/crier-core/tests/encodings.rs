//! The hub's fan-out in several encodings: JSON subscribers share the broker's frame, MessagePack
//! subscribers share one MessagePack frame built from it once per fan-out (per message per
//! node), whatever their number; buffered and notified frames are converted too, and buffered
//! ones keep the fan-out's shared (converted, compressed) form.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use crier_core::{Hub, Next, Out, Outbox, Publication};
use crier_protocol::Encoding;
use crier_protocol::frames::encode_message;

fn publication(offset: u64) -> Publication {
    Publication {
        offset,
        epoch: "e".into(),
        frame: encode_message("c", "e", offset, r#"{"text":"hi","n":[1,2.5,-3]}"#),
        published_at_us: 0,
    }
}

async fn frames(o: &Outbox) -> Vec<Bytes> {
    let mut batch = Vec::new();
    assert_eq!(o.next(&mut batch).await, Next::Batch);
    batch
        .into_iter()
        .filter_map(|b| match b {
            Out::Frame(f) | Out::Deflated(f) => Some(f),
            Out::Ping => None,
        })
        .collect()
}

#[tokio::test]
async fn each_encoding_gets_one_shared_frame_per_message() {
    let hub = Hub::new();
    let outboxes: Vec<Arc<Outbox>> = [Encoding::Json, Encoding::MsgPack, Encoding::Json, Encoding::MsgPack]
        .into_iter()
        .map(|e| Arc::new(Outbox::with_encoding(1 << 20, e)))
        .collect();
    for (i, o) in outboxes.iter().enumerate() {
        assert!(hub.add("c", i as u64, o.clone()).is_ok());
    }
    // The last one is still buffering when message 1 arrives.
    for i in 0..3 {
        assert!(hub.activate("c", i as u64, vec![], ("e", 0)));
    }
    let p = publication(1);
    assert_eq!(hub.deliver("c", &p).delivered, 3);
    assert!(hub.activate("c", 3, vec![], ("e", 0)));
    hub.deliver("c", &publication(2));
    let gap = Bytes::from_static(br#"{"type":"gap","channel":"c","epoch":"f","offset":9}"#);
    hub.notify("c", &gap);

    let json_a = frames(&outboxes[0]).await;
    let mp_a = frames(&outboxes[1]).await;
    let json_b = frames(&outboxes[2]).await;
    let mp_b = frames(&outboxes[3]).await;
    // JSON: the broker's very bytes.
    assert_eq!(json_a[0].as_ptr(), p.frame.as_ptr());
    assert_eq!(json_b[0].as_ptr(), p.frame.as_ptr());
    // MessagePack: the same value, in one allocation shared by both subscribers (message 2 and
    // the gap notice: live for both).
    let as_json = |b: &Bytes| rmp_serde::from_slice::<serde_json::Value>(b).unwrap();
    assert_eq!(as_json(&mp_a[0]), serde_json::from_slice::<serde_json::Value>(&p.frame).unwrap());
    assert_eq!(mp_a[1].as_ptr(), mp_b[1].as_ptr(), "one MessagePack frame per message per node");
    assert_eq!(mp_a[2].as_ptr(), mp_b[2].as_ptr());
    assert_eq!(as_json(&mp_a[2])["type"], "gap");
    // The buffered subscriber got message 1 at activation in the form its fan-out built: the
    // live subscriber's very bytes (transcoded once per node, buffered or not).
    assert_eq!(as_json(&mp_b[0])["offset"], 1);
    assert_eq!(mp_b[0].as_ptr(), mp_a[0].as_ptr(), "buffered messages share the fan-out's form");
    assert_eq!(mp_b.len(), 3);
    assert_eq!(json_a.len(), 3);
}

#[tokio::test]
async fn deflate_subscribers_share_one_compressed_frame_per_encoding_and_window() {
    let hub = Hub::new();
    let make = |e, window: Option<u8>| {
        let o = Arc::new(Outbox::with_encoding(1 << 20, e));
        if let Some(bits) = window {
            o.set_deflate(16, bits);
        }
        o
    };
    let outboxes = [
        make(Encoding::Json, Some(15)),
        make(Encoding::Json, Some(15)),
        make(Encoding::MsgPack, Some(15)),
        make(Encoding::MsgPack, Some(15)),
        make(Encoding::Json, None),
        // Smaller server windows (server_max_window_bits): one form per window; 8 is served by 9.
        make(Encoding::Json, Some(9)),
        make(Encoding::Json, Some(8)),
        make(Encoding::Json, Some(12)),
        make(Encoding::Json, Some(12)),
    ];
    for (i, o) in outboxes.iter().enumerate() {
        assert!(hub.add("c", i as u64, o.clone()).is_ok());
        assert!(hub.activate("c", i as u64, vec![], ("e", 0)));
    }
    let p = publication(1);
    hub.deliver("c", &p);
    let small = Publication { frame: Bytes::from_static(b"{\"a\":1}"), ..publication(2) };
    hub.deliver("c", &small);
    let mut got = Vec::new();
    for o in &outboxes {
        let mut batch = Vec::new();
        assert_eq!(o.next(&mut batch).await, Next::Batch);
        got.push(batch);
    }
    let ptr = |o: &Out| match o {
        Out::Deflated(b) => Some(b.as_ptr()),
        _ => None,
    };
    assert!(ptr(&got[0][0]).is_some(), "compressed for a deflate subscriber");
    assert_eq!(ptr(&got[0][0]), ptr(&got[1][0]), "one compression for both JSON subscribers");
    assert_eq!(ptr(&got[2][0]), ptr(&got[3][0]), "one for both MessagePack subscribers");
    assert_ne!(ptr(&got[0][0]), ptr(&got[2][0]));
    assert!(matches!(&got[4][0], Out::Frame(f) if f.as_ptr() == p.frame.as_ptr()), "plain JSON: the broker's bytes");
    assert!(matches!(&got[0][1], Out::Frame(_)), "under the minimum: uncompressed");
    let Out::Deflated(z) = &got[0][0] else { unreachable!() };
    assert_eq!(crier_protocol::ws::inflate(z, 1 << 20).unwrap(), p.frame.to_vec());
    assert_eq!(ptr(&got[5][0]), ptr(&got[6][0]), "windows 8 and 9 share one form");
    assert_eq!(ptr(&got[7][0]), ptr(&got[8][0]), "one compression per window");
    assert_ne!(ptr(&got[5][0]), ptr(&got[0][0]));
    assert_ne!(ptr(&got[7][0]), ptr(&got[0][0]));
    assert_ne!(ptr(&got[7][0]), ptr(&got[5][0]));
    for (i, bits) in [(5, 9), (7, 12)] {
        let Out::Deflated(z) = &got[i][0] else { unreachable!() };
        assert_eq!(
            z.to_vec(),
            crier_protocol::ws::deflate_window(&p.frame, bits).unwrap(),
            "compressed with {bits} bits"
        );
        assert_eq!(crier_protocol::ws::inflate(z, 1 << 20).unwrap(), p.frame.to_vec());
    }
}

#[tokio::test]
async fn a_buffering_deflate_subscriber_gets_the_shared_compressed_form() {
    let hub = Hub::new();
    let make = || {
        let o = Arc::new(Outbox::with_encoding(1 << 20, Encoding::MsgPack));
        o.set_deflate(16, 15);
        o
    };
    let (live, buffering) = (make(), make());
    assert!(hub.add("c", 1, live.clone()).is_ok());
    assert!(hub.activate("c", 1, vec![], ("e", 0)));
    assert!(hub.add("c", 2, buffering.clone()).is_ok());
    let p = publication(1);
    hub.deliver("c", &p);
    assert!(hub.activate("c", 2, vec![], ("e", 0)));
    let mut a = Vec::new();
    let mut b = Vec::new();
    assert_eq!(live.next(&mut a).await, Next::Batch);
    assert_eq!(buffering.next(&mut b).await, Next::Batch);
    let (Out::Deflated(x), Out::Deflated(y)) = (&a[0], &b[0]) else { panic!("compressed: {a:?} {b:?}") };
    assert_eq!(x.as_ptr(), y.as_ptr(), "one compression for the live and the buffered subscriber");
    let inflated = crier_protocol::ws::inflate(x, 1 << 20).unwrap();
    assert_eq!(
        rmp_serde::from_slice::<serde_json::Value>(&inflated).unwrap(),
        serde_json::from_slice::<serde_json::Value>(&p.frame).unwrap()
    );
}

/// A reconnect storm: many connections recovering the same channel over permessage-deflate (and
/// MessagePack) are sent each missed message in one shared form, compressed once per node —
/// concurrently, without a live subscriber to build it — and the cache goes with the channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovering_deflate_subscribers_share_one_compression_per_message() {
    use crier_core::broker::{Broker, PublishOptions};
    use crier_core::{MemoryBroker, Node};
    use crier_protocol::StreamPosition;

    const N: u64 = 16;
    const MISSED: u64 = 20;
    let hub = Arc::new(Hub::new());
    let broker = MemoryBroker::new(100, std::time::Duration::from_secs(60));
    broker.set_handler(hub.clone());
    let node = Arc::new(Node::new(hub.clone(), broker.clone()));
    let data = format!("\"{}\"", "recovered ".repeat(20));
    let mut epoch = String::new();
    for _ in 0..MISSED {
        epoch = broker.publish("c", &data, PublishOptions::default()).await.unwrap().epoch;
    }
    let make = |e| {
        let o = Arc::new(Outbox::with_encoding(1 << 20, e));
        o.set_deflate(16, 15);
        o
    };
    // Half JSON, half MessagePack; all recover everything from offset 0, at once.
    let outboxes: Vec<Arc<Outbox>> =
        (0..N).map(|i| make(if i % 2 == 0 { Encoding::Json } else { Encoding::MsgPack })).collect();
    let subscribes = outboxes.iter().enumerate().map(|(i, o)| {
        let (node, o, pos) = (node.clone(), o.clone(), StreamPosition { epoch: epoch.clone(), offset: 0 });
        tokio::spawn(async move {
            node.subscribe("c", i as u64, &o, Some(&pos), |_, _| Bytes::from_static(b"{\"type\":\"ack\"}")).await
        })
    });
    for s in subscribes.collect::<Vec<_>>() {
        let s = s.await.unwrap().expect("subscribed");
        assert_eq!((s.recovered, s.replayed), (Some(true), MISSED as usize));
    }
    assert!(hub.recovered_forms_bytes() > 0, "the shared forms are counted");
    let mut got: Vec<Vec<Out>> = Vec::new();
    for o in &outboxes {
        let mut batch = Vec::new();
        assert_eq!(o.next(&mut batch).await, Next::Batch);
        assert_eq!(batch.len(), 1 + MISSED as usize, "the ack and every missed message");
        got.push(batch);
    }
    let ptr = |o: &Out| match o {
        Out::Deflated(b) => b.as_ptr(),
        other => panic!("not compressed: {other:?}"),
    };
    for m in 1..=MISSED as usize {
        for (i, batch) in got.iter().enumerate() {
            // One compression per message and form, whatever the number of recovering connections.
            assert_eq!(ptr(&batch[m]), ptr(&got[i % 2][m]), "message {m}, subscriber {i}");
        }
        assert_ne!(ptr(&got[0][m]), ptr(&got[1][m]), "JSON and MessagePack are two forms");
        let Out::Deflated(z) = &got[1][m] else { unreachable!() };
        let mp = crier_protocol::ws::inflate(z, 1 << 20).unwrap();
        assert_eq!(rmp_serde::from_slice::<serde_json::Value>(&mp).unwrap()["offset"], m as u64);
    }
    for i in 0..N {
        node.unsubscribe("c", i).await;
    }
    assert_eq!(hub.recovered_forms_bytes(), 0, "gone with the channel's last subscriber");
}
