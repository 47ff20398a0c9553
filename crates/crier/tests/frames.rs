//! The client contract over a real WebSocket: every frame type, every error code, recovery,
//! refresh and token expiry.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Server, token_for};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn subscribe_receive_publish_unsubscribe() {
    let server = Server::start(&[]).await;
    let mut alice = server.client(&server.token("alice", &["chat:*"], &["chat:*"])).await;
    let ack = alice.subscribe("chat:lobby", 1).await;
    assert_eq!((ack["channel"].as_str(), ack["offset"].as_u64()), (Some("chat:lobby"), Some(0)));
    let epoch = ack["epoch"].as_str().unwrap().to_owned();

    // REST publish reaches the subscriber.
    let r = server.publish("chat:lobby", json!({"text": "hi"})).await;
    assert_eq!((r["offset"].as_u64(), r["epoch"].as_str()), (Some(1), Some(epoch.as_str())));
    let m = alice.recv().await;
    assert_eq!(m, json!({"type":"message","channel":"chat:lobby","epoch":epoch,"offset":1,"data":{"text":"hi"}}));

    // Client publish: ack to the publisher, message to subscribers (including itself).
    let mut bob = server.client(&server.token("bob", &["chat:*"], &[])).await;
    bob.subscribe("chat:lobby", 1).await;
    let ack = alice.request(json!({"type":"publish","channel":"chat:lobby","data":[1,2,3]}), 2).await;
    assert_eq!((ack["type"].as_str(), ack["offset"].as_u64()), (Some("ack"), Some(2)));
    assert_eq!(alice.recv_type("message").await["data"], json!([1, 2, 3]));
    assert_eq!(bob.recv().await["offset"], 2);

    // Bob may not publish.
    let e = bob.request(json!({"type":"publish","channel":"chat:lobby","data":1}), 5).await;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("forbidden")));

    // Unsubscribe, then nothing more arrives; a ping proves the connection lives.
    let ack = alice.request(json!({"type":"unsubscribe","channel":"chat:lobby"}), 3).await;
    assert_eq!(ack["type"], "ack");
    server.publish("chat:lobby", json!("after")).await;
    assert_eq!(bob.recv().await["data"], "after");
    let pong = alice.request(json!({"type":"ping"}), 4).await;
    assert_eq!(pong, json!({"type":"pong","id":4}));
    assert!(server.wait_metric("crier_messages_published_total{source=\"api\"}", 2.0).await >= 2.0);
    assert!(server.metric("crier_messages_published_total{source=\"client\"}").await >= 1.0);
    assert!(server.metric("crier_messages_delivered_total").await >= 4.0);
    assert!(server.metrics().await.contains("crier_broadcast_latency_seconds_bucket"));
}

#[tokio::test]
async fn every_error_code_and_the_connection_lives_on() {
    let server = Server::start(&["--max-subscriptions-per-connection", "2"]).await;
    let mut c = server.client(&server.token("u1", &["a:*"], &[])).await;
    let mut id = 0;
    let mut expect = async |c: &mut support::Client, frame: serde_json::Value, code: &str| {
        id += 1;
        let e = c.request(frame.clone(), id).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some(code)), "{frame} -> {e}");
        assert!(e["message"].is_string());
    };
    expect(&mut c, json!({"type":"dance"}), "unknown_type").await;
    expect(&mut c, json!({"type":"subscribe"}), "bad_request").await;
    expect(&mut c, json!({"type":"subscribe","channel":"bad channel"}), "invalid_channel").await;
    expect(&mut c, json!({"type":"subscribe","channel":"b:1"}), "forbidden").await;
    expect(&mut c, json!({"type":"unsubscribe","channel":"a:1"}), "not_subscribed").await;
    expect(&mut c, json!({"type":"refresh","token":"garbage"}), "token_invalid").await;
    expect(&mut c, json!({"type":"publish","channel":"a:1","data":1}), "forbidden").await;
    c.subscribe("a:1", 100).await;
    expect(&mut c, json!({"type":"subscribe","channel":"a:1"}), "already_subscribed").await;
    c.subscribe("user:u1", 101).await; // the personal channel is always allowed
    expect(&mut c, json!({"type":"subscribe","channel":"a:3"}), "too_many_subscriptions").await;
    expect(&mut c, json!({"type":"subscribe","channel":"user:u2"}), "forbidden").await;

    // Malformed JSON and binary frames: an error frame (no id to echo), the connection lives.
    c.send_raw(Message::text("{not json")).await;
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request");
    c.send_raw(Message::binary(vec![0u8, 159, 146, 150])).await;
    let e = c.recv().await;
    assert_eq!(e["code"], "bad_request");
    let deep = format!(r#"{{"type":"publish","channel":"a:1","data":{}{}}}"#, "[".repeat(200), "]".repeat(200));
    c.send_raw(Message::text(deep)).await;
    assert_eq!(c.recv().await["code"], "bad_request");
    assert_eq!(c.request(json!({"type":"ping"}), 999).await["type"], "pong");
    let m = server.metrics().await;
    for code in ["unknown_type", "bad_request", "invalid_channel", "forbidden", "not_subscribed", "token_invalid"] {
        assert!(support::metric_value(&m, &format!("crier_client_errors_total{{code=\"{code}\"}}")) >= 1.0, "{code}");
    }
}

#[tokio::test]
async fn oversized_frame_closes_with_1009() {
    let server = Server::start(&["--max-message-bytes", "1024"]).await;
    let mut c = server.client(&server.token("u", &["*"], &["*"])).await;
    let big = format!(r#"{{"type":"publish","channel":"a","data":"{}"}}"#, "x".repeat(4096));
    c.send_raw(Message::text(big)).await;
    assert_eq!(c.closed().await, Some(1009));
    // REST: 413 with the contract's body.
    let r = server.post("/api/v1/publish", json!({"channel":"a","data":"x".repeat(2048)})).await;
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap()["error"], "message_too_large");
}

#[tokio::test]
async fn recovery_after_reconnect_and_failed_recovery() {
    let server = Server::start(&["--history-size", "5"]).await;
    let token = server.token("r", &["news"], &[]);
    let mut c = server.client(&token).await;
    let ack = c.subscribe("news", 1).await;
    let epoch = ack["epoch"].as_str().unwrap().to_owned();
    server.publish("news", json!(1)).await;
    assert_eq!(c.recv().await["offset"], 1);
    drop(c);
    for i in 2..=4 {
        server.publish("news", json!(i)).await;
    }
    let mut c = server.client(&token).await;
    let ack = c.resubscribe("news", &epoch, 1, 2).await;
    assert_eq!(
        (ack["type"].as_str(), ack["recovered"].as_bool(), ack["offset"].as_u64()),
        (Some("ack"), Some(true), Some(4))
    );
    server.publish("news", json!(5)).await;
    let offsets: Vec<u64> = [c.recv().await, c.recv().await, c.recv().await, c.recv().await]
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![2, 3, 4, 5], "missed messages in order, then live, no duplicates");

    // Too far behind (history holds 5): recovered false, nothing replayed, then live.
    let mut d = server.client(&token).await;
    for i in 6..=12 {
        server.publish("news", json!(i)).await;
    }
    let ack = d.resubscribe("news", &epoch, 1, 3).await;
    assert_eq!((ack["recovered"].as_bool(), ack["offset"].as_u64()), (Some(false), Some(12)));
    // Wrong epoch: recovered false.
    let ack = d.request(json!({"type":"unsubscribe","channel":"news"}), 4).await;
    assert_eq!(ack["type"], "ack");
    let ack = d.resubscribe("news", "other", 11, 5).await;
    assert_eq!(ack["recovered"], false);
    server.publish("news", json!(13)).await;
    assert_eq!(d.recv().await["offset"], 13);
    assert!(server.metric("crier_recoveries_total{result=\"recovered\"}").await >= 1.0);
    assert!(server.metric("crier_recoveries_total{result=\"failed\"}").await >= 2.0);
}

#[tokio::test]
async fn history_and_presence_frames() {
    let server = Server::start(&[]).await;
    let mut c = server.client(&server.token("h", &["room"], &[])).await;
    for i in 1..=3 {
        server.publish("room", json!(i)).await;
    }
    let h = c.request(json!({"type":"history","channel":"room","limit":2}), 1).await;
    assert_eq!(h["type"], "history");
    assert_eq!(h["offset"], 3);
    let offs: Vec<_> = h["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offs, vec![2, 3]);
    let epoch = h["epoch"].clone();
    let h = c.request(json!({"type":"history","channel":"room","since":{"epoch":epoch,"offset":1}}), 2).await;
    assert_eq!(h["messages"].as_array().map(Vec::len), Some(2));
    let h = c.request(json!({"type":"history","channel":"elsewhere"}), 3).await;
    assert_eq!(h["code"], "forbidden");

    c.subscribe("room", 4).await;
    let mut d = server.client(&server.token("h2", &["room"], &[])).await;
    d.subscribe("room", 1).await;
    let p = c.request(json!({"type":"presence","channel":"room"}), 5).await;
    let mut users: Vec<_> =
        p["clients"].as_array().unwrap().iter().map(|e| e["user"].as_str().unwrap().to_owned()).collect();
    users.sort();
    assert_eq!(users, vec!["h", "h2"]);
    assert!(p["clients"][0]["node"] == "test-node" && p["clients"][0]["client"].is_string());
    drop(d);
    crier_testkit::poll("the presence entry of the closed client to go", async || {
        let p = server.get("/api/v1/channels/room/presence").await.json::<serde_json::Value>().await.unwrap();
        if p["clients"].as_array().map(Vec::len) == Some(1) { Ok(()) } else { Err(format!("presence: {p}")) }
    })
    .await;
}

#[tokio::test]
async fn refresh_extends_and_expiry_closes_with_4001() {
    let server = Server::start(&[]).await;
    // Expires in 2s; refreshed with a longer token, it lives on; its twin without refresh is closed.
    let short = token_for("t", &["a", "b"], &[], Duration::from_secs(2));
    let mut kept = server.client(&short).await;
    let mut lost = server.client(&short).await;
    kept.subscribe("a", 1).await;
    kept.subscribe("b", 2).await;
    let longer = token_for("t", &["a"], &[], Duration::from_secs(3600));
    let ack = kept.request(json!({"type":"refresh","token":longer}), 3).await;
    assert_eq!(ack["type"], "ack");
    // The refreshed token no longer covers "b": that subscription ends.
    let u = kept.recv_type("unsubscribed").await;
    assert_eq!(u["channel"], "b");
    // Another user's token is refused.
    let other = token_for("someone-else", &["a"], &[], Duration::from_secs(3600));
    assert_eq!(kept.request(json!({"type":"refresh","token":other}), 4).await["code"], "token_invalid");
    assert_eq!(lost.closed().await, Some(4001));
    // Past the first expiry, the refreshed connection still answers.
    assert_eq!(kept.request(json!({"type":"ping"}), 5).await["type"], "pong");
}

#[tokio::test]
async fn user_rate_limit_refuses_then_closes_with_4008() {
    let server = Server::start(&["--user-rate", "1", "--user-burst", "5"]).await;
    let mut c = server.client(&server.token("spammer", &[], &[])).await;
    for i in 0..5 {
        c.send(json!({"type":"ping","id":i})).await;
    }
    for _ in 0..5 {
        assert_eq!(c.recv().await["type"], "pong");
    }
    c.send(json!({"type":"ping","id":6})).await;
    let e = c.recv().await;
    assert_eq!(e["code"], "rate_limited");
    // Keep hammering: closed with 4008.
    for i in 0..100 {
        if c.ws.send(Message::text(json!({"type":"ping","id":i}).to_string())).await.is_err() {
            break;
        }
    }
    assert_eq!(c.closed().await, Some(4008));
    assert!(server.metric("crier_rate_limited_total{kind=\"user\"}").await >= 1.0);
}

use futures_util::SinkExt;
