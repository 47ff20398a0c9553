//! The MessagePack subprotocol (`crier.v1.msgpack`) against the real binary, with `rmp-serde` as
//! the client's codec: the whole frame set, each frame equal to what a JSON client gets; JSON and
//! MessagePack subscribers of one channel in one order; hostile input (invalid MessagePack,
//! values JSON cannot hold, text frames) answered with `bad_request`, counted, the connection and
//! its neighbours unaffected.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{Server, WAIT};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A MessagePack client: frames out as `rmp_serde::to_vec_named` of a JSON value, frames in
/// decoded with `rmp_serde::from_slice`.
struct Mp {
    ws: Ws,
    protocol: Option<String>,
}

impl Mp {
    async fn connect(server: &Server, protocols: &str, auth: Option<&str>) -> Mp {
        let mut req = server.ws_url().into_client_request().unwrap();
        req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_str(protocols).unwrap());
        if let Some(token) = auth {
            req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        }
        let (ws, resp) = tokio_tungstenite::connect_async(req).await.expect("connects");
        let protocol = resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()).map(str::to_owned);
        Mp { ws, protocol }
    }

    async fn send(&mut self, v: Value) {
        self.send_bytes(rmp_serde::to_vec_named(&v).unwrap()).await;
    }

    async fn send_bytes(&mut self, b: Vec<u8>) {
        self.ws.send(Message::binary(b)).await.unwrap();
    }

    async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next()).await.expect("a frame in time");
            match m {
                Some(Ok(Message::Binary(b))) => {
                    return rmp_serde::from_slice(&b).unwrap_or_else(|e| panic!("frame is MessagePack ({e}): {b:?}"));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a binary frame, got {other:?}"),
            }
        }
    }

    async fn recv_type(&mut self, ty: &str) -> Value {
        loop {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
    }
}

/// Does the same as a JSON client and a MessagePack client, and compares every reply.
#[tokio::test]
async fn every_frame_is_the_json_frame_in_messagepack() {
    let server = Server::start(&["--node-id", "n1"]).await;
    let token = server.token("u1", &["chat:*"], &["chat:*"]);
    let mut json_client = server.client(&token).await;
    // Token in the subprotocol list, as a browser would send it.
    let mut mp = Mp::connect(&server, &format!("crier.v1.msgpack, crier.bearer.{token}"), None).await;
    assert_eq!(mp.protocol.as_deref(), Some("crier.v1.msgpack"), "the token is never echoed");
    let welcome = mp.recv().await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!((welcome["user"].as_str(), welcome["node"].as_str()), (Some("u1"), Some("n1")));
    assert!(welcome["ping_interval_ms"].is_u64());

    // Frames whose replies are the same for both clients (ids and all).
    let exchanges = [
        json!({"type":"subscribe","id":1,"channel":"chat:a"}),
        json!({"type":"ping","id":2}),
        json!({"type":"subscribe","id":3,"channel":"secret"}),
        json!({"type":"dance","id":4}),
        json!({"type":"subscribe","id":5}),
        json!({"type":"subscribe","id":6,"channel":"chat:a"}),
        json!({"type":"refresh","id":7,"token":"nope"}),
        json!({"type":"unsubscribe","id":8,"channel":"chat:zz"}),
        json!({"type":"publish","id":9,"channel":"secret","data":1}),
    ];
    for frame in exchanges {
        json_client.send(frame.clone()).await;
        mp.send(frame.clone()).await;
        let (j, m) = (json_client.recv().await, mp.recv().await);
        assert_eq!(m, j, "reply to {frame}");
    }
    // A publish from the MessagePack client: its ack, and the message both get.
    let data = json!({"text":"hé","n":[1,-2,3.5,null,true],"big":18446744073709551615u64,"nested":{"z":{},"a":[]}});
    mp.send(json!({"type":"publish","id":10,"channel":"chat:a","data":data})).await;
    // The ack and the message, in either order (the fan-out may come first).
    let (a, b) = (mp.recv().await, mp.recv().await);
    let (ack, m) = if a["type"] == "ack" { (a, b) } else { (b, a) };
    assert_eq!((ack["type"].as_str(), ack["id"].as_u64(), ack["offset"].as_u64()), (Some("ack"), Some(10), Some(1)));
    assert_eq!(m["type"], "message");
    let j = json_client.recv_type("message").await;
    assert_eq!(m, j);
    assert_eq!(m["data"], data, "data survives MessagePack → JSON → MessagePack");
    // A REST publish.
    server.publish("chat:a", json!("from rest")).await;
    let (j, m) = (json_client.recv_type("message").await, mp.recv_type("message").await);
    assert_eq!(m, j);
    // Presence, history, recovery, refresh, unsubscribe.
    let token2 = server.token("u1", &["chat:*"], &["chat:*"]);
    for frame in [
        json!({"type":"history","id":11,"channel":"chat:a","since":{"epoch":j["epoch"],"offset":0},"limit":10}),
        json!({"type":"refresh","id":12,"token":token2}),
    ] {
        json_client.send(frame.clone()).await;
        mp.send(frame.clone()).await;
        let (j, m) = (json_client.recv().await, mp.recv().await);
        assert_eq!(m, j, "reply to {frame}");
    }
    json_client.send(json!({"type":"presence","id":13,"channel":"chat:a"})).await;
    mp.send(json!({"type":"presence","id":13,"channel":"chat:a"})).await;
    let (mut j, mut m) = (json_client.recv().await, mp.recv().await);
    for v in [&mut j, &mut m] {
        v["clients"].as_array_mut().unwrap().sort_by_key(|c| c["client"].as_str().unwrap().to_owned());
    }
    assert_eq!(m["clients"].as_array().map(Vec::len), Some(2));
    assert_eq!(m, j);
    mp.send(json!({"type":"unsubscribe","id":14,"channel":"chat:a"})).await;
    assert_eq!(mp.recv().await, json!({"type":"ack","id":14,"channel":"chat:a"}));
    let epoch = ack_epoch(&server).await;
    mp.send(json!({"type":"subscribe","id":15,"channel":"chat:a","recover":{"epoch":epoch,"offset":0}})).await;
    let rec = mp.recv().await;
    assert_eq!((rec["type"].as_str(), rec["recovered"].as_bool()), (Some("ack"), Some(true)), "{rec}");
    assert_eq!(mp.recv().await["offset"], 1, "recovered messages follow, in MessagePack");
    assert_eq!(mp.recv().await["offset"], 2);
}

/// The epoch of channel `chat:a` (from its history).
async fn ack_epoch(server: &Server) -> Value {
    let h: Value = server.get("/api/v1/channels/chat:a/history").await.json().await.unwrap();
    h["epoch"].clone()
}

#[tokio::test]
async fn hostile_messagepack_is_bad_request_and_disturbs_nothing() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["c"], &["c"]);
    let mut bystander = server.client(&token).await;
    bystander.subscribe("c", 1).await;
    let mut mp = Mp::connect(&server, "crier.v1.msgpack", Some(&token)).await;
    assert_eq!(mp.recv().await["type"], "welcome");
    let bin_data = {
        // {"type":"publish","channel":"c","data":<bin 2>}
        let mut b = rmp_serde::to_vec_named(&json!({"type":"publish","channel":"c"})).unwrap();
        b[0] = 0x83;
        b.extend_from_slice(&[0xa4, b'd', b'a', b't', b'a', 0xc4, 2, 1, 2]);
        b
    };
    let nan = {
        let mut b = rmp_serde::to_vec_named(&json!({"type":"publish","channel":"c"})).unwrap();
        b[0] = 0x83;
        b.extend_from_slice(&[0xa4, b'd', b'a', b't', b'a', 0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]);
        b
    };
    let cases: Vec<Vec<u8>> = vec![
        vec![0xc1],
        vec![],
        vec![0xdd, 0xff, 0xff, 0xff, 0xff],
        vec![0x81, 0x01, 0x02],
        vec![0xa3, 0xff, 0xfe, 0xfd],
        vec![0x91; 200],
        bin_data,
        nan,
        rmp_serde::to_vec_named(&json!([1, 2])).unwrap(),
        [rmp_serde::to_vec_named(&json!({"type":"ping"})).unwrap(), vec![0xc0]].concat(),
    ];
    let n = cases.len();
    for bytes in cases {
        mp.send_bytes(bytes.clone()).await;
        let e = mp.recv().await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_request")), "{bytes:?}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A text frame on a MessagePack connection.
    mp.ws.send(Message::text(r#"{"type":"ping","id":1}"#)).await.unwrap();
    let e = mp.recv().await;
    assert_eq!(
        (e["code"].as_str(), e["message"].as_str().map(|m| m.contains("msgpack"))),
        (Some("bad_request"), Some(true))
    );
    assert!(server.metric("crier_client_errors_total{code=\"bad_request\"}").await >= (n + 1) as f64);
    // Still a working connection, and the neighbour heard nothing of it.
    mp.send(json!({"type":"ping","id":2})).await;
    assert_eq!(mp.recv().await, json!({"type":"pong","id":2}));
    mp.send(json!({"type":"publish","id":3,"channel":"c","data":"ok"})).await;
    assert_eq!(mp.recv().await["type"], "ack");
    let m = bystander.recv_type("message").await;
    assert_eq!(
        (m["data"].as_str(), m["offset"].as_u64()),
        (Some("ok"), Some(1)),
        "only the valid publish went through"
    );
}

#[tokio::test]
async fn json_and_messagepack_subscribers_get_every_message_in_order() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["c"], &[]);
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let mut mp = Mp::connect(&server, "crier.v1.msgpack", Some(&token)).await;
        mp.recv().await;
        mp.send(json!({"type":"subscribe","id":1,"channel":"c"})).await;
        assert_eq!(mp.recv().await["type"], "ack");
        subscribers.push(mp);
    }
    let mut json_client = server.client(&token).await;
    json_client.subscribe("c", 1).await;
    for i in 0..100 {
        server.publish("c", json!({"i": i, "pad": "x".repeat(i * 10)})).await;
    }
    let mut want = Vec::new();
    for _ in 0..100 {
        want.push(json_client.recv_type("message").await);
    }
    for mp in &mut subscribers {
        for w in &want {
            assert_eq!(&mp.recv_type("message").await, w);
        }
    }
    assert_eq!(want.iter().map(|m| m["offset"].as_u64().unwrap()).collect::<Vec<_>>(), (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn the_first_crier_subprotocol_offered_wins() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["c"], &[]);
    let mut mp = Mp::connect(&server, "crier.v1.msgpack, crier.v1", Some(&token)).await;
    assert_eq!(mp.protocol.as_deref(), Some("crier.v1.msgpack"));
    assert_eq!(mp.recv().await["type"], "welcome");
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("other, crier.v1, crier.v1.msgpack"));
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
    let c = support::Client::connect(req).await.unwrap();
    assert_eq!(c.response_protocol.as_deref(), Some("crier.v1"));
}

#[tokio::test]
async fn a_messagepack_publish_with_an_idempotency_key_is_acked_with_the_first_offset() {
    let server = Server::start(&[]).await;
    let token = server.token("mp", &["chat:*"], &["chat:*"]);
    let mut c = Mp::connect(&server, "crier.v1.msgpack", Some(&token)).await;
    assert_eq!(c.recv().await["type"], "welcome");
    let frame = json!({"type":"publish","id":1,"channel":"chat:mpk","data":"x","idempotency_key":"mp-1"});
    c.send(frame.clone()).await;
    let a = c.recv_type("ack").await;
    c.send(frame).await;
    let b = c.recv_type("ack").await;
    assert_eq!((a["offset"].clone(), b["offset"].clone()), (json!(1), json!(1)), "{a} {b}");
    let next = json!({"type":"publish","id":2,"channel":"chat:mpk","data":"y"});
    c.send(next).await;
    assert_eq!(c.recv_type("ack").await["offset"], 2, "the repeat took no offset");
}
