//! The process as operators see it: configuration errors, --dev, heartbeats, slow consumers,
//! and the SIGTERM drain.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use crier_testkit::until;
use serde_json::{Value, json};
use support::{Server, WAIT};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn bad_configuration_is_reported_at_once_with_exit_64() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_crier"))
        .args(["--ping-interval", "soon", "--max-message-bytes", "lots", "--listen", "nowhere"])
        .env_remove("CRIER_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for setting in ["ping_interval", "max_message_bytes", "listen"] {
        assert!(err.contains(setting), "{setting} not reported in:\n{err}");
    }
    // No key and no --dev: refuses to start, saying why.
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_crier")).args(["--listen", "127.0.0.1:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dev"));
}

#[tokio::test]
async fn dev_mode_prints_a_working_token_and_serves_the_demo() {
    let server = Server::start_raw(&["--dev", "--listen", "127.0.0.1:0"], &[]).await.unwrap();
    // The dev banner (its curl line).
    let stdout = server.process.wait_stdout("curl").await;
    let token = stdout.lines().find_map(|l| l.trim().strip_prefix("token (24h): ")).unwrap().trim().to_owned();
    let curl = stdout.lines().find(|l| l.contains("curl")).unwrap();
    let key = curl.split("Bearer ").nth(1).and_then(|s| s.split('\'').next()).unwrap().to_owned();
    let page = reqwest::get(server.url("/")).await.unwrap().text().await.unwrap();
    assert!(page.contains("WebSocket") && page.contains(&token), "the demo page embeds the dev token");
    // A browser-like client (with an Origin) connects with the printed token.
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("origin", "http://localhost:1234".parse().unwrap());
    req.headers_mut().insert("sec-websocket-protocol", format!("crier.v1, crier.bearer.{token}").parse().unwrap());
    let mut c = support::Client::connect(req).await.unwrap();
    assert_eq!(c.recv().await["type"], "welcome");
    c.subscribe("chat:lobby", 1).await;
    let r = reqwest::Client::new()
        .post(server.url("/api/v1/publish"))
        .bearer_auth(&key)
        .json(&json!({"channel":"chat:lobby","data":{"text":"hello"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(c.recv().await["data"]["text"], "hello");
}

#[tokio::test]
async fn json_logs_never_contain_tokens() {
    let server = Server::start_raw(
        &["--dev", "--listen", "127.0.0.1:0"],
        &[("CRIER_LOG_FORMAT", "json"), ("RUST_LOG", "debug")],
    )
    .await
    .unwrap();
    let token = support::token_for("x", &[], &[], Duration::from_secs(60));
    let r = reqwest::get(format!("{}?token={token}", server.url("/ws"))).await.unwrap();
    // --dev has its own random secret: the token is refused, after the handler looked at it.
    assert_eq!(r.status(), 401);
    // Wait for that request's last log line (the access log's response line, written once the
    // handler returned): everything logged about the request is in the logs by then.
    let done = server
        .process
        .wait_log("the access log line of the GET /ws request", |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["fields"]["message"] == "finished processing request"
                    && v["span"]["path"] == "/ws"
                    && v["fields"]["status"] == 401
            })
        })
        .await;
    let logs = server.logs();
    assert!(logs.contains("crier started"), "{logs}");
    let first = logs.lines().next().unwrap();
    assert!(serde_json::from_str::<Value>(first).is_ok(), "JSON log line: {first}");
    assert!(!logs.contains(&token), "the token appeared in the logs (request logged as {done}):\n{logs}");
}

#[tokio::test]
async fn human_logs_into_a_pipe_carry_no_colour_codes() {
    // The test captures stderr through a pipe, as a log collector or `> file` would.
    let server = Server::start(&[]).await;
    let r = reqwest::get(format!("{}?token=not-a-token", server.url("/ws"))).await.unwrap();
    assert_eq!(r.status(), 401);
    server.process.wait_log("the refusal's log line", |l| l.contains("token")).await;
    let logs = server.logs();
    assert!(logs.contains("crier started"), "{logs}");
    assert!(!logs.contains('\u{1b}'), "ANSI escape codes in logs written to a pipe:\n{logs:?}");
}

/// A raw client that completes the handshake and then never reads or answers anything.
fn silent_client(server: &Server, token: &str) -> std::net::TcpStream {
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    write!(
        s,
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        server.addr
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

#[tokio::test]
async fn a_client_that_never_answers_pings_is_closed() {
    let server = Server::start(&["--ping-interval", "200ms", "--pong-timeout", "300ms"]).await;
    let token = server.token("quiet", &[], &[]);
    let silent = silent_client(&server, &token);
    // A normal client that keeps reading answers pings (tungstenite does) and survives.
    let alive = server.client(&token).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let alive = tokio::spawn(async move {
        let mut alive = alive;
        let mut stopped = stopped;
        loop {
            tokio::select! {
                m = futures_util::StreamExt::next(&mut alive.ws) => match m {
                    Some(Ok(tokio_tungstenite::tungstenite::Message::Close(_))) | Some(Err(_)) | None => return None,
                    Some(Ok(_)) => {}
                },
                _ = &mut stopped => return Some(alive),
            }
        }
    });
    server.wait_metric("crier_heartbeat_timeouts_total", 1.0).await;
    // The silent client's socket ends (after the close frame, if the socket took it).
    silent.set_read_timeout(Some(WAIT)).unwrap();
    let mut silent = silent;
    let ended = tokio::task::spawn_blocking(move || silent.read_to_end(&mut Vec::new()).is_ok());
    assert!(ended.await.unwrap(), "the server closed the silent connection");
    let _ = stop.send(());
    let mut alive = alive.await.unwrap().expect("the answering client was not closed");
    assert_eq!(alive.request(json!({"type":"ping"}), 1).await["type"], "pong");
}

#[tokio::test]
async fn a_client_that_never_reads_is_dropped_and_others_keep_receiving() {
    let server = Server::start(&["--client-queue-max-bytes", "131072"]).await;
    let token = server.token("reader", &["firehose"], &[]);
    let silent = silent_client(&server, &token);
    silent.set_nonblocking(true).unwrap();
    let mut s2 = silent.try_clone().unwrap();
    // Subscribe the silent client by writing a masked frame by hand.
    s2.set_nonblocking(false).unwrap();
    s2.write_all(&masked_text(r#"{"type":"subscribe","channel":"firehose","id":1}"#)).unwrap();
    let mut fast = server.client(&token).await;
    fast.subscribe("firehose", 1).await;
    // The reader that reads, concurrently: collects every offset until the last message.
    let reader = fast.offsets_until_last();
    let payload = "y".repeat(60_000);
    let mut sent = 0u64;
    until("the silent client to be dropped (crier_slow_consumers_total >= 1)", async || {
        if server.metric("crier_slow_consumers_total").await >= 1.0 {
            return true;
        }
        for _ in 0..10 {
            server.publish("firehose", json!(payload)).await;
            sent += 1;
        }
        false
    })
    .await;
    server.publish("firehose", json!("last")).await;
    sent += 1;
    let offsets = reader.await.unwrap();
    assert_eq!(offsets, (1..=sent).collect::<Vec<_>>(), "the reading subscriber got every message in order");
    drop(silent);
}

/// A client → server text frame (masked, as clients must send).
fn masked_text(text: &str) -> Vec<u8> {
    crier_protocol::ws::encode_masked(0x81, text.as_bytes(), [1, 2, 3, 4])
}

#[tokio::test]
async fn sigterm_drains_with_1012_and_exits_zero() {
    // Three clients closed evenly over 4.5s: the drain lasts 3s (closes at 0, 1.5s and 3s), and
    // the listener stays open that long (lib.rs, accept_loop), so the handshake below lands
    // well inside it.
    let mut server = Server::start(&["--shutdown-drain", "4500ms"]).await;
    let token = server.token("d", &[], &[]);
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(server.client(&token).await);
    }
    server.sigterm();
    until("readyz to turn 503", async || reqwest::get(server.url("/readyz")).await.is_ok_and(|r| r.status() == 503))
        .await;
    // A late handshake gets a clear 503 with the contract's JSON error body, not a refused or
    // reset connection.
    let mut req = server.ws_url().into_client_request().unwrap();
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    match support::Client::connect(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
            assert_eq!(r.status(), 503);
            // Retry-After tells a client without a load balancer to wait (plus its jitter).
            assert_eq!(r.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("1"), "{r:?}");
            let body: Value = serde_json::from_slice(r.body().as_deref().unwrap_or_default())
                .unwrap_or_else(|e| panic!("the 503 has a JSON body ({e}): {:?}", r.body()));
            assert_eq!(body["error"], "unavailable", "{body}");
            assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
        }
        Err(e) => panic!("a handshake during the drain must get HTTP 503, got {e}"),
        Ok(_) => panic!("an upgrade was accepted while draining"),
    }
    for c in &mut clients {
        assert_eq!(c.closed().await, Some(1012));
    }
    assert_eq!(server.wait_exit().await, Some(0));
}

#[tokio::test]
async fn a_client_close_is_answered_with_a_close_and_nothing_panics() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let server = Server::start(&[]).await;
    let token = server.token("closer", &["c"], &[]);
    for _ in 0..5 {
        let mut c = server.client(&token).await;
        c.subscribe("c", 1).await;
        let frame = CloseFrame { code: CloseCode::Normal, reason: "bye".into() };
        c.ws.send(tokio_tungstenite::tungstenite::Message::Close(Some(frame))).await.unwrap();
        let reply = c.ws.next().await;
        assert!(
            matches!(reply, Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(ref f)))) if f.code == CloseCode::Normal),
            "the server answers a close with a close: {reply:?}"
        );
    }
    // A connection the server closes (slow path: the writer ends first) must not panic either.
    let mut d = server.client(&token).await;
    server.post("/api/v1/disconnect", json!({"user":"closer"})).await;
    assert_eq!(d.closed().await, Some(4003));
    until("crier_connections to drop to 0", async || server.metric("crier_connections").await == 0.0).await;
    assert!(!server.logs().contains("panicked"), "a task panicked:\n{}", server.logs());
}

/// A key file that does not load (missing, unreadable, not PEM, a private key, an empty JWKS) is a
/// configuration error like any other: exit 64 with the setting named, before "crier listening".
#[tokio::test]
async fn key_files_that_do_not_load_exit_64_before_listening() {
    let dir = std::env::temp_dir().join(format!("crier-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_string_lossy().into_owned()
    };
    let keys = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");
    let cases: Vec<(&str, [String; 2])> = vec![
        ("a missing public key file", ["--jwt-public-key-file".into(), dir.join("nope.pem").to_string_lossy().into()]),
        ("a file that is not PEM", ["--jwt-public-key-file".into(), write("junk.pem", "not a key\n")]),
        ("a private key", ["--jwt-public-key-file".into(), format!("{keys}/rsa_private.pem")]),
        ("a directory", ["--jwt-public-key-file".into(), dir.to_string_lossy().into()]),
        ("an empty JWKS", ["--jwt-jwks-file".into(), write("empty.json", r#"{"keys":[]}"#)]),
        ("a JWKS that is not JSON", ["--jwt-jwks-file".into(), write("bad.json", "{")]),
        ("a missing JWKS file", ["--jwt-jwks-file".into(), dir.join("nope.json").to_string_lossy().into()]),
    ];
    for (what, [flag, value]) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_crier"))
            .args([flag.as_str(), value.as_str(), "--listen", "127.0.0.1:0"])
            .env_remove("CRIER_JWT_SECRET")
            .output()
            .unwrap();
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.code(), Some(64), "{what}: exit code; stderr:\n{stderr}");
        assert!(stderr.contains("invalid configuration"), "{what}: stderr says why:\n{stderr}");
        assert!(!stdout.contains("crier listening"), "{what}: reported before listening:\n{stdout}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `--dev` prints a full-access token: its banner says whether the network can reach it.
#[tokio::test]
async fn dev_banner_says_where_it_listens() {
    let server = Server::start_raw(&["--dev", "--listen", "127.0.0.1:0"], &[]).await.unwrap();
    let stdout = server.process.wait_stdout("curl").await;
    assert!(stdout.contains("this machine only"), "loopback is announced:\n{stdout}");
}
