//! The driver's state machine without a network: the connection is a real WebSocket
//! (tokio-tungstenite's framing) over an in-memory duplex pipe, and the test plays the server
//! frame by frame. Each test bounds every wait (`WAIT`), so none can hang.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use serde_json::{Value, json};
use tokio::io::DuplexStream;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;

use super::*;
use crate::events::{Gap, GapReason};
use crate::protocol::Reply;
use crier_protocol::backoff::Backoff;

const WAIT: Duration = Duration::from_secs(10);

type Mem = WebSocketStream<DuplexStream>;

/// The test's side of the connection.
struct Server {
    ws: Mem,
}

impl Server {
    /// The next text frame from the client, as JSON.
    async fn recv(&mut self) -> Value {
        loop {
            let m = timeout(WAIT, self.ws.next()).await.expect("a client frame in time");
            match m.expect("the client is connected").expect("a frame") {
                WsMessage::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
                WsMessage::Close(_) => panic!("the client closed"),
                _ => continue,
            }
        }
    }

    async fn send(&mut self, v: Value) {
        self.ws.send(WsMessage::text(v.to_string())).await.unwrap();
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: code.into(), reason: reason.to_owned().into() };
        self.ws.send(WsMessage::Close(Some(frame))).await.unwrap();
    }
}

struct Harness {
    commands: mpsc::UnboundedSender<ToDriver>,
    shared: Arc<Shared>,
    server: Server,
    /// The driver serving the connection; resolves to how it ended (and the driver, to look at
    /// its book afterwards).
    serving: JoinHandle<(Ended, Driver)>,
}

fn options() -> Options {
    Options {
        urls: vec!["ws://in-memory/ws".into()],
        token: TokenSource::None,
        backoff: Backoff::default(),
        ping_interval: None,
        pong_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(5),
    }
}

/// A driver serving an in-memory connection whose `welcome` has been read.
async fn serve(opts: Options) -> Harness {
    let (a, b) = tokio::io::duplex(1 << 16);
    let client = WebSocketStream::from_raw_socket(a, Role::Client, None).await;
    let server = Server { ws: WebSocketStream::from_raw_socket(b, Role::Server, None).await };
    let (state, _) = watch::channel(State::Connecting);
    let shared = Arc::new(Shared {
        state,
        connections: AtomicU64::new(0),
        close_reason: Mutex::new(None),
        welcome: Mutex::new(None),
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let (server_subs, _) = mpsc::unbounded_channel();
    let mut driver = Driver::new(opts, shared.clone(), rx, tx.downgrade(), server_subs);
    let welcome = Welcome { client: "c1".into(), user: "u".into(), node: "n".into(), ping_interval: None };
    let serving = tokio::spawn(async move {
        let ended = driver.serve(client, welcome).await;
        (ended, driver)
    });
    Harness { commands: tx, shared, server, serving }
}

impl Harness {
    fn subscribe(&self, channel: &str, from: Option<StreamPosition>) -> mpsc::UnboundedReceiver<Event> {
        let (events, rx) = mpsc::unbounded_channel();
        let cmd = ToDriver::Subscribe { channel: channel.into(), from, generation: 1, events };
        self.commands.send(cmd).unwrap();
        rx
    }

    fn request(&self, kind: RequestKind) -> oneshot::Receiver<Result<Reply, Error>> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(ToDriver::Request(Request { kind, reply })).unwrap();
        rx
    }

    async fn ended(self) -> (Ended, Driver) {
        timeout(WAIT, self.serving).await.expect("the connection ends in time").unwrap()
    }
}

async fn event(rx: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    timeout(WAIT, rx.recv()).await.expect("an event in time").expect("the subscription is open")
}

fn message(channel: &str, epoch: &str, offset: u64) -> Value {
    json!({"type": "message", "channel": channel, "epoch": epoch, "offset": offset, "data": offset})
}

#[tokio::test]
async fn messages_are_delivered_once_in_order_and_holes_are_told() {
    let mut h = serve(options()).await;
    let mut state = h.shared.state.subscribe();
    timeout(WAIT, state.wait_for(|s| *s == State::Connected)).await.expect("connected in time").unwrap();
    let mut events = h.subscribe("c", None);
    let sub = h.server.recv().await;
    assert_eq!((sub["type"].as_str(), sub["channel"].as_str()), (Some("subscribe"), Some("c")), "{sub}");
    assert!(sub.get("recover").is_none(), "a first subscribe recovers nothing: {sub}");
    h.server.send(json!({"type": "ack", "id": sub["id"], "channel": "c", "epoch": "e", "offset": 10})).await;
    assert_eq!(event(&mut events).await, Event::Subscribed { epoch: "e".into(), offset: 10, recovered: None });
    for offset in [11, 12, 11, 12, 14] {
        h.server.send(message("c", "e", offset)).await;
    }
    let offsets = |e: Event| match e {
        Event::Message(m) => m.offset,
        other => panic!("expected a message, got {other:?}"),
    };
    assert_eq!(offsets(event(&mut events).await), 11);
    assert_eq!(offsets(event(&mut events).await), 12);
    // The replayed 11 and 12 are dropped; 13 is missing: told before 14.
    let gap = Gap { channel: "c".into(), epoch: "e".into(), offset: 13, reason: GapReason::Missing { expected: 13 } };
    assert_eq!(event(&mut events).await, Event::Gap(gap));
    assert_eq!(offsets(event(&mut events).await), 14);
    // A server `gap` frame moves the position and is told.
    h.server.send(json!({"type": "gap", "channel": "c", "epoch": "f", "offset": 3})).await;
    assert!(matches!(event(&mut events).await, Event::Gap(Gap { reason: GapReason::Server, offset: 3, .. })));
    h.server.send(message("c", "f", 4)).await;
    assert_eq!(offsets(event(&mut events).await), 4);

    // 4009 (slow consumer): the table says reconnect with backoff; the delivered position keeps f:4.
    h.server.close(4009, "slow consumer").await;
    let (ended, driver) = h.ended().await;
    assert!(matches!(ended, Ended::Reconnect { new_token: false, wait: Wait::Backoff }), "{ended:?}");
    let position = driver.subs.get("c").and_then(|s| s.delivered.position.clone());
    assert_eq!(position, Some(StreamPosition { epoch: "f".into(), offset: 4 }), "resubscribes from there");
}

#[tokio::test]
async fn a_resubscribe_recovers_from_the_last_position_and_a_failed_recovery_is_a_gap() {
    let mut h = serve(options()).await;
    let mut events = h.subscribe("c", Some(StreamPosition { epoch: "e".into(), offset: 7 }));
    let sub = h.server.recv().await;
    assert_eq!(sub["recover"], json!({"epoch": "e", "offset": 7}), "{sub}");
    h.server
        .send(json!({"type": "ack", "id": sub["id"], "channel": "c", "epoch": "e", "offset": 9, "recovered": false}))
        .await;
    assert!(matches!(event(&mut events).await, Event::Subscribed { recovered: Some(false), .. }));
    assert!(matches!(event(&mut events).await, Event::Gap(Gap { reason: GapReason::NotRecovered, offset: 9, .. })));
    h.server.close(1012, "service restart").await;
    let (ended, _) = h.ended().await;
    assert!(matches!(ended, Ended::Reconnect { wait: Wait::Jitter, .. }), "1012: after a jitter: {ended:?}");
}

#[tokio::test]
async fn requests_are_answered_and_a_publish_in_flight_fails_when_the_connection_drops() {
    let mut h = serve(options()).await;
    let published = h.request(RequestKind::Publish { channel: "c".into(), data: json!(1), idempotency_key: None });
    let p = h.server.recv().await;
    assert_eq!((p["type"].as_str(), p["data"].as_i64()), (Some("publish"), Some(1)), "{p}");
    h.server.send(json!({"type": "ack", "id": p["id"], "channel": "c", "epoch": "e", "offset": 5})).await;
    match timeout(WAIT, published).await.unwrap().unwrap() {
        Ok(Reply::Published { epoch, offset }) => assert_eq!((epoch.as_deref(), offset), (Some("e"), 5)),
        other => panic!("{other:?}"),
    }
    let refused = h.request(RequestKind::Presence { channel: "c".into() });
    let p = h.server.recv().await;
    h.server.send(json!({"type": "error", "id": p["id"], "code": "forbidden", "message": "no"})).await;
    match timeout(WAIT, refused).await.unwrap().unwrap() {
        Err(Error::Server(e)) => assert_eq!(e.code, "forbidden"),
        other => panic!("{other:?}"),
    }

    // In flight when the connection drops: a publish's outcome is unknown (Disconnected), a
    // read waits for the next connection.
    let publish = h.request(RequestKind::Publish { channel: "c".into(), data: json!(2), idempotency_key: None });
    let history = h.request(RequestKind::History { channel: "c".into(), since: None, limit: None });
    h.server.recv().await;
    h.server.recv().await;
    drop(h.server);
    let (ended, driver) = timeout(WAIT, h.serving).await.unwrap().unwrap();
    assert!(matches!(ended, Ended::Reconnect { wait: Wait::Backoff, .. }), "{ended:?}");
    assert!(matches!(timeout(WAIT, publish).await.unwrap().unwrap(), Err(Error::Disconnected)));
    assert_eq!(driver.queued.len(), 1, "the history read is sent again on the next connection");
    drop(history);
}

#[tokio::test]
async fn a_stop_code_ends_the_client_with_the_servers_reason() {
    let mut h = serve(options()).await;
    h.server.close(4003, "forbidden").await;
    let (ended, _) = h.ended().await;
    match ended {
        Ended::Stop(CloseReason::Server { code, reason }) => assert_eq!((code, reason.as_str()), (4003, "forbidden")),
        other => panic!("4003 stops: {other:?}"),
    }
}

#[tokio::test]
async fn an_idle_connection_is_pinged_and_given_up_without_an_answer() {
    let opts = Options {
        ping_interval: Some(Duration::from_millis(20)),
        pong_timeout: Duration::from_millis(20),
        ..options()
    };
    let mut h = serve(opts).await;
    let ping = h.server.recv().await;
    assert_eq!(ping["type"], "ping", "{ping}");
    // No answer: the connection is taken for dead.
    let (ended, _) = h.ended().await;
    assert!(matches!(ended, Ended::Reconnect { wait: Wait::Backoff, .. }), "{ended:?}");
}

#[tokio::test]
async fn closing_the_client_sends_1000_and_stops() {
    let mut h = serve(options()).await;
    h.commands.send(ToDriver::Close).unwrap();
    let close = timeout(WAIT, h.server.ws.next()).await.unwrap().unwrap().unwrap();
    match close {
        WsMessage::Close(Some(f)) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("{other:?}"),
    }
    let (ended, _) = timeout(WAIT, h.serving).await.unwrap().unwrap();
    assert!(matches!(ended, Ended::Stop(CloseReason::Client)), "{ended:?}");
}
