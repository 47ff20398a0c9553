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
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crier_protocol::StreamPosition;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use crate::app_position::AppPosition;
use crate::error::{CloseReason, Error, ServerError};
use crate::events::{EndReason, Event};
use crate::frames::ClientFrame;
use crate::protocol::{Options, Request, RequestKind, Shared, ToDriver};
use crate::state::{State, Welcome};
use crate::subscription::Subscription;
use crate::token::{self, BoxError, TokenSource};

mod close;
mod incoming;
#[cfg(test)]
mod tests;

use close::{Ended, Wait, build_request, read_welcome, reconnect_delay};

/// What the driver needs of a WebSocket connection: tokio-tungstenite's stream over TCP (or TLS),
/// or an in-memory one in the unit tests.
pub(crate) trait Transport:
    Sink<WsMessage, Error = WsError> + Stream<Item = Result<WsMessage, WsError>> + Unpin
{
}

impl<T> Transport for T where T: Sink<WsMessage, Error = WsError> + Stream<Item = Result<WsMessage, WsError>> + Unpin {}

struct Sub {
    generation: u64,
    events: mpsc::UnboundedSender<Event>,
    delivered: AppPosition,
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

/// Per-connection state.
struct Conn<S> {
    ws: S,
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
    commands: mpsc::UnboundedReceiver<ToDriver>,
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
    commands_tx: mpsc::WeakUnboundedSender<ToDriver>,
    /// Where server subscriptions go ([`crate::Client::server_subscriptions`]).
    server_subs: mpsc::UnboundedSender<Subscription>,
    server_generation: u64,
}

impl Driver {
    pub(crate) fn new(
        opts: Options,
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<ToDriver>,
        commands_tx: mpsc::WeakUnboundedSender<ToDriver>,
        server_subs: mpsc::UnboundedSender<Subscription>,
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
                ToDriver::Request(r) => {
                    let _ = r.reply.send(Err(Error::Closed));
                }
                ToDriver::Subscribe { events, .. } => {
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
                    None | Some(ToDriver::Close) => return Err(CloseReason::Client),
                    Some(ToDriver::Request(r)) => self.queued.push_back(r),
                    Some(cmd) => {
                        self.book(cmd);
                    }
                },
            }
        }
    }

    /// Books a subscribe or unsubscribe; returns what must be sent when connected.
    fn book(&mut self, cmd: ToDriver) -> Option<(String, Option<StreamPosition>, bool)> {
        match cmd {
            ToDriver::Subscribe { channel, from, generation, events } => {
                if self.subs.contains_key(&channel) {
                    let _ = events.send(Event::Ended(EndReason::Refused(ServerError {
                        code: "already_subscribed".into(),
                        message: format!("this client already has a subscription to `{channel}`"),
                    })));
                    return None;
                }
                let sub =
                    Sub { generation, events, delivered: AppPosition::new(from.clone()), refusals: 0, server: false };
                self.subs.insert(channel.clone(), sub);
                Some((channel, from, true))
            }
            ToDriver::Unsubscribe { channel, generation } => {
                if self.subs.get(&channel).is_some_and(|s| s.generation == generation) {
                    self.subs.remove(&channel);
                    return Some((channel, None, false));
                }
                None
            }
            ToDriver::Request(_) | ToDriver::Close => None,
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

    /// Serves one established connection until it ends.
    async fn serve<S: Transport>(&mut self, ws: S, welcome: Welcome) -> Ended {
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
    async fn resume<S: Transport>(&mut self, conn: &mut Conn<S>) -> Result<(), ()> {
        // A server subscription without a position waits for the server to make it again.
        let subs: Vec<(String, Option<StreamPosition>)> = self
            .subs
            .iter()
            .filter(|(_, s)| !s.server || s.delivered.position.is_some())
            .map(|(c, s)| (c.clone(), s.delivered.position.clone()))
            .collect();
        for (channel, position) in subs {
            self.send_subscribe(conn, channel, position).await?;
        }
        while let Some(r) = self.queued.pop_front() {
            self.send_request(conn, r).await?;
        }
        Ok(())
    }

    fn schedule_refresh<S>(&self, conn: &mut Conn<S>) {
        conn.refresh_at = match (&self.opts.token, &self.token) {
            (TokenSource::Provider(_), Some(t)) => token::refresh_in(token::expiry(t)).map(|d| Instant::now() + d),
            _ => None,
        };
    }

    async fn send<S: Transport>(conn: &mut Conn<S>, frame: &ClientFrame<'_>) -> Result<(), ()> {
        conn.ws.send(WsMessage::text(frame.encode())).await.map_err(|e| {
            tracing::debug!(error = %e, "crier client: send failed");
        })
    }

    async fn send_subscribe<S: Transport>(
        &mut self,
        conn: &mut Conn<S>,
        channel: String,
        recover: Option<StreamPosition>,
    ) -> Result<(), ()> {
        let Some(generation) = self.subs.get(&channel).map(|s| s.generation) else { return Ok(()) };
        let id = self.id();
        Self::send(conn, &ClientFrame::Subscribe { id, channel: &channel, recover: recover.as_ref() }).await?;
        conn.pending.insert(id, Pending::Subscribe { channel, generation });
        Ok(())
    }

    async fn send_request<S: Transport>(&mut self, conn: &mut Conn<S>, r: Request) -> Result<(), ()> {
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

    async fn serve_loop<S: Transport>(&mut self, conn: &mut Conn<S>) -> Ended {
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
                            let _ = timeout(Duration::from_secs(1), conn.ws.send(WsMessage::Close(None))).await;
                            return self.on_close(frame);
                        }
                        _ => {}
                    }
                }
                cmd = self.commands.recv() => match cmd {
                    None | Some(ToDriver::Close) => {
                        let frame = CloseFrame { code: 1000.into(), reason: "client closed".into() };
                        if timeout(Duration::from_secs(1), conn.ws.send(WsMessage::Close(Some(frame)))).await.is_ok() {
                            // Wait (bounded) for the server's close reply.
                            let _ = timeout(Duration::from_secs(1), async {
                                while let Some(Ok(_)) = conn.ws.next().await {}
                            }).await;
                        }
                        return Ended::Stop(CloseReason::Client);
                    }
                    Some(ToDriver::Request(r)) => {
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
                        let position = sub.delivered.position.clone();
                        if self.send_subscribe(conn, channel, position).await.is_err() {
                            return Ended::reconnect();
                        }
                    }
                }
            }
        }
    }

    /// The connection is gone: requests in flight are settled (reads wait for the next
    /// connection, publishes fail with [`Error::Disconnected`]).
    fn disconnected<S>(&mut self, conn: Conn<S>) {
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

/// Awaits the handle if there is one; never resolves otherwise.
async fn join<T>(h: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match h {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}
