//! WebSocket framing abuse: protocol errors (1002), control frames and closes, invalid UTF-8
//! (1007), binary frames, fragmentation and oversized messages (1009).

use serde_json::json;

use crate::bystander::Bystander;
use crate::raw::{OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWs, frame, text};
use crate::{hostile_token, start};

#[tokio::test]
async fn junk_after_the_upgrade_is_a_protocol_error_closed_with_1002() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let token = hostile_token(&server);
    let mut unmasked = vec![0x81u8, 0x05];
    unmasked.extend_from_slice(b"hello");
    let mut fragmented_then_new = frame(false, OP_TEXT, b"{\"type\":");
    fragmented_then_new.extend(text("{\"type\":\"ping\"}"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("0xff bytes (reserved bits and opcode)", vec![0xff; 32]),
        ("an HTTP request after the upgrade", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("an unmasked frame", unmasked),
        ("a reserved data opcode", frame(true, 0x3, b"x")),
        ("a reserved control opcode", frame(true, 0xb, b"x")),
        ("RSV1 without an extension", {
            let mut f = text("{\"type\":\"ping\"}");
            f[0] |= 0x40;
            f
        }),
        ("a continuation with nothing to continue", frame(true, OP_CONT, b"x")),
        ("a new message inside a fragmented one", fragmented_then_new),
        ("a fragmented ping", frame(false, OP_PING, b"x")),
        ("a ping over 125 bytes", frame(true, OP_PING, &[b'p'; 126])),
    ];
    for (name, bytes) in cases {
        let mut ws = RawWs::connect(&server, &token).await;
        ws.send(&bytes).await;
        assert_eq!(ws.close_code().await, Some(1002), "{name}");
    }
    by.finish(&server).await;
}

#[tokio::test]
async fn early_frames_pings_and_closes_are_answered_as_rfc_6455_says() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let token = hostile_token(&server);
    // A frame sent together with the upgrade request (the HTTP layer read it) is not lost.
    let mut ws = RawWs::connect_with(&server, &token, &text(r#"{"type":"ping","id":1}"#)).await;
    assert_eq!(ws.text().await, json!({"type":"pong","id":1}));
    // A WebSocket ping gets a pong with its payload.
    ws.send(&frame(true, OP_PING, b"are you there")).await;
    let f = ws.frame().await.expect("a pong");
    assert_eq!((f.opcode, f.payload.as_slice()), (OP_PONG, &b"are you there"[..]));
    ws.assert_alive(2).await;
    // The client's close is echoed with its code.
    ws.send(&frame(true, OP_CLOSE, &[&4321u16.to_be_bytes()[..], b"bye"].concat())).await;
    assert_eq!(ws.close_code().await, Some(4321));
    // Close codes that must not be sent (1005, 1006, 1015, 1004, 2999, 5000) and a one-byte close
    // payload are protocol errors.
    for bad in [
        vec![0x03u8, 0xED],
        vec![0x03, 0xEE],
        vec![0x03, 0xF7],
        vec![0x03, 0xEC],
        vec![0x0B, 0xB7],
        vec![0x13, 0x88],
        vec![3],
    ] {
        let mut ws = RawWs::connect(&server, &token).await;
        ws.send(&frame(true, OP_CLOSE, &bad)).await;
        assert_eq!(ws.close_code().await, Some(1002), "close payload {bad:?}");
    }
    by.finish(&server).await;
}

#[tokio::test]
async fn invalid_utf8_in_a_text_frame_closes_with_1007() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let token = hostile_token(&server);
    let ping = br#"{"type":"ping","id":1,"x":""#;
    let with = |bad: &[u8]| [&ping[..], bad, b"\"}"].concat();
    let mut split_bad = frame(false, OP_TEXT, &with(b"ok"));
    split_bad.extend(frame(true, OP_CONT, b"\xff\xfe"));
    let mut truncated = frame(false, OP_TEXT, br#"{"type":"ping","x":""#);
    truncated.extend(frame(true, OP_CONT, b"\xc3"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an invalid byte", frame(true, OP_TEXT, &with(b"\xff"))),
        ("a broken two-byte sequence", frame(true, OP_TEXT, &with(b"\xc3\x28"))),
        ("an overlong encoding of '/'", frame(true, OP_TEXT, &with(b"\xc0\xaf"))),
        ("a UTF-16 surrogate", frame(true, OP_TEXT, &with(b"\xed\xa0\x80"))),
        ("a code point above U+10FFFF", frame(true, OP_TEXT, &with(b"\xf4\x90\x80\x80"))),
        ("invalid bytes in a continuation frame", split_bad),
        ("a message ending mid-character", truncated),
    ];
    for (name, bytes) in cases {
        let mut ws = RawWs::connect(&server, &token).await;
        ws.send(&bytes).await;
        assert_eq!(ws.close_code().await, Some(1007), "{name}");
    }
    // A multi-byte character split across two fragments is valid UTF-8 and is accepted.
    let mut ws = RawWs::connect(&server, &token).await;
    let whole = r#"{"type":"ping","id":5,"note":"é"}"#.as_bytes();
    let cut = whole.iter().position(|&b| b == 0xc3).unwrap() + 1;
    ws.send(&frame(false, OP_TEXT, &whole[..cut])).await;
    ws.send(&frame(true, OP_CONT, &whole[cut..])).await;
    assert_eq!(ws.text().await, json!({"type":"pong","id":5}));
    by.finish(&server).await;
}

#[tokio::test]
async fn binary_frames_get_bad_request_and_the_connection_lives() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    let mut fragmented = frame(false, OP_BINARY, b"{\"type\":");
    fragmented.extend(frame(true, OP_CONT, b"\"ping\"}"));
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("an empty binary frame", frame(true, OP_BINARY, b"")),
        ("JSON in a binary frame is not executed", frame(true, OP_BINARY, br#"{"type":"ping","id":9}"#)),
        ("random bytes", frame(true, OP_BINARY, &[0, 159, 146, 150, 255, 0])),
        ("a large binary frame", frame(true, OP_BINARY, &vec![0xab; 60_000])),
        ("a fragmented binary message", fragmented),
    ];
    for (i, (name, bytes)) in cases.into_iter().enumerate() {
        ws.send(&bytes).await;
        let e = ws.text().await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_request")), "{name}: {e}");
        assert!(e.get("id").is_none(), "{name}: a binary frame has no id to echo: {e}");
        ws.assert_alive(100 + i as u64).await;
    }
    assert!(server.metric("crier_client_errors_total{code=\"bad_request\"}").await >= 5.0);
    by.finish(&server).await;
}

#[tokio::test]
async fn fragmented_messages_are_one_frame_and_oversized_ones_close_with_1009() {
    let server = start(&["--max-message-bytes", "1024"]).await;
    let by = Bystander::start(&server).await;
    let token = hostile_token(&server);
    let mut ws = RawWs::connect(&server, &token).await;
    // A ping split in three, with a control frame (allowed) between the fragments.
    let msg = br#"{"type":"ping","id":7}"#;
    ws.send(&frame(false, OP_TEXT, &msg[..5])).await;
    ws.send(&frame(false, OP_CONT, &msg[5..12])).await;
    ws.send(&frame(true, OP_PING, b"mid")).await;
    ws.send(&frame(true, OP_CONT, &msg[12..])).await;
    assert_eq!(ws.text().await, json!({"type":"pong","id":7}));
    // A publish in one-byte fragments (and one empty fragment): one ack, one message.
    let sub = ws.request(r#"{"type":"subscribe","id":1,"channel":"junk:frag"}"#).await;
    assert_eq!(sub["type"], "ack");
    let publish = br#"{"type":"publish","id":2,"channel":"junk:frag","data":{"text":"in pieces"}}"#;
    let mut bytes = frame(false, OP_TEXT, &publish[..1]);
    bytes.extend(frame(false, OP_CONT, b""));
    for (i, b) in publish[1..].iter().enumerate() {
        bytes.extend(frame(i + 2 == publish.len(), OP_CONT, &[*b]));
    }
    ws.send(&bytes).await;
    let (mut acked, mut delivered) = (false, false);
    while !(acked && delivered) {
        let f = ws.text().await;
        match f["type"].as_str() {
            Some("ack") => acked = f["id"] == 2 && f["offset"] == 1,
            Some("message") => delivered = f["data"]["text"] == "in pieces",
            _ => panic!("unexpected {f}"),
        }
    }
    ws.assert_alive(3).await;

    // Fragments each under max_message_bytes whose total is over it: 1009.
    let mut ws = RawWs::connect(&server, &token).await;
    let part = vec![b' '; 600];
    ws.send(&frame(false, OP_TEXT, br#"{"type":"ping","pad":""#)).await;
    ws.send(&frame(false, OP_CONT, &part)).await;
    ws.send(&frame(false, OP_CONT, &part)).await;
    ws.send(&frame(true, OP_CONT, b"\"}")).await;
    assert_eq!(ws.close_code().await, Some(1009), "fragmented total over max_message_bytes");
    // A frame header announcing an absurd length (2^63 - 1 bytes): 1009 at once, no allocation.
    let mut ws = RawWs::connect(&server, &token).await;
    let mut header = vec![0x81u8, 0x80 | 127];
    header.extend_from_slice(&(i64::MAX as u64).to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    ws.send(&header).await;
    assert_eq!(ws.close_code().await, Some(1009), "a 2^63 byte frame header");
    // A single frame just over the limit: 1009 (also covered in frames.rs, here on a raw socket).
    let mut ws = RawWs::connect(&server, &token).await;
    ws.send(&frame(true, OP_TEXT, &[b' '; 1025])).await;
    assert_eq!(ws.close_code().await, Some(1009));
    assert!(server.metric("crier_client_errors_total{code=\"message_too_large\"}").await >= 3.0);
    by.finish(&server).await;
}
