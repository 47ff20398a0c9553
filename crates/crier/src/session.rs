//! One WebSocket connection, from `welcome` to close.
//!
//! One task per connection: it reads frames and answers them, runs the heartbeat and
//! token-expiry timers, and writes what the connection's [`Outbox`] holds (everything queued is
//! taken in one go and written with one flush). Everything the server sends goes through the
//! outbox, so its byte bound covers replies as well as messages; a write stuck on a socket that
//! does not drain is abandoned as soon as the outbox is aborted (slow consumer, heartbeat).
//!
//! Close codes sent from here: 1007 (invalid UTF-8), 1009 (frame too large), 4001 (token
//! expired), 4008 (rate-limit abuse), 4010 (heartbeat timeout); 4009 comes from the outbox,
//! 4003 from the registry, 1012 from the drain. See `crier_protocol::codes`.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use crier_core::node::SubscribeError;
use crier_core::{Close, ConnId, Next, Out, Outbox};
use crier_protocol::channel::any_matches;
use crier_protocol::frames::{self, ClientFrame, PresenceEntry, ServerFrame};
use crier_protocol::{CloseCode, ErrorCode, StreamPosition, validate_channel};
use futures_util::{Sink, SinkExt, StreamExt};
use tokio::time::{Instant, sleep_until};

use crate::auth::Claims;
use crate::config::RateScope;
use crate::handshake::ConnSlot;
use crate::metrics as m;
use crate::state::AppState;

/// Refused frames within [`STRIKE_WINDOW`] after which the connection is closed with 4008.
const MAX_STRIKES: u32 = 50;
const STRIKE_WINDOW: Duration = Duration::from_secs(10);
/// Largest `limit` of a `history` frame.
const MAX_HISTORY_LIMIT: usize = 1000;

/// A connection's state, owned by its session task.
pub struct Session {
    st: AppState,
    conn: ConnId,
    client: String,
    user: Arc<str>,
    claims: Claims,
    outbox: Arc<Outbox>,
    subs: HashSet<String>,
    strikes: u32,
    strike_window: Instant,
    expires_at: Option<Instant>,
    slot: Option<ConnSlot>,
}

impl Session {
    pub fn new(st: AppState, conn: ConnId, client: String, claims: Claims, slot: Option<ConnSlot>) -> Session {
        let outbox = Arc::new(Outbox::new(st.config.client_queue_max_bytes));
        Session {
            conn,
            client,
            user: claims.sub.as_str().into(),
            expires_at: expiry_instant(claims.exp),
            claims,
            outbox,
            subs: HashSet::new(),
            strikes: 0,
            strike_window: Instant::now(),
            slot,
            st,
        }
    }

    fn send(&self, frame: &ServerFrame<'_>) {
        self.outbox.push(frame.encode());
    }

    fn error(&self, id: Option<u64>, code: ErrorCode, message: &str, channel: Option<&str>) {
        metrics::counter!(m::CLIENT_ERRORS, "code" => code.as_str()).increment(1);
        self.send(&ServerFrame::Error { id, code: code.as_str(), message, channel });
    }

    fn can_subscribe(&self, channel: &str) -> bool {
        any_matches(&self.claims.channels, channel)
            || (!self.claims.sub.is_empty()
                && channel.strip_prefix("user:").is_some_and(|rest| rest == self.claims.sub))
    }

    /// Validates a channel name and the right to read it; sends the error when refused.
    fn readable(&self, id: Option<u64>, channel: &str) -> bool {
        if let Err(e) = validate_channel(channel) {
            self.error(id, ErrorCode::InvalidChannel, &e.to_string(), None);
            return false;
        }
        if !self.can_subscribe(channel) {
            self.error(id, ErrorCode::Forbidden, "the token does not allow this channel", Some(channel));
            return false;
        }
        true
    }

    /// Counts a frame against the user's rate (this node's, or the cluster's with
    /// `user_rate_scope = cluster`); `false` (and maybe a 4008 close) when refused.
    async fn admit(&mut self, id: Option<u64>) -> bool {
        if self.allowed().await {
            return true;
        }
        metrics::counter!(m::RATE_LIMITED, "kind" => "user").increment(1);
        let now = Instant::now();
        if now.duration_since(self.strike_window) > STRIKE_WINDOW {
            self.strike_window = now;
            self.strikes = 0;
        }
        self.strikes += 1;
        if self.strikes >= MAX_STRIKES {
            self.outbox.close(CloseCode::RATE_LIMITED, "too many rate-limit violations", false);
        } else {
            self.error(id, ErrorCode::RateLimited, "too many frames; slow down", None);
        }
        false
    }

    /// The rate decision. The cluster-wide limiter lives in the broker; if the broker cannot
    /// answer, the node-local limiter decides (fail over, never fail open without a limit).
    async fn allowed(&self) -> bool {
        let cfg = &self.st.config;
        if cfg.user_rate_scope == RateScope::Cluster && self.st.broker().shares_rate_limits() {
            match self.st.broker().rate_limit(&self.user, cfg.user_rate, cfg.user_burst).await {
                Ok(limited) => return limited.is_none(),
                Err(e) => tracing::debug!(error = %e, "cluster rate limit unavailable; using the node's"),
            }
        }
        self.st.limits.check_frame(&self.user)
    }

    async fn on_text(&mut self, text: &str) {
        // Decoded first so that even a refusal carries the frame's id.
        let decoded = frames::decode(text);
        let id = match &decoded {
            Ok(frame) => frame.id(),
            Err(e) => e.id,
        };
        if !self.admit(id).await {
            return;
        }
        match decoded {
            Ok(frame) => self.on_frame(frame).await,
            Err(e) => self.error(e.id, e.code, &e.message, None),
        }
    }

    /// The broker-bound branches are boxed: an idle connection's task then holds only a pointer
    /// instead of the largest of those futures inline (~1.5 KiB per connection).
    async fn on_frame(&mut self, frame: ClientFrame<'_>) {
        match frame {
            ClientFrame::Subscribe { id, channel, recover } => Box::pin(self.subscribe(id, &channel, recover)).await,
            ClientFrame::Unsubscribe { id, channel } => Box::pin(self.unsubscribe(id, &channel)).await,
            ClientFrame::Publish { id, channel, data } => Box::pin(self.publish(id, &channel, data.get())).await,
            ClientFrame::Ping { id } => self.send(&ServerFrame::Pong { id }),
            ClientFrame::Refresh { id, token } => Box::pin(self.refresh(id, &token)).await,
            ClientFrame::Presence { id, channel } => Box::pin(self.presence(id, &channel)).await,
            ClientFrame::History { id, channel, since, limit } => {
                Box::pin(self.history(id, &channel, since, limit)).await
            }
        }
    }

    async fn subscribe(&mut self, id: Option<u64>, channel: &str, recover: Option<StreamPosition>) {
        if !self.readable(id, channel) {
            return;
        }
        if self.subs.contains(channel) {
            return self.error(id, ErrorCode::AlreadySubscribed, "already subscribed", Some(channel));
        }
        if self.subs.len() >= self.st.config.max_subscriptions_per_connection {
            return self.error(
                id,
                ErrorCode::TooManySubscriptions,
                "max_subscriptions_per_connection reached",
                Some(channel),
            );
        }
        // Presence first, so that once the client holds its ack, everyone can see it.
        let entry = PresenceEntry {
            client: self.client.clone(),
            user: self.user.to_string(),
            node: self.st.config.node_id.clone(),
        };
        if let Err(e) = self.st.broker().presence_add(channel, &entry).await {
            tracing::warn!(error = %e, "presence add failed");
        }
        let ack = |h: &crier_core::History, recovered: Option<bool>| {
            ServerFrame::Ack { id, channel: Some(channel), epoch: Some(&h.epoch), offset: Some(h.offset), recovered }
                .encode()
        };
        let result = self.st.node.subscribe(channel, self.conn, &self.outbox, recover.as_ref(), ack).await;
        if result.is_err()
            && let Err(e) = self.st.broker().presence_remove(channel, &self.client).await
        {
            tracing::warn!(error = %e, "presence remove failed");
        }
        match result {
            Ok(s) => {
                self.subs.insert(channel.to_owned());
                if let Some(ok) = s.recovered {
                    let result = if ok { "recovered" } else { "failed" };
                    metrics::counter!(m::RECOVERIES, "result" => result).increment(1);
                }
            }
            Err(SubscribeError::AlreadySubscribed) => {
                self.error(id, ErrorCode::AlreadySubscribed, "already subscribed", Some(channel))
            }
            Err(SubscribeError::Unavailable(e)) => {
                tracing::warn!(error = %e, "subscribe failed");
                self.error(id, ErrorCode::Unavailable, "broker unavailable; retry later", Some(channel))
            }
            Err(SubscribeError::Closed) => {}
        }
    }

    async fn unsubscribe(&mut self, id: Option<u64>, channel: &str) {
        if let Err(e) = validate_channel(channel) {
            return self.error(id, ErrorCode::InvalidChannel, &e.to_string(), None);
        }
        if !self.subs.remove(channel) {
            return self.error(id, ErrorCode::NotSubscribed, "not subscribed", Some(channel));
        }
        self.leave(channel).await;
        self.send(&ServerFrame::Ack { id, channel: Some(channel), epoch: None, offset: None, recovered: None });
    }

    /// Hub, broker and presence side of leaving a channel.
    async fn leave(&self, channel: &str) {
        self.st.node.unsubscribe(channel, self.conn).await;
        if let Err(e) = self.st.broker().presence_remove(channel, &self.client).await {
            tracing::warn!(error = %e, "presence remove failed");
        }
    }

    async fn publish(&mut self, id: Option<u64>, channel: &str, data: &str) {
        if let Err(e) = validate_channel(channel) {
            return self.error(id, ErrorCode::InvalidChannel, &e.to_string(), None);
        }
        if !any_matches(&self.claims.publish, channel) {
            return self.error(id, ErrorCode::Forbidden, "the token does not allow publishing here", Some(channel));
        }
        match self.st.broker().publish(channel, data, Default::default()).await {
            Ok(r) => {
                metrics::counter!(m::PUBLISHED, "source" => "client").increment(1);
                self.send(&ServerFrame::Ack {
                    id,
                    channel: Some(channel),
                    epoch: Some(&r.epoch),
                    offset: Some(r.offset),
                    recovered: None,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "client publish failed");
                self.error(
                    id,
                    ErrorCode::Unavailable,
                    "broker unavailable; the message was not published",
                    Some(channel),
                )
            }
        }
    }

    async fn refresh(&mut self, id: Option<u64>, token: &str) {
        let claims = match self.st.verifier.verify(token) {
            Ok(c) => c,
            Err(e) => return self.error(id, ErrorCode::TokenInvalid, &e.0, None),
        };
        if claims.sub != self.claims.sub {
            return self.error(id, ErrorCode::TokenInvalid, "the new token is for another user", None);
        }
        self.expires_at = expiry_instant(claims.exp);
        self.claims = claims;
        let revoked: Vec<String> = self.subs.iter().filter(|c| !self.can_subscribe(c)).cloned().collect();
        for channel in revoked {
            self.subs.remove(&channel);
            self.leave(&channel).await;
            self.send(&ServerFrame::Unsubscribed {
                channel: &channel,
                reason: "the refreshed token does not allow it",
            });
        }
        self.send(&ServerFrame::Ack { id, channel: None, epoch: None, offset: None, recovered: None });
    }

    async fn presence(&mut self, id: Option<u64>, channel: &str) {
        if !self.readable(id, channel) {
            return;
        }
        match self.st.broker().presence(channel).await {
            Ok(clients) => self.send(&ServerFrame::Presence { id, channel, clients: &clients }),
            Err(e) => {
                tracing::warn!(error = %e, "presence failed");
                self.error(id, ErrorCode::Unavailable, "broker unavailable; retry later", Some(channel))
            }
        }
    }

    async fn history(&mut self, id: Option<u64>, channel: &str, since: Option<StreamPosition>, limit: Option<usize>) {
        if !self.readable(id, channel) {
            return;
        }
        let limit = limit.unwrap_or(self.st.config.history_size).min(MAX_HISTORY_LIMIT);
        match self.st.broker().history(channel, since.as_ref(), limit).await {
            Ok(h) => {
                let frames: Vec<Bytes> = h.publications.into_iter().map(|p| p.frame).collect();
                self.outbox.push(frames::encode_history(id, channel, &h.epoch, h.offset, &frames));
            }
            Err(e) => {
                tracing::warn!(error = %e, "history failed");
                self.error(id, ErrorCode::Unavailable, "broker unavailable; retry later", Some(channel))
            }
        }
    }

    /// Leaves every channel and forgets the connection.
    async fn cleanup(&mut self) {
        for channel in std::mem::take(&mut self.subs) {
            self.leave(&channel).await;
        }
        self.st.registry.unregister(self.conn);
        if let Some(slot) = self.slot.take() {
            slot.release().await;
        }
    }
}

/// The `Instant` at which a token with this `exp` (Unix seconds) expires; `None` if never.
fn expiry_instant(exp: u64) -> Option<Instant> {
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let left = exp as f64 - now_unix;
    if left > 10.0 * 365.0 * 86400.0 {
        return None;
    }
    Some(Instant::now() + Duration::from_secs_f64(left.max(0.0)))
}

/// Heartbeat: Ping every `interval`; after a Ping, anything received within `timeout` is proof of
/// life, otherwise the connection is closed with 4010.
struct Heartbeat {
    interval: Duration,
    timeout: Duration,
    ping_sent: Option<Instant>,
    last_seen: Instant,
}

impl Heartbeat {
    fn next_wake(&self) -> Instant {
        match self.ping_sent {
            Some(at) => at + self.timeout,
            None => self.last_seen + self.interval,
        }
    }
}

/// What woke the connection task.
enum Event {
    /// A frame from the client, the end of its stream, or a read error.
    Inbound(Option<Result<Message, axum::Error>>),
    /// The outbox has frames (now in the batch) or a close.
    Outbound(Next),
    /// Writing failed, or the outbox was aborted while a write was stuck.
    WriteEnded,
}

/// The connection's write side: messages being written and whether a flush is owed.
#[derive(Default)]
struct Writing {
    queue: VecDeque<Message>,
    flushing: bool,
}

impl Writing {
    fn busy(&self) -> bool {
        self.flushing || !self.queue.is_empty()
    }

    /// Moves the outbox's batch into the write queue.
    fn take(&mut self, batch: &mut Vec<Out>) {
        for item in batch.drain(..) {
            match item {
                Out::Frame(bytes) => {
                    if let Ok(text) = Utf8Bytes::try_from(bytes) {
                        self.queue.push_back(Message::Text(text));
                    }
                }
                Out::Ping => self.queue.push_back(Message::Ping(Bytes::new())),
            }
        }
    }

    /// Drives queued writes (feeding all, then one flush); `Err` when the socket failed.
    fn poll_drive(&mut self, ws: &mut WebSocket, cx: &mut Context<'_>) -> Result<(), ()> {
        while !self.queue.is_empty() {
            match Pin::new(&mut *ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Err(()),
                Poll::Pending => return Ok(()),
            }
            let Some(msg) = self.queue.pop_front() else { break };
            Pin::new(&mut *ws).start_send(msg).map_err(drop)?;
            self.flushing = true;
        }
        if self.flushing {
            match Pin::new(&mut *ws).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flushing = false,
                Poll::Ready(Err(_)) => return Err(()),
                Poll::Pending => {}
            }
        }
        Ok(())
    }
}

/// Waits for the next event of a connection while driving its writes: one task reads the socket,
/// writes what the outbox holds (batched, one flush per batch) and watches for aborts.
fn next_event<'a>(
    ws: &'a mut WebSocket,
    writing: &'a mut Writing,
    outbox: &'a Outbox,
    batch: &'a mut Vec<Out>,
) -> impl Future<Output = Event> + 'a {
    std::future::poll_fn(move |cx| {
        if writing.poll_drive(ws, cx).is_err() {
            return Poll::Ready(Event::WriteEnded);
        }
        if writing.busy() {
            // Stuck on a socket that does not drain: give up as soon as the outbox is aborted.
            if outbox.poll_aborted(cx).is_ready() {
                return Poll::Ready(Event::WriteEnded);
            }
        } else if let Poll::Ready(next) = outbox.poll_next(cx, batch) {
            return Poll::Ready(Event::Outbound(next));
        }
        if let Poll::Ready(msg) = ws.poll_next_unpin(cx) {
            return Poll::Ready(Event::Inbound(msg));
        }
        Poll::Pending
    })
}

/// Runs a connection to its end, in one task.
pub async fn run(mut s: Session, mut ws: WebSocket) {
    s.st.registry.register(s.conn, &s.user, s.outbox.clone());
    s.send(&ServerFrame::Welcome {
        client: &s.client,
        user: &s.user,
        node: &s.st.config.node_id,
        ping_interval_ms: s.st.config.ping_interval.as_millis() as u64,
    });
    let mut hb = Heartbeat {
        interval: s.st.config.ping_interval,
        timeout: s.st.config.pong_timeout,
        ping_sent: None,
        last_seen: Instant::now(),
    };
    let far_future = Instant::now() + Duration::from_secs(100 * 365 * 86400);
    let mut writing = Writing::default();
    let mut batch = Vec::new();
    let outbox = s.outbox.clone();
    let close = loop {
        let expiry = s.expires_at.unwrap_or(far_future);
        let event = tokio::select! {
            event = next_event(&mut ws, &mut writing, &outbox, &mut batch) => event,
            _ = sleep_until(hb.next_wake()) => {
                match hb.ping_sent {
                    Some(_) => {
                        metrics::counter!(m::HEARTBEAT_TIMEOUTS).increment(1);
                        s.outbox.close(CloseCode::HEARTBEAT_TIMEOUT, "no pong within pong_timeout", false);
                    }
                    None => {
                        s.outbox.ping();
                        hb.ping_sent = Some(Instant::now());
                    }
                }
                continue;
            }
            _ = sleep_until(expiry) => {
                s.outbox.close(CloseCode::TOKEN_EXPIRED, "token expired", true);
                s.expires_at = None;
                continue;
            }
        };
        match event {
            Event::Outbound(Next::Batch) => writing.take(&mut batch),
            Event::Outbound(Next::Close(close)) => break Some(close),
            Event::WriteEnded => {
                // Aborted (what was queued is dropped) or the socket failed: nothing more to write.
                writing = Writing::default();
                break s.outbox.take_close();
            }
            Event::Inbound(msg) => {
                hb.last_seen = Instant::now();
                hb.ping_sent = None;
                match msg {
                    Some(Ok(Message::Text(text))) => Box::pin(s.on_text(text.as_str())).await,
                    Some(Ok(Message::Binary(_))) => {
                        if s.admit(None).await {
                            s.error(
                                None,
                                ErrorCode::BadRequest,
                                "binary frames are not supported; send JSON text frames",
                                None,
                            );
                        }
                    }
                    // The client's close: reading on lets tungstenite send its reply (echoing the
                    // client's code) and end the stream.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => {}
                    None => break None,
                    Some(Err(e)) => {
                        on_read_error(&s.outbox, e);
                        break s.outbox.take_close();
                    }
                }
            }
        }
    };
    Box::pin(s.cleanup()).await;
    if let Some(close) = close {
        // A client that does not read (slow consumer) or answer (heartbeat timeout) gets the close
        // frame but no wait for a reply it will not send.
        let linger = !matches!(close.code, CloseCode::SLOW_CONSUMER | CloseCode::HEARTBEAT_TIMEOUT);
        send_close(&mut ws, &mut writing, close, linger).await;
    }
}

/// Writes what is still queued (unless the close dropped it), then the close frame, then — with
/// `linger` — reads until the client's close reply (discarding what it still sends), so the socket
/// is not reset under the close frame by unread data. Bounded: 2 s at most.
async fn send_close(ws: &mut WebSocket, writing: &mut Writing, close: Close, linger: bool) {
    let frame = CloseFrame { code: close.code.0, reason: Utf8Bytes::from(close.reason) };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        std::future::poll_fn(|cx| match writing.poll_drive(ws, cx) {
            Err(()) => Poll::Ready(()),
            Ok(()) if writing.busy() => Poll::Pending,
            Ok(()) => Poll::Ready(()),
        })
        .await;
        // When the client closed first, tungstenite refuses a second close but has queued its
        // reply (echoing the client's code): the flush sends it.
        let _ = ws.feed(Message::Close(Some(frame))).await;
        let _ = ws.flush().await;
        while linger && matches!(ws.next().await, Some(Ok(_))) {}
    })
    .await;
}

/// Maps a read error to a close code (best effort: the socket may be gone).
fn on_read_error(outbox: &Outbox, e: axum::Error) {
    use tungstenite::error::{CapacityError, Error as WsError};
    let inner = e.into_inner();
    match inner.downcast_ref::<WsError>() {
        Some(WsError::Capacity(CapacityError::MessageTooLong { .. })) => {
            metrics::counter!(m::CLIENT_ERRORS, "code" => ErrorCode::MessageTooLarge.as_str()).increment(1);
            outbox.close(CloseCode::TOO_BIG, "frame larger than max_message_bytes", false);
        }
        Some(WsError::Utf8(_)) => {
            metrics::counter!(m::CLIENT_ERRORS, "code" => ErrorCode::BadRequest.as_str()).increment(1);
            outbox.close(CloseCode(1007), "invalid UTF-8 in a text frame", false);
        }
        Some(WsError::Protocol(_)) => {
            metrics::counter!(m::CLIENT_ERRORS, "code" => ErrorCode::BadRequest.as_str()).increment(1);
            outbox.close(CloseCode(1002), "WebSocket protocol error", false);
        }
        _ => tracing::debug!(error = %inner, "websocket read error"),
    }
}
