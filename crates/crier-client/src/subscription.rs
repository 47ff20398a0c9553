//! A subscription as the application sees it — a stream of [`Event`]s — and the position
//! [`Tracker`] that keeps the delivery promise on the client side: each message once, in order,
//! across reconnects, or a [`Gap`] that says what was lost.

use crier_protocol::frames::PresenceEntry;
use std::pin::Pin;
use std::task::{Context, Poll};

use crier_protocol::StreamPosition;
use futures_util::Stream;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::driver::Command;
use crate::error::ServerError;

/// One publication on a channel, as delivered to the application.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub channel: String,
    /// The channel's epoch (changes when the channel's history was lost).
    pub epoch: String,
    /// The message's position in the channel: +1 per message.
    pub offset: u64,
    pub data: Value,
}

impl Message {
    /// The stream position just after this message (what a recovery resumes from).
    pub fn position(&self) -> StreamPosition {
        StreamPosition { epoch: self.epoch.clone(), offset: self.offset }
    }
}

/// Why the client says messages were lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GapReason {
    /// The server sent a `gap` frame (its broker lost messages it could not recover).
    Server,
    /// A resubscription with `recover` was answered `recovered: false` (history too short, or a
    /// new epoch): nothing was replayed.
    NotRecovered,
    /// A message arrived in an epoch other than the one the client tracked.
    EpochChanged,
    /// Offsets jumped (a hole without a `gap` frame; crier never does this, the client checks).
    Missing { expected: u64 },
}

/// Messages of the channel were lost; the application should resync the channel from its own
/// source of truth. Delivery continues after `epoch`/`offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub channel: String,
    pub epoch: String,
    pub offset: u64,
    pub reason: GapReason,
}

/// Why a subscription ended (its last event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// The server refused the subscription (`forbidden`, `invalid_channel`,
    /// `too_many_subscriptions`, `already_subscribed`, ...).
    Refused(ServerError),
    /// The server ended it (an `unsubscribed` frame, e.g. a refreshed token no longer covers the
    /// channel).
    Revoked(String),
    /// The client was closed (by [`crate::Client::close`], or for good by the server).
    ClientClosed,
}

/// What a subscription yields.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The server acknowledged the (re)subscription: `epoch`/`offset` is the channel's current
    /// position; `recovered` is `Some` when the client asked to recover (after a reconnect, or
    /// [`crate::Client::subscribe_from`]). Sent after every (re)connection.
    Subscribed { epoch: String, offset: u64, recovered: Option<bool> },
    /// A message, never one already delivered.
    Message(Message),
    /// Messages were lost (see [`Gap`]).
    Gap(Gap),
    /// A client entered the channel's presence (channels whose namespace has `join_leave`;
    /// never this connection's own join). Not a message: no offset, not recovered after a
    /// reconnect — read [`crate::Client::presence`] again after `Subscribed` if it matters.
    Join(PresenceEntry),
    /// A client left the channel's presence (unsubscribed, disconnected, or its node died and
    /// its entry expired), once.
    Leave(PresenceEntry),
    /// The subscription is over; the stream ends after this.
    Ended(EndReason),
}

/// A subscription: a stream of [`Event`]s (also readable with [`Subscription::next`]).
/// Dropping it (or [`Subscription::unsubscribe`]) unsubscribes.
///
/// Events are buffered without bound while the application does not read them.
#[derive(Debug)]
pub struct Subscription {
    pub(crate) channel: String,
    pub(crate) generation: u64,
    pub(crate) events: mpsc::UnboundedReceiver<Event>,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next event; `None` once the subscription has ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// The next message, skipping other events; `None` once the subscription has ended.
    pub async fn next_message(&mut self) -> Option<Message> {
        loop {
            match self.events.recv().await? {
                Event::Message(m) => return Some(m),
                Event::Ended(_) => return None,
                _ => continue,
            }
        }
    }

    /// Unsubscribes (the same as dropping the subscription).
    pub fn unsubscribe(self) {}
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self
            .commands
            .send(Command::Unsubscribe { channel: std::mem::take(&mut self.channel), generation: self.generation });
    }
}

impl Stream for Subscription {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.events.poll_recv(cx)
    }
}

/// What to do with an arriving message.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Deliver,
    /// Deliver, but tell the application first that messages were lost.
    DeliverAfter(GapReason),
    /// Already delivered (a replay): drop it.
    Duplicate,
}

/// The last position delivered to the application on one channel.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    pub(crate) position: Option<StreamPosition>,
}

impl Tracker {
    pub(crate) fn new(position: Option<StreamPosition>) -> Tracker {
        Tracker { position }
    }

    /// A subscribe ack. `asked_recovery`: the subscribe carried `recover` (from
    /// [`Tracker::position`]). Returns a gap when the server could not recover.
    pub(crate) fn on_ack(&mut self, epoch: &str, offset: u64, recovered: Option<bool>) -> Option<GapReason> {
        let gap = match (&self.position, recovered) {
            // First subscription: live from the channel's current position.
            (None, _) => None,
            (Some(p), Some(true)) if p.epoch == epoch => return None,
            (Some(p), Some(true)) if p.epoch != epoch => Some(GapReason::EpochChanged),
            _ => Some(GapReason::NotRecovered),
        };
        self.position = Some(StreamPosition { epoch: epoch.to_owned(), offset });
        gap
    }

    /// A `gap` frame: the channel continues after `epoch`/`offset`.
    pub(crate) fn on_gap(&mut self, epoch: &str, offset: u64) {
        self.position = Some(StreamPosition { epoch: epoch.to_owned(), offset });
    }

    /// A `message` frame; updates the position when it is delivered.
    pub(crate) fn on_message(&mut self, epoch: &str, offset: u64) -> Verdict {
        let verdict = match &self.position {
            None => Verdict::Deliver,
            Some(p) if p.epoch != epoch => Verdict::DeliverAfter(GapReason::EpochChanged),
            Some(p) if offset <= p.offset => return Verdict::Duplicate,
            Some(p) if offset == p.offset + 1 => Verdict::Deliver,
            Some(p) => Verdict::DeliverAfter(GapReason::Missing { expected: p.offset + 1 }),
        };
        self.position = Some(StreamPosition { epoch: epoch.to_owned(), offset });
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivers_each_offset_once_in_order() {
        let mut t = Tracker::default();
        assert_eq!(t.on_ack("e", 10, None), None);
        assert_eq!(t.on_message("e", 11), Verdict::Deliver);
        assert_eq!(t.on_message("e", 12), Verdict::Deliver);
        // A replay of what was delivered (a server resending after a reconnect) is dropped.
        assert_eq!(t.on_message("e", 11), Verdict::Duplicate);
        assert_eq!(t.on_message("e", 12), Verdict::Duplicate);
        assert_eq!(t.on_message("e", 13), Verdict::Deliver);
        assert_eq!(t.position, Some(StreamPosition { epoch: "e".into(), offset: 13 }));
    }

    #[test]
    fn recovery_keeps_the_position_and_failures_are_gaps() {
        let mut t = Tracker::new(Some(StreamPosition { epoch: "e".into(), offset: 5 }));
        assert_eq!(t.on_ack("e", 9, Some(true)), None);
        assert_eq!(t.position.as_ref().map(|p| p.offset), Some(5), "the replay follows from 6");
        assert_eq!(t.on_message("e", 6), Verdict::Deliver);
        assert_eq!(t.on_ack("e", 20, Some(false)), Some(GapReason::NotRecovered));
        assert_eq!(t.on_message("e", 21), Verdict::Deliver);
        assert_eq!(t.on_ack("f", 0, Some(true)), Some(GapReason::EpochChanged));
        assert_eq!(t.on_message("g", 1), Verdict::DeliverAfter(GapReason::EpochChanged));
        assert_eq!(t.on_message("g", 5), Verdict::DeliverAfter(GapReason::Missing { expected: 2 }));
        t.on_gap("g", 9);
        assert_eq!(t.on_message("g", 10), Verdict::Deliver);
    }
}
