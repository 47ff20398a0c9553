//! `frames::check_depth` on arbitrary text: never panics, and on valid JSON it agrees with the
//! real nesting depth (it is a byte scanner, so strings full of brackets and escapes are where it
//! could go wrong).
#![no_main]

use crier_protocol::frames::{MAX_DATA_DEPTH, check_depth};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[path = "common.rs"]
mod common;
use common::depth_of;

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    let verdict = check_depth(text);
    // serde_json refuses nesting over 128 on its own; below that, compare with the real depth.
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        assert_eq!(verdict.is_ok(), depth_of(&v) <= MAX_DATA_DEPTH, "depth {} judged {verdict:?}", depth_of(&v));
    }
});
