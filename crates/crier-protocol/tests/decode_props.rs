//! Property tests of frame decoding: the bounded, always-on counterpart of the libFuzzer targets
//! in `fuzz/` (which run only through `scripts/fuzz`). Arbitrary text never panics the decoder;
//! what it accepts is safe to forward; `check_depth` agrees with the real nesting depth.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use crier_protocol::frames::{ClientFrame, MAX_DATA_DEPTH, check_depth, decode, encode_message};
use proptest::prelude::*;
use serde_json::Value;

/// Text that looks like frames often enough to reach past the JSON parser.
fn frameish() -> impl Strategy<Value = String> {
    let field = prop_oneof![
        Just(r#""type":"publish""#.to_owned()),
        Just(r#""type":"subscribe""#.to_owned()),
        Just(r#""type":"history""#.to_owned()),
        Just(r#""type":"refresh""#.to_owned()),
        "\"type\":\"[a-z]{0,10}\"",
        "\"id\":-?[0-9]{1,22}(\\.[0-9])?",
        "\"channel\":\"[a-z:*\\\\\" ]{0,12}\"",
        "\"data\":[\\[\\]{}\"0-9a:,]{0,40}",
        "\"limit\":-?[0-9]{1,22}",
        "\"recover\":\\{\"epoch\":\"[a-z]{0,3}\",\"offset\":-?[0-9]{1,22}\\}",
        "\"token\":\"[a-zA-Z0-9.]{0,20}\"",
        "\"[a-z]{1,5}\":[\\[\\]{}0-9,\"]{0,10}",
    ];
    prop::collection::vec(field, 0..6).prop_map(|fields| format!("{{{}}}", fields.join(",")))
}

/// JSON nested exactly `depth` levels (arrays and objects mixed as `kinds` says), with a string
/// full of brackets at the bottom that must not count.
fn nested() -> impl Strategy<Value = (String, usize)> {
    (0usize..100, prop::collection::vec(any::<bool>(), 100), "[\\[\\]{}\"\\\\a]{0,8}").prop_map(
        |(depth, kinds, leaf)| {
            let mut s = String::new();
            for k in &kinds[..depth] {
                s.push_str(if *k { "[" } else { "{\"k\":" });
            }
            s.push_str(&serde_json::to_string(&leaf).unwrap());
            for k in kinds[..depth].iter().rev() {
                s.push(if *k { ']' } else { '}' });
            }
            (s, depth)
        },
    )
}

fn depth_of(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth_of).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(depth_of).max().unwrap_or(0),
        _ => 0,
    }
}

/// What must hold for any input.
fn check_decode(text: &str) -> Result<(), TestCaseError> {
    match decode(text) {
        Ok(ClientFrame::Publish { channel, data, .. }) => {
            let parsed: Value = serde_json::from_str(data.get()).expect("data is valid JSON");
            prop_assert!(depth_of(&parsed) <= MAX_DATA_DEPTH);
            prop_assert!(check_depth(data.get()).is_ok());
            // The one place a message frame is built yields valid JSON carrying the same data.
            let frame = encode_message(&channel, "e1", u64::MAX, data.get());
            let v: Value = serde_json::from_slice(&frame).expect("message frame is JSON");
            prop_assert_eq!(&v["data"], &parsed);
            prop_assert_eq!(v["channel"].as_str(), Some(channel.as_ref()));
        }
        Ok(_) => {}
        Err(e) => prop_assert!(!e.message.is_empty() && e.message.len() <= 512, "{:?}", e.message),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn decoding_arbitrary_text_never_panics(text in any::<String>()) {
        check_decode(&text)?;
        let _ = check_depth(&text);
    }

    #[test]
    fn decoding_frame_like_text_never_panics(text in frameish()) {
        check_decode(&text)?;
    }

    #[test]
    fn check_depth_is_the_real_depth((json, depth) in nested()) {
        prop_assert_eq!(depth_of(&serde_json::from_str(&json).unwrap()), depth);
        prop_assert_eq!(check_depth(&json).is_ok(), depth <= MAX_DATA_DEPTH, "depth {}", depth);
        let frame = format!(r#"{{"type":"publish","id":3,"channel":"c","data":{json}}}"#);
        match decode(&frame) {
            Ok(ClientFrame::Publish { id, .. }) => prop_assert!(depth <= MAX_DATA_DEPTH && id == Some(3)),
            Err(e) => prop_assert!(depth > MAX_DATA_DEPTH && e.id == Some(3), "{:?}", e),
            Ok(other) => prop_assert!(false, "decoded as {:?}", other.kind()),
        }
    }
}

/// Error messages go back to the client in `error` frames. `decode` already cuts an unknown
/// `type` to 32 characters, but a serde_json error quotes the offending string whole, in Rust
/// debug form: a frame of `max_message_bytes` is echoed back in full, and a string of DEL
/// characters comes back six times larger (`\u{7f}`) — an amplifier (found by the
/// `frame_decode` fuzz target).
#[test]
fn error_messages_are_bounded() {
    let long = "x".repeat(60_000);
    for frame in [
        format!(r#"{{"type":"ping","id":"{long}"}}"#),
        format!(r#""{long}""#),
        format!(r#"{{"type":"subscribe","channel":"c","recover":"{long}"}}"#),
        format!(r#"{{"type":"history","channel":"c","limit":"{long}"}}"#),
        format!("\"{}\"", "\u{7f}".repeat(10_000)),
    ] {
        let e = decode(&frame).expect_err("refused");
        assert!(e.message.len() <= 256, "a {} byte error message for a {} byte frame", e.message.len(), frame.len());
    }
}

/// `data` is kept as a RawValue, which checks the JSON grammar only. A lone UTF-16 surrogate
/// escape (`"\ud800"`) or a number beyond f64 (`1e400`) is grammatical, but strict parsers —
/// serde_json among them — refuse the `message` frame built from it, so every Rust subscriber of
/// the channel fails on that message (found by the `frame_decode` fuzz target).
#[test]
fn data_that_serde_json_refuses_is_refused() {
    for data in [r#""\ud800""#, r#""\udc00""#, r#"["\ud800x"]"#, r#"{"k":"\ud83d\u0041"}"#, "1e400", "[-1e309]"] {
        assert!(serde_json::from_str::<Value>(data).is_err(), "serde_json refuses {data}");
        let frame = format!(r#"{{"type":"publish","id":1,"channel":"c","data":{data}}}"#);
        assert!(decode(&frame).is_err(), "accepted {data}");
    }
    // A proper surrogate pair and big-but-finite numbers are fine.
    for data in [r#""\ud83d\ude00""#, "1e308", "18446744073709551616"] {
        let frame = format!(r#"{{"type":"publish","id":1,"channel":"c","data":{data}}}"#);
        assert!(decode(&frame).is_ok(), "refused {data}");
    }
}

/// docs/protocol.md, "Frames": "`id` (optional) ... replies carry it". When any field of a
/// frame has the wrong type, the whole envelope fails to deserialize and the `bad_request`
/// reply has no `id`, although the frame's `id` was a fine integer: the client cannot tell which
/// request failed.
#[test]
fn errors_for_malformed_frames_carry_a_valid_id() {
    for (frame, id) in [
        (r#"{"type":"history","id":3,"channel":"c","limit":-1}"#, 3),
        (r#"{"type":"subscribe","id":2,"channel":"c","recover":{"epoch":"e","offset":"41"}}"#, 2),
        (r#"{"type":"subscribe","id":5,"channel":42}"#, 5),
        (r#"{"type":"refresh","id":7,"token":12345}"#, 7),
        (r#"{"type":42,"id":8}"#, 8),
    ] {
        let e = decode(frame).expect_err("refused");
        assert_eq!(e.id, Some(id), "{frame}: {e:?}");
    }
    // No usable id: none echoed.
    for frame in [r#"{"type":"ping","id":-1}"#, r#"{"type":"ping","id":1"#, r#"[1]"#] {
        assert_eq!(decode(frame).expect_err("refused").id, None, "{frame}");
    }
}
