//! JSON abuse: every case gets a precise answer and the connection lives.

use serde_json::{Value, json};

use crate::bystander::Bystander;
use crate::raw::RawWs;
use crate::support::API_KEY;
use crate::{hostile_token, start};

/// What a frame must be answered with.
enum Want {
    /// A reply of this `type` (and, for `error`, this code); `id` echoed as given.
    Reply(&'static str, Option<Value>),
    Error(&'static str, Option<Value>),
    /// `bad_request` for a frame that does not decode; its `id` is not checked here (a valid one
    /// is carried: `errors_for_malformed_frames_carry_a_valid_id` in
    /// crates/crier-protocol/tests/decode_props.rs).
    Malformed,
}

async fn check_replies(ws: &mut RawWs, cases: Vec<(String, Want)>) {
    for (i, (frame_text, want)) in cases.into_iter().enumerate() {
        let r = ws.request(&frame_text).await;
        let shown = if frame_text.len() > 200 { format!("{}…", &frame_text[..200]) } else { frame_text.clone() };
        match want {
            Want::Reply(ty, id) => {
                assert_eq!(r["type"], ty, "{shown} -> {r}");
                assert_eq!(r.get("id"), id.as_ref(), "{shown} -> {r}");
            }
            Want::Malformed => {
                assert_eq!(
                    (r["type"].as_str(), r["code"].as_str()),
                    (Some("error"), Some("bad_request")),
                    "{shown} -> {r}"
                );
            }
            Want::Error(code, id) => {
                assert_eq!((r["type"].as_str(), r["code"].as_str()), (Some("error"), Some(code)), "{shown} -> {r}");
                assert_eq!(r.get("id"), id.as_ref(), "{shown} -> {r}");
                assert!(r["message"].as_str().is_some_and(|m| !m.is_empty() && m.len() < 300), "{shown} -> {r}");
            }
        }
        ws.assert_alive(10_000 + i as u64).await;
    }
}

#[tokio::test]
async fn deeply_nested_json_is_refused_with_bad_request() {
    let server = start(&["--max-message-bytes", "262144"]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    let publish = |data: String| format!(r#"{{"type":"publish","id":1,"channel":"junk:deep","data":{data}}}"#);
    let arrays = |n: usize| "[".repeat(n) + &"]".repeat(n);
    let objects = |n: usize| "{\"a\":".repeat(n) + "1" + &"}".repeat(n);
    let mixed = |n: usize| {
        (0..n).map(|i| if i % 2 == 0 { "[" } else { "{\"k\":" }).collect::<String>()
            + "0"
            + &(0..n).rev().map(|i| if i % 2 == 0 { "]" } else { "}" }).collect::<String>()
    };
    let one = || Some(json!(1));
    let cases = vec![
        (publish(arrays(64)), Want::Reply("ack", one())),
        (publish(objects(64)), Want::Reply("ack", one())),
        (publish(arrays(65)), Want::Error("bad_request", one())),
        (publish(objects(65)), Want::Error("bad_request", one())),
        (publish(mixed(65)), Want::Error("bad_request", one())),
        (publish(arrays(100_000)), Want::Error("bad_request", one())),
        (publish(objects(20_000)), Want::Error("bad_request", one())),
        // Brackets inside strings are not nesting.
        (publish(format!("\"{}\"", "[{".repeat(10_000))), Want::Reply("ack", one())),
        (publish(format!("[\"\\\"{}\"]", "[".repeat(1000))), Want::Reply("ack", one())),
        // Nesting outside `data`: in an unknown field, in `recover`, at the top level.
        // An unknown field is skipped without recursion, however deep (and never forwarded).
        (format!(r#"{{"type":"ping","id":1,"junk":{}}}"#, arrays(10_000)), Want::Reply("pong", one())),
        (
            format!(r#"{{"type":"subscribe","id":1,"channel":"junk:x","recover":{}}}"#, objects(10_000)),
            Want::Error("bad_request", one()),
        ),
        (arrays(50_000), Want::Error("bad_request", None)),
        // Unbalanced.
        (publish("[".repeat(1000)), Want::Error("bad_request", None)),
    ];
    check_replies(&mut ws, cases).await;
    by.finish(&server).await;
}

#[tokio::test]
async fn unknown_fields_are_ignored() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    let cases = vec![
        (
            r#"{"type":"ping","id":1,"extra":true,"nested":{"a":[1,{"b":null}]},"__proto__":{"x":1}}"#.into(),
            Want::Reply("pong", Some(json!(1))),
        ),
        (r#"{"Type":"subscribe","TYPE":"x","type":"ping","id":2}"#.into(), Want::Reply("pong", Some(json!(2)))),
        (
            r#"{"type":"subscribe","id":3,"channel":"junk:u","priority":"high","recover_from":7}"#.into(),
            Want::Reply("ack", Some(json!(3))),
        ),
        (
            r#"{"type":"publish","id":4,"channel":"junk:u","data":{"t":1},"meta":{"trace":"abc"},"ttl":-1}"#.into(),
            Want::Reply("ack", Some(json!(4))),
        ),
        (
            r#"{"type":"history","id":5,"channel":"junk:u","limit":10,"order":"desc"}"#.into(),
            Want::Reply("history", Some(json!(5))),
        ),
        (
            r#"{"type":"presence","id":6,"channel":"junk:u","verbose":[1,2,3]}"#.into(),
            Want::Reply("presence", Some(json!(6))),
        ),
        (r#"{"type":"unsubscribe","id":7,"channel":"junk:u","force":true}"#.into(), Want::Reply("ack", Some(json!(7)))),
        // A field whose name is a known one with a different case is unknown, hence ignored.
        (r#"{"type":"ping","ID":"not-a-number","id":8}"#.into(), Want::Reply("pong", Some(json!(8)))),
        // Known fields that do not belong to the frame type are ignored too...
        (
            r#"{"type":"ping","id":9,"channel":"bad channel","data":{"x":[]},"limit":3}"#.into(),
            Want::Reply("pong", Some(json!(9))),
        ),
        // ...but their types are still checked: a malformed frame is refused whole.
        (r#"{"type":"ping","id":10,"token":5}"#.into(), Want::Error("bad_request", Some(json!(10)))),
    ];
    check_replies(&mut ws, cases).await;
    // The publish above went through: its message was delivered to the subscriber (us, before
    // the unsubscribe); the bystander's channel is untouched.
    by.finish(&server).await;
}

#[tokio::test]
async fn absurd_numbers_and_wrong_types_get_precise_errors() {
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    let ping = |id: &str| format!(r#"{{"type":"ping","id":{id}}}"#);
    let recover = |offset: &str| {
        format!(r#"{{"type":"subscribe","id":2,"channel":"junk:n","recover":{{"epoch":"e","offset":{offset}}}}}"#)
    };
    let history = |limit: &str| format!(r#"{{"type":"history","id":3,"channel":"junk:n","limit":{limit}}}"#);
    let since = |offset: &str| {
        format!(r#"{{"type":"history","id":4,"channel":"junk:n","since":{{"epoch":"e","offset":{offset}}}}}"#)
    };
    let bad = || Want::Malformed;
    let mut cases = vec![
        (ping("18446744073709551615"), Want::Reply("pong", Some(json!(u64::MAX)))),
        (ping("0"), Want::Reply("pong", Some(json!(0)))),
        (ping("null"), Want::Reply("pong", None)),
        (ping("18446744073709551616"), bad()),
        (ping("99999999999999999999999999999999999999"), bad()),
        (ping("-1"), bad()),
        (ping("1.5"), bad()),
        (ping("1e3"), bad()),
        (ping("1e400"), bad()),
        (ping("-0"), bad()),
        (ping("\"1\""), bad()),
        (ping("true"), bad()),
        (ping("[1]"), bad()),
        (ping("{\"id\":1}"), bad()),
        // Subscribe with an absurd recovery position: an ack that says recovery failed.
        (recover("-1"), bad()),
        (recover("\"41\""), bad()),
        (recover("1e999"), bad()),
        (r#"{"type":"subscribe","id":2,"channel":"junk:n","recover":"yesterday"}"#.into(), bad()),
        (r#"{"type":"subscribe","id":2,"channel":"junk:n","recover":{"epoch":7,"offset":1}}"#.into(), bad()),
        (r#"{"type":"subscribe","id":2,"channel":"junk:n","recover":{"offset":1}}"#.into(), bad()),
        (recover("18446744073709551615"), Want::Reply("ack", Some(json!(2)))),
        // History limits and positions.
        (history("18446744073709551615"), Want::Reply("history", Some(json!(3)))),
        (history("0"), Want::Reply("history", Some(json!(3)))),
        (history("-1"), bad()),
        (history("2.5"), bad()),
        (history("\"10\""), bad()),
        (history("1e400"), bad()),
        (history("18446744073709551616"), bad()),
        (since("18446744073709551615"), Want::Reply("history", Some(json!(4)))),
        (since("-5"), bad()),
        // Wrong types and shapes for the rest.
        (r#"{"type":"subscribe","id":5,"channel":42}"#.into(), bad()),
        (r#"{"type":"subscribe","id":5,"channel":null}"#.into(), Want::Error("bad_request", Some(json!(5)))),
        (r#"{"type":"subscribe","id":5,"channel":["junk:a"]}"#.into(), bad()),
        (r#"{"type":"subscribe","id":5,"channel":""}"#.into(), Want::Error("invalid_channel", Some(json!(5)))),
        (
            format!(r#"{{"type":"subscribe","id":5,"channel":"junk:{}"}}"#, "x".repeat(300)),
            Want::Error("invalid_channel", Some(json!(5))),
        ),
        (
            r#"{"type":"subscribe","id":5,"channel":"junk:\u0000"}"#.into(),
            Want::Error("invalid_channel", Some(json!(5))),
        ),
        (r#"{"type":"subscribe","id":5,"channel":"junk:é"}"#.into(), Want::Error("invalid_channel", Some(json!(5)))),
        (r#"{"type":"subscribe","id":5,"channel":"junk:\ud800"}"#.into(), bad()),
        (r#"{"type":"publish","id":6,"channel":"junk:n"}"#.into(), Want::Error("bad_request", Some(json!(6)))),
        (r#"{"type":"refresh","id":7,"token":12345}"#.into(), bad()),
        (r#"{"type":42,"id":8}"#.into(), bad()),
        (r#"{"type":null,"id":8}"#.into(), Want::Error("bad_request", Some(json!(8)))),
        (r#"{"type":"PING","id":8}"#.into(), Want::Error("unknown_type", Some(json!(8)))),
        (format!(r#"{{"type":"{}","id":8}}"#, "x".repeat(10_000)), Want::Error("unknown_type", Some(json!(8)))),
        (r#"{"type":"ping","id":9,"id":10}"#.into(), bad()),
    ];
    // Not an object at all.
    for top in ["[]", "1", "\"ping\"", "null", "", " ", "{", "}", "{\"type\":\"ping\"", "\u{feff}{\"type\":\"ping\"}"] {
        cases.push((top.to_owned(), bad()));
    }
    check_replies(&mut ws, cases).await;
    by.finish(&server).await;
}

#[tokio::test]
async fn data_that_serde_json_refuses_is_refused() {
    // `data` is checked as JSON grammar only (RawValue). "\ud800" and 1e400 are grammatical,
    // but strict parsers (serde_json: the Rust client, this harness) refuse the whole message
    // frame: one publisher can poison a channel for such subscribers.
    let server = start(&[]).await;
    let by = Bystander::start(&server).await;
    let mut ws = RawWs::connect(&server, &hostile_token(&server)).await;
    for data in [r#"{"t":"\ud800"}"#, "[1e400]"] {
        let e = ws.request(&format!(r#"{{"type":"publish","id":1,"channel":"junk:s","data":{data}}}"#)).await;
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_request")), "{data}: {e}");
        let r = reqwest::Client::new()
            .post(server.url("/api/v1/publish"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(format!(r#"{{"channel":"junk:s","data":{data}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "REST publish of {data}");
    }
    by.finish(&server).await;
}
