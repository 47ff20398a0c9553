//! Channel names and permission patterns.
//!
//! A channel name is 1–255 bytes of `A-Z a-z 0-9 _ - : . @ / =`; its namespace is the part
//! before the first `:`. Because none of these bytes needs escaping in JSON, a channel name can
//! be copied verbatim into an encoded frame.
//!
//! A pattern (from the `channels` and `publish` claims) is an exact channel name, a prefix
//! ending in `*` (`chat:*`), or `*` alone.

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// Why a channel name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelError {
    Empty,
    TooLong,
    BadByte(u8),
}

impl std::fmt::Display for ChannelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ChannelError::Empty => f.write_str("channel name is empty"),
            ChannelError::TooLong => write!(f, "channel name is longer than {MAX_CHANNEL_LEN} bytes"),
            ChannelError::BadByte(b) => {
                write!(f, "channel name contains byte 0x{b:02x}; allowed are A-Z a-z 0-9 _ - : . @ / =")
            }
        }
    }
}

impl std::error::Error for ChannelError {}

fn allowed(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.' | b'@' | b'/' | b'=')
}

/// Checks a channel name against the contract's rules.
pub fn validate_channel(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong);
    }
    match name.bytes().find(|b| !allowed(*b)) {
        Some(b) => Err(ChannelError::BadByte(b)),
        None => Ok(()),
    }
}

/// The namespace of a (valid) channel: the part before the first `:`, or `""` when there is none.
/// Used as a low-cardinality metric label.
pub fn namespace(channel: &str) -> &str {
    match channel.find(':') {
        Some(i) => &channel[..i],
        None => "",
    }
}

/// Does `pattern` (exact name, `prefix*`, or `*`) cover `channel`?
pub fn channel_matches(pattern: &str, channel: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => channel.starts_with(prefix),
        None => pattern == channel,
    }
}

/// Does any of `patterns` cover `channel`?
pub fn any_matches<S: AsRef<str>>(patterns: &[S], channel: &str) -> bool {
    patterns.iter().any(|p| channel_matches(p.as_ref(), channel))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(validate_channel("chat:lobby").is_ok());
        assert!(validate_channel("a/b@c=d.e-f_g:1").is_ok());
        assert_eq!(validate_channel(""), Err(ChannelError::Empty));
        assert_eq!(validate_channel(&"a".repeat(256)), Err(ChannelError::TooLong));
        assert!(validate_channel(&"a".repeat(255)).is_ok());
        assert_eq!(validate_channel("a b"), Err(ChannelError::BadByte(b' ')));
        assert_eq!(validate_channel("a\"b"), Err(ChannelError::BadByte(b'"')));
        assert_eq!(validate_channel("é"), Err(ChannelError::BadByte(0xc3)));
    }

    #[test]
    fn namespaces() {
        assert_eq!(namespace("chat:lobby:x"), "chat");
        assert_eq!(namespace("lobby"), "");
    }

    #[test]
    fn patterns() {
        assert!(channel_matches("*", "anything"));
        assert!(channel_matches("chat:*", "chat:lobby"));
        assert!(channel_matches("chat:*", "chat:"));
        assert!(!channel_matches("chat:*", "chatter"));
        assert!(channel_matches("chat:lobby", "chat:lobby"));
        assert!(!channel_matches("chat:lobby", "chat:lobby2"));
        assert!(!channel_matches("user:42:*", "user:420:x"));
        assert!(any_matches(&["a", "b:*"], "b:c"));
        assert!(!any_matches::<&str>(&[], "b:c"));
    }
}

/// Property tests: the channel-name rules against a reference model, and the pattern semantics
/// the permission checks rely on (exact name, `prefix*`, `*`).
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// 1–255 of the allowed bytes.
    fn valid_name() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_\\-:.@/=]{1,255}"
    }

    /// Mostly-plausible names: allowed bytes plus a few troublemakers (`*`, space, quote,
    /// backslash, control, non-ASCII), any length around the bounds.
    fn any_name() -> impl Strategy<Value = String> {
        prop_oneof![valid_name(), "[A-Za-z0-9_\\-:.@/=* \"\\\\\u{0}\u{7f}é€]{0,300}", any::<String>(),]
    }

    /// Reference model of the contract's rule: 1–255 bytes of `A-Z a-z 0-9 _ - : . @ / =`.
    fn model_valid(name: &str) -> bool {
        (1..=255).contains(&name.len()) && name.bytes().all(model_byte)
    }

    fn model_byte(b: u8) -> bool {
        b.is_ascii_alphanumeric() || b"_-:.@/=".contains(&b)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn validation_matches_the_contract(name in any_name()) {
            let got = validate_channel(&name);
            prop_assert_eq!(got.is_ok(), model_valid(&name), "{:?} -> {:?}", name, got);
            match got {
                Ok(()) => {}
                Err(ChannelError::Empty) => prop_assert!(name.is_empty()),
                Err(ChannelError::TooLong) => prop_assert!(name.len() > MAX_CHANNEL_LEN),
                Err(ChannelError::BadByte(b)) => {
                    prop_assert!(name.len() <= MAX_CHANNEL_LEN);
                    // The reported byte is the first offending one.
                    prop_assert_eq!(name.bytes().find(|b| !model_byte(*b)), Some(b));
                }
            }
        }

        #[test]
        fn a_valid_name_needs_no_json_escaping(name in valid_name()) {
            // encode_message copies channel names verbatim into frames; this is why it may.
            prop_assert_eq!(serde_json::to_string(&name).ok(), Some(format!("\"{name}\"")));
        }

        #[test]
        fn a_valid_name_matches_itself_and_nothing_else_exactly(name in valid_name(), other in any_name()) {
            prop_assert!(channel_matches(&name, &name));
            prop_assert_eq!(channel_matches(&name, &other), name == other);
        }

        #[test]
        fn star_matches_everything(channel in any_name()) {
            prop_assert!(channel_matches("*", &channel));
            prop_assert!(any_matches(&["*"], &channel));
        }

        #[test]
        fn prefix_star_matches_iff_starts_with(prefix in any_name(), channel in any_name()) {
            let pattern = format!("{prefix}*");
            prop_assert_eq!(channel_matches(&pattern, &channel), channel.starts_with(prefix.as_str()));
        }

        #[test]
        fn prefix_star_covers_every_extension(prefix in "[a-z:]{0,20}", rest in valid_name()) {
            let (channel, pattern) = (format!("{prefix}{rest}"), format!("{prefix}*"));
            prop_assert!(channel_matches(&pattern, &channel));
        }

        #[test]
        fn an_inner_star_is_literal_and_matches_no_valid_channel(
            a in "[a-z:]{0,10}", b in "[a-z:]{1,10}", channel in valid_name()
        ) {
            // `chat:*:room` is not a glob: only a trailing `*` is special. Valid channel names
            // cannot contain `*`, so such a pattern grants nothing.
            let pattern = format!("{a}*{b}");
            prop_assert!(!channel_matches(&pattern, &channel));
        }

        #[test]
        fn any_matches_is_any_of_channel_matches(patterns in prop::collection::vec(any_name(), 0..6), channel in any_name()) {
            let want = patterns.iter().any(|p| channel_matches(p, &channel));
            prop_assert_eq!(any_matches(&patterns, &channel), want);
        }

        #[test]
        fn namespace_is_the_part_before_the_first_colon(channel in any_name()) {
            let ns = namespace(&channel);
            prop_assert!(channel.starts_with(ns));
            prop_assert!(!ns.contains(':'));
            if channel.contains(':') {
                prop_assert_eq!(channel.as_bytes().get(ns.len()), Some(&b':'));
            } else {
                prop_assert_eq!(ns, "");
            }
        }
    }
}
