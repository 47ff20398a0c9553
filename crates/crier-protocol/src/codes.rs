//! Error codes (`error` frames, REST bodies, handshake bodies) and WebSocket close codes.
//!
//! | close | when | the client should |
//! |---|---|---|
//! | 1000 | normal | stop |
//! | 1001 | node shutting down | reconnect now, with recovery |
//! | 1008 | policy violation | stop |
//! | 1009 | frame larger than `max_message_bytes` | stop |
//! | 1011 | internal error | reconnect with backoff |
//! | 1012 | node restarting / draining | reconnect after a jittered delay, with recovery |
//! | 4001 | token expired, not refreshed | get a new token, reconnect |
//! | 4003 | disconnected by the API or permissions revoked | stop |
//! | 4008 | too many rate-limit violations | reconnect with backoff |
//! | 4009 | slow consumer (outbound queue over limit) | reconnect with recovery |
//! | 4010 | heartbeat timeout (crier extension) | reconnect with recovery |

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
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 12] = [
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
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A WebSocket close code the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const POLICY: CloseCode = CloseCode(1008);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL: CloseCode = CloseCode(1011);
    pub const RESTART: CloseCode = CloseCode(1012);
    pub const TOKEN_EXPIRED: CloseCode = CloseCode(4001);
    pub const DISCONNECTED: CloseCode = CloseCode(4003);
    pub const RATE_LIMITED: CloseCode = CloseCode(4008);
    pub const SLOW_CONSUMER: CloseCode = CloseCode(4009);
    pub const HEARTBEAT_TIMEOUT: CloseCode = CloseCode(4010);
}
