//! A client's session: what its frames mean, whatever carries them.
//!
//! The session consumes decoded client frames ([`Session::on_frame`]) and answers through the
//! connection's [`Outbox`]: replies, errors and pushes are encoded in the connection's
//! [`Encoding`] and queued; published messages reach the outbox from the hub. It owns the
//! subscriptions, recovery on subscribe, the per-user frame rate and its strike count, token
//! refresh and permission checks. It knows nothing of sockets, WebSocket framing or HTTP: a
//! transport ([`crate::transport`]) decodes what the client sends, calls the session, writes
//! what the outbox holds and renders the outbox's close in its own way.
//!
//! Lifecycle, driven by the transport: [`Session::new`] (from an admitted handshake) →
//! [`Session::open`] (registered, `welcome` queued) → [`Session::on_frame`] for each client
//! frame → [`Session::close`] (leaves every channel, releases the user's connection slot).
//!
//! The session closes a connection only through its outbox: 4008 after [`MAX_STRIKES`] refused
//! frames. Other closes come from elsewhere and reach the transport the same way: 4009 from the
//! outbox itself, 4001/4010 from the heartbeat sweep, 4003 from the registry, 1012 from the drain;
//! framing violations (1002/1007/1009) are the transport's own. See
//! [`crier_protocol::codes::CLOSE_CODES`].

mod channels;
mod requests;

pub use channels::may_subscribe;

use std::sync::Arc;
use std::time::Duration;

use crier_core::{Command, ConnId, Outbox, Transport, clock_ms};
use crier_protocol::frames::{ClientFrame, FrameError, ServerFrame};
use crier_protocol::{CloseCode, Encoding, ErrorCode};

use crate::auth::expiry_ms;
use crate::config::RateScope;
use crate::handshake::{Admitted, ConnSlot};
use crate::metrics as m;
use crate::state::{AppState, Patterns};

/// Refused frames within [`STRIKE_WINDOW`] after which the connection is closed with 4008.
pub const MAX_STRIKES: u32 = 50;

/// One subscribed channel, and whether the server subscribed it (REST `subscribe`, the token's
/// `subs`): those bypass the token's patterns, so a `refresh` does not take them away.
pub(crate) struct Sub {
    name: Box<str>,
    server: bool,
}
const STRIKE_WINDOW: Duration = Duration::from_secs(10);

/// A connection's state, owned by its transport's task. Kept small on purpose: it lives in every
/// connection's task for the connection's whole life (the client id is derived, not stored; the
/// token's patterns are kept, its other claims are not).
pub struct Session {
    st: AppState,
    conn: ConnId,
    /// The token's `sub` (empty for an anonymous connection).
    user: Arc<str>,
    /// Channel patterns the token allows subscribing to and publishing to (shared with the
    /// connections whose tokens carry the same, [`crate::state::PatternCache`]).
    patterns: Arc<Patterns>,
    outbox: Arc<Outbox>,
    /// Subscribed channels (at most `max_subscriptions_per_connection`, searched linearly).
    subs: Vec<Sub>,
    encoding: Encoding,
    strikes: u16,
    /// The token's `iat` (Unix seconds, 0: none; token invalidation).
    iat: u32,
    /// Admitted by the connect proxy (no token: the handshake's revocation check does not apply).
    proxied: bool,
    /// [`clock_ms`] when the current strike window began.
    strike_window: u64,
    slot: Option<Box<ConnSlot>>,
}

impl Session {
    /// A session for an admitted handshake, speaking `encoding`.
    pub fn new(st: AppState, admitted: Admitted, encoding: Encoding) -> Session {
        let Admitted { conn, claims, slot, proxied } = admitted;
        let outbox = Arc::new(Outbox::with_encoding(st.config.client_queue_max_bytes, encoding));
        outbox.set_expiry(expiry_ms(claims.exp));
        let user: Arc<str> = claims.sub.into();
        if proxied
            && claims.exp != u64::MAX
            && let Some(proxies) = &st.proxies
        {
            proxies.watch(conn, user.clone(), st.client_id(conn), &outbox, claims.exp);
        }
        // The token's `subs`: subscribed by the server once the connection is open and idle.
        for channel in &claims.subs {
            outbox.command(Command::Subscribe { channel: channel.as_str().into(), recover: None });
        }
        Session {
            iat: u32::try_from(claims.iat.unwrap_or(0)).unwrap_or(u32::MAX),
            proxied,
            conn,
            user,
            patterns: st.patterns.share(&claims.channels, &claims.publish),
            outbox,
            subs: Vec::new(),
            encoding,
            strikes: 0,
            strike_window: clock_ms(),
            slot: slot.map(Box::new),
            st,
        }
    }

    /// The outbox the transport writes from (and touches whenever the client is heard from).
    pub fn outbox(&self) -> &Arc<Outbox> {
        &self.outbox
    }

    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    /// The connection is open: it is registered with the node (drain, disconnects, heartbeats)
    /// and its first frame, `welcome`, is queued.
    pub fn open(&mut self, transport: Transport) {
        crate::trim::note();
        self.st.registry.register(self.conn, self.user.clone(), self.outbox.clone(), self.iat.into(), transport);
        self.send(&ServerFrame::Welcome {
            client: &self.client(),
            user: &self.user,
            node: &self.st.config.node_id,
            ping_interval_ms: self.st.config.ping_interval.as_millis() as u64,
        });
        // An invalidation that arrived between the handshake's check and the registration above
        // found no connection to close: look again now that a later one would find this one.
        let iat = (self.iat > 0).then_some(u64::from(self.iat));
        if !self.proxied && !self.user.is_empty() && self.st.revocations.is_revoked(&self.user, iat) {
            self.outbox.close_with(CloseCode::TOKEN_EXPIRED, std::borrow::Cow::Borrowed("token revoked"));
        }
    }

    /// One client frame, as the connection's encoding decoded it (a decoding error still
    /// counts against the rate and gets its error reply, with the frame's `id` when known).
    ///
    /// The broker-bound branches are boxed: an idle connection's task then holds only a pointer
    /// instead of the largest of those futures inline (~1.5 KiB per connection).
    pub async fn on_frame(&mut self, decoded: Result<ClientFrame<'_>, FrameError>) {
        let id = match &decoded {
            Ok(frame) => frame.id(),
            Err(e) => e.id,
        };
        if !self.admit(id).await {
            return;
        }
        let frame = match decoded {
            Ok(frame) => frame,
            Err(e) => return self.error(e.id, e.code, &e.message, None),
        };
        if let ClientFrame::Ping { id } = frame {
            return self.send(&ServerFrame::Pong { id });
        }
        // Taken before the boxed future is allocated: bounds the memory of request bursts.
        // Subscribe and history give it back before they wait for room in the outbox.
        let st = self.st.clone();
        let slot = st.node.broker_slot().await;
        crate::trim::note();
        match frame {
            ClientFrame::Subscribe { id, channel, recover } => {
                Box::pin(self.subscribe(id, &channel, recover, slot)).await
            }
            ClientFrame::Unsubscribe { id, channel } => Box::pin(self.unsubscribe(id, &channel)).await,
            ClientFrame::Publish { id, channel, data, idempotency_key } => {
                Box::pin(self.publish(id, &channel, data.get(), idempotency_key.as_deref(), slot)).await
            }
            ClientFrame::Ping { id } => self.send(&ServerFrame::Pong { id }),
            ClientFrame::Refresh { id, token } => Box::pin(self.refresh(id, &token)).await,
            ClientFrame::Presence { id, channel } => Box::pin(self.presence(id, &channel)).await,
            ClientFrame::PresenceStats { id, channel } => Box::pin(self.presence_stats(id, &channel)).await,
            ClientFrame::History { id, channel, since, limit } => {
                Box::pin(self.history(id, &channel, since, limit, slot)).await
            }
        }
    }

    /// Subscribes to a channel the transport's handshake named (SSE's `?channel=`): exactly what a
    /// `subscribe` frame without an `id` does (ack or error queued in the outbox), except that it
    /// is not counted against the user's frame rate — the handshake rate already covers it, and a
    /// client that cannot send frames could not pace its subscriptions.
    pub async fn subscribe_named(&mut self, channel: &str, recover: Option<crier_protocol::StreamPosition>) {
        Box::pin(self.subscribe(None, channel, recover, None)).await
    }

    /// A server command the transport took from the outbox ([`crier_core::Outbox::poll_command`]),
    /// run like a client frame: not counted against the user's frame rate (the server's word).
    pub async fn on_command(&mut self, command: Command) {
        let st = self.st.clone();
        let slot = st.node.broker_slot().await;
        crate::trim::note();
        match command {
            Command::Subscribe { channel, recover } => {
                Box::pin(self.subscribe_as(None, &channel, recover, slot, true)).await
            }
            Command::Unsubscribe { channel } => {
                drop(slot);
                Box::pin(self.server_unsubscribe(&channel)).await
            }
        }
    }

    /// The connection ended (whatever ended it): leaves every channel, forgets the connection
    /// and releases the user's connection slot.
    pub async fn close(mut self) {
        crate::trim::note();
        for sub in std::mem::take(&mut self.subs) {
            self.leave(&sub.name).await;
        }
        self.st.registry.unregister(self.conn);
        if let Some(proxies) = &self.st.proxies {
            proxies.unwatch(self.conn);
        }
        if let Some(slot) = self.slot.take() {
            slot.release().await;
        }
    }

    fn client(&self) -> String {
        self.st.client_id(self.conn)
    }

    fn send(&self, frame: &ServerFrame<'_>) {
        self.outbox.push(self.encoding.encode(frame));
    }

    fn error(&self, id: Option<u64>, code: ErrorCode, message: &str, channel: Option<&str>) {
        push_error(&self.outbox, self.encoding, id, code, message, channel);
    }

    /// Counts a frame against the user's rate (this node's, or the cluster's with
    /// `user_rate_scope = cluster`); `false` (and maybe a 4008 close) when refused.
    async fn admit(&mut self, id: Option<u64>) -> bool {
        if self.allowed().await {
            return true;
        }
        metrics::counter!(m::RATE_LIMITED, "kind" => "user").increment(1);
        if !self.strike() {
            self.error(id, ErrorCode::RateLimited, SLOW_DOWN, None);
        }
        false
    }

    /// One refused frame: counts a strike; `true` when that closed the connection (4008).
    fn strike(&mut self) -> bool {
        let now = clock_ms();
        if now.saturating_sub(self.strike_window) > STRIKE_WINDOW.as_millis() as u64 {
            self.strike_window = now;
            self.strikes = 0;
        }
        self.strikes = self.strikes.saturating_add(1);
        if u32::from(self.strikes) >= MAX_STRIKES {
            self.outbox.close(CloseCode::RATE_LIMITED);
            return true;
        }
        false
    }

    /// What answers `ping` frames while a request of this session is in flight (the transport
    /// keeps reading meanwhile): see [`Pinger`]. Give it back with [`Session::absorb`].
    pub fn pinger(&self) -> Pinger {
        Pinger { st: self.st.clone(), user: self.user.clone(), encoding: self.encoding, refused: 0 }
    }

    /// Takes back a [`Pinger`]: the pings it refused count as strikes.
    pub fn absorb(&mut self, pinger: Pinger) {
        for _ in 0..pinger.refused {
            if self.strike() {
                break;
            }
        }
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
}

/// Answers a connection's `ping` frames at once while one of its requests is in flight (a
/// publish waiting for the broker, a paced recovery): the pong does not wait behind the request.
/// Each ping still counts against the user's frame rate — the node's limiter (a cluster-wide
/// limiter would need the broker, which may be what the request waits for); a refused one gets
/// its `rate_limited` error and, once the request is done, its strike ([`Session::absorb`]).
pub struct Pinger {
    st: AppState,
    user: Arc<str>,
    encoding: Encoding,
    refused: u32,
}

impl Pinger {
    /// A `ping` frame with this `id` arrived.
    pub fn ping(&mut self, outbox: &Outbox, id: Option<u64>) {
        if self.st.limits.check_frame(&self.user) {
            outbox.push(self.encoding.encode(&ServerFrame::Pong { id }));
            return;
        }
        metrics::counter!(m::RATE_LIMITED, "kind" => "user").increment(1);
        self.refused += 1;
        push_error(outbox, self.encoding, id, ErrorCode::RateLimited, SLOW_DOWN, None);
    }
}

/// The message of a frame refused by the user's frame rate.
const SLOW_DOWN: &str = "too many frames; slow down";

/// Counts a client error and queues its `error` frame.
fn push_error(
    outbox: &Outbox,
    encoding: Encoding,
    id: Option<u64>,
    code: ErrorCode,
    message: &str,
    channel: Option<&str>,
) {
    metrics::counter!(m::CLIENT_ERRORS, "code" => code.as_str()).increment(1);
    outbox.push(encoding.encode(&ServerFrame::Error { id, code: code.as_str(), message, channel }));
}
