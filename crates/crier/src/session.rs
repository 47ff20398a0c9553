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

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use crier_core::node::SubscribeError;
use crier_core::{Close, ConnId, Next, Outbox, clock_ms};
use crier_protocol::channel::any_matches;
use crier_protocol::frames::{self, ClientFrame, PresenceEntry, ServerFrame};
use crier_protocol::ws::{Incoming, Violation};
use crier_protocol::{CloseCode, ErrorCode, StreamPosition, validate_channel};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::auth::Claims;
use crate::config::RateScope;
use crate::handshake::ConnSlot;
use crate::metrics as m;
use crate::state::AppState;
use crate::ws::{ReadError, WsSocket};

/// Refused frames within [`STRIKE_WINDOW`] after which the connection is closed with 4008.
const MAX_STRIKES: u32 = 50;
const STRIKE_WINDOW: Duration = Duration::from_secs(10);
/// Largest `limit` of a `history` frame.
const MAX_HISTORY_LIMIT: usize = 1000;

/// The client id of connection `conn` on node `node` (in `welcome`, presence and connection
/// counts).
pub fn client_id(node: &str, conn: ConnId) -> String {
    format!("{node}-{conn}")
}

/// A connection's state, owned by its session task. Kept small on purpose: it lives in every
/// connection's task for the connection's whole life (the client id is derived, not stored; the
/// token's patterns are kept, its other claims are not).
pub struct Session {
    st: AppState,
    conn: ConnId,
    /// The token's `sub` (empty for an anonymous connection).
    user: Arc<str>,
    /// Channel patterns the token allows subscribing to and publishing to.
    channels: Box<[String]>,
    publish: Box<[String]>,
    outbox: Arc<Outbox>,
    /// Subscribed channels (at most `max_subscriptions_per_connection`, searched linearly).
    subs: Vec<Box<str>>,
    strikes: u32,
    /// [`clock_ms`] when the current strike window began.
    strike_window: u64,
    slot: Option<Box<ConnSlot>>,
}

impl Session {
    pub fn new(st: AppState, conn: ConnId, claims: Claims, slot: Option<ConnSlot>) -> Session {
        let outbox = Arc::new(Outbox::new(st.config.client_queue_max_bytes));
        outbox.set_expiry(expiry_ms(claims.exp));
        Session {
            conn,
            user: claims.sub.into(),
            channels: claims.channels.into_boxed_slice(),
            publish: claims.publish.into_boxed_slice(),
            outbox,
            subs: Vec::new(),
            strikes: 0,
            strike_window: clock_ms(),
            slot: slot.map(Box::new),
            st,
        }
    }

    fn client(&self) -> String {
        client_id(&self.st.config.node_id, self.conn)
    }

    fn subscribed(&self, channel: &str) -> Option<usize> {
        self.subs.iter().position(|c| &**c == channel)
    }

    fn send(&self, frame: &ServerFrame<'_>) {
        self.outbox.push(frame.encode());
    }

    fn error(&self, id: Option<u64>, code: ErrorCode, message: &str, channel: Option<&str>) {
        metrics::counter!(m::CLIENT_ERRORS, "code" => code.as_str()).increment(1);
        self.send(&ServerFrame::Error { id, code: code.as_str(), message, channel });
    }

    fn can_subscribe(&self, channel: &str) -> bool {
        any_matches(&self.channels, channel)
            || (!self.user.is_empty() && channel.strip_prefix("user:").is_some_and(|rest| rest == &*self.user))
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
        let now = clock_ms();
        if now.saturating_sub(self.strike_window) > STRIKE_WINDOW.as_millis() as u64 {
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
        if let ClientFrame::Ping { id } = frame {
            return self.send(&ServerFrame::Pong { id });
        }
        // Taken before the boxed future is allocated: bounds the memory of request bursts.
        let st = self.st.clone();
        let _slot = st.node.broker_slot().await;
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
        if self.subscribed(channel).is_some() {
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
        let entry =
            PresenceEntry { client: self.client(), user: self.user.to_string(), node: self.st.config.node_id.clone() };
        if let Err(e) = self.st.broker().presence_add(channel, &entry).await {
            tracing::warn!(error = %e, "presence add failed");
        }
        let ack = |h: &crier_core::History, recovered: Option<bool>| {
            ServerFrame::Ack { id, channel: Some(channel), epoch: Some(&h.epoch), offset: Some(h.offset), recovered }
                .encode()
        };
        let result = self.st.node.subscribe(channel, self.conn, &self.outbox, recover.as_ref(), ack).await;
        if result.is_err()
            && let Err(e) = self.st.broker().presence_remove(channel, &entry.client).await
        {
            tracing::warn!(error = %e, "presence remove failed");
        }
        match result {
            Ok(s) => {
                // Grown one at a time: most connections hold a channel or two.
                self.subs.reserve_exact(1);
                self.subs.push(channel.into());
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
        let Some(at) = self.subscribed(channel) else {
            return self.error(id, ErrorCode::NotSubscribed, "not subscribed", Some(channel));
        };
        self.subs.swap_remove(at);
        self.leave(channel).await;
        self.send(&ServerFrame::Ack { id, channel: Some(channel), epoch: None, offset: None, recovered: None });
    }

    /// Hub, broker and presence side of leaving a channel.
    async fn leave(&self, channel: &str) {
        self.st.node.unsubscribe(channel, self.conn).await;
        if let Err(e) = self.st.broker().presence_remove(channel, &self.client()).await {
            tracing::warn!(error = %e, "presence remove failed");
        }
    }

    async fn publish(&mut self, id: Option<u64>, channel: &str, data: &str) {
        if let Err(e) = validate_channel(channel) {
            return self.error(id, ErrorCode::InvalidChannel, &e.to_string(), None);
        }
        if !any_matches(&self.publish, channel) {
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
        if *claims.sub != *self.user {
            return self.error(id, ErrorCode::TokenInvalid, "the new token is for another user", None);
        }
        self.outbox.set_expiry(expiry_ms(claims.exp));
        self.channels = claims.channels.into_boxed_slice();
        self.publish = claims.publish.into_boxed_slice();
        let revoked: Vec<Box<str>> = self.subs.iter().filter(|c| !self.can_subscribe(c)).cloned().collect();
        for channel in revoked {
            self.subs.retain(|c| *c != channel);
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

/// The [`clock_ms`] at which a token with this `exp` (Unix seconds) expires; `u64::MAX` if never.
fn expiry_ms(exp: u64) -> u64 {
    let now_unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let left = exp as f64 - now_unix;
    if left > 10.0 * 365.0 * 86400.0 {
        return u64::MAX;
    }
    clock_ms() + (left.max(0.0) * 1000.0) as u64
}

/// What woke the connection task.
enum Event {
    /// A message from the client, the end of its stream, or a read error.
    Inbound(Result<Option<Incoming>, ReadError>),
    /// The outbox asks for this close (what was queued before it is written).
    Close(Close),
    /// Writing failed, or the outbox was aborted while a write was stuck.
    WriteEnded,
}

/// Waits for the next event of a connection while driving its writes: one task reads the socket,
/// writes what the outbox holds (one `sendmsg` per batch) and watches for aborts.
fn next_event<'a>(ws: &'a mut WsSocket, outbox: &'a Outbox) -> impl Future<Output = Event> + 'a {
    std::future::poll_fn(move |cx| {
        loop {
            if ws.is_writing() {
                match ws.poll_write_pending(cx) {
                    Poll::Ready(Ok(())) => {}
                    Poll::Ready(Err(_)) => return Poll::Ready(Event::WriteEnded),
                    // Stuck on a socket that does not drain: give up as soon as the outbox is aborted.
                    Poll::Pending if outbox.poll_aborted(cx).is_ready() => return Poll::Ready(Event::WriteEnded),
                    Poll::Pending => break,
                }
            }
            let mut batch = Vec::new();
            match outbox.poll_next(cx, &mut batch) {
                Poll::Ready(Next::Batch) => {
                    if ws.write_batch(cx, &batch).is_err() {
                        return Poll::Ready(Event::WriteEnded);
                    }
                }
                Poll::Ready(Next::Close(close)) => return Poll::Ready(Event::Close(close)),
                Poll::Pending => break,
            }
        }
        ws.poll_message(cx).map(Event::Inbound)
    })
}

/// How a connection ends.
enum Ending {
    /// The socket is gone: nothing to send.
    Gone,
    /// Send this close frame; with `linger`, wait (briefly) for the client's reply.
    Close(Close, bool),
    /// The client closed: echo its code (RFC 6455 §5.5.1).
    Echo(Option<u16>),
}

/// Runs a connection to its end, in one task: waits for hyper to hand over the upgraded socket,
/// then reads, writes and answers until a close. Heartbeats and token expiry are checked by the
/// node's sweep ([`crate::heartbeat`]), which acts through the outbox.
///
/// Not an `async fn`: the `async move` block uses the captured session in place, where an
/// `async fn` would keep a second copy of its argument in the task (rust-lang/rust#62958;
/// measured: 864 → ~580 bytes per connection task).
#[allow(clippy::manual_async_fn)] // on purpose, see above
pub fn run(mut s: Session, upgrade: OnUpgrade) -> impl Future<Output = ()> + Send {
    async move {
        let mut ws = match upgrade.await.map(|u| u.downcast::<TokioIo<TcpStream>>()) {
            Ok(Ok(parts)) => WsSocket::new(parts.io.into_inner(), parts.read_buf, s.st.config.max_message_bytes),
            Ok(Err(_)) => return tracing::error!("the upgraded connection is not a TCP stream"),
            Err(e) => return tracing::debug!(error = %e, "websocket upgrade failed"),
        };
        s.st.registry.register(s.conn, s.user.clone(), s.outbox.clone());
        s.send(&ServerFrame::Welcome {
            client: &s.client(),
            user: &s.user,
            node: &s.st.config.node_id,
            ping_interval_ms: s.st.config.ping_interval.as_millis() as u64,
        });
        let ending = loop {
            let event = next_event(&mut ws, &s.outbox).await;
            let inbound = match event {
                Event::Close(close) => {
                    // A client that does not read (slow consumer) or answer (heartbeat timeout) gets
                    // the close frame but no wait for a reply it will not send.
                    let linger = !matches!(close.code, CloseCode::SLOW_CONSUMER | CloseCode::HEARTBEAT_TIMEOUT);
                    break Ending::Close(close, linger);
                }
                // Aborted (the batch being written is abandoned) or the socket failed.
                Event::WriteEnded => break s.outbox.take_close().map_or(Ending::Gone, |c| Ending::Close(c, false)),
                Event::Inbound(inbound) => inbound,
            };
            s.outbox.touch();
            match inbound {
                Ok(Some(Incoming::Text(text))) => Box::pin(s.on_text(&text)).await,
                Ok(Some(Incoming::Binary(_))) => {
                    if Box::pin(s.admit(None)).await {
                        s.error(
                            None,
                            ErrorCode::BadRequest,
                            "binary frames are not supported; send JSON text frames",
                            None,
                        );
                    }
                }
                Ok(Some(Incoming::Ping(_) | Incoming::Pong)) => {}
                Ok(Some(Incoming::Close(c))) => break Ending::Echo(c.map(|(code, _)| code)),
                Ok(None) => break Ending::Gone,
                Err(ReadError::Violation(v)) => {
                    let code = match v {
                        Violation::TooBig => ErrorCode::MessageTooLarge,
                        _ => ErrorCode::BadRequest,
                    };
                    metrics::counter!(m::CLIENT_ERRORS, "code" => code.as_str()).increment(1);
                    break Ending::Close(Close { code: CloseCode(v.close_code()), reason: v.reason().into() }, false);
                }
                Err(ReadError::Io(e)) => {
                    tracing::debug!(error = %e, "websocket read error");
                    break Ending::Gone;
                }
            }
        };
        Box::pin(s.cleanup()).await;
        Box::pin(finish(ws, ending)).await;
    }
}

/// Writes what is still pending, then the close frame, then — with `linger` — reads until the
/// client's close reply (discarding what it still sends), so the socket is not reset under the
/// close frame by unread data. Bounded: 2 s at most.
async fn finish(mut ws: WsSocket, ending: Ending) {
    let linger = match ending {
        Ending::Gone => return,
        Ending::Close(close, linger) => {
            ws.queue_close(Some((close.code.0, &close.reason)));
            linger
        }
        Ending::Echo(code) => {
            ws.queue_close(code.map(|c| (c, "")));
            false
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if std::future::poll_fn(|cx| ws.poll_write_pending(cx)).await.is_err() {
            return;
        }
        if linger {
            while let Ok(Some(m)) = std::future::poll_fn(|cx| ws.poll_message(cx)).await {
                if matches!(m, Incoming::Close(_)) {
                    break;
                }
            }
        }
    })
    .await;
}
