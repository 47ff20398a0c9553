//! Channel names and permission patterns on arbitrary input: `validate_channel` follows the
//! contract's rule exactly, and `channel_matches` has the semantics the permission checks rely on.
#![no_main]

use crier_protocol::channel::{MAX_CHANNEL_LEN, any_matches, channel_matches, namespace, validate_channel};
use libfuzzer_sys::fuzz_target;

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_-:.@/=".contains(&b)
}

fuzz_target!(|bytes: &[u8]| {
    // Split the input into a pattern and a channel at the first NUL (or use it as both).
    let (a, b) = match bytes.iter().position(|&b| b == 0) {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (bytes, bytes),
    };
    let (Ok(pattern), Ok(channel)) = (std::str::from_utf8(a), std::str::from_utf8(b)) else { return };

    for name in [pattern, channel] {
        let valid = validate_channel(name).is_ok();
        let model = (1..=MAX_CHANNEL_LEN).contains(&name.len()) && name.bytes().all(allowed);
        assert_eq!(valid, model, "validate_channel({name:?})");
        if valid {
            // A valid name matches itself; it contains no `*`, so as a pattern it is exact.
            assert!(channel_matches(name, name));
            assert!(!name.contains('*'));
            // And it is copied verbatim into JSON frames: it needs no escaping.
            assert_eq!(serde_json::to_string(name).ok(), Some(format!("\"{name}\"")));
        }
        let ns = namespace(name);
        assert!(name.starts_with(ns) && !ns.contains(':'));
    }

    // `*` matches everything.
    assert!(channel_matches("*", channel));
    // `prefix*` matches iff the channel starts with the prefix; anything else is exact.
    let got = channel_matches(pattern, channel);
    match pattern.strip_suffix('*') {
        Some(prefix) => assert_eq!(got, channel.starts_with(prefix)),
        None => assert_eq!(got, pattern == channel),
    }
    let star = format!("{pattern}*");
    assert_eq!(channel_matches(&star, channel), channel.starts_with(pattern));
    // A `*` anywhere but at the very end is literal, and valid names contain none: such a
    // pattern grants no valid channel.
    if pattern.strip_suffix('*').unwrap_or(pattern).contains('*') && validate_channel(channel).is_ok() {
        assert!(!got, "{pattern:?} matched {channel:?}");
    }
    assert_eq!(any_matches(&[pattern, "never:used"], channel), got || channel == "never:used");
});
