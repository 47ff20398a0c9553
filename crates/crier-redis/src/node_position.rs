//! Per-channel delivery bookkeeping of the pub/sub task: where each subscribed channel's stream
//! stands for this node, so live publications are delivered in offset order, exactly once, and
//! holes (a pub/sub reconnect, a dropped message) are noticed and filled from the history.
//!
//! Pure logic, no I/O: the pub/sub task asks [`NodePosition::check`] about every live publication
//! and acts on the [`Verdict`].

use std::sync::Arc;

/// What to do with a live publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Hand it to the handler (the position already moved past it).
    Deliver,
    /// Already delivered (by a gap-fill, or a repeat): drop it.
    Duplicate,
    /// Publications between the last delivered one and this one are missing: fill from the
    /// history first, then ask again.
    Gap,
}

/// Where a channel's stream stands for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NodePosition {
    pub epoch: Arc<str>,
    /// The last offset delivered to the handler (or the channel's top when the subscription
    /// started: earlier publications are the node's history read's business, not the broker's).
    pub last: u64,
}

impl NodePosition {
    pub(crate) fn new(epoch: Arc<str>, top: u64) -> NodePosition {
        NodePosition { epoch, last: top }
    }

    /// Judges a live publication. `gap_fill` is false when there is no history to fill from.
    pub(crate) fn check(&mut self, epoch: &str, offset: u64, gap_fill: bool) -> Verdict {
        if *self.epoch != *epoch {
            // The channel's history was lost and a new epoch began: its stream starts over.
            self.epoch = Arc::from(epoch);
            self.last = 0;
        }
        if offset <= self.last {
            return Verdict::Duplicate;
        }
        if offset == self.last + 1 || !gap_fill {
            self.last = offset;
            return Verdict::Deliver;
        }
        Verdict::Gap
    }

    /// Before delivering a history read at `top` in `epoch`: moves to that epoch (a different
    /// epoch starts the stream over). When the history is behind what this node delivered in the
    /// same epoch (Redis restarted from an older snapshot), the position follows the history so
    /// that new publications flow again.
    pub(crate) fn rebase(&mut self, epoch: &str, top: u64) {
        if *self.epoch != *epoch {
            self.epoch = Arc::from(epoch);
            self.last = 0;
        }
        self.last = self.last.min(top);
    }

    /// Whether a publication read from the history is new for this node (and records it).
    pub(crate) fn take(&mut self, offset: u64) -> bool {
        if offset > self.last {
            self.last = offset;
            true
        } else {
            false
        }
    }

    /// After delivering what a history read returned: publications up to `top` are delivered, or
    /// lost for good (trimmed or expired before this node could read them).
    pub(crate) fn settle(&mut self, top: u64) {
        self.last = self.last.max(top);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_duplicates_and_gaps() {
        let mut p = NodePosition::new("e".into(), 5);
        assert_eq!(p.check("e", 5, true), Verdict::Duplicate, "published before the subscription");
        assert_eq!(p.check("e", 6, true), Verdict::Deliver);
        assert_eq!(p.check("e", 6, true), Verdict::Duplicate);
        assert_eq!(p.check("e", 8, true), Verdict::Gap);
        assert_eq!(p.last, 6, "a gap does not move the position");
        assert_eq!(p.check("e", 8, false), Verdict::Deliver, "without history, deliver what comes");
    }

    #[test]
    fn new_epoch_starts_over() {
        let mut p = NodePosition::new("old".into(), 40);
        assert_eq!(p.check("new", 1, true), Verdict::Deliver);
        assert_eq!((&*p.epoch, p.last), ("new", 1));
        let mut p = NodePosition::new("old".into(), 40);
        assert_eq!(p.check("new", 3, true), Verdict::Gap, "1 and 2 of the new epoch are missing");
        assert_eq!(&*p.epoch, "new");
    }

    #[test]
    fn fill_then_late_live_messages() {
        let mut p = NodePosition::new("e".into(), 10);
        // Reconnected: history says top 15 but only holds 13..=15 (11 and 12 trimmed).
        p.rebase("e", 15);
        assert!(p.take(13) && p.take(14) && p.take(15));
        assert!(!p.take(15));
        p.settle(15);
        assert_eq!(p.check("e", 14, true), Verdict::Duplicate, "queued live copy of a filled one");
        assert_eq!(p.check("e", 16, true), Verdict::Deliver);
        // History behind what we delivered (older snapshot): follow it.
        let mut p = NodePosition::new("e".into(), 50);
        p.rebase("e", 20);
        p.settle(20);
        assert_eq!(p.check("e", 21, true), Verdict::Deliver);
        // New epoch found by the fill: everything in it is new.
        let mut p = NodePosition::new("old".into(), 50);
        p.rebase("new", 3);
        assert!(p.take(1) && p.take(2) && p.take(3));
    }
}
