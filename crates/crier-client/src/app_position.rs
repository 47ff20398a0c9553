//! The client's side of the delivery promise: the last position delivered on a channel, which
//! drops replays by offset and says when messages were lost (a new epoch, a hole in the
//! offsets, a recovery the server could not make).
//!
//! Not shared with crier-redis's `NodePosition` (the node's side): that one holds a live
//! message back and fills the hole from history before delivering; a client cannot fill, it
//! delivers and tells the application what was lost.

use crier_protocol::StreamPosition;

use crate::events::GapReason;

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
pub(crate) struct AppPosition {
    pub(crate) position: Option<StreamPosition>,
}

impl AppPosition {
    pub(crate) fn new(position: Option<StreamPosition>) -> AppPosition {
        AppPosition { position }
    }

    /// A subscribe ack. `asked_recovery`: the subscribe carried `recover` (from
    /// [`AppPosition::position`]). Returns a gap when the server could not recover.
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
        let mut t = AppPosition::default();
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
        let mut t = AppPosition::new(Some(StreamPosition { epoch: "e".into(), offset: 5 }));
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
