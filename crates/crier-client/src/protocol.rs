//! The handle-to-task protocol: what a [`crate::Client`] and its [`crate::Subscription`]s send
//! the connection's task ([`ToDriver`], [`Request`]) and what they share with it ([`Shared`]:
//! the state, the close reason, the welcome), and the settings the task runs with ([`Options`]).

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{CloseReason, Error};
use crate::events::{Event, Message};
use crate::state::{State, Welcome};
use crate::token::TokenSource;
use crier_protocol::backoff::Backoff;

/// What the handles and the task share (short critical sections only).
#[derive(Debug)]
pub(crate) struct Shared {
    pub state: watch::Sender<State>,
    pub connections: AtomicU64,
    pub close_reason: Mutex<Option<CloseReason>>,
    pub welcome: Mutex<Option<Welcome>>,
}

/// The client's settings, fixed at build time.
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// The node(s): each (re)connection attempt takes the next one, in turn.
    pub urls: Vec<String>,
    pub token: TokenSource,
    pub backoff: Backoff,
    /// Send a `ping` after this long without hearing anything (default: the server's
    /// `ping_interval_ms`, else 25 s).
    pub ping_interval: Option<Duration>,
    /// After a `ping`, how long to wait for anything before the connection is taken for dead.
    pub pong_timeout: Duration,
    /// Bound of the TCP connect + WebSocket handshake, and of the wait for `welcome`.
    pub connect_timeout: Duration,
}

/// A request of the application.
#[derive(Debug)]
pub(crate) enum RequestKind {
    Publish { channel: String, data: Value, idempotency_key: Option<String> },
    Presence { channel: String },
    PresenceStats { channel: String },
    History { channel: String, since: Option<StreamPosition>, limit: Option<usize> },
}

#[derive(Debug)]
pub(crate) enum Reply {
    Published { epoch: Option<String>, offset: u64 },
    Presence(Vec<PresenceEntry>),
    PresenceStats { clients: u64, users: u64 },
    History { epoch: String, offset: u64, messages: Vec<Message>, next: Option<StreamPosition> },
}

#[derive(Debug)]
pub(crate) struct Request {
    pub kind: RequestKind,
    pub reply: oneshot::Sender<Result<Reply, Error>>,
}

/// From the handles to the task.
#[derive(Debug)]
pub(crate) enum ToDriver {
    Subscribe { channel: String, from: Option<StreamPosition>, generation: u64, events: mpsc::UnboundedSender<Event> },
    Unsubscribe { channel: String, generation: u64 },
    Request(Request),
    Close,
}
