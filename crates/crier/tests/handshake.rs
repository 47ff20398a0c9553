//! `GET /ws`: every way to present a token, and every rejection of the contract's table, against
//! the real binary over real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use serde_json::Value;
use support::{Client, Server, rejected};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

#[tokio::test]
async fn token_in_header_subprotocol_or_query() {
    let server = Server::start(&[]).await;
    let token = server.token("alice", &["chat:*"], &[]);

    // Authorization header.
    let _c = server.client(&token).await;

    // Subprotocol pair: the server picks crier.v1 and never echoes the token.
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_str(&format!("crier.v1, crier.bearer.{token}")).unwrap());
    let mut c = Client::connect(req).await.expect("subprotocol handshake");
    assert_eq!(c.response_protocol.as_deref(), Some("crier.v1"));
    let w = c.recv().await;
    assert_eq!(
        (w["type"].as_str(), w["user"].as_str(), w["node"].as_str()),
        (Some("welcome"), Some("alice"), Some("test-node"))
    );
    assert_eq!(w["ping_interval_ms"], 25000);

    // Query string; the token must never reach the logs.
    let req = format!("ws://{}/ws?token={token}", server.addr).into_client_request().unwrap();
    let mut c = Client::connect(req).await.expect("query handshake");
    assert_eq!(c.recv().await["type"], "welcome");
    assert!(server.wait_metric("crier_handshakes_total{result=\"ok\"}", 3.0).await >= 3.0);
    assert!(!server.logs().contains(&token), "a token appeared in the logs");
}

#[tokio::test]
async fn every_rejection_has_its_status_and_code() {
    let server = Server::start(&["--allowed-origins", "https://app.example.com,https://*.example.org"]).await;
    let good = server.token("bob", &[], &[]);

    let (s, b) = rejected(&server, "/ws", &[]).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("token_missing")));

    let (s, b) = rejected(&server, "/ws?token=not.a.jwt", &[]).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("token_invalid")));

    let other_key = crier::auth::mint_hs256(
        b"another-secret-another-secret-another-secret",
        "bob",
        &[],
        &[],
        Duration::from_secs(60),
    )
    .unwrap();
    let (s, b) = rejected(&server, &format!("/ws?token={other_key}"), &[]).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("token_invalid")));

    // alg: none is never accepted.
    let none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJib2IiLCJleHAiOjQxMDI0NDQ4MDB9.";
    let (s, b) = rejected(&server, &format!("/ws?token={none}"), &[]).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("token_invalid")));

    // Expired (well beyond any leeway).
    let old = old_token();
    let (s, b) = rejected(&server, &format!("/ws?token={old}"), &[]).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("token_invalid")));
    assert!(b["message"].as_str().unwrap_or_default().contains("expired"), "{b}");

    // Origin: a listed one passes, a wildcard subdomain passes, anything else is 403.
    let auth = format!("Bearer {good}");
    let (s, b) = rejected(&server, "/ws", &[("origin", "https://evil.example.com"), ("authorization", &auth)]).await;
    assert_eq!((s, b["error"].as_str()), (403, Some("origin_not_allowed")));
    for origin in ["https://app.example.com", "https://a.b.example.org"] {
        let mut req = server.ws_url().into_client_request().unwrap();
        req.headers_mut().insert("origin", HeaderValue::from_str(origin).unwrap());
        req.headers_mut().insert("authorization", HeaderValue::from_str(&auth).unwrap());
        assert!(Client::connect(req).await.is_ok(), "{origin} is allowed");
    }

    // Not a WebSocket upgrade.
    let r = reqwest::Client::new().get(server.url("/ws")).bearer_auth(&good).send().await.unwrap();
    assert!([400, 426].contains(&r.status().as_u16()), "status {}", r.status());
    let b: Value = r.json().await.unwrap();
    assert_eq!(b["error"], "bad_upgrade");
    // An upgrade for another WebSocket version: 426 naming the version spoken (RFC 6455 §4.4).
    let r = reqwest::Client::new()
        .get(server.url("/ws"))
        .bearer_auth(&good)
        .header("connection", "Upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("sec-websocket-version", "8")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 426);
    assert_eq!(r.headers().get("sec-websocket-version").map(|v| v.as_bytes()), Some(&b"13"[..]));

    let m = server.metrics().await;
    for code in ["token_missing", "token_invalid", "origin_not_allowed", "bad_upgrade"] {
        assert!(
            support::metric_value(&m, &format!("crier_handshakes_total{{result=\"{code}\"}}")) >= 1.0,
            "{code} counted"
        );
    }
}

/// A token signed with the right key that expired an hour ago.
fn old_token() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = serde_json::json!({"sub": "bob", "exp": now - 3600});
    let key = jsonwebtoken::EncodingKey::from_secret(support::SECRET.as_bytes());
    jsonwebtoken::encode(&jsonwebtoken::Header::default(), &claims, &key).unwrap()
}

#[tokio::test]
async fn handshake_rate_limit_answers_429_with_retry_after() {
    let server = Server::start(&["--handshake-rate", "1", "--handshake-burst", "2"]).await;
    let token = server.token("carol", &[], &[]);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..4 {
        let r = reqwest::Client::new().get(server.url("/ws")).bearer_auth(&token).send().await.unwrap();
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let b: Value = r.json().await.unwrap();
            assert_eq!(b["error"], "rate_limited");
        }
    }
    assert_eq!(&statuses[..2], &[400, 400], "the burst passes the limiter (then fails as a bad upgrade)");
    assert!(statuses[2..].contains(&429), "{statuses:?}");
    assert!(retry_after.and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s >= 1));
    assert!(server.wait_metric("crier_rate_limited_total{kind=\"handshake\"}", 1.0).await >= 1.0);
}

#[tokio::test]
async fn node_handshake_admission_answers_503_with_retry_after_before_token_work() {
    // One handshake per second for the whole node: a burst beyond it is shed with 503 and
    // Retry-After. The token is invalid, so a handshake that reached the token check says 401:
    // a 503 shows the admission answered first, without verifying it.
    let server = Server::start(&["--node-handshake-rate", "1", "--node-handshake-burst", "1"]).await;
    let mut statuses = Vec::new();
    let mut retry_after = None;
    while !statuses.contains(&503) {
        assert!(statuses.len() < 20, "no admission refusal: {statuses:?}");
        let r = reqwest::Client::new().get(server.url("/ws")).bearer_auth("not.a.token").send().await.unwrap();
        let status = r.status().as_u16();
        statuses.push(status);
        if status == 503 {
            retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
        }
        let b: Value = r.json().await.unwrap();
        let want = if status == 503 { "unavailable" } else { "token_invalid" };
        assert_eq!(b["error"], want, "{status}: {b}");
    }
    assert_eq!(statuses[0], 401, "the first handshake is admitted: {statuses:?}");
    assert!(retry_after.and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s >= 1));
    assert!(server.wait_metric("crier_rate_limited_total{kind=\"admission\"}", 1.0).await >= 1.0);
    assert!(server.wait_metric("crier_handshakes_total{result=\"unavailable\"}", 1.0).await >= 1.0);
}

#[tokio::test]
async fn too_many_connections_per_user() {
    let server = Server::start(&["--max-connections-per-user", "2"]).await;
    let token = server.token("dave", &[], &[]);
    let a = server.client(&token).await;
    let _b = server.client(&token).await;
    let (s, b) = rejected(&server, &format!("/ws?token={token}"), &[]).await;
    assert_eq!((s, b["error"].as_str()), (429, Some("too_many_connections")));
    // Another user is unaffected; a closed connection frees its slot.
    let _e = server.client(&server.token("erin", &[], &[])).await;
    drop(a);
    crier_testkit::until("the closed connection's slot to be freed", async || {
        let mut req = server.ws_url().into_client_request().unwrap();
        req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        Client::connect(req).await.is_ok()
    })
    .await;
}

fn sign(alg: jsonwebtoken::Algorithm, kid: Option<&str>, key: jsonwebtoken::EncodingKey) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let claims = serde_json::json!({"sub": "pk-user", "exp": now + 600, "channels": ["a"]});
    jsonwebtoken::encode(&header, &claims, &key).unwrap()
}

fn key_file(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[tokio::test]
async fn public_key_and_jwks_verification_on_the_real_binary() {
    use jsonwebtoken::{Algorithm, EncodingKey};
    let rsa_private = std::fs::read(key_file("rsa_private.pem")).unwrap();
    let rsa_public = std::fs::read(key_file("rsa_public.pem")).unwrap();
    let ec_private = std::fs::read(key_file("ec_private.pem")).unwrap();

    let pem = key_file("rsa_public.pem");
    let server = Server::start_raw(&["--listen", "127.0.0.1:0", "--jwt-public-key-file", &pem], &[]).await.unwrap();
    let rs = sign(Algorithm::RS256, None, EncodingKey::from_rsa_pem(&rsa_private).unwrap());
    let mut c = server.client(&rs).await;
    assert_eq!(c.subscribe("a", 1).await["type"], "ack");
    // RS → HS confusion: an HS256 token keyed with the public key's bytes is refused.
    let confused = sign(Algorithm::HS256, None, EncodingKey::from_secret(&rsa_public));
    let (s, b) = rejected(&server, &format!("/ws?token={confused}"), &[]).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("token_invalid")));

    let jwks = key_file("jwks.json");
    let server = Server::start_raw(&["--listen", "127.0.0.1:0", "--jwt-jwks-file", &jwks], &[]).await.unwrap();
    let rs = sign(Algorithm::RS256, Some("rsa-1"), EncodingKey::from_rsa_pem(&rsa_private).unwrap());
    let es = sign(Algorithm::ES256, Some("ec-1"), EncodingKey::from_ec_pem(&ec_private).unwrap());
    let _a = server.client(&rs).await;
    let _b = server.client(&es).await;
    let wrong_kid = sign(Algorithm::RS256, Some("nope"), EncodingKey::from_rsa_pem(&rsa_private).unwrap());
    let (s, b) = rejected(&server, &format!("/ws?token={wrong_kid}"), &[]).await;
    assert_eq!((s, b["error"].as_str()), (401, Some("token_invalid")));
    assert!(b["message"].as_str().unwrap().contains("unknown key id"), "{b}");
}
