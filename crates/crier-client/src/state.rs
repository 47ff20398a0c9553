//! The public state types of a client: its connection [`State`] and the server's [`Welcome`].

use std::time::Duration;

/// The connection state, as the JavaScript client names them ("connecting" | "connected" |
/// "disconnected" | "closed"), plus `Failed` (a refused handshake; docs/protocol.md, *Client libraries*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Getting a token, connecting, or waiting for `welcome`.
    Connecting,
    /// `welcome` received; subscriptions are (re)established.
    Connected,
    /// The connection ended; waiting for the backoff delay before connecting again.
    Disconnected,
    /// Stopped for good (see [`crate::Client::close_reason`]).
    Closed,
    /// Stopped for good because the server refused the handshake in a way retrying cannot fix
    /// (401/403 even with a fresh token, 400, 426); [`crate::Client::close_reason`] has the
    /// status and the server's reason.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Disconnected => "disconnected",
            State::Closed => "closed",
            State::Failed => "failed",
        }
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The server's `welcome` of the current (or last) connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub client: String,
    pub user: String,
    pub node: String,
    pub ping_interval: Option<Duration>,
}
