//! one file: the one public client, each behaviour against a real server, all sharing the event-collecting helpers.
//!
//! The Rust client against the real `crier` binary (and real `redis-server`s): subscribe and
//! receive, typed results and error codes, a node killed and restarted on the same port while a
//! publisher keeps going, token refresh and 4001, the close codes that end a client, dedupe of a
//! real server's replay, the gap a lost history is reported as, a silent connection pinged and
//! replaced, and the backoff measured on real reconnect attempts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod proxy;
mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crier_client::{
    Client, CloseReason, EndReason, Error, ErrorCode, Event, Gap, GapReason, HistoryOptions, Message, State,
    StreamPosition,
};
use serde_json::{Value, json};
use support::{Node, Redis, next_event, subscribed, token, until};

const HOUR: Duration = Duration::from_secs(3600);

fn client(url: String, token: String) -> Client {
    Client::builder(url)
        .token(token)
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .connect()
        .expect("inside a runtime")
}

/// Reads a subscription in a task: every event, until the message whose `data` is `"last"`.
fn collect(mut sub: crier_client::Subscription) -> (Arc<Mutex<Vec<Event>>>, tokio::task::JoinHandle<()>) {
    let events: Arc<Mutex<Vec<Event>>> = Default::default();
    let e = events.clone();
    let task = tokio::spawn(async move {
        while let Some(ev) = sub.next().await {
            let last = matches!(&ev, Event::Message(m) if m.data == "last");
            e.lock().unwrap().push(ev);
            if last {
                return;
            }
        }
    });
    (events, task)
}

fn messages(events: &Mutex<Vec<Event>>) -> Vec<Message> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.clone()),
            _ => None,
        })
        .collect()
}

fn gaps(events: &Mutex<Vec<Event>>) -> Vec<Gap> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Gap(g) => Some(g.clone()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn subscribes_receives_publishes_and_reads_presence_and_history() {
    let node = Node::start(&[]).await;
    let c = client(node.ws_url(), token("alice", &["chat:*"], &["chat:*"], HOUR));
    let mut sub = c.subscribe("chat:lobby");
    let (epoch, offset, recovered) = subscribed(&mut sub).await;
    assert_eq!((offset, recovered), (0, None));
    assert_eq!(c.state(), State::Connected);

    let r = node.publish("chat:lobby", json!({"text": "from the api"})).await;
    assert_eq!(r.status(), 200);
    let p = c.publish("chat:lobby", &json!({"text": "from the client"})).await.expect("publish");
    assert_eq!(p.offset, 2);
    assert_eq!(p.epoch.as_deref(), Some(epoch.as_str()));
    for (offset, text) in [(1, "from the api"), (2, "from the client")] {
        match next_event(&mut sub).await {
            Event::Message(m) => {
                assert_eq!((m.channel.as_str(), m.epoch.as_str(), m.offset), ("chat:lobby", epoch.as_str(), offset));
                assert_eq!(m.data, json!({ "text": text }));
            }
            other => panic!("expected a message, got {other:?}"),
        }
    }

    let who = c.presence("chat:lobby").await.expect("presence");
    let welcome = c.welcome().expect("welcome");
    assert_eq!(who.len(), 1);
    assert_eq!((who[0].client.as_str(), who[0].user.as_str()), (welcome.client.as_str(), "alice"));

    let h = c.history("chat:lobby", HistoryOptions::default()).await.expect("history");
    assert_eq!((h.epoch.as_str(), h.offset), (epoch.as_str(), 2));
    assert_eq!(h.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), [1, 2]);
    let since = Some(StreamPosition { epoch: epoch.clone(), offset: 1 });
    let h = c.history("chat:lobby", HistoryOptions { since, limit: Some(10) }).await.expect("history since");
    assert_eq!(h.messages.len(), 1);
    assert_eq!(h.messages[0].data, json!({"text": "from the client"}));

    // Unsubscribing (dropping the stream) leaves the channel's presence.
    drop(sub);
    let mut left = false;
    for _ in 0..500 {
        if c.presence("chat:lobby").await.expect("presence").is_empty() {
            left = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(left, "the dropped subscription left the channel");
    c.close();
    assert_eq!(c.closed().await, CloseReason::Client);
}

/// A `--dev` node declares the `chat` namespace with join/leave: the subscription streams `Join`
/// and `Leave` in their place among the messages (never this connection's own join), and
/// `presence_stats` counts clients and users.
#[tokio::test]
async fn join_and_leave_events_and_presence_stats() {
    let node = Node::start(&["--dev"]).await;
    let alice = client(node.ws_url(), token("alice", &["chat:*"], &[], HOUR));
    let mut sub = alice.subscribe("chat:room");
    subscribed(&mut sub).await;
    let bob = client(node.ws_url(), token("bob", &["chat:*"], &[], HOUR));
    let mut bob_sub = bob.subscribe("chat:room");
    subscribed(&mut bob_sub).await;
    node.publish("chat:room", json!("after bob")).await;
    match next_event(&mut sub).await {
        Event::Join(who) => {
            assert_eq!(who.user, "bob");
            assert_eq!(Some(who.client), bob.welcome().map(|w| w.client));
        }
        other => panic!("expected bob's join, got {other:?}"),
    }
    assert!(matches!(next_event(&mut sub).await, Event::Message(m) if m.data == "after bob"));
    match next_event(&mut bob_sub).await {
        Event::Message(m) => assert_eq!(m.data, "after bob", "bob's first event is no join of his own"),
        other => panic!("expected the message, got {other:?}"),
    }
    let stats = alice.presence_stats("chat:room").await.expect("presence_stats");
    assert_eq!((stats.clients, stats.users), (2, 2));
    bob.close();
    match next_event(&mut sub).await {
        Event::Leave(who) => assert_eq!(who.user, "bob"),
        other => panic!("expected bob's leave, got {other:?}"),
    }
    let stats = alice.presence_stats("chat:room").await.expect("presence_stats");
    assert_eq!((stats.clients, stats.users), (1, 1));
    let refused = alice.presence_stats("secret:x").await.expect_err("not in the token");
    assert!(matches!(&refused, Error::Server(e) if e.code == "forbidden"), "{refused:?}");
}

/// crier caps a `history` reply by the connection's queue (1 MiB) and says where to go on: the
/// client follows the pages, so 20 messages of ~65,000 bytes come back whole, in order.
#[tokio::test]
async fn history_larger_than_the_queue_comes_back_whole() {
    let node = Node::start(&[]).await;
    let c = client(node.ws_url(), token("carol", &["big:*"], &[], HOUR));
    for i in 0..20 {
        let r = node.publish("big:h", json!(format!("{i:05}{}", "x".repeat(65_000)))).await;
        assert_eq!(r.status(), 200);
    }
    let h = c.history("big:h", HistoryOptions::default()).await.expect("history");
    assert_eq!(h.offset, 20);
    assert_eq!(h.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    let limited = c.history("big:h", HistoryOptions { since: None, limit: Some(12) }).await.expect("history");
    assert_eq!(limited.messages.iter().map(|m| m.offset).collect::<Vec<_>>(), (9..=20).collect::<Vec<_>>());
    c.close();
}

#[tokio::test]
async fn refusals_carry_the_contracts_error_codes() {
    let node = Node::start(&[]).await;
    let c = client(node.ws_url(), token("bob", &["chat:*"], &["chat:own"], HOUR));
    let err = c.publish("chat:other", &json!(1)).await.expect_err("no publish claim");
    assert_eq!(err.code(), Some("forbidden"));
    let err = c.publish("not a channel!", &json!(1)).await.expect_err("bad name");
    assert_eq!(err.code(), Some("invalid_channel"));
    assert!(matches!(&err, Error::Server(e) if e.error_code() == Some(ErrorCode::InvalidChannel)));
    let err = c.history("secret:x", HistoryOptions::default()).await.expect_err("not readable");
    assert_eq!(err.code(), Some("forbidden"));
    let err = c.presence("secret:x").await.expect_err("not readable");
    assert_eq!(err.code(), Some("forbidden"));

    // A refused subscription ends its stream with the server's code; the client lives on.
    let mut sub = c.subscribe("secret:x");
    match next_event(&mut sub).await {
        Event::Ended(EndReason::Refused(e)) => assert_eq!(e.code, "forbidden"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(sub.next().await.is_none(), "the stream ends after Ended");
    // A second subscription to a channel this client already has is refused locally.
    let mut one = c.subscribe("chat:dup");
    subscribed(&mut one).await;
    let mut two = c.subscribe("chat:dup");
    assert!(
        matches!(next_event(&mut two).await, Event::Ended(EndReason::Refused(e)) if e.code == "already_subscribed")
    );
    assert_eq!(c.publish("chat:own", &json!("ok")).await.expect("allowed").offset, 1);
    assert_eq!(c.connections(), 1, "errors never cost the connection");

    // Nothing listening: with a request timeout, a request fails with Timeout.
    let port = support::free_port();
    let offline = Client::builder(format!("ws://127.0.0.1:{port}/ws"))
        .token("t")
        .request_timeout(Duration::from_millis(300))
        .connect()
        .unwrap();
    assert_eq!(offline.publish("chat:own", &json!(1)).await, Err(Error::Timeout));
    assert_ne!(offline.state(), State::Connected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_and_restarted_on_the_same_port_loses_nothing_acknowledged() {
    let redis = Redis::start();
    let mut a = Node::with_redis(&redis, "node-a", &[]).await;
    let b = Arc::new(Node::with_redis(&redis, "node-b", &[]).await);
    let c = client(a.ws_url(), token("carol", &["orders:*"], &[], HOUR));
    let mut sub = c.subscribe("orders:eu");
    subscribed(&mut sub).await;
    let (events, reader) = collect(sub);

    // A publisher through node b that keeps going, recording every acknowledged offset.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let acked: Arc<Mutex<Vec<u64>>> = Default::default();
    let (pb, pa) = (b.clone(), acked.clone());
    let publisher = tokio::spawn(async move {
        let mut i = 0u64;
        loop {
            let last = *stop_rx.borrow();
            let data = if last { json!("last") } else { json!(i) };
            let r = pb.publish("orders:eu", data).await;
            if r.status() == 200 {
                let v: Value = r.json().await.unwrap();
                pa.lock().unwrap().push(v["offset"].as_u64().unwrap());
            }
            if last {
                return;
            }
            i += 1;
            // Paced so the run stays small; not a synchronisation.
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });

    until("20 messages before the kill", async || messages(&events).len() >= 20).await;
    a.kill();
    until("the client noticed", async || c.state() != State::Connected).await;
    let before_restart = acked.lock().unwrap().len();
    until("20 publishes while node a is down", async || acked.lock().unwrap().len() >= before_restart + 20).await;
    a.restart().await;
    until("the client reconnected", async || c.connections() == 2).await;
    let delivered = messages(&events).len();
    until("20 messages after the reconnect", async || messages(&events).len() >= delivered + 20).await;
    stop_tx.send(true).unwrap();
    publisher.await.unwrap();
    tokio::time::timeout(support::WAIT, reader).await.expect("the last message arrives").unwrap();

    let got: Vec<u64> = messages(&events).iter().map(|m| m.offset).collect();
    let want = acked.lock().unwrap().clone();
    let first = got[0];
    let want: Vec<u64> = want.into_iter().filter(|o| *o >= first).collect();
    assert_eq!(got, want, "every acknowledged message exactly once, in order");
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "no hole, no duplicate");
    assert!(gaps(&events).is_empty(), "nothing was lost: {:?}", gaps(&events));
    let resubscribed =
        events.lock().unwrap().iter().any(|e| matches!(e, Event::Subscribed { recovered: Some(true), .. }));
    assert!(resubscribed, "the reconnect resubscribed with recovery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_refreshed_before_expiry_and_replaced_after_4001() {
    let node = Node::start(&[]).await;
    // Phase 1: every token lives 3 s; the provider's fresh ones go in `refresh` frames.
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let c = Client::builder(node.ws_url())
        .token_provider(move || {
            n.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, Infallible>(token("dave", &["news:*"], &["news:*"], Duration::from_secs(3))) }
        })
        .connect()
        .unwrap();
    let mut sub = c.subscribe("news:today");
    subscribed(&mut sub).await;
    until("three refreshes", async || calls.load(Ordering::SeqCst) >= 4).await;
    // Past the first token's lifetime, still the first connection.
    assert_eq!(c.connections(), 1, "refresh kept the connection");
    assert_eq!(c.state(), State::Connected);
    c.publish("news:today", &json!("still here")).await.expect("publish after refreshes");
    assert!(matches!(next_event(&mut sub).await, Event::Message(m) if m.data == "still here"));
    c.close();

    // Phase 2: the refresh is refused (a token for another user), so the server closes with
    // 4001 at expiry; the provider is asked again and the client reconnects, recovering.
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let c = Client::builder(node.ws_url())
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .token_provider(move || {
            let k = n.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, Infallible>(match k {
                    // Refreshed at 80% of its life (>= 1.6 s), well before its exp (>= 2 s).
                    0 => token("erin", &["news:*"], &[], Duration::from_secs(3)),
                    1 => token("mallory", &["news:*"], &[], HOUR),
                    _ => token("erin", &["news:*"], &[], HOUR),
                })
            }
        })
        .connect()
        .unwrap();
    let mut sub = c.subscribe("news:today");
    let (_, at, _) = subscribed(&mut sub).await;
    until("the reconnect after 4001", async || c.connections() == 2).await;
    assert_eq!(calls.load(Ordering::SeqCst), 3, "first token, refused refresh, token after 4001");
    let (_, _, recovered) = subscribed(&mut sub).await;
    assert_eq!(recovered, Some(true));
    node.publish("news:today", json!("after 4001")).await;
    match next_event(&mut sub).await {
        Event::Message(m) => assert_eq!((m.offset, m.data), (at + 1, json!("after 4001"))),
        other => panic!("expected the message, got {other:?}"),
    }
    assert!(node.metric("crier_handshakes_total{result=\"ok\"}").await >= 3.0);

    // Without a provider, 4001 ends the client.
    let c = client(node.ws_url(), token("frank", &["news:*"], &[], Duration::from_secs(1)));
    assert!(matches!(c.closed().await, CloseReason::Server { code: 4001, .. }));
    assert_eq!(c.connections(), 1);
}

#[tokio::test]
async fn close_codes_4003_and_1008_end_the_client_and_1012_does_not() {
    let node = Node::start(&[]).await;
    let c = client(node.ws_url(), token("gina", &["chat:*"], &[], HOUR));
    let mut sub = c.subscribe("chat:x");
    subscribed(&mut sub).await;
    let r = node.post("/api/v1/disconnect", json!({"user": "gina"})).await;
    assert_eq!(r.status(), 200);
    assert!(matches!(c.closed().await, CloseReason::Server { code: 4003, .. }));
    assert!(matches!(next_event(&mut sub).await, Event::Ended(EndReason::ClientClosed)));
    // The task has ended: nothing can reconnect. One handshake was all the server saw.
    assert_eq!(c.connections(), 1);
    assert_eq!(node.metric("crier_handshakes_total{result=\"ok\"}").await, 1.0);
    assert_eq!(c.publish("chat:x", &json!(1)).await, Err(Error::Closed));

    let proxy = proxy::Proxy::start(node.ws_url()).await;
    let c = client(proxy.ws_url(), token("hank", &["chat:*"], &[], HOUR));
    let mut sub = c.subscribe("chat:x");
    subscribed(&mut sub).await;
    proxy.close_all(1012);
    until("reconnected after 1012", async || c.connections() == 2).await;
    assert_eq!(subscribed(&mut sub).await.2, Some(true));
    proxy.close_all(1008);
    assert!(matches!(c.closed().await, CloseReason::Server { code: 1008, .. }));
    assert_eq!(proxy.accepted.load(Ordering::SeqCst), 2, "no connection after 1008");
}

#[tokio::test]
async fn a_replay_of_delivered_messages_is_not_delivered_twice() {
    let node = Node::start(&[]).await;
    let proxy = proxy::Proxy::start(node.ws_url()).await;
    let c = client(proxy.ws_url(), token("ivy", &["feed:*"], &[], HOUR));
    let mut sub = c.subscribe("feed:main");
    subscribed(&mut sub).await;
    for i in 1..=10 {
        assert_eq!(node.publish("feed:main", json!(i)).await.status(), 200);
    }
    for want in 1..=10 {
        assert!(matches!(next_event(&mut sub).await, Event::Message(m) if m.offset == want));
    }
    // On the next connection the proxy asks the real server to recover from 5, not 10: the
    // server replays 6..=10, which the client delivered already.
    proxy.rewind.store(5, Ordering::SeqCst);
    proxy.close_all(1012);
    assert_eq!(subscribed(&mut sub).await.2, Some(true));
    for i in 11..=12 {
        node.publish("feed:main", json!(i)).await;
    }
    node.publish("feed:main", json!("last")).await;
    let (events, reader) = collect(sub);
    tokio::time::timeout(support::WAIT, reader).await.expect("the last message").unwrap();
    let got: Vec<u64> = messages(&events).iter().map(|m| m.offset).collect();
    assert_eq!(got, [11, 12, 13], "nothing delivered twice");
    assert_eq!(proxy.forwarded(1), [6, 7, 8, 9, 10, 11, 12, 13], "the server did replay 6..=10");
    assert!(gaps(&events).is_empty());
}

#[tokio::test]
async fn a_history_lost_with_the_node_is_reported_as_a_gap() {
    // Memory broker: a restarted node has a new epoch and no history.
    let mut node = Node::start(&[]).await;
    let c = client(node.ws_url(), token("jo", &["room:*"], &[], HOUR));
    let mut sub = c.subscribe("room:1");
    let (old_epoch, _, _) = subscribed(&mut sub).await;
    node.publish("room:1", json!("before")).await;
    assert!(matches!(next_event(&mut sub).await, Event::Message(m) if m.offset == 1));
    node.restart().await;
    let (epoch, offset, recovered) = subscribed(&mut sub).await;
    assert_eq!(recovered, Some(false));
    assert_ne!(epoch, old_epoch);
    match next_event(&mut sub).await {
        Event::Gap(g) => assert_eq!((g.epoch, g.offset, g.reason), (epoch.clone(), offset, GapReason::NotRecovered)),
        other => panic!("expected a gap, got {other:?}"),
    }
    node.publish("room:1", json!("after")).await;
    match next_event(&mut sub).await {
        Event::Message(m) => assert_eq!((m.epoch, m.offset, m.data), (epoch, offset + 1, json!("after"))),
        other => panic!("expected the new message, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connection_that_stops_answering_is_pinged_then_replaced() {
    let node = Node::start(&[]).await;
    let proxy = proxy::Proxy::start(node.ws_url()).await;
    let c = Client::builder(proxy.ws_url())
        .token(token("kim", &["tick:*"], &[], HOUR))
        .ping_interval(Duration::from_millis(200))
        .pong_timeout(Duration::from_millis(300))
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .connect()
        .unwrap();
    let mut sub = c.subscribe("tick:1");
    subscribed(&mut sub).await;
    // The first connection goes silent (TCP stays up, nothing comes through).
    proxy.mute.store(0, Ordering::SeqCst);
    node.publish("tick:1", json!("lost in the silence")).await;
    until("a new connection after the silence", async || c.connections() == 2).await;
    assert!(proxy.sent(0).iter().any(|t| t == "ping"), "the client pinged: {:?}", proxy.sent(0));
    assert_eq!(subscribed(&mut sub).await.2, Some(true));
    // What was published while the connection was silent is recovered.
    assert!(
        matches!(next_event(&mut sub).await, Event::Message(m) if m.offset == 1 && m.data == "lost in the silence")
    );
}

#[tokio::test]
async fn reconnect_attempts_back_off_exponentially_with_jitter() {
    // A listener that accepts and drops every connection: each attempt fails at the handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let c = Client::builder(url)
        .token("t")
        .backoff(Duration::from_millis(20), Duration::from_millis(320))
        .connect()
        .unwrap();
    let mut at = Vec::new();
    while at.len() < 13 {
        let (tcp, _) = tokio::time::timeout(support::WAIT, listener.accept()).await.expect("an attempt").unwrap();
        at.push(tokio::time::Instant::now());
        drop(tcp);
    }
    let delays: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!("reconnect delays (base 20 ms, cap 320 ms): {delays:?}");
    // Attempts 0..=2 wait at most 20, 40, 80 ms (+ overhead); attempts 4.. are capped at 320 ms.
    // Growth: the last eight waits together are longer than the first three (for full jitter
    // the chance of the opposite is below 1e-7).
    let first: Duration = delays[..3].iter().sum();
    let last: Duration = delays[4..].iter().sum();
    assert!(last > first, "backoff grows: {delays:?}");
    // Jitter: the capped waits are not all the same.
    let capped = &delays[4..];
    let spread = capped.iter().max().unwrap().saturating_sub(*capped.iter().min().unwrap());
    assert!(spread > Duration::from_millis(5), "jittered: {delays:?}");
    assert_eq!(c.connections(), 0);
    assert_ne!(c.state(), State::Closed, "a refused connection is retried, not given up");
}

#[tokio::test]
async fn subscribes_refused_by_the_rate_limit_are_retried_until_they_hold() {
    // 1 frame/s with a burst of 3: six subscribes at once cannot all pass the first time.
    let node = Node::start(&["--user-rate", "1", "--user-burst", "3"]).await;
    let c = Client::builder(node.ws_url())
        .token(token("lee", &["s:*"], &[], HOUR))
        .backoff(Duration::from_millis(200), Duration::from_secs(2))
        .connect()
        .unwrap();
    let mut subs: Vec<_> = (0..6).map(|i| c.subscribe(format!("s:{i}"))).collect();
    for sub in &mut subs {
        subscribed(sub).await;
    }
    assert!(node.metric("crier_rate_limited_total{kind=\"user\"}").await >= 1.0, "the limit did refuse some");
    assert_eq!(c.connections(), 1);
    assert_eq!(node.metric("crier_subscriptions").await, 6.0);
}

#[tokio::test]
async fn a_refused_handshake_fails_a_fixed_token_and_asks_a_provider_once() {
    let node = Node::start(&["--allowed-origins", "https://app.example.com"]).await;
    let c = client(node.ws_url(), "not-a-jwt".into());
    match c.closed().await {
        CloseReason::Handshake { status: 401, error: Some(e) } => assert_eq!(e.code, "token_invalid"),
        other => panic!("expected a 401 token_invalid, got {other:?}"),
    }
    assert_eq!(c.state(), State::Failed);
    assert_eq!(c.connections(), 0);

    // A provider is asked once more after a refusal: a good token then connects …
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let c = Client::builder(node.ws_url())
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .token_provider(move || {
            let k = n.fetch_add(1, Ordering::SeqCst);
            async move {
                if k < 1 { Ok("not-a-jwt".to_string()) } else { Ok::<_, Infallible>(token("max", &["a:*"], &[], HOUR)) }
            }
        })
        .connect()
        .unwrap();
    let mut sub = c.subscribe("a:b");
    subscribed(&mut sub).await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "asked again after the 401");
    assert_eq!(c.connections(), 1);

    // … a second refusal in a row fails the client, with the status and the server's reason.
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let expired = {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = json!({"sub": "max", "exp": now - 3600});
        let key = jsonwebtoken::EncodingKey::from_secret(support::SECRET.as_bytes());
        jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
    };
    let c = Client::builder(node.ws_url())
        .backoff(Duration::from_millis(20), Duration::from_millis(100))
        .token_provider(move || {
            n.fetch_add(1, Ordering::SeqCst);
            let t = expired.clone();
            async move { Ok::<_, Infallible>(t) }
        })
        .connect()
        .unwrap();
    match c.closed().await {
        CloseReason::Handshake { status: 401, error: Some(e) } => {
            assert_eq!(e.code, "token_invalid");
            assert!(e.message.contains("expired"), "{}", e.message);
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    assert_eq!(c.state(), State::Failed);
    assert_eq!(calls.load(Ordering::SeqCst), 2, "the provider is asked once after a refusal, not forever");
}

/// Every code of the server's table, sent by a proxy in front of a real node: the client does
/// what `CLOSE_CODES` says (stop, refresh, reconnect now / after jitter / with backoff).
#[tokio::test]
async fn every_close_code_of_the_table_takes_the_tables_action() {
    use crier_protocol::codes::{CLOSE_CODES, ClientAction};
    let node = Node::start(&[]).await;
    for spec in CLOSE_CODES {
        let code = spec.code.0;
        let proxy = proxy::Proxy::start(node.ws_url()).await;
        let c = Client::builder(proxy.ws_url())
            .token(token("table", &["chat:*"], &[], HOUR))
            .backoff(Duration::from_millis(20), Duration::from_millis(100))
            .connect()
            .unwrap();
        let mut sub = c.subscribe("chat:x");
        subscribed(&mut sub).await;
        proxy.close_all(code);
        match spec.action {
            // A fixed token cannot be refreshed: 4001 stops it too.
            ClientAction::Stop | ClientAction::RefreshToken => {
                match c.closed().await {
                    CloseReason::Server { code: got, .. } => assert_eq!(got, code),
                    other => panic!("{code}: expected a stop, got {other:?}"),
                }
                assert_eq!(c.state(), State::Closed, "{code}");
                assert_eq!(proxy.accepted.load(Ordering::SeqCst), 1, "{code}: no reconnect");
            }
            ClientAction::ReconnectNow | ClientAction::ReconnectAfterJitter | ClientAction::ReconnectWithBackoff => {
                until(&format!("reconnected after {code}"), async || c.connections() == 2).await;
                assert_eq!(subscribed(&mut sub).await.2, Some(true), "{code}: resubscribed with recovery");
            }
        }
        c.close();
    }
}

#[tokio::test]
async fn publish_with_key_repeated_is_delivered_once_and_acked_with_the_first_offset() {
    let node = Node::start(&[]).await;
    let c = client(node.ws_url(), token("alice", &["chat:*"], &["chat:*"], HOUR));
    let mut sub = c.subscribe("chat:keyed");
    subscribed(&mut sub).await;
    let first = c.publish_with_key("chat:keyed", &json!("once"), "order-17").await.expect("publish");
    let again = c.publish_with_key("chat:keyed", &json!("once"), "order-17").await.expect("retry");
    assert_eq!((again.epoch.clone(), again.offset), (first.epoch.clone(), first.offset), "the first ack");
    let last = c.publish("chat:keyed", &json!("last")).await.expect("publish");
    assert_eq!(last.offset, first.offset + 1, "the retry took no offset");
    for want in ["once", "last"] {
        match next_event(&mut sub).await {
            Event::Message(m) => assert_eq!(m.data, json!(want)),
            other => panic!("expected a message, got {other:?}"),
        }
    }
    let err = c.publish_with_key("chat:keyed", &json!(1), "").await.expect_err("an empty key");
    assert_eq!(err.code(), Some("bad_request"));
}

/// Subscriptions the server makes (REST `subscribe`, the token's `subs` claim) come out of
/// `server_subscriptions()` as ordinary subscriptions, survive a node restart with nothing lost
/// (the client recovers from its position once the claim subscribed it again), and the server's
/// unsubscribe ends them; the client's own subscriptions are undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_subscriptions_are_surfaced_and_recovered_across_a_node_restart() {
    let redis = Redis::start();
    let mut a = Node::with_redis(&redis, "srv-a", &[]).await;
    let b = Node::with_redis(&redis, "srv-b", &[]).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    // "feed" is not in the token's patterns: only the `subs` claim grants it.
    let claims = json!({"sub": "srv", "iat": now, "exp": now + 3600, "channels": ["chat:*"], "subs": ["feed"]});
    let t = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(support::SECRET.as_bytes()),
    )
    .unwrap();
    let c = client(a.ws_url(), t);
    let mut server_subs = c.server_subscriptions().expect("taken once");
    assert!(c.server_subscriptions().is_none());
    let mut own = c.subscribe("chat:a");
    subscribed(&mut own).await;
    let mut feed = tokio::time::timeout(support::WAIT, server_subs.recv()).await.unwrap().expect("the claim's");
    assert_eq!(feed.channel(), "feed");
    assert!(matches!(next_event(&mut feed).await, Event::Subscribed { offset: 0, .. }));
    b.publish("feed", json!(1)).await;
    b.publish("feed", json!(2)).await;
    let (events, reader) = collect(feed);
    until("two messages", async || messages(&events).len() == 2).await;

    a.kill();
    until("the client noticed", async || c.state() != State::Connected).await;
    b.publish("feed", json!(3)).await;
    b.publish("feed", json!(4)).await;
    a.restart().await;
    until("the client reconnected", async || c.connections() == 2).await;
    b.publish("feed", json!("last")).await;
    tokio::time::timeout(support::WAIT, reader).await.expect("the last message arrives").unwrap();
    let got: Vec<u64> = messages(&events).iter().map(|m| m.offset).collect();
    assert_eq!(got, [1, 2, 3, 4, 5], "each once, in order, across the restart");
    assert!(gaps(&events).is_empty(), "nothing lost: {:?}", gaps(&events));

    // A REST subscribe: another server subscription; the client's own goes on.
    let r = b.post("/api/v1/subscribe", json!({"user": "srv", "channel": "team:1"})).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"subscribed": 1}));
    let mut team = tokio::time::timeout(support::WAIT, server_subs.recv()).await.unwrap().expect("the REST one");
    assert_eq!(team.channel(), "team:1");
    assert!(matches!(next_event(&mut team).await, Event::Subscribed { .. }));
    b.publish("team:1", json!("hi")).await;
    match next_event(&mut team).await {
        Event::Message(m) => assert_eq!(m.data, json!("hi")),
        other => panic!("expected the message, got {other:?}"),
    }
    b.publish("chat:a", json!("mine")).await;
    loop {
        match next_event(&mut own).await {
            Event::Subscribed { .. } => continue, // resubscribed after the restart
            Event::Message(m) => break assert_eq!(m.data, json!("mine")),
            other => panic!("expected the message, got {other:?}"),
        }
    }
    // The server's unsubscribe ends the subscription it names.
    let r = b.post("/api/v1/unsubscribe", json!({"user": "srv", "channel": "chat:a"})).await;
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"unsubscribed": 1}));
    match next_event(&mut own).await {
        Event::Ended(EndReason::Revoked(reason)) => assert_eq!(reason, "unsubscribed by the server"),
        other => panic!("expected the end of the subscription, got {other:?}"),
    }
    assert_eq!(c.state(), State::Connected);
}
