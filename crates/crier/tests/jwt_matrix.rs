//! The JWT attack matrix on the real binary (issue 4), in one table: every forged, stale, foreign
//! or mangled token is refused at the handshake with 401 `token_invalid` and a `message` that
//! says why; and the same token sent in a `refresh` frame on a live connection gets a
//! `token_invalid` error frame with the same reason, while the connection lives on.
//!
//! Three nodes cover the three key sources: an HS256 secret with `jwt_issuer` and `jwt_audience`
//! set, an RSA public key (for RS→HS confusion), and a JWKS (for `kid` handling).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};
use support::{Client, SECRET, Server};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const ISS: &str = "https://auth.example.test";
const AUD: &str = "crier-test";
const NO_RATE_LIMITS: [&str; 8] =
    ["--user-rate", "100000", "--user-burst", "100000", "--handshake-rate", "100000", "--handshake-burst", "100000"];

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn key_file(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Valid claims for the HS256 node (right `iss` and `aud`), with `changes` applied: a key set to
/// `null` is removed, any other value replaces or adds the claim.
fn claims(changes: Value) -> Value {
    let mut c = json!({"sub": "alice", "exp": now() + 600, "iat": now(), "iss": ISS, "aud": AUD, "channels": ["*"]});
    let obj: &mut Map<String, Value> = c.as_object_mut().unwrap();
    for (k, v) in changes.as_object().unwrap() {
        if v.is_null() {
            obj.remove(k);
        } else {
            obj.insert(k.clone(), v.clone());
        }
    }
    c
}

fn sign(header: Header, claims: &Value, key: &EncodingKey) -> String {
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(SECRET.as_bytes()))
}

fn rsa_private() -> EncodingKey {
    EncodingKey::from_rsa_pem(&std::fs::read(key_file("rsa_private.pem")).unwrap()).unwrap()
}

fn rs256(kid: Option<&str>, claims: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(str::to_owned);
    sign(h, claims, &rsa_private())
}

/// A token with this exact header and claims and `signature` (already encoded) as its third part.
fn forge(header: Value, claims: &Value, signature: &str) -> String {
    format!("{}.{}.{signature}", b64(header.to_string().as_bytes()), b64(claims.to_string().as_bytes()))
}

/// `token` with one character of its payload segment replaced by another valid base64url one.
fn tamper_one_char(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut payload: Vec<u8> = parts[1].bytes().collect();
    let i = payload.len() / 2;
    payload[i] = if payload[i] == b'A' { b'B' } else { b'A' };
    format!("{}.{}.{}", parts[0], String::from_utf8(payload).unwrap(), parts[2])
}

/// `token` with its payload replaced (re-encoded) and the original signature kept.
fn swap_payload(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], b64(claims.to_string().as_bytes()), parts[2])
}

fn strip_signature(token: &str) -> String {
    let (head, _sig) = token.rsplit_once('.').unwrap();
    format!("{head}.")
}

/// Attempts a handshake with `token`; returns the HTTP rejection's status and JSON body.
async fn handshake(server: &Server, token: &str) -> Result<(), (u16, Value)> {
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
    match Client::connect(req).await {
        Ok(_) => Ok(()),
        Err(WsError::Http(resp)) => {
            let body = serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).expect("a JSON body");
            Err((resp.status().as_u16(), body))
        }
        Err(e) => panic!("handshake failed without an HTTP answer: {e}"),
    }
}

/// One row of the matrix: what the attack is, the token, and a substring of the reason.
struct Attack {
    name: &'static str,
    token: String,
    reason: &'static str,
}

fn attack(name: &'static str, token: String, reason: &'static str) -> Attack {
    Attack { name, token, reason }
}

/// Runs `attacks` against `server`: each refused at the handshake (401 `token_invalid`, the
/// reason in `message`), then each sent as `refresh` on a live connection opened with `valid`
/// (error frame `token_invalid` with the same message; the connection stays usable).
async fn run_matrix(server: &Server, valid: &str, attacks: &[Attack]) {
    handshake(server, valid).await.expect("the control token is accepted");
    let before = server.metric("crier_handshakes_total{result=\"token_invalid\"}").await;
    let mut messages = Vec::new();
    for a in attacks {
        let (status, body) = handshake(server, &a.token).await.err().unwrap_or_else(|| panic!("{}: accepted", a.name));
        assert_eq!((status, body["error"].as_str()), (401, Some("token_invalid")), "{}: {body}", a.name);
        let message = body["message"].as_str().unwrap_or_default().to_owned();
        assert!(message.contains(a.reason), "{}: message {message:?} does not say {:?}", a.name, a.reason);
        assert!(!message.contains(&a.token), "{}: the message echoes the token", a.name);
        messages.push(message);
    }
    let counted = server.wait_metric("crier_handshakes_total{result=\"token_invalid\"}", before + attacks.len() as f64);
    assert_eq!(counted.await, before + attacks.len() as f64, "every refusal is counted once");

    let mut c = server.client(valid).await;
    for (i, (a, message)) in attacks.iter().zip(&messages).enumerate() {
        let id = 1 + i as u64;
        let e = c.request(json!({"type":"refresh","token":a.token}), id).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("token_invalid")), "{}: {e}", a.name);
        // The same words; a number of seconds ("token expired 3600 s ago") may have ticked on
        // between the two checks.
        let digitless = |m: &str| m.chars().filter(|c| !c.is_ascii_digit()).collect::<String>();
        let said = e["message"].as_str().unwrap_or_default();
        assert_eq!(digitless(said), digitless(message), "{}: refresh says what the handshake said ({said:?})", a.name);
    }
    assert_eq!(c.request(json!({"type":"ping"}), 9999).await["type"], "pong", "the connection lives on");
    // The connection still holds its original rights: a refused refresh changed nothing.
    assert_eq!(c.request(json!({"type":"refresh","token":valid}), 10_000).await["type"], "ack");
}

#[tokio::test]
async fn every_bad_token_is_refused_with_its_reason() {
    // --- An HS256 secret, with issuer and audience checks.
    let mut args = vec!["--jwt-issuer", ISS, "--jwt-audience", AUD];
    args.extend_from_slice(&NO_RATE_LIMITS);
    let hs = Server::start(&args).await;
    let valid = hs256(&claims(json!({})));
    let good = claims(json!({}));
    let long_ago = now() - 3600;
    let padding = "x".repeat(9 * 1024);
    let other_secret = EncodingKey::from_secret(b"another-secret-another-secret-another-secret!!");
    let hs_attacks = vec![
        attack("alg none", forge(json!({"alg":"none","typ":"JWT"}), &good, ""), "algorithm not allowed: none"),
        attack("alg NONE", forge(json!({"alg":"NONE"}), &good, ""), "algorithm not allowed"),
        attack(
            "alg none carrying a valid HS256 signature",
            forge(json!({"alg":"none"}), &good, valid.rsplit('.').next().unwrap()),
            "algorithm not allowed: none",
        ),
        attack("expired", hs256(&claims(json!({"exp": long_ago}))), "expired"),
        attack("exp just past the leeway", hs256(&claims(json!({"exp": now() - 30}))), "expired"),
        attack("missing exp", hs256(&claims(json!({"exp": null}))), "missing claim `exp`"),
        attack("exp as a string", hs256(&claims(json!({"exp": "tomorrow"}))), "malformed claim `exp`"),
        attack("not yet valid", hs256(&claims(json!({"nbf": now() + 3600}))), "not yet valid"),
        attack("issued in the future", hs256(&claims(json!({"iat": now() + 3600}))), "issued in the future"),
        attack("wrong iss", hs256(&claims(json!({"iss": "https://evil.example"}))), "wrong issuer"),
        attack("missing iss", hs256(&claims(json!({"iss": null}))), "missing claim `iss`"),
        attack("wrong aud", hs256(&claims(json!({"aud": "someone-else"}))), "wrong audience"),
        attack("aud list without ours", hs256(&claims(json!({"aud": ["a", "b"]}))), "wrong audience"),
        attack("missing aud", hs256(&claims(json!({"aud": null}))), "missing claim `aud`"),
        attack("missing sub", hs256(&claims(json!({"sub": null}))), "missing claim `sub`"),
        attack("empty sub", hs256(&claims(json!({"sub": ""}))), "`sub` is empty"),
        attack("sub not a string", hs256(&claims(json!({"sub": 42}))), "malformed claim `sub`"),
        attack("oversized token (> 8 KiB)", hs256(&claims(json!({"pad": padding}))), "too large"),
        attack("tampered payload (one character)", tamper_one_char(&valid), "signature invalid"),
        attack(
            "tampered payload (sub swapped, signature kept)",
            swap_payload(&valid, &claims(json!({"sub": "admin"}))),
            "signature invalid",
        ),
        attack("signature stripped", strip_signature(&valid), "signature invalid"),
        attack("signature and its dot stripped", valid.rsplit_once('.').unwrap().0.to_owned(), "malformed"),
        attack(
            "signed with another secret",
            sign(Header::new(Algorithm::HS256), &good, &other_secret),
            "signature invalid",
        ),
        attack(
            "HS512 with the right secret (only HS256 allowed)",
            sign(Header::new(Algorithm::HS512), &good, &EncodingKey::from_secret(SECRET.as_bytes())),
            "algorithm not allowed: HS512",
        ),
        attack("RS256 on an HMAC node", rs256(None, &good), "algorithm not allowed: RS256"),
        attack(
            "a crit header",
            forge(json!({"alg":"HS256","crit":["exp"]}), &good, "c2ln"),
            "unsupported critical header",
        ),
        attack(
            "header not JSON",
            format!("{}.{}.sig", b64(b"not json"), b64(good.to_string().as_bytes())),
            "malformed",
        ),
        attack("not a JWT at all", "definitely-not-a-token".into(), "malformed"),
        attack("four segments", format!("{valid}.extra"), "malformed"),
    ];
    run_matrix(&hs, &valid, &hs_attacks).await;

    // --- An RSA public key: RS→HS algorithm confusion.
    let pem_path = key_file("rsa_public.pem");
    let pem = std::fs::read(&pem_path).unwrap();
    let mut args = vec!["--listen", "127.0.0.1:0", "--jwt-public-key-file", &pem_path];
    args.extend_from_slice(&NO_RATE_LIMITS);
    let rsa = Server::start_raw(&args, &[]).await.unwrap();
    let plain = claims(json!({"iss": null, "aud": null}));
    let valid = rs256(None, &plain);
    let rsa_attacks = vec![
        attack(
            "RS→HS confusion: HS256 keyed with the public key PEM",
            sign(Header::new(Algorithm::HS256), &plain, &EncodingKey::from_secret(&pem)),
            "algorithm not allowed: HS256",
        ),
        attack(
            "RS→HS confusion with the PEM's trailing newline trimmed",
            sign(Header::new(Algorithm::HS256), &plain, &EncodingKey::from_secret(pem.trim_ascii())),
            "algorithm not allowed: HS256",
        ),
        attack("alg none", forge(json!({"alg":"none"}), &plain, ""), "algorithm not allowed: none"),
        attack("tampered payload", tamper_one_char(&valid), "signature invalid"),
        attack("signature stripped", strip_signature(&valid), "signature invalid"),
        attack("expired", rs256(None, &claims(json!({"iss": null, "aud": null, "exp": long_ago}))), "expired"),
    ];
    run_matrix(&rsa, &valid, &rsa_attacks).await;

    // --- A JWKS: keys chosen by kid.
    let jwks_path = key_file("jwks.json");
    let mut args = vec!["--listen", "127.0.0.1:0", "--jwt-jwks-file", &jwks_path];
    args.extend_from_slice(&NO_RATE_LIMITS);
    let jwks = Server::start_raw(&args, &[]).await.unwrap();
    let valid = rs256(Some("rsa-1"), &plain);
    let ec_private = EncodingKey::from_ec_pem(&std::fs::read(key_file("ec_private.pem")).unwrap()).unwrap();
    let mut es_as_rsa = Header::new(Algorithm::ES256);
    es_as_rsa.kid = Some("rsa-1".into());
    let mut hs_with_kid = Header::new(Algorithm::HS256);
    hs_with_kid.kid = Some("rsa-1".into());
    let jwks_attacks = vec![
        attack("unknown kid", rs256(Some("rotated-away"), &plain), "unknown key id"),
        attack("no kid with several keys", rs256(None, &plain), "missing key id"),
        attack(
            "kid of another key family (ES256 with the RSA key's kid)",
            sign(es_as_rsa, &plain, &ec_private),
            "algorithm not allowed: ES256",
        ),
        attack(
            "RS→HS confusion with a kid",
            sign(hs_with_kid, &plain, &EncodingKey::from_secret(&pem)),
            "algorithm not allowed: HS256",
        ),
        attack("kid not a string", forge(json!({"alg":"RS256","kid":7}), &plain, "c2ln"), "malformed"),
        attack(
            "alg none with a kid",
            forge(json!({"alg":"none","kid":"rsa-1"}), &plain, ""),
            "algorithm not allowed: none",
        ),
    ];
    run_matrix(&jwks, &valid, &jwks_attacks).await;
}
