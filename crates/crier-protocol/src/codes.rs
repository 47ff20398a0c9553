//! Error codes (`error` frames, REST bodies, handshake bodies) and WebSocket close codes.
//!
//! [`CLOSE_CODES`] is the one table of the close codes crier sends — code, name, the reason sent
//! in the close frame, when, and what the client should do. The code that closes a connection
//! takes the reason from it ([`CloseCode::reason`]), client libraries take the reconnect decision
//! from it ([`CloseCode::action`]), and docs/protocol.md shows it ([`close_code_table`]; a test
//! keeps the two equal).

/// Codes of `error` frames and of JSON error bodies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BadRequest,
    UnknownType,
    InvalidChannel,
    Forbidden,
    RateLimited,
    TooManySubscriptions,
    MessageTooLarge,
    AlreadySubscribed,
    NotSubscribed,
    TokenInvalid,
    Unavailable,
    Internal,
    OutcomeUnknown,
    /// The channel's namespace bounds its subscribers (`max_subscribers`) and it is full.
    ChannelFull,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 14] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::InvalidChannel,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::TooManySubscriptions,
        ErrorCode::MessageTooLarge,
        ErrorCode::AlreadySubscribed,
        ErrorCode::NotSubscribed,
        ErrorCode::TokenInvalid,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
        ErrorCode::OutcomeUnknown,
        ErrorCode::ChannelFull,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::OutcomeUnknown => "outcome_unknown",
            ErrorCode::ChannelFull => "channel_full",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A WebSocket close code the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL_ERROR: CloseCode = CloseCode(1002);
    pub const INVALID_PAYLOAD: CloseCode = CloseCode(1007);
    pub const POLICY: CloseCode = CloseCode(1008);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL: CloseCode = CloseCode(1011);
    pub const RESTART: CloseCode = CloseCode(1012);
    pub const TOKEN_EXPIRED: CloseCode = CloseCode(4001);
    pub const DISCONNECTED: CloseCode = CloseCode(4003);
    pub const RATE_LIMITED: CloseCode = CloseCode(4008);
    pub const SLOW_CONSUMER: CloseCode = CloseCode(4009);
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(4010);

    /// This code's row of [`CLOSE_CODES`] (`None` for a code crier never sends, e.g. one a
    /// client chose and the server echoes).
    pub fn spec(self) -> Option<&'static CloseSpec> {
        CLOSE_CODES.iter().find(|s| s.code == self)
    }

    /// The reason crier sends with this code (empty for a code not in the table).
    pub fn reason(self) -> &'static str {
        self.spec().map_or("", |s| s.reason)
    }

    /// What a client should do after this close. Codes not in the table: reconnect with
    /// backoff (the safe default for a code a newer server may send).
    pub fn action(self) -> ClientAction {
        self.spec().map_or(ClientAction::ReconnectWithBackoff, |s| s.action)
    }

    /// Whether what was queued before the close is still written ahead of the close frame
    /// (`false`: the queue is dropped, e.g. a consumer that does not read).
    pub fn flushes_queue(self) -> bool {
        self.spec().is_none_or(|s| s.flush)
    }

    /// Whether the server waits (briefly) for the client's close reply; not for a client that
    /// is not reading or not answering.
    pub fn lingers(self) -> bool {
        !matches!(self, CloseCode::SLOW_CONSUMER | CloseCode::HEARTBEAT_TIMEOUT)
    }
}

/// What a client should do after a close (the last column of [`CLOSE_CODES`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAction {
    /// Stop: reconnecting would get the same answer.
    Stop,
    /// Reconnect at once, recovering every subscription.
    ReconnectNow,
    /// Reconnect after a jittered delay, recovering every subscription.
    ReconnectAfterJitter,
    /// Reconnect with exponential backoff, recovering every subscription.
    ReconnectWithBackoff,
    /// Get a new token, then reconnect.
    RefreshToken,
}

impl ClientAction {
    /// The action's name in client libraries (the JavaScript client's generated table).
    pub fn as_str(self) -> &'static str {
        match self {
            ClientAction::Stop => "stop",
            ClientAction::ReconnectNow => "reconnect_now",
            ClientAction::ReconnectAfterJitter => "reconnect_after_jitter",
            ClientAction::ReconnectWithBackoff => "reconnect_with_backoff",
            ClientAction::RefreshToken => "refresh_token",
        }
    }
}

/// One close code crier may send.
#[derive(Debug)]
pub struct CloseSpec {
    pub code: CloseCode,
    pub name: &'static str,
    /// When crier sends it.
    pub when: &'static str,
    /// The close frame's reason (for 1002 the framing rule broken is sent instead).
    pub reason: &'static str,
    /// Queued frames are written before the close frame.
    pub flush: bool,
    pub action: ClientAction,
    /// What the client should do, in the contract's words.
    pub advice: &'static str,
}

const fn spec(
    code: CloseCode,
    name: &'static str,
    when: &'static str,
    reason: &'static str,
    flush: bool,
    (action, advice): (ClientAction, &'static str),
) -> CloseSpec {
    CloseSpec { code, name, when, reason, flush, action, advice }
}

use ClientAction::{ReconnectAfterJitter, ReconnectNow, ReconnectWithBackoff, RefreshToken, Stop};

/// Every close code crier sends (the contract's table, plus 1002, 1007 and the 4010 extension).
pub static CLOSE_CODES: &[CloseSpec] = &[
    spec(CloseCode::NORMAL, "normal", "normal closure", "", true, (Stop, "stop")),
    spec(
        CloseCode::GOING_AWAY,
        "going_away",
        "node shutting down (reserved: the drain sends 1012)",
        "node shutting down",
        true,
        (ReconnectNow, "reconnect now, with recovery"),
    ),
    spec(
        CloseCode::PROTOCOL_ERROR,
        "protocol_error",
        "the client broke a WebSocket framing rule (RFC 6455)",
        "protocol error",
        false,
        (Stop, "fix the client"),
    ),
    spec(
        CloseCode::INVALID_PAYLOAD,
        "invalid_payload",
        "a text frame or close reason is not UTF-8",
        "invalid UTF-8 in a text frame",
        false,
        (Stop, "fix the client"),
    ),
    spec(
        CloseCode::POLICY,
        "policy",
        "policy violation (reserved: not sent by this version)",
        "policy violation",
        true,
        (Stop, "stop"),
    ),
    spec(
        CloseCode::TOO_BIG,
        "too_big",
        "frame larger than `max_message_bytes`",
        "message larger than max_message_bytes",
        false,
        (Stop, "stop"),
    ),
    spec(
        CloseCode::INTERNAL,
        "internal",
        "internal error: the broker failed during a paced recovery, after its ack",
        "internal error",
        true,
        (ReconnectWithBackoff, "reconnect with backoff"),
    ),
    spec(
        CloseCode::RESTART,
        "restart",
        "node restarting / draining",
        "node draining; reconnect to another node",
        true,
        (ReconnectAfterJitter, "reconnect after a jittered delay, with recovery"),
    ),
    spec(
        CloseCode::TOKEN_EXPIRED,
        "token_expired",
        "token expired, not refreshed",
        "token expired",
        true,
        (RefreshToken, "get a new token, reconnect"),
    ),
    spec(
        CloseCode::DISCONNECTED,
        "disconnected",
        "disconnected by the API or permissions revoked",
        "disconnected by the API",
        true,
        (Stop, "stop"),
    ),
    spec(
        CloseCode::RATE_LIMITED,
        "rate_limited",
        "too many rate-limit violations",
        "too many rate-limit violations",
        false,
        (ReconnectWithBackoff, "reconnect with backoff"),
    ),
    spec(
        CloseCode::SLOW_CONSUMER,
        "slow_consumer",
        "slow consumer (outbound queue over `client_queue_max_bytes`)",
        "slow consumer",
        false,
        (ReconnectWithBackoff, "reconnect with recovery"),
    ),
    spec(
        CloseCode::HEARTBEAT_TIMEOUT,
        "heartbeat_timeout",
        "heartbeat timeout: no pong within `pong_timeout` (crier extension)",
        "no pong within pong_timeout",
        false,
        (ReconnectWithBackoff, "reconnect with recovery"),
    ),
];

/// [`CLOSE_CODES`] as the markdown table docs/protocol.md shows.
pub fn close_code_table() -> String {
    let mut out = String::from("| code | name | when | reason sent | the client should |\n|---|---|---|---|---|\n");
    for s in CLOSE_CODES {
        let reason = if s.reason.is_empty() { String::new() } else { format!("`{}`", s.reason) };
        out.push_str(&format!("| {} | `{}` | {} | {} | {} |\n", s.code.0, s.name, s.when, reason, s.advice));
    }
    out
}

/// [`CLOSE_CODES`] as the JavaScript client's table (clients/js/src/index.js holds this text
/// between its `generated from CLOSE_CODES` markers; a test keeps the two equal).
pub fn js_close_actions() -> String {
    let mut out = String::from("export const CLOSE_ACTIONS = Object.freeze({\n");
    for s in CLOSE_CODES {
        out.push_str(&format!("  {}: \"{}\", // {}\n", s.code.0, s.action.as_str(), s.name));
    }
    out.push_str("});\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_are_listed_once() {
        for (i, a) in CLOSE_CODES.iter().enumerate() {
            assert!(CLOSE_CODES[i + 1..].iter().all(|b| b.code != a.code && b.name != a.name), "{}", a.code.0);
        }
        assert_eq!(CloseCode::SLOW_CONSUMER.reason(), "slow consumer");
        assert_eq!(CloseCode(4321).reason(), "");
        assert_eq!(CloseCode::DISCONNECTED.action(), ClientAction::Stop);
        assert!(!CloseCode::SLOW_CONSUMER.flushes_queue() && CloseCode::RESTART.flushes_queue());
    }
}
