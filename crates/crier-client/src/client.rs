//! The application's handle: [`Client`] and its [`ClientBuilder`].

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::driver::Driver;
use crate::error::{CloseReason, Error};
use crate::events::{EndReason, Event, Message};
use crate::protocol::{Options, Reply, Request, RequestKind, Shared, ToDriver};
use crate::state::{State, Welcome};
use crate::subscription::Subscription;
use crier_protocol::backoff::Backoff;

/// The subscriptions the server makes for this client ([`Client::server_subscriptions`]).
pub type ServerSubscriptions = mpsc::UnboundedReceiver<Subscription>;
use crate::token::{BoxError, TokenSource};

/// Settings of a [`Client`]; [`ClientBuilder::connect`] starts it.
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    opts: Options,
    request_timeout: Option<Duration>,
}

impl ClientBuilder {
    /// `url` is the WebSocket endpoint, e.g. `ws://127.0.0.1:8080/ws`.
    pub fn new(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            opts: Options {
                urls: vec![url.into()],
                token: TokenSource::None,
                backoff: Backoff::default(),
                ping_interval: None,
                pong_timeout: Duration::from_secs(10),
                connect_timeout: Duration::from_secs(10),
            },
            request_timeout: None,
        }
    }

    /// Another node to connect to: each (re)connection attempt takes the next URL, in turn
    /// (after a node closed with 1001/1012 while draining, the client resumes on another one).
    pub fn also_url(mut self, url: impl Into<String>) -> ClientBuilder {
        self.opts.urls.push(url.into());
        self
    }

    /// A fixed token (sent as `Authorization: Bearer`). When it expires the server closes with
    /// 4001 and the client stops; use [`ClientBuilder::token_provider`] to keep going.
    pub fn token(mut self, token: impl Into<String>) -> ClientBuilder {
        self.opts.token = TokenSource::Static(token.into());
        self
    }

    /// An async token provider, asked before the first connection, again after a 4001 close or a
    /// 401 handshake, and shortly before the current token's `exp` (the new token is then sent in
    /// a `refresh` frame and the connection continues). A provider error is retried.
    pub fn token_provider<F, Fut, E>(mut self, provider: F) -> ClientBuilder
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.opts.token = TokenSource::provider(provider);
        self
    }

    /// Full-jitter exponential backoff between connection attempts (default 500 ms, 20 s).
    pub fn backoff(mut self, base: Duration, cap: Duration) -> ClientBuilder {
        self.opts.backoff = Backoff { base, cap: cap.max(base) };
        self
    }

    /// How long `publish`, `presence` and `history` wait for their reply, connection time
    /// included (default: no limit — a request made while disconnected waits for the
    /// connection).
    pub fn request_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.request_timeout = Some(timeout);
        self
    }

    /// Send `{"type":"ping"}` after this long without hearing from the server (default: the
    /// server's `ping_interval_ms` from `welcome`, else 25 s).
    pub fn ping_interval(mut self, interval: Duration) -> ClientBuilder {
        self.opts.ping_interval = Some(interval.max(Duration::from_millis(10)));
        self
    }

    /// After a ping, how long without hearing anything before the connection is taken for
    /// dead and replaced (default 10 s).
    pub fn pong_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.opts.pong_timeout = timeout;
        self
    }

    /// Bound of one connection attempt: TCP connect, handshake, `welcome` (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.opts.connect_timeout = timeout;
        self
    }

    /// Starts the client's connection task on the current tokio runtime; it connects at once.
    /// Fails only outside a tokio runtime.
    pub fn connect(self) -> Result<Client, Error> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Invalid("crier_client::Client must be started inside a tokio runtime".into()))?;
        let (state, _) = watch::channel(State::Connecting);
        let shared = Arc::new(Shared {
            state,
            connections: AtomicU64::new(0),
            close_reason: Mutex::new(None),
            welcome: Mutex::new(None),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let (server_tx, server_rx) = mpsc::unbounded_channel();
        runtime.spawn(Driver::new(self.opts, shared.clone(), rx, tx.downgrade(), server_tx).run());
        Ok(Client {
            inner: Arc::new(Inner {
                commands: tx,
                shared,
                request_timeout: self.request_timeout,
                generation: AtomicU64::new(0),
                server_subs: Mutex::new(Some(server_rx)),
            }),
        })
    }
}

/// A channel's presence counted ([`Client::presence_stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceStats {
    /// Clients (connections) in the channel's presence.
    pub clients: u64,
    /// Distinct users among them.
    pub users: u64,
}

/// What a `publish` was given by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The channel's epoch (crier sends it; `None` from a server that does not).
    pub epoch: Option<String>,
    pub offset: u64,
}

/// Options of [`Client::history`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryOptions {
    /// Only messages after this position (else the latest ones).
    pub since: Option<StreamPosition>,
    /// At most this many (the server's default: its `history_size`; at most 1000).
    pub limit: Option<usize>,
}

/// A channel's history: its position and the messages asked for, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    pub epoch: String,
    pub offset: u64,
    pub messages: Vec<Message>,
}

#[derive(Debug)]
struct Inner {
    commands: mpsc::UnboundedSender<ToDriver>,
    shared: Arc<Shared>,
    request_timeout: Option<Duration>,
    generation: AtomicU64,
    server_subs: Mutex<Option<ServerSubscriptions>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.commands.send(ToDriver::Close);
    }
}

/// A crier client: one connection, kept up (see the crate docs). Cheap to clone; the last clone
/// dropped closes it, like [`Client::close`].
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl Client {
    /// A builder for a client of `url` (e.g. `ws://127.0.0.1:8080/ws`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(url)
    }

    /// The connection state now.
    pub fn state(&self) -> State {
        *self.inner.shared.state.borrow()
    }

    /// The connection state as a `watch` (await `changed()`, or `wait_for(..)`).
    pub fn watch_state(&self) -> watch::Receiver<State> {
        self.inner.shared.state.subscribe()
    }

    /// How many connections reached `welcome` so far (1 + the reconnects).
    pub fn connections(&self) -> u64 {
        self.inner.shared.connections.load(Ordering::Relaxed)
    }

    /// The `welcome` of the current (or last) connection.
    pub fn welcome(&self) -> Option<Welcome> {
        self.inner.shared.welcome.lock().ok().and_then(|w| w.clone())
    }

    /// The subscriptions the server makes for this client (REST `subscribe`, the token's `subs`
    /// claim), each a [`Subscription`] like [`Client::subscribe`]'s: [`Event::Subscribed`], then
    /// the messages; recovered after a reconnect (once the server subscribed it again, the
    /// client recovers from the last delivered position). The stream once: `None` after the
    /// first call. Until it is taken, such subscriptions queue up in it.
    pub fn server_subscriptions(&self) -> Option<ServerSubscriptions> {
        self.inner.server_subs.lock().ok().and_then(|mut s| s.take())
    }

    /// Why the client stopped, once it is [`State::Closed`] or [`State::Failed`].
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.inner.shared.close_reason.lock().ok().and_then(|r| r.clone())
    }

    /// Subscribes to `channel`, live from its current position. The returned stream yields
    /// [`Event::Subscribed`] once the server acknowledged (again after every reconnect), then
    /// messages; it survives reconnects, recovering what was missed.
    pub fn subscribe(&self, channel: impl Into<String>) -> Subscription {
        self.subscribe_inner(channel.into(), None)
    }

    /// Subscribes to `channel` recovering everything after `position` (e.g. the position of the
    /// last message the application stored), or telling it ([`Event::Gap`]) that it cannot.
    pub fn subscribe_from(&self, channel: impl Into<String>, position: StreamPosition) -> Subscription {
        self.subscribe_inner(channel.into(), Some(position))
    }

    fn subscribe_inner(&self, channel: String, from: Option<StreamPosition>) -> Subscription {
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let cmd = ToDriver::Subscribe { channel: channel.clone(), from, generation, events: tx };
        if let Err(mpsc::error::SendError(ToDriver::Subscribe { events, .. })) = self.inner.commands.send(cmd) {
            let _ = events.send(Event::Ended(EndReason::ClientClosed));
        }
        Subscription { channel, generation, events: rx, commands: self.inner.commands.clone() }
    }

    async fn request(&self, kind: RequestKind) -> Result<Reply, Error> {
        let (tx, rx) = oneshot::channel();
        self.inner.commands.send(ToDriver::Request(Request { kind, reply: tx })).map_err(|_| Error::Closed)?;
        let reply = async { rx.await.unwrap_or(Err(Error::Closed)) };
        match self.inner.request_timeout {
            Some(t) => tokio::time::timeout(t, reply).await.unwrap_or(Err(Error::Timeout)),
            None => reply.await,
        }
    }

    /// Publishes `data` on `channel` (the token needs a `publish` claim for it). Resolves once the
    /// server accepted it. [`Error::Disconnected`] means the connection dropped before the reply,
    /// and a server error `outcome_unknown` that the broker did not confirm it: the message may or
    /// may not have been published (use [`Client::publish_with_key`] to retry safely).
    pub async fn publish(&self, channel: impl Into<String>, data: &impl Serialize) -> Result<Published, Error> {
        self.publish_inner(channel.into(), data, None).await
    }

    /// [`Client::publish`] with an idempotency key (1-256 bytes): a publish repeated with the same
    /// key on the same channel within the server's idempotency window (5 minutes) is delivered
    /// once, and its reply carries the first one's offset. After [`Error::Disconnected`],
    /// [`Error::Timeout`] or `outcome_unknown`, retry with the same key.
    pub async fn publish_with_key(
        &self,
        channel: impl Into<String>,
        data: &impl Serialize,
        idempotency_key: impl Into<String>,
    ) -> Result<Published, Error> {
        self.publish_inner(channel.into(), data, Some(idempotency_key.into())).await
    }

    async fn publish_inner(
        &self,
        channel: String,
        data: &impl Serialize,
        idempotency_key: Option<String>,
    ) -> Result<Published, Error> {
        let data = serde_json::to_value(data).map_err(|e| Error::Invalid(format!("`data` is not JSON: {e}")))?;
        match self.request(RequestKind::Publish { channel, data, idempotency_key }).await? {
            Reply::Published { epoch, offset } => Ok(Published { epoch, offset }),
            _ => Err(Error::Invalid("unexpected reply".into())),
        }
    }

    /// Who is subscribed to `channel`, on every node.
    pub async fn presence(&self, channel: impl Into<String>) -> Result<Vec<PresenceEntry>, Error> {
        match self.request(RequestKind::Presence { channel: channel.into() }).await? {
            Reply::Presence(clients) => Ok(clients),
            _ => Err(Error::Invalid("unexpected reply".into())),
        }
    }

    /// How many clients and distinct users are in `channel`'s presence, cluster-wide (counted
    /// by the broker, without listing them).
    pub async fn presence_stats(&self, channel: impl Into<String>) -> Result<PresenceStats, Error> {
        match self.request(RequestKind::PresenceStats { channel: channel.into() }).await? {
            Reply::PresenceStats { clients, users } => Ok(PresenceStats { clients, users }),
            _ => Err(Error::Invalid("unexpected reply".into())),
        }
    }

    /// The channel's stored messages (see [`HistoryOptions`]). crier caps one reply by the
    /// connection's queue size and says where to go on (`more`/`next`); this follows those pages
    /// up to the position of the first reply, so the result is what was asked for.
    pub async fn history(&self, channel: impl Into<String>, opts: HistoryOptions) -> Result<History, Error> {
        let channel = channel.into();
        let (mut since, mut left) = (opts.since, opts.limit);
        let mut all: Option<History> = None;
        loop {
            let kind = RequestKind::History { channel: channel.clone(), since: since.take(), limit: left };
            let Reply::History { epoch, offset, messages, next } = self.request(kind).await? else {
                return Err(Error::Invalid("unexpected reply".into()));
            };
            let got = messages.len();
            let h = all.get_or_insert_with(|| History { epoch, offset, messages: Vec::new() });
            let top = (h.epoch.clone(), h.offset);
            // Later pages may carry messages published since the first reply: not asked for.
            h.messages.extend(messages.into_iter().filter(|m| m.epoch != top.0 || m.offset <= top.1));
            left = left.map(|l| l.saturating_sub(got));
            match next {
                Some(next) if got > 0 && left != Some(0) && (next.epoch != top.0 || next.offset < top.1) => {
                    since = Some(next)
                }
                _ => return all.ok_or_else(|| Error::Invalid("no reply".into())),
            }
        }
    }

    /// Closes the connection (code 1000) and stops; every subscription ends with
    /// [`EndReason::ClientClosed`].
    pub fn close(&self) {
        let _ = self.inner.commands.send(ToDriver::Close);
    }

    /// Waits until the client is [`State::Closed`] or [`State::Failed`] and returns why.
    pub async fn closed(&self) -> CloseReason {
        let mut rx = self.watch_state();
        let _ = rx.wait_for(|s| matches!(s, State::Closed | State::Failed)).await;
        self.close_reason().unwrap_or(CloseReason::Client)
    }
}
