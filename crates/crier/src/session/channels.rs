//! Subscribing, unsubscribing and refreshing the token: the session's channel set and the
//! permission checks behind it.

use crier_core::History;
use crier_core::node::SubscribeError;
use crier_protocol::channel::channel_matches;
use crier_protocol::frames::{PresenceEntry, ServerFrame};
use crier_protocol::{ErrorCode, StreamPosition, validate_channel};
use tokio::sync::SemaphorePermit;

use super::{Session, Sub, expiry_ms};
use crate::metrics as m;
use crate::proxy::{Answer, Kind};

/// Whether a token with these `channels` patterns, for `user` (empty: anonymous), may subscribe
/// to `channel`: a matching pattern, or the user's personal channel `user:<sub>`. Also what a
/// transport checks for channels named at its handshake (SSE's `?channel=`).
pub fn may_subscribe<'a>(mut channels: impl Iterator<Item = &'a str>, user: &str, channel: &str) -> bool {
    channels.any(|p| channel_matches(p, channel))
        || (!user.is_empty() && channel.strip_prefix("user:").is_some_and(|rest| rest == user))
}

impl Session {
    pub(super) fn subscribed(&self, channel: &str) -> Option<usize> {
        self.subs.iter().position(|c| &*c.name == channel)
    }

    fn can_subscribe(&self, channel: &str) -> bool {
        may_subscribe(self.patterns.channels(), &self.user, channel)
    }

    /// Validates a channel name and the right to read it; sends the error when refused. In a
    /// namespace whose subscriptions the backend decides (`subscribe_proxy`), a channel the
    /// connection is subscribed to is readable (presence, history) whatever the token says.
    pub(super) fn readable(&self, id: Option<u64>, channel: &str) -> bool {
        if let Err(e) = validate_channel(channel) {
            self.error(id, ErrorCode::InvalidChannel, &e.to_string(), None);
            return false;
        }
        if self.st.policy(channel).subscribe_proxy && self.subscribed(channel).is_some() {
            return true;
        }
        if !self.can_subscribe(channel) {
            self.error(id, ErrorCode::Forbidden, "the token does not allow this channel", Some(channel));
            return false;
        }
        true
    }

    /// `slot`: the broker slot the request holds, given back before a paced recovery waits.
    pub(super) async fn subscribe(
        &mut self,
        id: Option<u64>,
        channel: &str,
        recover: Option<StreamPosition>,
        slot: Option<SemaphorePermit<'_>>,
    ) {
        self.subscribe_as(id, channel, recover, slot, false).await
    }

    /// A subscribe by the client (`server` false: the token must allow the channel; answered with
    /// an `ack`) or by the server (REST `subscribe`, the `subs` claim: no token check; announced
    /// with a `subscribed` frame marked `server: true`; a channel the client already subscribed
    /// becomes the server's, so a refresh keeps it, and nothing is sent). Either way bounded by
    /// `max_subscriptions_per_connection` (an `error` frame `too_many_subscriptions` naming the
    /// channel, without an `id` for the server's).
    pub(super) async fn subscribe_as(
        &mut self,
        id: Option<u64>,
        channel: &str,
        recover: Option<StreamPosition>,
        slot: impl Into<Option<SemaphorePermit<'_>>>,
        server: bool,
    ) {
        let mut slot = slot.into();
        // A client `subscribe` with `recover` for a channel the server subscribed it to (after a
        // reconnect, the `subs` claim's subscribe comes first, without a position): the client
        // takes the subscription over to recover from its own position — no token check (the
        // server already granted the channel), left and subscribed again with recovery
        // (duplicates of what arrived meanwhile are dropped by offset), still the server's.
        let mut takeover = false;
        if !server
            && recover.is_some()
            && let Some(at) = self.subscribed(channel)
            && self.subs[at].server
        {
            self.subs.swap_remove(at);
            self.leave(channel).await;
            takeover = true;
        }
        // A namespace with the subscribe proxy: the backend decides instead of the token (not
        // for the server's own subscriptions, nor a takeover of one: the server granted those).
        let proxied = !server && !takeover && self.st.policy(channel).subscribe_proxy;
        if server || takeover || proxied {
            if let Err(e) = validate_channel(channel) {
                return self.error(id, ErrorCode::InvalidChannel, &e.to_string(), None);
            }
        } else if !self.readable(id, channel) {
            return;
        }
        if let Some(at) = self.subscribed(channel) {
            if server {
                self.subs[at].server = true;
                return;
            }
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
        if proxied {
            // The broker slot is not held while the backend thinks.
            drop(slot.take());
            if !self.proxy_subscribe(id, channel).await {
                return;
            }
        }
        let policy = self.st.policy(channel);
        let (in_presence, max_subscribers) = (policy.presence, policy.max_subscribers);
        // A namespace without history (or without recovery) has nothing to recover from: the
        // ack says so, and the subscribe goes on from the top.
        let no_history = recover.is_some() && (!policy.recovery || policy.history_size == 0);
        let recover = if no_history { None } else { recover };
        // Presence first, so that once the client holds its ack, everyone can see it.
        let entry =
            PresenceEntry { client: self.client(), user: self.user.to_string(), node: self.st.config.node_id.clone() };
        if max_subscribers > 0 {
            // The channel's presence is its subscriber count, cluster-wide: the broker checks and
            // adds in one step, so the bound is never passed and a refused client is never
            // entered (no join/leave announced for it; the remove below changes nothing then).
            match self.st.broker().presence_add_counted(channel, &entry, max_subscribers as u64).await {
                Ok(n) if n > max_subscribers as u64 => {
                    if let Err(e) = self.st.broker().presence_remove(channel, &entry.client).await {
                        tracing::warn!(error = %e, "presence remove failed");
                    }
                    return self.error(
                        id,
                        ErrorCode::ChannelFull,
                        &format!("the channel has its namespace's max_subscribers ({max_subscribers}) subscribers"),
                        Some(channel),
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "presence add failed"),
            }
        } else if in_presence && let Err(e) = self.st.broker().presence_add(channel, &entry).await {
            tracing::warn!(error = %e, "presence add failed");
        }
        let encoding = self.encoding;
        let ack = |h: &History, recovered: Option<bool>| {
            if server {
                return encoding.encode(&ServerFrame::Subscribed {
                    channel,
                    epoch: &h.epoch,
                    offset: h.offset,
                    recovered,
                    server: true,
                });
            }
            if no_history {
                return encoding.encode(&ServerFrame::AckWithReason {
                    id,
                    channel,
                    epoch: &h.epoch,
                    offset: h.offset,
                    recovered: false,
                    reason: "no_history",
                });
            }
            encoding.encode(&ServerFrame::Ack {
                id,
                channel: Some(channel),
                epoch: Some(&h.epoch),
                offset: Some(h.offset),
                recovered,
            })
        };
        let result =
            self.st.node.subscribe_holding(channel, self.conn, &self.outbox, recover.as_ref(), ack, slot).await;
        if result.is_err()
            && (in_presence || max_subscribers > 0)
            && let Err(e) = self.st.broker().presence_remove(channel, &entry.client).await
        {
            tracing::warn!(error = %e, "presence remove failed");
        }
        match result {
            Ok(s) => {
                // Grown one at a time: most connections hold a channel or two.
                self.subs.reserve_exact(1);
                self.subs.push(Sub { name: channel.into(), server: server || takeover });
                if let Some(ok) = s.recovered.or(no_history.then_some(false)) {
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

    /// Asks the subscribe proxy; `false` (error frame sent) when it refused or failed.
    async fn proxy_subscribe(&self, id: Option<u64>, channel: &str) -> bool {
        let Some(proxies) = self.st.proxies.as_deref() else {
            // Unreachable: the settings refuse subscribe_proxy without subscribe_url.
            self.error(id, ErrorCode::Unavailable, "no subscribe proxy configured", Some(channel));
            return false;
        };
        let body = serde_json::json!({"client": self.client(), "user": &*self.user, "channel": channel});
        match proxies.subscribe(&body).await {
            Ok(Answer::Allowed(_)) => true,
            Ok(Answer::Refused { reason }) => {
                self.error(id, ErrorCode::Forbidden, &reason, Some(channel));
                false
            }
            Err(f) => {
                self.error(id, ErrorCode::Unavailable, &f.message(Kind::Subscribe), Some(channel));
                false
            }
        }
    }

    pub(super) async fn unsubscribe(&mut self, id: Option<u64>, channel: &str) {
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

    /// The server ends a subscription (REST `unsubscribe`): an `unsubscribed` frame marked
    /// `server: true`; nothing when the connection is not subscribed.
    pub(super) async fn server_unsubscribe(&mut self, channel: &str) {
        let Some(at) = self.subscribed(channel) else {
            return;
        };
        self.subs.swap_remove(at);
        self.leave(channel).await;
        self.send(&ServerFrame::Unsubscribed { channel, reason: "unsubscribed by the server", server: Some(true) });
    }

    /// Hub, broker and presence side of leaving a channel.
    pub(super) async fn leave(&self, channel: &str) {
        self.st.node.unsubscribe(channel, self.conn).await;
        let policy = self.st.policy(channel);
        if (policy.presence || policy.max_subscribers > 0)
            && let Err(e) = self.st.broker().presence_remove(channel, &self.client()).await
        {
            tracing::warn!(error = %e, "presence remove failed");
        }
    }

    /// A new token for the same user: new expiry and permissions; channels the new token no
    /// longer covers are left, each with an `unsubscribed` push.
    pub(super) async fn refresh(&mut self, id: Option<u64>, token: &str) {
        let claims = match self.st.verifier.verify(token) {
            Ok(c) => c,
            Err(e) => return self.error(id, ErrorCode::TokenInvalid, &e.0, None),
        };
        if *claims.sub != *self.user {
            return self.error(id, ErrorCode::TokenInvalid, "the new token is for another user", None);
        }
        if self.st.revocations.is_revoked(&claims.sub, claims.iat) {
            metrics::counter!(m::CLIENT_ERRORS, "code" => "token_revoked").increment(1);
            return self.error(id, ErrorCode::TokenInvalid, "token_revoked: the token was invalidated", None);
        }
        self.outbox.set_expiry(expiry_ms(claims.exp));
        self.iat = u32::try_from(claims.iat.unwrap_or(0)).unwrap_or(u32::MAX);
        self.st.registry.set_iat(self.conn, claims.iat.unwrap_or(0));
        self.patterns = self.st.patterns.share(&claims.channels, &claims.publish);
        // Channels the server subscribed stay: the server's word, not the token's. So do those of
        // a namespace with a subscribe proxy: the backend granted them, the token never did.
        let revoked: Vec<Box<str>> = self
            .subs
            .iter()
            .filter(|c| !c.server && !self.st.policy(&c.name).subscribe_proxy && !self.can_subscribe(&c.name))
            .map(|c| c.name.clone())
            .collect();
        for channel in revoked {
            self.subs.retain(|c| c.name != channel);
            self.leave(&channel).await;
            self.send(&ServerFrame::Unsubscribed {
                channel: &channel,
                reason: "the refreshed token does not allow it",
                server: None,
            });
        }
        self.send(&ServerFrame::Ack { id, channel: None, epoch: None, offset: None, recovered: None });
    }
}
