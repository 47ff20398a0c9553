//! Arbitrary bytes → (UTF-8) text → `frames::decode`: never panics; a decoded `publish` carries
//! valid JSON no deeper than `MAX_DATA_DEPTH`, and the `message` frame built from it is valid
//! JSON carrying the same data; errors have a short, non-empty message.
#![no_main]

use crier_protocol::frames::{ClientFrame, MAX_DATA_DEPTH, check_depth, decode, encode_message};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[path = "common.rs"]
mod common;
use common::depth_of;

fuzz_target!(|bytes: &[u8]| {
    // Text frames are UTF-8 by the time they reach decode (tungstenite checks; invalid = 1007).
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    match decode(text) {
        Ok(ClientFrame::Publish { channel, data, .. }) => {
            let parsed: Value = match serde_json::from_str(data.get()) {
                Ok(v) => v,
                Err(e) => panic!("accepted data is not valid JSON: {e}"),
            };
            assert!(depth_of(&parsed) <= MAX_DATA_DEPTH, "accepted data deeper than the limit");
            assert!(check_depth(data.get()).is_ok());
            let frame = encode_message(&channel, "e1", u64::MAX, data.get());
            let v: Value = serde_json::from_slice(&frame).expect("the message frame is JSON");
            assert_eq!(v["data"], parsed);
            assert_eq!(v["channel"].as_str(), Some(channel.as_ref()));
        }
        Ok(frame) => {
            let _ = (frame.id(), frame.kind());
        }
        // Not "short" yet: serde_json quotes an offending string whole, in Rust debug form
        // (DEL becomes `\u{7f}`, 6 bytes for 1), so a message can be ~6 times the frame (see
        // the ignored test `error_messages_are_bounded` in crates/crier-protocol/tests/
        // decode_props.rs). Tighten to a constant once that is fixed.
        Err(e) => assert!(
            !e.message.is_empty() && e.message.len() <= 8 * text.len() + 256,
            "error message of {} bytes for {} bytes of input",
            e.message.len(),
            text.len()
        ),
    }
});
