//! permessage-deflate (RFC 7692, `websocket_compression`) against the real binary: negotiation
//! with the offers real clients send and with bogus ones, compressed message frames (RSV1) that
//! inflate to the very JSON frames, small frames and replies uncompressed, compressed client
//! frames accepted, a deflate bomb refused with 1009 without disturbing anyone; the server window
//! (`server_max_window_bits` 8..=15) echoed and honoured (frames inflate with exactly that
//! window); and real clients: Python `websockets` (default offer, next to plain WebSocket and SSE
//! subscribers of the same channel, all receiving every message in order; and offering each
//! server window) and Node `ws` (default offer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use support::{Server, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

const DEFLATE_RESPONSE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// A client frame, masked; `rsv1` marks it compressed.
fn frame(opcode: u8, rsv1: bool, payload: &[u8]) -> Vec<u8> {
    crier_protocol::ws::encode_masked(0x80 | if rsv1 { 0x40 } else { 0 } | opcode, payload, [0x11, 0x22, 0x33, 0x44])
}

/// Raw deflate, tail stripped (what a permessage-deflate client sends).
fn compress(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.flush().unwrap();
    let mut out = e.finish().unwrap();
    // finish() adds a final empty block after the sync flush; a receiver ignores what follows
    // the sync marker's end, but strip to the marker as RFC 7692 senders do.
    if let Some(i) = out.windows(4).rposition(|w| w == [0, 0, 0xff, 0xff]) {
        out.truncate(i);
    }
    out
}

fn decompress(data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = flate2::read::DeflateDecoder::new(&input[..]);
    let mut out = Vec::new();
    // The stream has no final block: reading to its end reports an error after the data.
    let mut buf = [0u8; 8192];
    loop {
        match d.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    out
}

struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
    /// The 101's Sec-WebSocket-Extensions.
    extensions: Option<String>,
}

/// A server frame: (rsv1, opcode, payload).
type Frame = (bool, u8, Vec<u8>);

impl Raw {
    async fn connect(server: &Server, token: &str, extensions: Option<&str>) -> Raw {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        let ext = extensions.map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n")).unwrap_or_default();
        let req = format!(
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {token}\r\n{ext}\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Raw { s, buf: Vec::new(), extensions: None };
        let deadline = Instant::now() + WAIT;
        let end = loop {
            if let Some(i) = raw.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            raw.fill(deadline).await;
        };
        let head = String::from_utf8_lossy(&raw.buf[..end]).into_owned();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        raw.extensions = head.lines().find_map(|l| {
            l.to_ascii_lowercase().starts_with("sec-websocket-extensions:").then(|| l[25..].trim().to_owned())
        });
        raw.buf.drain(..end);
        let (rsv1, _, welcome) = raw.frame().await;
        assert!(!rsv1);
        assert_eq!(serde_json::from_slice::<Value>(&welcome).unwrap()["type"], "welcome");
        raw
    }

    async fn fill(&mut self, deadline: Instant) {
        let mut chunk = [0u8; 65536];
        let n = timeout_at(deadline, self.s.read(&mut chunk)).await.expect("data in time").unwrap();
        assert!(n > 0, "connection closed");
        self.buf.extend_from_slice(&chunk[..n]);
    }

    async fn frame(&mut self) -> Frame {
        let deadline = Instant::now() + WAIT;
        loop {
            if self.buf.len() >= 2 {
                let (b0, b1) = (self.buf[0], self.buf[1]);
                let (len, at) = match b1 & 0x7f {
                    126 if self.buf.len() >= 4 => (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4),
                    127 if self.buf.len() >= 10 => {
                        (u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= at + len {
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return (b0 & 0x40 != 0, b0 & 0x0f, payload);
                }
            }
            self.fill(deadline).await;
        }
    }

    /// The next data frame as JSON (inflated when compressed), skipping pings.
    async fn json(&mut self) -> (bool, Value) {
        loop {
            let (rsv1, op, payload) = self.frame().await;
            match op {
                0x9 | 0xA => continue,
                0x1 => {
                    let bytes = if rsv1 { decompress(&payload) } else { payload };
                    return (rsv1, serde_json::from_slice(&bytes).unwrap());
                }
                other => panic!("unexpected opcode {other}: {payload:?}"),
            }
        }
    }

    async fn send(&mut self, v: &Value, compressed: bool) {
        let text = v.to_string();
        let f =
            if compressed { frame(0x1, true, &compress(text.as_bytes())) } else { frame(0x1, false, text.as_bytes()) };
        self.s.write_all(&f).await.unwrap();
    }

    /// The close frame's code.
    async fn close_code(&mut self) -> u16 {
        loop {
            let (_, op, payload) = self.frame().await;
            if op == 0x8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }
}

#[tokio::test]
async fn negotiates_compresses_big_frames_and_inflates_client_frames() {
    let server = Server::start(&["--websocket-compression", "--max-message-bytes", "65536"]).await;
    let token = server.token("u1", &["c"], &["c"]);
    let mut z = Raw::connect(&server, &token, Some("permessage-deflate; client_max_window_bits")).await;
    assert_eq!(z.extensions.as_deref(), Some(DEFLATE_RESPONSE));
    let mut plain = server.client(&token).await;
    plain.subscribe("c", 1).await;
    z.send(&json!({"type":"subscribe","id":1,"channel":"c"}), false).await;
    let (rsv1, ack) = z.json().await;
    assert_eq!(ack["type"], "ack");
    assert!(!rsv1, "replies go uncompressed");

    let big = json!({"items": (0..40).map(|i| json!({"id": i, "name": format!("item {i}"), "tags": ["a", "b"]})).collect::<Vec<_>>()});
    server.publish("c", big.clone()).await;
    server.publish("c", json!("small")).await;
    let (rsv1, m) = z.json().await;
    assert!(rsv1, "a frame over websocket_compression_min_bytes is compressed");
    assert_eq!(m, plain.recv_type("message").await, "it inflates to the very JSON frame");
    assert_eq!(m["data"], big);
    let (rsv1, m) = z.json().await;
    assert!(!rsv1, "a frame under websocket_compression_min_bytes is not");
    assert_eq!(m["data"], "small");

    // A compressed client frame (publish), then a plain one.
    let payload = json!({"text": "x".repeat(2000)});
    z.send(&json!({"type":"publish","id":2,"channel":"c","data":payload}), true).await;
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(z.json().await.1);
    }
    assert!(got.iter().any(|v| v["type"] == "ack" && v["id"] == 2), "{got:?}");
    assert!(got.iter().any(|v| v["type"] == "message" && v["data"] == payload));
    z.send(&json!({"type":"ping","id":3}), false).await;
    assert_eq!(z.json().await.1, json!({"type":"pong","id":3}));
}

#[tokio::test]
async fn a_deflate_bomb_is_1009_and_disturbs_nobody() {
    let server = Server::start(&["--websocket-compression", "--max-message-bytes", "65536"]).await;
    let token = server.token("u1", &["c"], &["c"]);
    let mut bystander = server.client(&token).await;
    bystander.subscribe("c", 1).await;
    let mut z = Raw::connect(&server, &token, Some("permessage-deflate")).await;
    // 64 MiB of one JSON string inflating from a few dozen KiB: refused at 64 KiB inflated.
    let mut bomb = br#"{"type":"publish","channel":"c","data":""#.to_vec();
    bomb.extend(std::iter::repeat_n(b'A', 64 << 20));
    bomb.extend_from_slice(br#""}"#);
    let compressed = compress(&bomb);
    assert!(compressed.len() < 65536, "the bomb fits under the frame bound: {}", compressed.len());
    let f = frame(0x1, true, &compressed);
    z.s.write_all(&f).await.unwrap();
    assert_eq!(z.close_code().await, 1009);
    assert!(server.metric("crier_client_errors_total{code=\"message_too_large\"}").await >= 1.0);
    server.publish("c", json!("still fine")).await;
    assert_eq!(bystander.recv_type("message").await["data"], "still fine");
    // Corrupt compressed data: 1002.
    let mut z = Raw::connect(&server, &token, Some("permessage-deflate")).await;
    z.s.write_all(&frame(0x1, true, &[0xff, 0xff, 0xff, 0xff])).await.unwrap();
    assert_eq!(z.close_code().await, 1002);
}

#[tokio::test]
async fn bogus_offers_and_compression_off_go_uncompressed() {
    let on = Server::start(&["--websocket-compression"]).await;
    let token = on.token("u1", &["c"], &[]);
    for bogus in [
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; unknown_param",
        "permessage-deflate; client_max_window_bits=99",
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "x-webkit-deflate-frame",
    ] {
        let mut z = Raw::connect(&on, &token, Some(bogus)).await;
        assert_eq!(z.extensions, None, "{bogus} declined");
        // Without the extension, RSV1 is a protocol error.
        z.s.write_all(&frame(0x1, true, &compress(b"{\"type\":\"ping\"}"))).await.unwrap();
        assert_eq!(z.close_code().await, 1002, "{bogus}");
    }
    let off = Server::start(&[]).await;
    let token = off.token("u1", &["c"], &[]);
    let mut z = Raw::connect(&off, &token, Some("permessage-deflate; client_max_window_bits")).await;
    assert_eq!(z.extensions, None, "websocket_compression is off by default");
    z.send(&json!({"type":"subscribe","id":1,"channel":"c"}), false).await;
    z.json().await;
    off.publish("c", json!("x".repeat(1000))).await;
    assert!(!z.json().await.0);
}

/// The Python interpreter with `websockets` (scripts/test makes target/test-venv), or
/// `CRIER_TEST_PYTHON`.
fn python() -> String {
    if let Ok(p) = std::env::var("CRIER_TEST_PYTHON") {
        return p;
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/test-venv/bin/python3");
    assert!(
        std::path::Path::new(venv).exists(),
        "Python websockets is needed: run scripts/test (it creates target/test-venv) or set CRIER_TEST_PYTHON"
    );
    venv.to_owned()
}

#[tokio::test]
async fn python_websockets_with_compression_gets_every_message_next_to_plain_and_sse_subscribers() {
    let server = Server::start(&["--websocket-compression"]).await;
    let token = server.token("u1", &["feed"], &["feed"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/ws_deflate.py");
    let mut child = Command::new(python())
        .args([script, &server.ws_url(), &token, "feed"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    // The script's stdout lines, as they come.
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut stderr = child.stderr.take().unwrap();
    let mut next_line = async || -> Value {
        let line = tokio::time::timeout(WAIT, lines.recv()).await.expect("python answers in time");
        let line = line.unwrap_or_else(|| {
            let mut err = String::new();
            let _ = stderr.read_to_string(&mut err);
            panic!("python ended: {err}")
        });
        serde_json::from_str(&line).unwrap_or_else(|_| panic!("python said {line:?}"))
    };
    let hello = next_line().await;
    assert_eq!(hello["extensions"], json!(["permessage-deflate"]), "{hello}");

    let mut plain = server.client(&token).await;
    plain.subscribe("feed", 1).await;
    let plain_task = plain.offsets_until_last();
    let sse = server.http.get(server.url(&format!("/sse?channel=feed&token={token}"))).send().await.unwrap();
    crier_testkit::until("every subscriber is in", async || server.metric("crier_subscriptions").await == 3.0).await;
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(next_line().await["ack"], 1, "python's compressed publish was accepted");
    for i in 0..59 {
        // ~1 KiB JSON payloads.
        let data = json!({"seq": i, "text": "lorem ipsum dolor sit amet ".repeat(35), "tags": ["a", "b", "c"]});
        server.publish("feed", data).await;
    }
    server.publish("feed", json!("last")).await;
    let result = next_line().await;
    let want: Vec<u64> = (1..=61).collect();
    let offsets: Vec<u64> = result["offsets"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap()).collect();
    assert_eq!(offsets, want, "python got every message in order");
    assert!(tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap().success());
    let plain_offsets = tokio::time::timeout(WAIT, plain_task).await.unwrap().unwrap();
    assert_eq!(plain_offsets, want, "the plain WebSocket subscriber too");
    let body = tokio::time::timeout(WAIT, async {
        let mut sse = sse;
        let mut text = String::new();
        while !text.contains("\"data\":\"last\"") {
            let chunk = sse.chunk().await.unwrap().expect("stream open");
            text.push_str(&String::from_utf8_lossy(&chunk));
        }
        text
    })
    .await
    .unwrap();
    let sse_offsets: Vec<u64> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter(|v| v["type"] == "message")
        .map(|v| v["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(sse_offsets, want, "the SSE subscriber too");
}

/// Letters whose repeats lie ~8 KB apart inside one JSON frame: a window under 8 KiB cannot
/// refer back to them, so a frame compressed for a larger window does not inflate with a small one.
fn far_repeats(seed: u32) -> Value {
    let mut x = seed | 1;
    let block: String = (0..8000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    json!({"a": block, "b": block, "c": format!("{}{}", &block[..300], block)})
}

/// Inflates each (window bits, compressed message) with Python's zlib, strictly within that
/// window (tests/clients/inflate_strict.py): the inflated bytes, or the zlib error.
fn inflate_strict(items: &[(u8, Vec<u8>)]) -> Vec<Result<Vec<u8>, String>> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/inflate_strict.py");
    let mut child =
        Command::new(python()).arg(script).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("python runs");
    let mut input = String::new();
    for (bits, z) in items {
        input.push_str(&format!("{bits} {}\n", z.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    }
    // Written from a thread while the output is read: both exceed a pipe's buffer.
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("error: ") {
            Some(e) => Err(e.to_owned()),
            None => Ok((0..l.len()).step_by(2).map(|i| u8::from_str_radix(&l[i..i + 2], 16).unwrap()).collect()),
        })
        .collect()
}

#[tokio::test]
async fn server_max_window_bits_is_echoed_and_frames_inflate_with_exactly_that_window() {
    let server = Server::start(&["--websocket-compression"]).await;
    let token = server.token("u1", &["c"], &["c"]);
    let mut plain = server.client(&token).await;
    plain.subscribe("c", 1).await;
    let mut subscribers = Vec::new();
    for bits in 8..=15u8 {
        // Offers as Firefox / websockets / Autobahn write them; the window is always echoed.
        let offer = format!("permessage-deflate; client_max_window_bits; server_max_window_bits={bits}");
        let mut z = Raw::connect(&server, &token, Some(&offer)).await;
        assert_eq!(
            z.extensions.as_deref(),
            Some(format!("{DEFLATE_RESPONSE}; server_max_window_bits={bits}").as_str()),
            "{offer}"
        );
        z.send(&json!({"type":"subscribe","id":1,"channel":"c"}), false).await;
        assert_eq!(z.json().await.1["type"], "ack");
        subscribers.push((bits, z));
    }
    // Without server_max_window_bits: the full window, nothing echoed.
    let mut full = Raw::connect(&server, &token, Some("permessage-deflate")).await;
    assert_eq!(full.extensions.as_deref(), Some(DEFLATE_RESPONSE));
    full.send(&json!({"type":"subscribe","id":1,"channel":"c"}), false).await;
    full.json().await;

    server.publish("c", far_repeats(7)).await;
    let want = serde_json::to_vec(&plain.recv_type("message").await).unwrap();
    let mut items = Vec::new();
    for (bits, z) in &mut subscribers {
        let (rsv1, op, payload) = z.frame().await;
        assert!(rsv1 && op == 0x1, "{bits} bits: a compressed text frame");
        items.push((*bits, payload));
    }
    let (rsv1, _, payload) = full.frame().await;
    assert!(rsv1);
    // The control: the 32 KiB-window frame does not inflate within 512 bytes (so the check bites).
    items.push((9, payload.clone()));
    items.push((15, payload));
    let results = inflate_strict(&items);
    assert_eq!(results.len(), items.len());
    for ((bits, _), result) in items.iter().zip(&results).take(8) {
        let got = result.as_ref().unwrap_or_else(|e| panic!("{bits} bits: {e}"));
        assert_eq!(serde_json::from_slice::<Value>(got).unwrap(), serde_json::from_slice::<Value>(&want).unwrap());
    }
    assert!(results[8].is_err(), "a 15-bit frame fails a 9-bit window: {:?}", results[8].as_ref().map(|v| v.len()));
    assert!(results[9].is_ok());
    // Smaller windows compress less: the 8 and 9 bit frames are the same bytes (8 is served by 9).
    assert_eq!(items[0].1, items[1].1);
    assert!(items[1].1.len() > items[7].1.len());
}

#[tokio::test]
async fn python_websockets_offering_server_max_window_bits_gets_it_echoed_and_round_trips() {
    let server = Server::start(&["--websocket-compression"]).await;
    let token = server.token("u1", &["w"], &["w"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/ws_deflate_windows.py");
    let bits: Vec<String> = (8..=15).map(|b: u8| b.to_string()).collect();
    let out = tokio::task::spawn_blocking({
        let (url, token) = (server.ws_url(), token.clone());
        move || Command::new(python()).arg(script).args([&url, &token, "w"]).args(&bits).output().expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    for (line, bits) in lines.iter().zip(8..=15) {
        assert_eq!(line["bits"], bits);
        assert_eq!(line["extensions"], json!(["permessage-deflate"]), "{line}");
        assert_eq!(line["remote_max_window_bits"], bits, "websockets inflates with the window echoed: {line}");
        assert_eq!(line["same"], true, "{line}");
    }
}

#[tokio::test]
async fn node_ws_with_its_default_offer_negotiates_and_round_trips() {
    let ws = concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/js/node_modules/ws/index.js");
    assert!(std::path::Path::new(ws).exists(), "Node ws is needed: run scripts/test (or `cd clients/js && npm ci`)");
    let server = Server::start(&["--websocket-compression"]).await;
    let token = server.token("u1", &["n"], &["n"]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients/ws_node_deflate.mjs");
    let out = tokio::task::spawn_blocking({
        let (url, token) = (server.ws_url(), token.clone());
        move || Command::new("node").args([script, ws, &url, &token, "n"]).output().expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let line: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| panic!("node said {stdout:?}"));
    assert_eq!(line["header"], DEFLATE_RESPONSE, "{line}");
    assert_eq!(line["extensions"], "permessage-deflate", "ws accepted crier's answer to its offer: {line}");
    assert_eq!(line["same"], true, "{line}");
}

/// Recovered messages take the same form as live ones: compressed over the minimum size
/// (docs/protocol.md: every message frame over the minimum is compressed).
#[tokio::test]
async fn recovered_messages_are_compressed_like_live_ones() {
    let server = Server::start(&["--websocket-compression", "--max-message-bytes", "65536"]).await;
    let token = server.token("u1", &["c"], &["c"]);
    let big = |i: u64| json!({"i": i, "items": (0..40).map(|j| json!({"id": j, "name": format!("item {j}")})).collect::<Vec<_>>()});
    let first = server.publish("c", big(1)).await;
    let epoch = first["epoch"].as_str().unwrap().to_owned();
    server.publish("c", big(2)).await;
    server.publish("c", json!("small")).await;
    let mut z = Raw::connect(&server, &token, Some("permessage-deflate")).await;
    z.send(&json!({"type":"subscribe","id":1,"channel":"c","recover":{"epoch":epoch,"offset":0}}), false).await;
    let (rsv1, ack) = z.json().await;
    assert_eq!((ack["type"].as_str(), ack["recovered"].as_bool(), rsv1), (Some("ack"), Some(true), false), "{ack}");
    for i in 1..=2 {
        let (rsv1, m) = z.json().await;
        assert_eq!((m["type"].as_str(), m["offset"].as_u64()), (Some("message"), Some(i)), "{m}");
        assert!(rsv1, "recovered message {i} is compressed");
        assert_eq!(m["data"], big(i));
    }
    let (rsv1, m) = z.json().await;
    assert_eq!((m["offset"].as_u64(), rsv1), (Some(3), false), "under the minimum: plain, recovered or not");
    // And live after the replay, as before.
    server.publish("c", big(4)).await;
    let (rsv1, m) = z.json().await;
    assert_eq!((m["offset"].as_u64(), rsv1), (Some(4), true));
}
