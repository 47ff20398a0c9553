//! What a subscription yields, as the application sees it: [`Event`]s — messages, presence
//! joins and leaves, [`Gap`]s that say what was lost, and the reason it ended.

use crier_protocol::StreamPosition;
use crier_protocol::frames::PresenceEntry;
use serde_json::Value;

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
