//! HTTP-level abuse: junk instead of a request, malformed bodies, oversized request heads,
//! slowloris.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::bystander::Bystander;
use crate::raw::{raw_exchange, upgrade_request};
use crate::support::API_KEY;
use crate::{hostile_token, start};

#[tokio::test]
async fn junk_bytes_instead_of_an_http_request_get_400_and_a_close() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut random = Vec::with_capacity(64 * 1024);
    let mut x: u32 = 0x2545_f491;
    for _ in 0..64 * 1024 {
        // xorshift: reproducible junk.
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        random.push(x as u8);
    }
    random[0] = 0x00; // not a token character: hyper refuses at once.
    let cases: Vec<(&str, Vec<u8>, &[&str])> = vec![
        ("binary junk", random, &["HTTP/1.1 400"]),
        ("a TLS ClientHello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\x00\x00\x00\x00".to_vec(), &["HTTP/1.1 400"]),
        ("NUL bytes", vec![0u8; 1024], &["HTTP/1.1 400"]),
        ("a control character in a header", b"GET /ws HTTP/1.1\r\nHost: x\r\nX-A: \x01\x02\r\n\r\n".to_vec(), &["HTTP/1.1 400"]),
        ("a header without a colon", b"GET /ws HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n".to_vec(), &["HTTP/1.1 400"]),
        ("an unknown HTTP version", b"GET /ws HTTP/7.1\r\nHost: x\r\n\r\n".to_vec(), &["HTTP/1.1 400", "HTTP/1.1 505"]),
        ("a negative Content-Length", b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(), &["HTTP/1.1 400"]),
        // Both framings: hyper lets Transfer-Encoding win (RFC 9112 §6.3), answers once (401:
        // no API key) and closes the connection, so nothing can be smuggled behind it.
        (
            "Content-Length with Transfer-Encoding (request smuggling)",
            b"POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            &["HTTP/1.1 400", "HTTP/1.1 401"],
        ),
    ];
    for (name, bytes, statuses) in cases {
        let status = raw_exchange(&server, &bytes).await;
        assert!(
            statuses.iter().any(|s| status.starts_with(s) && (!s.is_empty() || status.is_empty())),
            "{name}: answered {status:?}, expected one of {statuses:?}"
        );
    }
    // A well-formed request on a fresh connection still works.
    assert_eq!(
        raw_exchange(&server, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await,
        "HTTP/1.1 200 OK"
    );
    by.finish(&server).await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_a_bad_request_not_413() {
    // read_json turns any error of `to_bytes(body, limit)` into 413 "request body over N bytes";
    // only a LengthLimitError means that. A broken chunked encoding is the client's malformed
    // request: 400 bad_request (the contract's REST errors), like malformed JSON.
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let req = format!(
        "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
    );
    let status = raw_exchange(&server, req.as_bytes()).await;
    assert!(status.starts_with("HTTP/1.1 400"), "a broken chunk size was answered {status:?}");
    by.finish(&server).await;
}

#[tokio::test]
async fn a_request_head_over_max_header_bytes_gets_431() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let limit = crier::MAX_HEADER_BYTES;
    let token = hostile_token(&server);
    // One huge header, on the WebSocket route and on the API.
    let big = "a".repeat(limit + 1024);
    for path in ["/ws", "/api/v1/info", "/healthz"] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\nX-Padding: {big}\r\n\r\n"
        );
        let status = raw_exchange(&server, req.as_bytes()).await;
        assert!(status.starts_with("HTTP/1.1 431"), "{path} with a {} byte head: {status:?}", req.len());
    }
    // A huge request line (e.g. a query string) and many small headers adding up.
    let req = format!("GET /ws?token={big} HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(raw_exchange(&server, req.as_bytes()).await.starts_with("HTTP/1.1 431"));
    let many: String = (0..400).map(|i| format!("X-H{i}: {}\r\n", "b".repeat(40))).collect();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert!(req.len() > limit);
    assert!(raw_exchange(&server, req.as_bytes()).await.starts_with("HTTP/1.1 431"));
    // More headers than hyper's header count limit, while the head stays small: refused too.
    let many: String = (0..120).map(|i| format!("X-{i}: 1\r\n")).collect();
    let req = format!("GET /healthz HTTP/1.1\r\nHost: x\r\n{many}\r\n");
    assert!(req.len() < limit);
    assert!(raw_exchange(&server, req.as_bytes()).await.starts_with("HTTP/1.1 431"));
    // Just under the bound: served.
    let req = format!(
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Padding: {}\r\n\r\n",
        "c".repeat(limit - 1024)
    );
    assert_eq!(raw_exchange(&server, req.as_bytes()).await, "HTTP/1.1 200 OK");
    by.finish(&server).await;
}

#[tokio::test]
async fn slowloris_is_cut_off_at_the_header_read_timeout() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let timeout = crier::HEADER_READ_TIMEOUT;
    let margin = Duration::from_secs(3);
    let request = upgrade_request(&server, &hostile_token(&server));
    // Several slow clients at once, each dribbling its request head a byte at a time at a pace
    // that would need far longer than the timeout to finish; plus one that connects and sends
    // only a partial request line.
    let mut lorises = Vec::new();
    for i in 0..8 {
        let addr = server.addr;
        let request = request.clone();
        lorises.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).await.unwrap();
            let (mut rd, mut wr) = s.split();
            let mut answer = Vec::new();
            let mut chunk = [0u8; 1024];
            let pace = Duration::from_millis(300 + 50 * i);
            let mut bytes = request.bytes();
            // Bounded: at most the request's length in writes, and the deadline below.
            let deadline = started + timeout + margin;
            loop {
                tokio::select! {
                    r = rd.read(&mut chunk) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&chunk[..n]),
                    },
                    _ = tokio::time::sleep(pace) => {
                        if let Some(b) = bytes.next() && wr.write_all(&[b]).await.is_err() {
                            break;
                        }
                    }
                    _ = tokio::time::sleep_until(deadline) => panic!("slowloris {i} still open after {:?}", timeout + margin),
                }
            }
            (started.elapsed(), String::from_utf8_lossy(&answer).into_owned())
        }));
    }
    for l in lorises {
        let (elapsed, answer) = l.await.unwrap();
        assert!(elapsed + Duration::from_secs(1) >= timeout, "cut off after {elapsed:?}, before the timeout");
        assert!(elapsed <= timeout + margin, "cut off only after {elapsed:?}");
        // hyper closes the connection; it may say 408 first.
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 408"), "answered {answer:?}");
    }
    by.finish(&server).await;
}

/// Every rejection is the JSON error shape, including the ones no handler writes (a method the
/// path does not take, an unknown path), and counted; the `Bearer` scheme is case-insensitive on
/// the REST API as on the handshake.
#[tokio::test]
async fn rest_rejections_are_json_and_the_bearer_scheme_is_case_insensitive() {
    let server = start(&[]).await;
    let http = reqwest::Client::new();
    let cases = [
        (reqwest::Method::GET, "/api/v1/publish", 405, "method_not_allowed", Some("POST")),
        (reqwest::Method::DELETE, "/api/v1/info", 405, "method_not_allowed", Some("GET")),
        (reqwest::Method::POST, "/ws", 405, "method_not_allowed", Some("GET")),
        (reqwest::Method::GET, "/api/v1/nothing-here", 404, "not_found", None),
        (reqwest::Method::GET, "/api/v1/channels/c/nothing", 404, "not_found", None),
    ];
    for (method, path, status, code, allow) in cases {
        let r = http.request(method.clone(), server.url(path)).bearer_auth(API_KEY).send().await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{method} {path}");
        let allowed = r.headers().get("allow").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let ctype = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
        assert!(ctype.starts_with("application/json"), "{method} {path}: content type {ctype:?}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], code, "{method} {path}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{method} {path}: a message: {body}");
        if let Some(want) = allow {
            assert!(allowed.as_deref().is_some_and(|a| a.contains(want)), "{method} {path}: Allow {allowed:?}");
        }
    }
    let metrics = http.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("crier_http_rejections_total{code=\"method_not_allowed\"} 3")),
        "405s counted:\n{metrics}"
    );
    for scheme in ["Bearer", "bearer", "BEARER", "BeArEr"] {
        let r = http
            .post(server.url("/api/v1/publish"))
            .header("authorization", format!("{scheme} {API_KEY}"))
            .json(&serde_json::json!({"channel": "c", "data": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "scheme {scheme}");
    }
    // The probes keep their plain text (their status is what counts).
    let r = http.get(server.url("/readyz")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "ready");
}
