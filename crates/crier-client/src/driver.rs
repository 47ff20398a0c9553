//! The connection task: one task per [`crate::Client`] owns the WebSocket, the subscriptions and
//! the requests in flight, and takes commands from the handles over a channel (no lock is held
//! across an `.await`).
//!
//! Its life: get a token → connect → `welcome` → resubscribe every channel (with `recover` from
//! the last delivered position) and send the requests that waited → serve frames, pings and token
//! refreshes → on a close or a dead connection, decide (close-code table below) whether to stop or
//! to wait a full-jitter backoff and start again.
//!
//! Every close decision comes from the server's table, `crier_protocol::codes::CLOSE_CODES`
//! (its [`ClientAction`]), never from a list of its own:
//!
//! | the table says | the client |
//! |---|---|
//! | stop (1000, 1002, 1007, 1008, 1009, 4003) | stops ([`State::Closed`]) |
//! | refresh token (4001) | asks its token provider again and reconnects; stops if it has none |
//! | reconnect now (1001) | reconnects at once, with recovery |
//! | reconnect after jitter (1012) | reconnects after [`crate::Backoff::jitter`], with recovery |
//! | reconnect with backoff (1011, 4008, 4009, 4010), a code not in the table, or the connection died | reconnects after a backoff, with recovery |
//!
//! A handshake refused with 401 or 403 asks the token provider once for a new token (a second
//! refusal in a row, or no provider: [`State::Failed`] with the status and the server's reason in
//! [`crate::Client::close_reason`]); 400 and 426 fail at once (retrying cannot fix them); any
//! other refusal (429, 503, ...) or network error is retried with backoff.
//!
//! A refusal with `Retry-After` (a node shedding a handshake storm, a draining node) is retried
//! after that long plus a jitter of up to as long again, never sooner than the backoff.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crier_protocol::StreamPosition;
use crier_protocol::codes::{ClientAction, CloseCode};
use crier_protocol::frames::PresenceEntry;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::backoff::Backoff;
use crate::error::{CloseReason, Error, ServerError};
use crate::frames::{self, ClientFrame, MessageFrame, PresenceEventFrame, ServerFrame};
use crate::subscription::{EndReason, Event, Gap, GapReason, Message, Tracker, Verdict};
use crate::token::{self, BoxError, TokenSource};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

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
pub(crate) enum Command {
    Subscribe { channel: String, from: Option<StreamPosition>, generation: u64, events: mpsc::UnboundedSender<Event> },
    Unsubscribe { channel: String, generation: u64 },
    Request(Request),
    Close,
}

struct Sub {
    generation: u64,
    events: mpsc::UnboundedSender<Event>,
    tracker: Tracker,
    /// Consecutive `rate_limited`/`unavailable` refusals of this channel's subscribe.
    refusals: u32,
    /// The server made it (a `subscribed` frame): after a reconnect the client waits for the
    /// server to make it again, then recovers from its position.
    server: bool,
}

/// Generations of subscriptions the server made (apart from the handles' own).
const SERVER_GENERATIONS: u64 = 1 << 62;

impl Sub {
    fn emit(&self, event: Event) {
        // The receiver may be gone already; its Drop has queued the unsubscribe.
        let _ = self.events.send(event);
    }
}

/// What a reply frame answers.
enum Pending {
    Subscribe { channel: String, generation: u64 },
    Request(Request),
    Refresh(String),
    Ignore,
}

/// How a connection (attempt) ended.
enum Ended {
    Stop(CloseReason),
    /// Reconnect after `wait`; `new_token`: ask the provider for a new token first.
    Reconnect {
        new_token: bool,
        wait: Wait,
    },
}

/// How long to wait before the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    Backoff,
    Jitter,
    Now,
    /// A refused handshake's `Retry-After`: the least wait (plus jitter, see `reconnect_delay`).
    RetryAfter(Duration),
}

impl Ended {
    fn reconnect() -> Ended {
        Ended::Reconnect { new_token: false, wait: Wait::Backoff }
    }
    fn refresh() -> Ended {
        Ended::Reconnect { new_token: true, wait: Wait::Backoff }
    }
}

/// The decision for a close with `code`, from the server's table (see the module docs).
fn close_decision(code: u16, reason: String, has_provider: bool) -> Ended {
    match CloseCode(code).action() {
        ClientAction::Stop => Ended::Stop(CloseReason::Server { code, reason }),
        ClientAction::RefreshToken if has_provider => Ended::refresh(),
        ClientAction::RefreshToken => Ended::Stop(CloseReason::Server { code, reason }),
        ClientAction::ReconnectNow => Ended::Reconnect { new_token: false, wait: Wait::Now },
        ClientAction::ReconnectAfterJitter => Ended::Reconnect { new_token: false, wait: Wait::Jitter },
        ClientAction::ReconnectWithBackoff => Ended::reconnect(),
    }
}

/// The wait before the next attempt: the backoff draw, or — when the server said `Retry-After`
/// — that long plus a uniform jitter of up to as long again, so the clients a node refused
/// together do not all come back in the same second.
fn reconnect_delay(backoff: Duration, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        Some(ra) if !ra.is_zero() => {
            let jitter = rand::Rng::random_range(&mut rand::rng(), 0..=ra.as_millis().min(u128::from(u64::MAX)) as u64);
            backoff.max(ra + Duration::from_millis(jitter))
        }
        _ => backoff,
    }
}

/// Per-connection state.
struct Conn {
    ws: Ws,
    pending: HashMap<u64, Pending>,
    last_heard: Instant,
    ping_sent: Option<Instant>,
    ping_interval: Duration,
    refresh_at: Option<Instant>,
    refreshing: Option<JoinHandle<Result<String, BoxError>>>,
    /// Subscribes to send again (after `rate_limited` / `unavailable`): due time, channel,
    /// subscription generation.
    retries: Vec<(Instant, String, u64)>,
}

/// Far enough in the future to mean "never" for a timer that is disabled.
fn never() -> Instant {
    Instant::now() + Duration::from_secs(86400 * 365)
}

pub(crate) struct Driver {
    opts: Options,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    subs: HashMap<String, Sub>,
    /// Requests waiting for a connection.
    queued: VecDeque<Request>,
    token: Option<String>,
    next_id: u64,
    /// Which of `opts.urls` the next attempt uses.
    url_index: usize,
    /// A handshake was refused (401/403) and a new token asked for since the last `welcome`:
    /// the next such refusal fails the client.
    refreshed_after_refusal: bool,
    /// For the handles of server subscriptions (weak: the task ends when every client is gone).
    commands_tx: mpsc::WeakUnboundedSender<Command>,
    /// Where server subscriptions go ([`crate::Client::server_subscriptions`]).
    server_subs: mpsc::UnboundedSender<crate::subscription::Subscription>,
    server_generation: u64,
}

impl Driver {
    pub(crate) fn new(
        opts: Options,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
        commands_tx: mpsc::WeakUnboundedSender<Command>,
        server_subs: mpsc::UnboundedSender<crate::subscription::Subscription>,
    ) -> Driver {
        Driver {
            commands_tx,
            server_subs,
            server_generation: SERVER_GENERATIONS,
            opts,
            shared,
            commands,
            subs: HashMap::new(),
            queued: VecDeque::new(),
            token: None,
            next_id: 0,
            url_index: 0,
            refreshed_after_refusal: false,
        }
    }

    fn set_state(&self, state: State) {
        self.shared.state.send_if_modified(|s| {
            let changed = *s != state;
            *s = state;
            changed
        });
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    pub(crate) async fn run(mut self) {
        let mut attempt: u32 = 0;
        let reason = loop {
            self.set_state(State::Connecting);
            let (ended, welcomed) = self.connection().await;
            if welcomed {
                attempt = 0;
                self.refreshed_after_refusal = false;
            }
            let wait = match ended {
                Ended::Stop(reason) => break reason,
                Ended::Reconnect { new_token, wait } => {
                    if new_token {
                        self.token = None;
                    }
                    wait
                }
            };
            self.set_state(State::Disconnected);
            let delay = match wait {
                Wait::Now => Duration::ZERO,
                Wait::Jitter => self.opts.backoff.jitter(),
                Wait::Backoff => {
                    let d = self.opts.backoff.delay(attempt);
                    attempt = attempt.saturating_add(1);
                    d
                }
                Wait::RetryAfter(ra) => {
                    let d = reconnect_delay(self.opts.backoff.delay(attempt), Some(ra));
                    attempt = attempt.saturating_add(1);
                    d
                }
            };
            tracing::debug!(?delay, attempt, "crier client: reconnecting after a backoff");
            if let Err(reason) = self.offline(tokio::time::sleep(delay)).await {
                break reason;
            }
        };
        self.finish(reason);
    }

    /// Stops for good: every subscription ends, every waiting request fails.
    fn finish(&mut self, reason: CloseReason) {
        let failed = matches!(reason, CloseReason::Handshake { .. });
        tracing::debug!(?reason, "crier client closed");
        if let Ok(mut r) = self.shared.close_reason.lock() {
            *r = Some(reason);
        }
        for (_, sub) in self.subs.drain() {
            sub.emit(Event::Ended(EndReason::ClientClosed));
        }
        for r in self.queued.drain(..) {
            let _ = r.reply.send(Err(Error::Closed));
        }
        self.commands.close();
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Request(r) => {
                    let _ = r.reply.send(Err(Error::Closed));
                }
                Command::Subscribe { events, .. } => {
                    let _ = events.send(Event::Ended(EndReason::ClientClosed));
                }
                _ => {}
            }
        }
        self.set_state(if failed { State::Failed } else { State::Closed });
    }

    /// Runs `fut` while keeping the book of commands (no connection to send on);
    /// `Err` when the client is closed meanwhile.
    async fn offline<F: Future>(&mut self, fut: F) -> Result<F::Output, CloseReason> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                out = &mut fut => return Ok(out),
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Close) => return Err(CloseReason::Client),
                    Some(Command::Request(r)) => self.queued.push_back(r),
                    Some(cmd) => {
                        self.book(cmd);
                    }
                },
            }
        }
    }

    /// Books a subscribe or unsubscribe; returns what must be sent when connected.
    fn book(&mut self, cmd: Command) -> Option<(String, Option<StreamPosition>, bool)> {
        match cmd {
            Command::Subscribe { channel, from, generation, events } => {
                if self.subs.contains_key(&channel) {
                    let _ = events.send(Event::Ended(EndReason::Refused(ServerError {
                        code: "already_subscribed".into(),
                        message: format!("this client already has a subscription to `{channel}`"),
                    })));
                    return None;
                }
                let sub = Sub { generation, events, tracker: Tracker::new(from.clone()), refusals: 0, server: false };
                self.subs.insert(channel.clone(), sub);
                Some((channel, from, true))
            }
            Command::Unsubscribe { channel, generation } => {
                if self.subs.get(&channel).is_some_and(|s| s.generation == generation) {
                    self.subs.remove(&channel);
                    return Some((channel, None, false));
                }
                None
            }
            Command::Request(_) | Command::Close => None,
        }
    }

    async fn fetch_token(&mut self) -> Result<(), Ended> {
        if self.token.is_some() {
            return Ok(());
        }
        match &self.opts.token {
            TokenSource::None => Ok(()),
            TokenSource::Static(t) => {
                self.token = Some(t.clone());
                Ok(())
            }
            TokenSource::Provider(p) => {
                let fut = p();
                match self.offline(fut).await {
                    Err(reason) => Err(Ended::Stop(reason)),
                    Ok(Ok(t)) => {
                        self.token = Some(t);
                        Ok(())
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "crier client: the token provider failed; retrying");
                        Err(Ended::refresh())
                    }
                }
            }
        }
    }

    /// One connection attempt and, when it succeeds, the connection's life.
    /// Returns how it ended and whether `welcome` was reached.
    async fn connection(&mut self) -> (Ended, bool) {
        if let Err(ended) = self.fetch_token().await {
            return (ended, false);
        }
        let url = &self.opts.urls[self.url_index % self.opts.urls.len().max(1)];
        self.url_index = self.url_index.wrapping_add(1);
        let request = match build_request(url, self.token.as_deref()) {
            Ok(r) => r,
            Err(e) => return (Ended::Stop(CloseReason::Invalid(e)), false),
        };
        let connect =
            timeout(self.opts.connect_timeout, tokio_tungstenite::connect_async_with_config(request, None, true));
        let mut ws = match self.offline(connect).await {
            Err(reason) => return (Ended::Stop(reason), false),
            Ok(Err(_elapsed)) => return (Ended::reconnect(), false),
            Ok(Ok(Err(e))) => return (self.refused(e), false),
            Ok(Ok(Ok((ws, _response)))) => ws,
        };
        let has_provider = self.opts.token.has_provider();
        let welcome = match self.offline(timeout(self.opts.connect_timeout, read_welcome(&mut ws, has_provider))).await
        {
            Err(reason) => {
                let _ = timeout(Duration::from_secs(1), ws.close(None)).await;
                return (Ended::Stop(reason), false);
            }
            Ok(Ok(Ok(w))) => w,
            Ok(Ok(Err(ended))) => return (ended, false),
            Ok(Err(_elapsed)) => return (Ended::reconnect(), false),
        };
        (self.serve(ws, welcome).await, true)
    }

    /// A failed handshake: stop or retry (see the module docs).
    fn refused(&mut self, e: WsError) -> Ended {
        match e {
            WsError::Http(resp) => {
                let status = resp.status().as_u16();
                let error = resp
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<HttpError>(b).ok())
                    .map(|b| ServerError { code: b.error, message: b.message });
                tracing::debug!(status, ?error, "crier client: handshake refused");
                // 429 and 503 may say when to come back (seconds; an HTTP date is not used).
                let retry_after = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|secs| Duration::from_secs(secs.min(3600)));
                match status {
                    401 | 403 if self.opts.token.has_provider() && !self.refreshed_after_refusal => {
                        self.refreshed_after_refusal = true;
                        Ended::refresh()
                    }
                    400 | 401 | 403 | 426 => {
                        tracing::warn!(status, ?error, "crier client: the handshake was refused; giving up (failed)");
                        Ended::Stop(CloseReason::Handshake { status, error })
                    }
                    _ => match retry_after {
                        Some(ra) => Ended::Reconnect { new_token: false, wait: Wait::RetryAfter(ra) },
                        None => Ended::reconnect(),
                    },
                }
            }
            WsError::Url(e) => Ended::Stop(CloseReason::Invalid(e.to_string())),
            e => {
                tracing::debug!(error = %e, "crier client: connection failed");
                Ended::reconnect()
            }
        }
    }

    /// Serves one established connection until it ends.
    async fn serve(&mut self, ws: Ws, welcome: Welcome) -> Ended {
        let ping_interval = self.opts.ping_interval.or(welcome.ping_interval).unwrap_or(Duration::from_secs(25));
        if let Ok(mut w) = self.shared.welcome.lock() {
            *w = Some(welcome);
        }
        self.shared.connections.fetch_add(1, Ordering::Relaxed);
        let mut conn = Conn {
            ws,
            pending: HashMap::new(),
            last_heard: Instant::now(),
            ping_sent: None,
            ping_interval,
            refresh_at: None,
            refreshing: None,
            retries: Vec::new(),
        };
        self.schedule_refresh(&mut conn);
        self.set_state(State::Connected);
        let ended = match self.resume(&mut conn).await {
            Ok(()) => self.serve_loop(&mut conn).await,
            Err(()) => Ended::reconnect(),
        };
        self.disconnected(conn);
        ended
    }

    /// Resubscribes every channel (with recovery) and sends the requests that waited.
    async fn resume(&mut self, conn: &mut Conn) -> Result<(), ()> {
        // A server subscription without a position waits for the server to make it again.
        let subs: Vec<(String, Option<StreamPosition>)> = self
            .subs
            .iter()
            .filter(|(_, s)| !s.server || s.tracker.position.is_some())
            .map(|(c, s)| (c.clone(), s.tracker.position.clone()))
            .collect();
        for (channel, position) in subs {
            self.send_subscribe(conn, channel, position).await?;
        }
        while let Some(r) = self.queued.pop_front() {
            self.send_request(conn, r).await?;
        }
        Ok(())
    }

    fn schedule_refresh(&self, conn: &mut Conn) {
        conn.refresh_at = match (&self.opts.token, &self.token) {
            (TokenSource::Provider(_), Some(t)) => token::refresh_in(token::expiry(t)).map(|d| Instant::now() + d),
            _ => None,
        };
    }

    async fn send(conn: &mut Conn, frame: &ClientFrame<'_>) -> Result<(), ()> {
        conn.ws.send(WsMessage::text(frame.encode())).await.map_err(|e| {
            tracing::debug!(error = %e, "crier client: send failed");
        })
    }

    async fn send_subscribe(
        &mut self,
        conn: &mut Conn,
        channel: String,
        recover: Option<StreamPosition>,
    ) -> Result<(), ()> {
        let Some(generation) = self.subs.get(&channel).map(|s| s.generation) else { return Ok(()) };
        let id = self.id();
        Self::send(conn, &ClientFrame::Subscribe { id, channel: &channel, recover: recover.as_ref() }).await?;
        conn.pending.insert(id, Pending::Subscribe { channel, generation });
        Ok(())
    }

    async fn send_request(&mut self, conn: &mut Conn, r: Request) -> Result<(), ()> {
        if r.reply.is_closed() {
            return Ok(()); // the caller gave up (timeout)
        }
        let id = self.id();
        let sent = match &r.kind {
            RequestKind::Publish { channel, data, idempotency_key } => {
                let idempotency_key = idempotency_key.as_deref();
                Self::send(conn, &ClientFrame::Publish { id, channel, data, idempotency_key }).await
            }
            RequestKind::Presence { channel } => Self::send(conn, &ClientFrame::Presence { id, channel }).await,
            RequestKind::PresenceStats { channel } => {
                Self::send(conn, &ClientFrame::PresenceStats { id, channel }).await
            }
            RequestKind::History { channel, since, limit } => {
                Self::send(conn, &ClientFrame::History { id, channel, since: since.as_ref(), limit: *limit }).await
            }
        };
        // Registered even when the send failed: `disconnected` then settles it like any request
        // in flight (a publish whose bytes may have left is of unknown outcome).
        conn.pending.insert(id, Pending::Request(r));
        sent
    }

    async fn serve_loop(&mut self, conn: &mut Conn) -> Ended {
        loop {
            let idle_at = match conn.ping_sent {
                Some(at) => at + self.opts.pong_timeout,
                None => conn.last_heard + conn.ping_interval,
            };
            let retry_at = conn.retries.iter().map(|(at, _, _)| *at).min();
            let refresh_at = conn.refresh_at.filter(|_| conn.refreshing.is_none());
            tokio::select! {
                msg = conn.ws.next() => {
                    let msg = match msg {
                        Some(Ok(m)) => m,
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "crier client: connection lost");
                            return Ended::reconnect();
                        }
                        None => return Ended::reconnect(),
                    };
                    conn.last_heard = Instant::now();
                    conn.ping_sent = None;
                    match msg {
                        WsMessage::Text(text) => self.on_text(conn, text.as_str()),
                        WsMessage::Close(frame) => {
                            let _ = timeout(Duration::from_secs(1), conn.ws.close(None)).await;
                            return self.on_close(frame);
                        }
                        _ => {}
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Close) => {
                        let frame = CloseFrame { code: 1000.into(), reason: "client closed".into() };
                        if timeout(Duration::from_secs(1), conn.ws.close(Some(frame))).await.is_ok() {
                            // Wait (bounded) for the server's close reply.
                            let _ = timeout(Duration::from_secs(1), async {
                                while let Some(Ok(_)) = conn.ws.next().await {}
                            }).await;
                        }
                        return Ended::Stop(CloseReason::Client);
                    }
                    Some(Command::Request(r)) => {
                        if self.send_request(conn, r).await.is_err() {
                            return Ended::reconnect();
                        }
                    }
                    Some(cmd) => {
                        if let Some((channel, from, subscribe)) = self.book(cmd) {
                            let sent = if subscribe {
                                self.send_subscribe(conn, channel, from).await
                            } else {
                                let id = self.id();
                                conn.pending.insert(id, Pending::Ignore);
                                Self::send(conn, &ClientFrame::Unsubscribe { id, channel: &channel }).await
                            };
                            if sent.is_err() {
                                return Ended::reconnect();
                            }
                        }
                    }
                },
                _ = sleep_until(idle_at) => {
                    if conn.ping_sent.is_some() {
                        tracing::debug!("crier client: no answer to ping; the connection is dead");
                        return Ended::reconnect();
                    }
                    // Any frame that comes back proves the connection; the pong is not awaited.
                    let id = self.id();
                    if Self::send(conn, &ClientFrame::Ping { id }).await.is_err() {
                        return Ended::reconnect();
                    }
                    conn.ping_sent = Some(Instant::now());
                }
                _ = sleep_until(refresh_at.unwrap_or_else(never)), if refresh_at.is_some() => {
                    if let TokenSource::Provider(p) = &self.opts.token {
                        conn.refreshing = Some(tokio::spawn(p()));
                    }
                    conn.refresh_at = None;
                }
                got = join(&mut conn.refreshing) => {
                    conn.refreshing = None;
                    match got {
                        Ok(Ok(token)) => {
                            let id = self.id();
                            if Self::send(conn, &ClientFrame::Refresh { id, token: &token }).await.is_err() {
                                return Ended::reconnect();
                            }
                            conn.pending.insert(id, Pending::Refresh(token));
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "crier client: the token provider failed; retrying in 1s");
                            conn.refresh_at = Some(Instant::now() + Duration::from_secs(1));
                        }
                        Err(e) => tracing::warn!(error = %e, "crier client: the token provider panicked"),
                    }
                }
                _ = sleep_until(retry_at.unwrap_or_else(never)), if retry_at.is_some() => {
                    let now = Instant::now();
                    let (due, later): (Vec<_>, Vec<_>) = conn.retries.drain(..).partition(|(at, _, _)| *at <= now);
                    conn.retries = later;
                    for (_, channel, generation) in due {
                        // Only the subscription that was refused (not a newer one of the channel).
                        let Some(sub) = self.subs.get(&channel).filter(|s| s.generation == generation) else {
                            continue;
                        };
                        let position = sub.tracker.position.clone();
                        if self.send_subscribe(conn, channel, position).await.is_err() {
                            return Ended::reconnect();
                        }
                    }
                }
            }
        }
    }

    fn on_close(&self, frame: Option<CloseFrame>) -> Ended {
        let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
        tracing::debug!(code, reason, "crier client: the server closed the connection");
        close_decision(code, reason, self.opts.token.has_provider())
    }

    /// One text frame from the server.
    fn on_text(&mut self, conn: &mut Conn, text: &str) {
        let Some(frame) = frames::decode(text) else {
            tracing::debug!("crier client: ignoring a frame it cannot read");
            return;
        };
        match frame {
            ServerFrame::Message(m) => self.on_message(m),
            ServerFrame::Ack { id: Some(id), epoch, offset, recovered } => match conn.pending.remove(&id) {
                Some(Pending::Subscribe { channel, generation }) => {
                    let Some(sub) = self.subs.get_mut(&channel).filter(|s| s.generation == generation) else {
                        return;
                    };
                    sub.refusals = 0;
                    let (epoch, offset) = (epoch.unwrap_or_default(), offset.unwrap_or(0));
                    let gap = sub.tracker.on_ack(&epoch, offset, recovered);
                    sub.emit(Event::Subscribed { epoch: epoch.clone(), offset, recovered });
                    if let Some(reason) = gap {
                        sub.emit(Event::Gap(Gap { channel, epoch, offset, reason }));
                    }
                }
                Some(Pending::Request(r)) => {
                    let _ = r.reply.send(Ok(Reply::Published { epoch, offset: offset.unwrap_or(0) }));
                }
                Some(Pending::Refresh(token)) => {
                    self.token = Some(token);
                    self.schedule_refresh(conn);
                }
                Some(Pending::Ignore) | None => {}
            },
            ServerFrame::Error { id: Some(id), code, message, channel } => {
                let error = ServerError { code, message };
                match conn.pending.remove(&id) {
                    Some(Pending::Subscribe { channel, generation }) => {
                        self.subscribe_refused(conn, channel, generation, error)
                    }
                    Some(Pending::Request(r)) => {
                        let _ = r.reply.send(Err(Error::Server(error)));
                    }
                    Some(Pending::Refresh(_)) => {
                        tracing::warn!(%error, "crier client: token refresh refused; the connection ends at expiry");
                    }
                    Some(Pending::Ignore) | None => {
                        tracing::debug!(%error, ?channel, "crier client: error frame");
                    }
                }
            }
            ServerFrame::Error { id: None, code, message, .. } => {
                tracing::debug!(code, message, "crier client: error frame without id");
            }
            ServerFrame::Presence { id: Some(id), clients } => {
                if let Some(Pending::Request(r)) = conn.pending.remove(&id) {
                    let _ = r.reply.send(Ok(Reply::Presence(clients)));
                }
            }
            ServerFrame::History { id: Some(id), epoch, offset, messages, next } => {
                if let Some(Pending::Request(r)) = conn.pending.remove(&id) {
                    let messages = messages.into_iter().map(into_message).collect();
                    let _ = r.reply.send(Ok(Reply::History { epoch, offset, messages, next }));
                }
            }
            ServerFrame::PresenceStats { id: Some(id), clients, users } => {
                if let Some(Pending::Request(r)) = conn.pending.remove(&id) {
                    let _ = r.reply.send(Ok(Reply::PresenceStats { clients, users }));
                }
            }
            ServerFrame::Join(e) | ServerFrame::Leave(e) if !self.subs.contains_key(&e.channel) => {}
            ServerFrame::Join(e) => self.on_presence_event(e, true),
            ServerFrame::Leave(e) => self.on_presence_event(e, false),
            ServerFrame::Gap { channel, epoch, offset } => {
                if let Some(sub) = self.subs.get_mut(&channel) {
                    sub.tracker.on_gap(&epoch, offset);
                    sub.emit(Event::Gap(Gap { channel, epoch, offset, reason: GapReason::Server }));
                }
            }
            ServerFrame::Subscribed { channel, epoch, offset, recovered } => {
                self.on_server_subscribed(conn, channel, epoch, offset, recovered)
            }
            ServerFrame::Unsubscribed { channel, reason } => {
                if let Some(sub) = self.subs.remove(&channel) {
                    sub.emit(Event::Ended(EndReason::Revoked(reason)));
                }
            }
            ServerFrame::Welcome { .. }
            | ServerFrame::Ack { id: None, .. }
            | ServerFrame::Presence { id: None, .. }
            | ServerFrame::PresenceStats { id: None, .. }
            | ServerFrame::History { id: None, .. }
            | ServerFrame::Pong {}
            | ServerFrame::Unknown => {}
        }
    }

    fn on_presence_event(&mut self, e: PresenceEventFrame, joined: bool) {
        let Some(sub) = self.subs.get_mut(&e.channel) else { return };
        let entry = PresenceEntry { client: e.client, user: e.user, node: e.node };
        sub.emit(if joined { Event::Join(entry) } else { Event::Leave(entry) });
    }

    fn on_message(&mut self, m: MessageFrame) {
        let Some(sub) = self.subs.get_mut(&m.channel) else { return };
        match sub.tracker.on_message(&m.epoch, m.offset) {
            Verdict::Duplicate => {
                tracing::trace!(channel = m.channel, offset = m.offset, "crier client: duplicate dropped");
            }
            Verdict::Deliver => sub.emit(Event::Message(into_message(m))),
            Verdict::DeliverAfter(reason) => {
                let (epoch, offset) = (m.epoch.clone(), m.offset.saturating_sub(1));
                sub.emit(Event::Gap(Gap { channel: m.channel.clone(), epoch, offset, reason }));
                sub.emit(Event::Message(into_message(m)));
            }
        }
    }

    /// The server subscribed the connection. A new channel becomes a [`Subscription`] sent to
    /// [`crate::Client::server_subscriptions`]; one the client tracks already (a server
    /// subscription after a reconnect) is recovered from its position when the server's is
    /// ahead of it (a `subscribe` with `recover` takes the server's over), else acknowledged.
    fn on_server_subscribed(
        &mut self,
        conn: &mut Conn,
        channel: String,
        epoch: String,
        offset: u64,
        recovered: Option<bool>,
    ) {
        if let Some(sub) = self.subs.get_mut(&channel) {
            sub.server = true;
            let generation = sub.generation;
            let in_flight = conn.pending.values().any(
                |p| matches!(p, Pending::Subscribe { channel: c, generation: g } if *c == channel && *g == generation),
            );
            if in_flight {
                return; // the client's own subscribe answers
            }
            match &sub.tracker.position {
                Some(p) if p.epoch != epoch || p.offset < offset => {
                    conn.retries.push((Instant::now(), channel, generation));
                }
                _ => {
                    let gap = sub.tracker.on_ack(&epoch, offset, recovered);
                    sub.emit(Event::Subscribed { epoch: epoch.clone(), offset, recovered });
                    if let Some(reason) = gap {
                        sub.emit(Event::Gap(Gap { channel, epoch, offset, reason }));
                    }
                }
            }
            return;
        }
        let Some(commands) = self.commands_tx.upgrade() else { return };
        self.server_generation += 1;
        let generation = self.server_generation;
        let (events, rx) = mpsc::unbounded_channel();
        let mut tracker = Tracker::new(None);
        // Recovered by the server: the missed messages (at or below `offset`) follow.
        if recovered.is_none() {
            tracker.on_ack(&epoch, offset, None);
        }
        let sub = Sub { generation, events, tracker, refusals: 0, server: true };
        sub.emit(Event::Subscribed { epoch, offset, recovered });
        self.subs.insert(channel.clone(), sub);
        let handle = crate::subscription::Subscription { channel, generation, events: rx, commands };
        if let Err(mpsc::error::SendError(handle)) = self.server_subs.send(handle) {
            // Nobody can take it (the client is gone): dropping it unsubscribes.
            drop(handle);
        }
    }

    /// A subscribe answered with an error: retried later when the refusal is temporary, else the
    /// subscription ends.
    fn subscribe_refused(&mut self, conn: &mut Conn, channel: String, generation: u64, error: ServerError) {
        let Some(sub) = self.subs.get_mut(&channel).filter(|s| s.generation == generation) else { return };
        if sub.server && error.code == "forbidden" {
            // Not subscribed by the server again (yet) on this connection: wait for its frame.
            return;
        }
        if matches!(error.code.as_str(), "rate_limited" | "unavailable") {
            let delay = self.opts.backoff.delay(sub.refusals).max(Duration::from_millis(50));
            sub.refusals = sub.refusals.saturating_add(1);
            tracing::debug!(%error, ?delay, channel, "crier client: subscribe refused for now; retrying");
            conn.retries.push((Instant::now() + delay, channel, generation));
            return;
        }
        if let Some(sub) = self.subs.remove(&channel) {
            sub.emit(Event::Ended(EndReason::Refused(error)));
        }
    }

    /// The connection is gone: requests in flight are settled (reads wait for the next
    /// connection, publishes fail with [`Error::Disconnected`]).
    fn disconnected(&mut self, conn: Conn) {
        if let Some(h) = conn.refreshing {
            h.abort();
        }
        let mut pending: Vec<(u64, Pending)> = conn.pending.into_iter().collect();
        pending.sort_by_key(|(id, _)| std::cmp::Reverse(*id));
        for (_, p) in pending {
            if let Pending::Request(r) = p {
                match r.kind {
                    RequestKind::Publish { .. } => {
                        let _ = r.reply.send(Err(Error::Disconnected));
                    }
                    _ => self.queued.push_front(r),
                }
            }
        }
    }
}

fn into_message(m: MessageFrame) -> Message {
    Message { channel: m.channel, epoch: m.epoch, offset: m.offset, data: m.data }
}

/// Awaits the handle if there is one; never resolves otherwise.
async fn join<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

#[derive(serde::Deserialize)]
struct HttpError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

fn build_request(url: &str, token: Option<&str>) -> Result<tokio_tungstenite::tungstenite::http::Request<()>, String> {
    let mut req = url.into_client_request().map_err(|e| format!("invalid URL: {e}"))?;
    if let Some(t) = token {
        let value = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| "the token holds characters a header cannot carry".to_string())?;
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    Ok(req)
}

/// Reads the first frame, which must be `welcome`.
async fn read_welcome(ws: &mut Ws, has_provider: bool) -> Result<Welcome, Ended> {
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(t))) => {
                return match frames::decode(t.as_str()) {
                    Some(ServerFrame::Welcome { client, user, node, ping_interval_ms }) => Ok(Welcome {
                        client,
                        user,
                        node,
                        ping_interval: ping_interval_ms.filter(|ms| *ms > 0).map(Duration::from_millis),
                    }),
                    _ => {
                        tracing::warn!("crier client: the first frame was not `welcome`");
                        Err(Ended::reconnect())
                    }
                };
            }
            Some(Ok(WsMessage::Close(frame))) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                return Err(close_decision(code, reason, has_provider));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(Ended::reconnect()),
        }
    }
}

#[cfg(test)]
mod retry_after_tests {
    use super::*;

    #[test]
    fn retry_after_is_the_least_wait_with_jitter_up_to_twice_it() {
        let ra = Duration::from_secs(2);
        let delays: Vec<Duration> = (0..200).map(|_| reconnect_delay(Duration::from_millis(100), Some(ra))).collect();
        assert!(delays.iter().all(|d| *d >= ra && *d <= ra * 2), "{delays:?}");
        assert!(delays.iter().any(|d| *d != delays[0]), "no jitter: {delays:?}");
        // A longer backoff draw wins; no Retry-After: the backoff alone.
        assert_eq!(reconnect_delay(Duration::from_secs(9), Some(ra)), Duration::from_secs(9));
        assert_eq!(reconnect_delay(Duration::from_millis(300), None), Duration::from_millis(300));
        assert_eq!(reconnect_delay(Duration::from_millis(300), Some(Duration::ZERO)), Duration::from_millis(300));
    }
}
