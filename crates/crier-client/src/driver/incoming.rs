//! What each server frame does to the driver's book: replies settle what was pending, messages
//! go through their channel's `AppPosition` (duplicates dropped, gaps told), presence events and
//! server subscriptions reach their subscriptions, refusals are retried or end a subscription.

use std::time::Duration;

use crier_protocol::frames::PresenceEntry;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;

use super::close::{Ended, close_decision};
use super::{Conn, Driver, Pending, Sub};
use crate::app_position::{AppPosition, Verdict};
use crate::error::{Error, ServerError};
use crate::events::{EndReason, Event, Gap, GapReason, Message};
use crate::frames::{self, MessageFrame, PresenceEventFrame, ServerFrame};
use crate::protocol::Reply;
use crate::subscription::Subscription;

impl Driver {
    pub(super) fn on_close(&self, frame: Option<CloseFrame>) -> Ended {
        let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
        tracing::debug!(code, reason, "crier client: the server closed the connection");
        close_decision(code, reason, self.opts.token.has_provider())
    }

    /// One text frame from the server.
    pub(super) fn on_text<S>(&mut self, conn: &mut Conn<S>, text: &str) {
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
                    let gap = sub.delivered.on_ack(&epoch, offset, recovered);
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
                    sub.delivered.on_gap(&epoch, offset);
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

    pub(super) fn on_presence_event(&mut self, e: PresenceEventFrame, joined: bool) {
        let Some(sub) = self.subs.get_mut(&e.channel) else { return };
        let entry = PresenceEntry { client: e.client, user: e.user, node: e.node };
        sub.emit(if joined { Event::Join(entry) } else { Event::Leave(entry) });
    }

    pub(super) fn on_message(&mut self, m: MessageFrame) {
        let Some(sub) = self.subs.get_mut(&m.channel) else { return };
        match sub.delivered.on_message(&m.epoch, m.offset) {
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
    pub(super) fn on_server_subscribed<S>(
        &mut self,
        conn: &mut Conn<S>,
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
            match &sub.delivered.position {
                Some(p) if p.epoch != epoch || p.offset < offset => {
                    conn.retries.push((Instant::now(), channel, generation));
                }
                _ => {
                    let gap = sub.delivered.on_ack(&epoch, offset, recovered);
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
        let mut delivered = AppPosition::new(None);
        // Recovered by the server: the missed messages (at or below `offset`) follow.
        if recovered.is_none() {
            delivered.on_ack(&epoch, offset, None);
        }
        let sub = Sub { generation, events, delivered, refusals: 0, server: true };
        sub.emit(Event::Subscribed { epoch, offset, recovered });
        self.subs.insert(channel.clone(), sub);
        let handle = Subscription { channel, generation, events: rx, commands };
        if let Err(mpsc::error::SendError(handle)) = self.server_subs.send(handle) {
            // Nobody can take it (the client is gone): dropping it unsubscribes.
            drop(handle);
        }
    }

    /// A subscribe answered with an error: retried later when the refusal is temporary, else the
    /// subscription ends.
    pub(super) fn subscribe_refused<S>(
        &mut self,
        conn: &mut Conn<S>,
        channel: String,
        generation: u64,
        error: ServerError,
    ) {
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
}

pub(super) fn into_message(m: MessageFrame) -> Message {
    Message { channel: m.channel, epoch: m.epoch, offset: m.offset, data: m.data }
}
