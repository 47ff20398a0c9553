//! Backend proxies (`[proxy]`, docs/hooks.md) against the real binary and a real HTTP backend
//! started by each test (axum on a free port): the connect proxy (cookie in, user and
//! permissions out, over WebSocket and SSE; refusals with the backend's reason; timeout, 5xx,
//! malformed answer and a dead backend as a clear 503 while the node stays ready and JWT clients
//! are unaffected; the circuit breaker; 1,000 concurrent connects through a 50 ms backend within
//! the concurrency bound), the subscribe and publish proxies (allow, refuse, rewrite, fail), and
//! the refresh proxy (extends; a refusal closes with 4001 at expiry), proxy-admitted users in
//! the cluster-wide per-user count (two nodes, a real redis-server), and bad `[proxy]` settings.
//!
//! Every request crier sends is validated against docs/schemas/proxy-*-request.json, and every
//! answer the backend gives (but the deliberately broken ones) against the answer schemas, so
//! the documented shapes are the ones crier sends and accepts.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use crier_testkit::poll;
use serde_json::{Value, json};
use support::{Client, ConfigFile, Server, rejected};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn schema(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/schemas").join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

fn schema_errors(name: &str, instance: &Value) -> Vec<String> {
    let validator = jsonschema::draft202012::new(&schema(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    validator.iter_errors(instance).map(|e| format!("{name}: {e} at {} in {instance}", e.instance_path())).collect()
}

/// What the test backend saw and how it behaves.
#[derive(Default)]
struct Seen {
    /// (proxy, request body), in arrival order.
    calls: Mutex<Vec<(String, Value)>>,
    /// Requests or answers that do not match their documented schema.
    schema_errors: Mutex<Vec<String>>,
    inflight: AtomicUsize,
    max_inflight: AtomicUsize,
    /// Added to every answer.
    delay_ms: AtomicU64,
}

struct Backend {
    addr: SocketAddr,
    seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    async fn start() -> Backend {
        let seen = Arc::new(Seen::default());
        let app = Router::new().route("/{proxy}", post(answer)).with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Backend { addr, seen, task }
    }

    fn url(&self, proxy: &str) -> String {
        format!("http://{}/{proxy}", self.addr)
    }

    fn calls(&self, proxy: &str) -> Vec<Value> {
        self.seen.calls.lock().unwrap().iter().filter(|(p, _)| p == proxy).map(|(_, b)| b.clone()).collect()
    }

    fn assert_schemas(&self) {
        let errors = self.seen.schema_errors.lock().unwrap();
        assert!(errors.is_empty(), "requests or answers off their documented schemas: {errors:#?}");
        assert!(!self.seen.calls.lock().unwrap().is_empty(), "the backend was called");
    }
}

/// The test backend: records and validates the request, waits `delay_ms`, answers by content.
async fn answer(State(seen): State<Arc<Seen>>, Path(proxy): Path<String>, body: String) -> (StatusCode, String) {
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let mut errors = schema_errors(&format!("proxy-{proxy}-request.json"), &request);
    seen.calls.lock().unwrap().push((proxy.clone(), request.clone()));
    let now = seen.inflight.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_inflight.fetch_max(now, Ordering::SeqCst);
    let delay = seen.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let (status, answer, checked) = decide(&proxy, &request).await;
    seen.inflight.fetch_sub(1, Ordering::SeqCst);
    if checked {
        let name =
            if status == StatusCode::OK { format!("proxy-{proxy}-answer.json") } else { "proxy-refusal.json".into() };
        errors.extend(schema_errors(&name, &answer));
    }
    seen.schema_errors.lock().unwrap().extend(errors);
    let text = match answer {
        Value::String(s) => s,
        other => other.to_string(),
    };
    (status, text)
}

/// The answer to a request: (status, body, whether the body is meant to match its schema).
async fn decide(proxy: &str, r: &Value) -> (StatusCode, Value, bool) {
    let ok = |v: Value| (StatusCode::OK, v, true);
    let refuse = |v: Value| (StatusCode::FORBIDDEN, v, true);
    match proxy {
        "connect" => match r["headers"]["cookie"].as_str().unwrap_or("") {
            "session=alice" => ok(json!({"user": "alice", "channels": ["news:*"], "publish": ["news:*"]})),
            "session=banned" => refuse(json!({"code": 4403, "reason": "account suspended"})),
            "session=broken" => (StatusCode::INTERNAL_SERVER_ERROR, json!("oops"), false),
            "session=garbage" => (StatusCode::OK, json!({"nope": 1}), false),
            "session=slow" => {
                tokio::time::sleep(Duration::from_secs(5)).await;
                ok(json!({"user": "slow"}))
            }
            "session=short" => ok(json!({"user": "short", "channels": ["*"], "expire_at": unix_now() + 3})),
            "session=norefresh" => ok(json!({"user": "norefresh", "channels": ["*"], "expire_at": unix_now() + 3})),
            "session=team" => ok(json!({"user": "tess", "channels": [], "subs": ["team:42", "user:tess"]})),
            "session=badsubs" => (StatusCode::OK, json!({"user": "x", "subs": ["not a channel"]}), false),
            _ => refuse(json!({"reason": "no session"})),
        },
        "subscribe" => match r["channel"].as_str().unwrap_or("") {
            "secret:ok" => ok(json!({})),
            "secret:info" => ok(json!({"info": {"role": "moderator"}})),
            "secret:no" => refuse(json!({"reason": "not a member"})),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, json!("down"), false),
        },
        "publish" => match r["channel"].as_str().unwrap_or("") {
            "mod:clean" => ok(json!({"data": {"text": "***"}})),
            "mod:keep" => ok(json!({})),
            _ => refuse(json!({"reason": "spam"})),
        },
        "refresh" => match r["user"].as_str().unwrap_or("") {
            "short" => ok(json!({"expire_at": unix_now() + 3600})),
            _ => refuse(json!({"reason": "session ended"})),
        },
        _ => (StatusCode::NOT_FOUND, json!("no such proxy"), false),
    }
}

/// A node whose proxies point at `backend` (`extra_toml` appended to the file).
async fn node(backend: &Backend, proxy_toml: &str, extra_toml: &str, args: &[&str]) -> (Server, ConfigFile) {
    let file = ConfigFile::new(&format!(
        "[proxy]\nconnect_url = \"{}\"\nconnect_headers = [\"Cookie\"]\nsubscribe_url = \"{}\"\n\
         publish_url = \"{}\"\nrefresh_url = \"{}\"\n{proxy_toml}\n{extra_toml}",
        backend.url("connect"),
        backend.url("subscribe"),
        backend.url("publish"),
        backend.url("refresh"),
    ));
    let mut all = vec!["--config", file.0.to_str().unwrap()];
    all.extend_from_slice(args);
    (Server::start(&all).await, file)
}

/// Reads an SSE stream until its text holds `needle` (fails after the deadline); the text read.
async fn read_until(mut resp: reqwest::Response, needle: &str) -> String {
    let mut text = String::new();
    let found = tokio::time::timeout(support::WAIT, async {
        while let Some(chunk) = resp.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains(needle) {
                return true;
            }
        }
        false
    })
    .await;
    assert!(matches!(found, Ok(true)), "no {needle:?} in the stream: {text}");
    text
}

async fn cookie_client(server: &Server, cookie: &str) -> Client {
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("cookie", HeaderValue::from_str(cookie).unwrap());
    req.headers_mut().insert("x-not-forwarded", HeaderValue::from_static("1"));
    Client::connect(req).await.expect("websocket connects")
}

#[tokio::test]
async fn cookie_in_user_and_permissions_out() {
    let backend = Backend::start().await;
    let (server, _file) = node(&backend, "", "", &[]).await;

    let mut c = cookie_client(&server, "session=alice").await;
    let welcome = c.recv().await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"], "alice", "the backend's user: {welcome}");
    c.subscribe("news:today", 1).await;
    let refused = c.request(json!({"type": "subscribe", "channel": "sports:today"}), 2).await;
    assert_eq!(refused["code"], "forbidden", "not in the backend's channels: {refused}");
    let ack = c.request(json!({"type": "publish", "channel": "news:today", "data": {"n": 1}}), 3).await;
    assert_eq!(ack["type"], "ack", "the backend's publish patterns: {ack}");
    let personal = c.request(json!({"type": "subscribe", "channel": "user:alice"}), 4).await;
    assert_eq!(personal["type"], "ack", "the personal channel of the backend's user: {personal}");

    let calls = backend.calls("connect");
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call["client"], welcome["client"], "the request names the connection: {call}");
    assert_eq!(call["transport"], "websocket");
    assert_eq!(call["remote_addr"], "127.0.0.1");
    assert_eq!(call["headers"], json!({"cookie": "session=alice"}), "only connect_headers are forwarded");

    // SSE: the same proxy, transport "sse".
    let resp =
        server.http.get(server.url("/sse?channel=news:today")).header("cookie", "session=alice").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    drop(resp);
    let calls = backend.calls("connect");
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1]["transport"], "sse");

    // A token still means the token (connect_always is off): the backend is not asked.
    let token = server.token("bob", &["*"], &[]);
    let mut jwt = server.client(&token).await;
    jwt.subscribe("sports:today", 1).await;
    assert_eq!(backend.calls("connect").len(), 2, "JWT handshakes do not call the connect proxy");
    assert_eq!(server.metric(r#"crier_proxy_calls_total{proxy="connect",result="ok"}"#).await, 2.0);
    assert!(server.metrics().await.contains(r#"crier_proxy_duration_seconds_bucket{proxy="connect""#));
    backend.assert_schemas();
}

/// The connect answer's `subs`: the connection is subscribed by the server at connect (each
/// announced `subscribed` with `"server":true`), even to channels its patterns do not cover; a
/// `subs` with an invalid channel name is a malformed answer (503).
#[tokio::test]
async fn the_connect_answer_s_subs_are_subscribed_at_connect() {
    let backend = Backend::start().await;
    let (server, _file) = node(&backend, "", "", &[]).await;
    let mut c = cookie_client(&server, "session=team").await;
    assert_eq!(c.recv().await["user"], "tess");
    let mut announced = Vec::new();
    for _ in 0..2 {
        let s = c.recv_type("subscribed").await;
        assert_eq!(s["server"], true, "{s}");
        announced.push(s["channel"].as_str().unwrap().to_owned());
    }
    announced.sort();
    assert_eq!(announced, ["team:42", "user:tess"]);
    server.publish("team:42", json!({"n": 1})).await;
    let m = c.recv_type("message").await;
    assert_eq!((m["channel"].as_str(), m["data"].clone()), (Some("team:42"), json!({"n": 1})));

    let (status, body) = support::rejected(&server, "/ws", &[("cookie", "session=badsubs")]).await;
    assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")), "{body}");
    assert!(body["message"].as_str().unwrap_or("").contains("not a valid channel name"), "{body}");
}

#[tokio::test]
async fn connect_always_sends_every_handshake_to_the_backend() {
    let backend = Backend::start().await;
    let (server, _file) = node(&backend, "connect_always = true", "", &[]).await;
    // A valid token of another user: the backend's answer decides, not the token.
    let token = server.token("mallory", &["*"], &["*"]);
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("cookie", HeaderValue::from_static("session=alice"));
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
    let mut c = Client::connect(req).await.unwrap();
    assert_eq!(c.recv().await["user"], "alice");
    assert_eq!(backend.calls("connect").len(), 1);
    backend.assert_schemas();
}

#[tokio::test]
async fn a_refused_handshake_shows_the_backend_s_reason() {
    let backend = Backend::start().await;
    let (server, _file) = node(&backend, "", "", &[]).await;
    let (status, body) = rejected(&server, "/ws", &[("cookie", "session=banned")]).await;
    assert_eq!(status, 403);
    assert_eq!(body, json!({"error": "forbidden", "message": "account suspended"}));
    let (status, body) = rejected(&server, "/ws", &[]).await;
    assert_eq!((status, body["message"].as_str()), (403, Some("no session")), "{body}");
    // SSE: the same answer.
    let resp =
        server.http.get(server.url("/sse?channel=news:x")).header("cookie", "session=banned").send().await.unwrap();
    assert_eq!(resp.status(), 403);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["message"], "account suspended");

    assert_eq!(server.metric(r#"crier_refusals_total{surface="handshake",reason="proxy_refused"}"#).await, 3.0);
    assert_eq!(server.metric(r#"crier_handshakes_total{result="forbidden"}"#).await, 3.0);
    assert_eq!(server.metric(r#"crier_proxy_calls_total{proxy="connect",result="refused"}"#).await, 3.0);
    backend.assert_schemas();
}

#[tokio::test]
async fn a_failing_backend_is_a_clear_503_and_the_node_stays_healthy() {
    let backend = Backend::start().await;
    let (server, _file) = node(&backend, "timeout = \"300ms\"\nbreaker_failures = 0", "", &[]).await;
    for (cookie, says) in [
        ("session=slow", "did not answer in time"),
        ("session=broken", "answered HTTP 500"),
        ("session=garbage", "malformed"),
    ] {
        let (status, body) = rejected(&server, "/ws", &[("cookie", cookie)]).await;
        assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")), "{cookie}: {body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("connect backend") && message.contains(says), "{cookie}: {message}");
    }
    for result in ["timeout", "bad_status", "malformed"] {
        let series = format!(r#"crier_proxy_calls_total{{proxy="connect",result="{result}"}}"#);
        assert_eq!(server.metric(&series).await, 1.0, "{series}");
    }
    assert_eq!(server.metric(r#"crier_refusals_total{surface="handshake",reason="proxy_unavailable"}"#).await, 3.0);
    assert_eq!(server.get("/readyz").await.status(), 200, "the node stays ready");
    // JWT clients are unaffected, even while a handshake waits on the slow backend.
    let waiting = tokio::spawn({
        let url = server.ws_url();
        async move {
            let mut req = url.into_client_request().unwrap();
            req.headers_mut().insert("cookie", HeaderValue::from_static("session=slow"));
            Client::connect(req).await.is_err()
        }
    });
    let token = server.token("bob", &["*"], &["*"]);
    let mut jwt = server.client(&token).await;
    jwt.subscribe("news:x", 1).await;
    let ack = jwt.request(json!({"type": "publish", "channel": "news:x", "data": 1}), 2).await;
    assert_eq!(ack["type"], "ack");
    assert!(waiting.await.unwrap(), "the slow handshake is refused");
}

#[tokio::test]
async fn a_dead_backend_opens_the_breaker() {
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let file = ConfigFile::new(&format!(
        "[proxy]\nconnect_url = \"http://{dead}/connect\"\nbreaker_failures = 3\nbreaker_cooldown = \"1h\"\n"
    ));
    let server = Server::start(&["--config", file.0.to_str().unwrap()]).await;
    for attempt in 0..3 {
        let (status, body) = rejected(&server, "/ws", &[]).await;
        assert_eq!(status, 503, "{body}");
        assert!(body["message"].as_str().unwrap().contains("unreachable"), "attempt {attempt}: {body}");
    }
    let (status, body) = rejected(&server, "/ws", &[]).await;
    assert_eq!(status, 503);
    assert!(body["message"].as_str().unwrap().contains("circuit open"), "{body}");
    assert_eq!(server.metric(r#"crier_proxy_calls_total{proxy="connect",result="error"}"#).await, 3.0);
    assert_eq!(server.metric(r#"crier_proxy_calls_total{proxy="connect",result="breaker_open"}"#).await, 1.0);
    assert_eq!(server.get("/readyz").await.status(), 200);
    let token = server.token("bob", &["*"], &[]);
    let mut jwt = server.client(&token).await;
    jwt.subscribe("news:x", 1).await;
}

#[tokio::test]
async fn a_thousand_concurrent_connects_through_a_50ms_backend_within_the_bound() {
    const CLIENTS: usize = 1000;
    const BOUND: usize = 16;
    let backend = Backend::start().await;
    backend.seen.delay_ms.store(50, Ordering::SeqCst);
    let (server, _file) = node(
        &backend,
        &format!("timeout = \"20s\"\nmax_concurrency = {BOUND}"),
        "",
        &["--handshake-rate", "100000", "--handshake-burst", "100000", "--max-pending-handshakes", "5000"],
    )
    .await;
    let url = server.ws_url();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let mut req = url.into_client_request().unwrap();
                req.headers_mut().insert("cookie", HeaderValue::from_static("session=alice"));
                let mut c = Client::connect(req).await.expect("admitted");
                let w = c.recv().await;
                assert_eq!(w["user"], "alice");
                c
            })
        })
        .collect();
    let mut clients = Vec::with_capacity(CLIENTS);
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    assert_eq!(clients.len(), CLIENTS);
    assert_eq!(backend.calls("connect").len(), CLIENTS);
    let max = backend.seen.max_inflight.load(Ordering::SeqCst);
    assert!(max <= BOUND, "at most {BOUND} calls in flight, the backend saw {max}");
    assert!(max > 1, "calls ran concurrently (max in flight {max})");
    println!("1,000 connects through a 50 ms backend: max in flight {max} (bound {BOUND})");
    assert_eq!(server.metric(r#"crier_proxy_calls_total{proxy="connect",result="ok"}"#).await, CLIENTS as f64);
}

#[tokio::test]
async fn proxy_admitted_users_are_counted_cluster_wide_on_redis() {
    // Two nodes sharing a redis-server, one connection per user: the backend's user is counted
    // like a token's `sub`, across the cluster; closing the connection gives the place back.
    let redis = crier_testkit::redis::RedisServer::start();
    let backend = Backend::start().await;
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--max-connections-per-user", "1"];
    let (a, _fa) = node(&backend, "", "", &args).await;
    let (b, _fb) = node(&backend, "", "", &args).await;
    let mut first = cookie_client(&a, "session=alice").await;
    assert_eq!(first.recv().await["user"], "alice");
    let (status, body) = rejected(&b, "/ws", &[("cookie", "session=alice")]).await;
    assert_eq!((status, body["error"].as_str()), (429, Some("too_many_connections")), "{body}");
    first.ws.close(None).await.unwrap();
    drop(first);
    poll("alice's place given back", async || {
        let mut req = b.ws_url().into_client_request().unwrap();
        req.headers_mut().insert("cookie", HeaderValue::from_static("session=alice"));
        match Client::connect(req).await {
            Ok(mut c) => Ok(c.recv().await),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    backend.assert_schemas();
}

const NAMESPACES: &str = "[namespaces.secret]\nsubscribe_proxy = true\n[namespaces.mod]\npublish_proxy = true\n";

#[tokio::test]
async fn subscribe_and_publish_proxies_allow_refuse_and_rewrite() {
    let backend = Backend::start().await;
    let (server, _file) = node(&backend, "", NAMESPACES, &[]).await;
    // The token allows neither namespace: the backend decides instead of the patterns.
    let token = server.token("carol", &["mod:*"], &["news:*"]);
    let mut c = server.client(&token).await;

    c.subscribe("secret:ok", 1).await;
    c.subscribe("secret:info", 2).await;
    let no = c.request(json!({"type": "subscribe", "channel": "secret:no"}), 3).await;
    assert_eq!((no["code"].as_str(), no["message"].as_str()), (Some("forbidden"), Some("not a member")), "{no}");
    let down = c.request(json!({"type": "subscribe", "channel": "secret:down"}), 4).await;
    assert_eq!(down["code"], "unavailable", "{down}");
    assert!(down["message"].as_str().unwrap().contains("subscribe backend"), "{down}");
    // Subscribed through the backend: presence and history of the channel are readable.
    let presence = c.request(json!({"type": "presence", "channel": "secret:ok"}), 5).await;
    assert_eq!(presence["type"], "presence", "{presence}");
    let calls = backend.calls("subscribe");
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[0]["user"], "carol");
    assert_eq!(calls[0]["channel"], "secret:ok");

    // SSE: a stream's `?channel=` of the namespace is asked when it subscribes (the refusal is
    // the stream's error event, the handshake is not refused).
    let resp = server.http.get(server.url("/sse?channel=secret:no")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let events = read_until(resp, "not a member").await;
    assert!(events.contains("forbidden"), "{events}");
    assert_eq!(backend.calls("subscribe").len(), 5);

    // Publish: rewritten, kept, refused.
    c.subscribe("mod:clean", 6).await;
    c.subscribe("mod:keep", 7).await;
    let ack = c.request(json!({"type": "publish", "channel": "mod:clean", "data": {"text": "darn"}}), 8).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = c.recv_type("message").await;
    assert_eq!((m["channel"].as_str(), &m["data"]), (Some("mod:clean"), &json!({"text": "***"})), "rewritten: {m}");
    let ack = c.request(json!({"type": "publish", "channel": "mod:keep", "data": [1, 2]}), 9).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = c.recv_type("message").await;
    assert_eq!(m["data"], json!([1, 2]), "kept: {m}");
    let spam = c.request(json!({"type": "publish", "channel": "mod:spam", "data": "buy"}), 10).await;
    assert_eq!((spam["code"].as_str(), spam["message"].as_str()), (Some("forbidden"), Some("spam")), "{spam}");
    let calls = backend.calls("publish");
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[0]["data"], json!({"text": "darn"}), "the client's data as sent");
    // Outside the proxied namespaces, the token's patterns still decide (and no call is made).
    let ack = c.request(json!({"type": "publish", "channel": "news:x", "data": 1}), 11).await;
    assert_eq!(ack["type"], "ack");
    let refused = c.request(json!({"type": "subscribe", "channel": "news:x"}), 12).await;
    assert_eq!(refused["code"], "forbidden");
    assert_eq!(backend.calls("publish").len(), 3);
    assert_eq!(backend.calls("subscribe").len(), 5);
    backend.assert_schemas();
}

#[tokio::test]
async fn a_token_refresh_keeps_what_the_subscribe_proxy_granted() {
    let backend = Backend::start().await;
    let (server, _file) = node(&backend, "", NAMESPACES, &[]).await;
    // The token does not allow `secret:*`: the subscribe proxy granted it.
    let token = server.token("carol", &["mod:*"], &[]);
    let mut c = server.client(&token).await;
    c.subscribe("secret:ok", 1).await;
    let refreshed = server.token("carol", &["mod:*"], &[]);
    let ack = c.request(json!({"type": "refresh", "token": refreshed}), 2).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // Still subscribed: its presence is readable and its messages arrive, with no `unsubscribed`.
    let presence = c.request(json!({"type": "presence", "channel": "secret:ok"}), 3).await;
    assert_eq!(presence["type"], "presence", "{presence}");
    server.publish("secret:ok", json!("after refresh")).await;
    let next = c.recv().await;
    assert_eq!((next["type"].as_str(), &next["data"]), (Some("message"), &json!("after refresh")), "{next}");
    assert_eq!(backend.calls("subscribe").len(), 1, "the refresh does not ask the backend again");
}

#[tokio::test]
async fn refresh_extends_a_proxy_admitted_connection() {
    let backend = Backend::start().await;
    let (server, _file) = node(&backend, "", "", &[]).await;
    let mut extended = cookie_client(&server, "session=short").await;
    let welcome = extended.recv().await;
    let admitted_until = backend.calls("connect")[0].clone();
    let mut ended = cookie_client(&server, "session=norefresh").await;
    ended.recv().await;
    // Both were admitted until at most this (the backend answered before now).
    let original_expiry = unix_now() + 3;

    // The refused one closes with 4001 at its expiry; the extended one outlives it.
    assert_eq!(ended.closed().await, Some(4001));
    poll(
        "past the original expiry",
        async || {
            if unix_now() > original_expiry + 1 { Ok(()) } else { Err("not yet".to_owned()) }
        },
    )
    .await;
    let pong = extended.request(json!({"type": "ping"}), 1).await;
    assert_eq!(pong["type"], "pong", "still open after its first expiry: {pong}");
    let calls = backend.calls("refresh");
    let mine: Vec<_> = calls.iter().filter(|c| c["client"] == welcome["client"]).collect();
    assert_eq!(mine.len(), 1, "asked once (then extended by an hour): {calls:?}");
    assert_eq!(mine[0]["user"], "short");
    assert!(admitted_until["headers"]["cookie"] == "session=short");
    assert_eq!(server.metric(r#"crier_proxy_calls_total{proxy="refresh",result="ok"}"#).await, 1.0);
    assert_eq!(server.metric(r#"crier_proxy_calls_total{proxy="refresh",result="refused"}"#).await, 1.0);
    backend.assert_schemas();
}

#[test]
fn the_documented_schemas_compile_and_their_examples_match() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/schemas");
    let mut seen = HashMap::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if !name.starts_with("proxy-") {
            continue;
        }
        let s = schema(&name);
        for example in s["examples"].as_array().into_iter().flatten() {
            let errors = schema_errors(&name, example);
            assert!(errors.is_empty(), "{errors:?}");
        }
        seen.insert(name, ());
    }
    for proxy in ["connect", "subscribe", "publish", "refresh"] {
        for side in ["request", "answer"] {
            assert!(seen.contains_key(&format!("proxy-{proxy}-{side}.json")), "proxy-{proxy}-{side}.json");
        }
    }
    assert!(seen.contains_key("proxy-refusal.json"));
}

#[tokio::test]
async fn bad_proxy_settings_are_configuration_errors() {
    let start = async |toml: &str| {
        let file = ConfigFile::new(toml);
        let args = ["--listen", "127.0.0.1:0", "--jwt-secret", support::SECRET, "--config", file.0.to_str().unwrap()];
        Server::start_raw(&args, &[]).await.err().expect("refused at start")
    };
    let err = start("[namespaces.secret]\nsubscribe_proxy = true\n[namespaces.mod]\npublish_proxy = true\n").await;
    assert!(err.contains("namespaces.secret.subscribe_proxy") && err.contains("subscribe_url"), "{err}");
    assert!(err.contains("namespaces.mod.publish_proxy") && err.contains("publish_url"), "{err}");
    let err = start("[proxy]\ntimeout = \"0s\"\nconnect_url = \"https://x\"\nconect_headers = [\"Cookie\"]\n").await;
    assert!(err.contains("proxy.timeout"), "{err}");
    assert!(err.contains("proxy.connect_url") && err.contains("http://"), "{err}");
    assert!(err.contains("did you mean `connect_headers`"), "{err}");
    let err = start("[proxy]\nconnect_always = true\n").await;
    assert!(err.contains("proxy.connect_always") && err.contains("needs proxy.connect_url"), "{err}");
}
