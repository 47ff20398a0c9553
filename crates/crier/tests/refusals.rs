//! Refusals a person can diagnose, against the real binary: the three typical mistakes (an
//! expired token, an Origin not allowed, a wrong API key) each give one log line naming the
//! check that failed and what to change (never the token or the key), a 403 body naming the
//! origin and the setting, and a `crier_refusals_total{surface,reason}` count; `/readyz` logs a
//! Redis outage once when it starts and once when it ends, not once per probe.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use crier_testkit::redis::RedisServer;
use crier_testkit::{poll, until};
use serde_json::json;
use support::{Server, rejected};

/// A token signed with the right key that expired `ago` seconds ago.
fn expired_token(ago: u64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"sub": "bob", "exp": now - ago});
    let key = jsonwebtoken::EncodingKey::from_secret(support::SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

fn lines_with(logs: &str, needle: &str) -> Vec<String> {
    logs.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect()
}

async fn wait_log(server: &Server, needle: &str) -> String {
    poll(format!("a log line containing {needle:?}"), async || {
        lines_with(&server.logs(), needle).into_iter().next().ok_or_else(|| server.logs())
    })
    .await
}

#[tokio::test]
async fn the_three_typical_mistakes_are_logged_with_what_to_change() {
    let server = Server::start(&["--allowed-origins", "https://app.example.com"]).await;

    // 1. An expired token: the log says how long ago and what to do.
    let old = expired_token(3600);
    let started = Instant::now();
    let (s, b) = rejected(&server, &format!("/ws?token={old}"), &[]).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("token_invalid")));
    assert!(b["message"].as_str().unwrap().starts_with("token expired 360"), "{b}");
    let line = wait_log(&server, "handshake refused").await;
    assert!(line.contains("WARN") && line.contains("token expired 360") && line.contains("s ago"), "{line}");
    assert!(line.contains("fresh token"), "says what to change: {line}");

    // The same mistake again within the window: counted, not logged; the next line (after the
    // window) carries the suppressed count — the unit test of `refusal` checks that part.
    for _ in 0..3 {
        rejected(&server, &format!("/ws?token={old}"), &[]).await;
    }
    server.wait_metric("crier_refusals_total{surface=\"handshake\",reason=\"token_expired\"}", 4.0).await;
    if started.elapsed() < LOG_WINDOW {
        assert_eq!(lines_with(&server.logs(), "token expired").len(), 1, "{}", server.logs());
    }

    // 2. An Origin not in the allow-list: the 403 body and the log name it and the setting.
    let good = server.token("bob", &[], &[]);
    let auth = format!("Bearer {good}");
    let (s, b) = rejected(&server, "/ws", &[("origin", "http://localhost:5173"), ("authorization", &auth)]).await;
    assert_eq!((s, b["error"].as_str()), (403, Some("origin_not_allowed")));
    let message = b["message"].as_str().unwrap();
    assert!(message.contains(r#"origin "http://localhost:5173" not in allowed_origins"#), "{message}");
    assert!(message.contains("CRIER_ALLOWED_ORIGINS"), "{message}");
    let line = wait_log(&server, "origin_not_allowed").await;
    assert!(line.contains(r#"origin "http://localhost:5173" not in allowed_origins"#), "{line}");

    // 3. A wrong API key: logged as unknown_api_key, never the key itself.
    let r = server
        .http
        .post(server.url("/api/v1/publish"))
        .bearer_auth("not-the-key-0123")
        .json(&json!({"channel": "chat:x", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let line = wait_log(&server, "API request refused").await;
    assert!(
        line.contains("unknown_api_key") && line.contains("POST /api/v1/publish") && line.contains("api_keys"),
        "{line}"
    );
    // A refused REST call with a good key (a bad channel) is logged with its code too.
    let r = server
        .http
        .post(server.url("/api/v1/publish"))
        .bearer_auth(support::API_KEY)
        .json(&json!({"channel": "bad channel", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let line = wait_log(&server, "-> 400 invalid_channel").await;
    assert!(line.contains("API request refused: POST /api/v1/publish"), "{line}");

    // SSE runs the same checks: its refusals are logged and counted the same way.
    let r = server.http.get(server.url(&format!("/sse?channels=chat:x&token={old}"))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    server.wait_metric("crier_refusals_total{surface=\"handshake\",reason=\"token_expired\"}", 5.0).await;

    let logs = server.logs();
    assert!(!logs.contains(&old) && !logs.contains(&good), "a token appeared in the logs");
    assert!(!logs.contains("not-the-key-0123") && !logs.contains(support::API_KEY), "an API key appeared in the logs");
    let m = server.metrics().await;
    for (series, min) in [
        ("crier_refusals_total{surface=\"handshake\",reason=\"origin_not_allowed\"}", 1.0),
        ("crier_refusals_total{surface=\"api\",reason=\"unknown_api_key\"}", 1.0),
        ("crier_refusals_total{surface=\"api\",reason=\"invalid_channel\"}", 1.0),
        ("crier_handshakes_total{result=\"token_invalid\"}", 4.0),
    ] {
        assert!(support::metric_value(&m, series) >= min, "{series} in\n{m}");
    }
}

/// The refusal log's window (one line per reason per window): crier's `refusal::LOG_WINDOW`.
const LOG_WINDOW: Duration = Duration::from_secs(5);

#[tokio::test]
async fn readyz_logs_a_redis_outage_once_each_way() {
    let mut redis = RedisServer::start();
    let url = redis.url();
    let server = Server::start(&["--redis-url", url.as_str()]).await;
    let status = async || server.http.get(server.url("/readyz")).send().await.map(|r| r.status().as_u16()).unwrap_or(0);
    until("ready", async || status().await == 200).await;

    redis.kill();
    // Several probes answered 503 …
    let mut not_ready = 0;
    until("five 503 probes", async || {
        if status().await == 503 {
            not_ready += 1;
        }
        not_ready >= 5
    })
    .await;
    // … one line says so, and no probe is logged on its own.
    wait_log(&server, "not ready: the broker is unreachable").await;
    let logs = server.logs();
    assert_eq!(lines_with(&logs, "not ready").len(), 1, "{logs}");
    assert!(lines_with(&logs, "/readyz").iter().all(|l| l.contains("not ready")), "a probe was logged:\n{logs}");

    redis.restart();
    until("ready again", async || status().await == 200).await;
    wait_log(&server, "ready again").await;
    assert_eq!(lines_with(&server.logs(), "ready again").len(), 1);
}
