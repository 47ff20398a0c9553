//! RFC 6455 edges against the real binary, over raw sockets: a `Sec-WebSocket-Key` that is not
//! the base64 of 16 bytes is refused (400, `bad_upgrade`, counted), and a client that breaks a
//! framing rule while still sending — a 4 MiB message against a 64 KiB limit — reads the close
//! code (1009) instead of a TCP reset: crier sends its close frame and reads on, dropping what
//! arrives, until the client's close. (The whole RFC is exercised by scripts/test-autobahn.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::Value;
use support::{Server, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

/// Sends an upgrade request with this key; the response head and what followed it.
async fn upgrade(server: &Server, token: &str, key: &str) -> (TcpStream, String, Vec<u8>) {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let mut buf = Vec::new();
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).into_owned();
            let rest = buf[i + 4..].to_vec();
            return (s, head, rest);
        }
        let mut chunk = [0u8; 4096];
        let n = timeout_at(deadline, s.read(&mut chunk)).await.expect("an answer in time").unwrap();
        assert!(n > 0, "closed before the response head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn a_key_that_is_not_the_base64_of_16_bytes_is_400_bad_upgrade() {
    let server = Server::start(&[]).await;
    let token = server.token("u1", &["c"], &[]);
    for key in
        ["x", "AAAAAAAAAAAAAAAAAAAA", "dGhlIHNhbXBsZSBub25jZQ", "AAAAAAAAAAAAAAAAAAAAAAAA", "not base64 at all!!!!==="]
    {
        let (mut s, head, mut body) = upgrade(&server, &token, key).await;
        assert!(head.starts_with("HTTP/1.1 400"), "{key:?}: {head}");
        // The JSON error shape: read the body to its Content-Length.
        let len: usize = head
            .lines()
            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
            .expect("a content-length");
        let deadline = Instant::now() + WAIT;
        while body.len() < len {
            let mut chunk = [0u8; 1024];
            let n = timeout_at(deadline, s.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0);
            body.extend_from_slice(&chunk[..n]);
        }
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "bad_upgrade", "{v}");
        assert!(v["message"].as_str().unwrap().contains("Sec-WebSocket-Key"), "{v}");
    }
    assert!(server.metric("crier_handshakes_total{result=\"bad_upgrade\"}").await >= 5.0);
    // A valid key still upgrades.
    let (_s, head, _) = upgrade(&server, &token, "dGhlIHNhbXBsZSBub25jZQ==").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
}

/// Reads server frames until a close frame; its code. Fails on a reset or the end of the stream
/// before one (the close code lost).
async fn read_close(s: &mut tokio::net::tcp::ReadHalf<'_>, mut buf: Vec<u8>) -> u16 {
    let deadline = Instant::now() + WAIT;
    loop {
        while buf.len() >= 2 {
            let (len, at) = match buf[1] & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize, 10),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if buf.len() < at + len {
                break;
            }
            if buf[0] & 0x0f == 0x8 {
                return u16::from_be_bytes([buf[at], buf[at + 1]]);
            }
            buf.drain(..at + len);
        }
        let mut chunk = [0u8; 65536];
        match timeout_at(deadline, s.read(&mut chunk)).await.expect("the close frame in time") {
            Ok(0) => panic!("the stream ended without a close frame"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("no close frame, the connection failed: {e}"),
        }
    }
}

#[tokio::test]
async fn a_client_still_sending_a_4_mib_message_reads_close_1009_not_a_reset() {
    let server = Server::start(&["--max-message-bytes", "65536"]).await;
    let token = server.token("u1", &["c"], &["c"]);
    for round in 0..3 {
        let (mut s, head, rest) = upgrade(&server, &token, "dGhlIHNhbXBsZSBub25jZQ==").await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let message = vec![b'x'; 4 << 20];
        let frame = crier_protocol::ws::encode_masked(0x81, &message, [1, 2, 3, 4]);
        let (mut r, mut w) = s.split();
        // Send the whole 4 MiB while reading: crier refuses it from the header and must keep
        // reading (and dropping) the rest, or the unread bytes reset the connection.
        let send = async {
            let sent = w.write_all(&frame).await;
            (sent, w)
        };
        let (code, (sent, mut w)) = tokio::join!(read_close(&mut r, rest), send);
        assert_eq!(code, 1009, "round {round}");
        assert!(sent.is_ok(), "round {round}: the whole message was taken: {sent:?}");
        // The client's close reply; crier then ends the connection cleanly (EOF, not a reset).
        w.write_all(&crier_protocol::ws::encode_masked(0x88, &1009u16.to_be_bytes(), [5, 6, 7, 8])).await.unwrap();
        let mut tail = Vec::new();
        let eof = timeout_at(Instant::now() + WAIT, r.read_to_end(&mut tail)).await.expect("crier closes in time");
        assert!(eof.is_ok(), "round {round}: closed cleanly, not reset: {eof:?}");
    }
    assert!(server.metric("crier_client_errors_total{code=\"message_too_large\"}").await >= 3.0);
}
