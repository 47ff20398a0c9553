//! Errors of the client's requests, and why a client closed.

use crier_protocol::ErrorCode;

/// An `error` frame (or handshake rejection body): the contract's code and the server's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServerError {
    /// The contract's error code (`forbidden`, `rate_limited`, `message_too_large`, ...), as sent.
    pub code: String,
    pub message: String,
}

impl ServerError {
    /// The code as a known [`ErrorCode`] (`None` for a code this version does not know).
    pub fn error_code(&self) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == self.code)
    }
}

/// Why a request failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The server answered with an `error` frame.
    #[error("the server refused: {0}")]
    Server(ServerError),
    /// The connection dropped after the request was sent and before its reply: the outcome is
    /// unknown (a publish may or may not have been accepted). Reads (`presence`, `history`) are
    /// retried on the next connection instead.
    #[error("the connection dropped before the reply; the outcome is unknown")]
    Disconnected,
    /// No reply within the client's request timeout.
    #[error("no reply within the request timeout")]
    Timeout,
    /// The client is closed.
    #[error("the client is closed")]
    Closed,
    /// The request could not be built (e.g. `data` that does not serialise to JSON).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl Error {
    /// The contract's error code when the server refused, e.g. `Some("forbidden")`.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Server(e) => Some(&e.code),
            _ => None,
        }
    }
}

/// Why the client stopped for good (see [`crate::Client::close_reason`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// [`crate::Client::close`] was called, or every `Client` handle was dropped.
    Client,
    /// The server closed with a code after which a client must not reconnect (the table's "stop":
    /// 1000, 1002, 1007, 1008, 1009, 4003), or 4001 without a token provider.
    Server { code: u16, reason: String },
    /// The handshake was refused in a way retrying cannot fix ([`crate::State::Failed`]): 401 or
    /// 403 without a token provider or again with a fresh token (`token_invalid`,
    /// `origin_not_allowed`, …), 400/426 (`bad_upgrade`). `error` is the server's reason.
    Handshake { status: u16, error: Option<ServerError> },
    /// The URL or request could not be used at all.
    Invalid(String),
}
