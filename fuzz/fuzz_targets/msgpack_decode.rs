//! Arbitrary bytes → `crier_protocol::msgpack::to_json` (what a `crier.v1.msgpack` client's
//! binary frame goes through): never panics; accepted input becomes valid JSON no deeper than
//! `msgpack::MAX_DEPTH`; that JSON transcoded back (`from_json`) and again to JSON gives the same
//! text (the two directions agree); the MessagePack encoding's `decode_binary` never panics.
#![no_main]

use crier_protocol::Encoding;
use crier_protocol::msgpack::{MAX_DEPTH, from_json, to_json};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

#[path = "common.rs"]
mod common;
use common::depth_of;

fuzz_target!(|bytes: &[u8]| {
    let mut json = String::new();
    if to_json(bytes, &mut json).is_ok() {
        let v: Value = match serde_json::from_str(&json) {
            Ok(v) => v,
            Err(e) => panic!("to_json wrote invalid JSON ({e}): {json}"),
        };
        assert!(depth_of(&v) <= MAX_DEPTH);
        let again = from_json(json.as_bytes()).expect("valid JSON transcodes");
        let mut back = String::new();
        to_json(&again, &mut back).expect("what from_json writes, to_json reads");
        assert_eq!(back, json);
    }
    let mut scratch = String::new();
    let _ = Encoding::MsgPack.decode_binary(bytes, &mut scratch);
});
