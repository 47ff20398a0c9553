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
