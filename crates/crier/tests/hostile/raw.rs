//! Raw WebSocket, by hand: frames built byte by byte (masked, any opcode, any flags) and a
//! connection on a raw TCP socket that parses the server's frames.

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use crate::support::{Server, WAIT};

pub(crate) const OP_CONT: u8 = 0x0;
pub(crate) const OP_TEXT: u8 = 0x1;
pub(crate) const OP_BINARY: u8 = 0x2;
pub(crate) const OP_CLOSE: u8 = 0x8;
pub(crate) const OP_PING: u8 = 0x9;
pub(crate) const OP_PONG: u8 = 0xA;

/// A client → server frame: masked, as clients must send, any opcode, FIN as given.
pub(crate) fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    crier_protocol::ws::encode_masked(if fin { 0x80 } else { 0 } | opcode, payload, [0x37, 0xfa, 0x21, 0x3d])
}

pub(crate) fn text(s: &str) -> Vec<u8> {
    frame(true, OP_TEXT, s.as_bytes())
}

/// The bytes of a WebSocket upgrade request for `token`.
pub(crate) fn upgrade_request(server: &Server, token: &str) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        server.addr
    )
}

/// A WebSocket connection on a raw TCP socket: writes whatever bytes a test wants, parses the
/// server's (unmasked) frames.
pub(crate) struct RawWs {
    s: TcpStream,
    buf: Vec<u8>,
}

#[derive(Debug)]
pub(crate) struct Frame {
    pub(crate) opcode: u8,
    pub(crate) payload: Vec<u8>,
}

impl RawWs {
    /// Upgrades and reads the welcome frame.
    pub(crate) async fn connect(server: &Server, token: &str) -> RawWs {
        RawWs::connect_with(server, token, &[]).await
    }

    /// Upgrades with `early` bytes sent in the same write as the request (before the 101), and
    /// reads the welcome frame.
    pub(crate) async fn connect_with(server: &Server, token: &str, early: &[u8]) -> RawWs {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(&[upgrade_request(server, token).as_bytes(), early].concat()).await.unwrap();
        let mut ws = RawWs { s, buf: Vec::new() };
        let deadline = Instant::now() + WAIT;
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(ws.fill(deadline).await, "the server closed during the handshake");
        };
        let head: Vec<u8> = ws.buf.drain(..end).collect();
        assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
        assert_eq!(ws.text().await["type"], "welcome");
        ws
    }

    /// Reads more bytes into the buffer; `false` on EOF or a socket error.
    async fn fill(&mut self, deadline: Instant) -> bool {
        let mut chunk = [0u8; 8192];
        match timeout_at(deadline, self.s.read(&mut chunk)).await.expect("the server answered within the deadline") {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) {
        // The server may already have closed (that is what some tests provoke): ignore errors.
        let _ = self.s.write_all(bytes).await;
    }

    /// The next server frame; `None` when the connection ended.
    pub(crate) async fn frame(&mut self) -> Option<Frame> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((f, used)) = parse_frame(&self.buf) {
                self.buf.drain(..used);
                return Some(f);
            }
            if !self.fill(deadline).await {
                return None;
            }
        }
    }

    /// The next text frame as JSON, skipping control frames; panics on close.
    pub(crate) async fn text(&mut self) -> Value {
        loop {
            match self.frame().await {
                Some(Frame { opcode: OP_TEXT, payload }) => return serde_json::from_slice(&payload).unwrap(),
                Some(Frame { opcode, payload }) if opcode >= OP_CLOSE => {
                    assert_ne!(opcode, OP_CLOSE, "closed unexpectedly: {payload:?}");
                }
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Sends a text frame and returns the next text frame that is not a `message`.
    pub(crate) async fn request(&mut self, s: &str) -> Value {
        self.send(&text(s)).await;
        loop {
            let v = self.text().await;
            if v["type"] != "message" {
                return v;
            }
        }
    }

    /// Proves the connection is alive and in sync: a ping frame gets its pong.
    pub(crate) async fn assert_alive(&mut self, id: u64) {
        let pong = self.request(&json!({"type":"ping","id":id}).to_string()).await;
        assert_eq!(pong, json!({"type":"pong","id":id}));
    }

    /// Reads until the close frame; its code, or `None` if the socket just ended.
    pub(crate) async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.frame().await {
                Some(Frame { opcode: OP_CLOSE, payload }) => {
                    return (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                }
                Some(_) => continue,
                None => return None,
            }
        }
    }
}

/// Parses one unmasked server frame from the front of `buf`: the frame and the bytes it used.
fn parse_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    let (b0, b1) = (*buf.first()?, *buf.get(1)?);
    assert_eq!(b1 & 0x80, 0, "the server never masks");
    let (len, mut at) = match b1 & 0x7f {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(at..at + len)?.to_vec();
    at += len;
    assert_ne!(b0 & 0x80, 0, "the server does not fragment");
    Some((Frame { opcode: b0 & 0x0f, payload }, at))
}

/// Sends `bytes` on a fresh TCP connection and reads whatever comes back until the server
/// closes. Returns the response's status line (empty if the server closed without answering).
pub(crate) async fn raw_exchange(server: &Server, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Err(_) => {
                panic!("the server neither answered nor closed within {WAIT:?}: {:?}", String::from_utf8_lossy(&got))
            }
        }
    }
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap_or_default().to_owned()
}
