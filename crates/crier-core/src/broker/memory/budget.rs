//! The memory broker's byte bound on history across channels: how many bytes were published in
//! each [`TICK`] slice, so a publish past the cap finds how far back history must go without
//! sorting the channels.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::TICK;

/// The history's bytes across all channels, by publish time (slices of [`TICK`]): enough to
/// find how far back history must go to fall under the cap without sorting every channel.
/// Locked after a shard's lock, never before one.
pub(super) struct Budget {
    /// 0: no cap (the bytes are still counted).
    pub(super) cap: usize,
    pub(super) total: usize,
    origin: Instant,
    /// The tick of `buckets[0]`.
    first: u64,
    /// Bytes of history published in each tick, oldest first.
    buckets: VecDeque<usize>,
}

impl Budget {
    pub(super) fn new(cap: usize) -> Budget {
        Budget { cap, total: 0, origin: Instant::now(), first: 0, buckets: VecDeque::new() }
    }

    pub(super) fn tick(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.origin).as_nanos() / TICK.as_nanos()) as u64
    }

    pub(super) fn add(&mut self, at: Instant, bytes: usize) {
        self.total += bytes;
        if self.cap == 0 {
            return;
        }
        let t = self.tick(at);
        if self.buckets.is_empty() {
            self.first = t;
        }
        // A publish stamped just before an older one got the lock: count it in the first slice.
        let i = t.saturating_sub(self.first) as usize;
        if self.buckets.len() <= i {
            self.buckets.resize(i + 1, 0);
        }
        self.buckets[i] += bytes;
    }

    pub(super) fn remove(&mut self, at: Instant, bytes: usize) {
        self.total = self.total.saturating_sub(bytes);
        if self.cap == 0 {
            return;
        }
        let i = self.tick(at).saturating_sub(self.first) as usize;
        if let Some(b) = self.buckets.get_mut(i) {
            *b = b.saturating_sub(bytes);
        }
        if self.total == 0 {
            self.buckets.clear();
        }
        while self.buckets.front() == Some(&0) {
            self.buckets.pop_front();
            self.first += 1;
        }
        if self.buckets.capacity() > 64 && self.buckets.len() < self.buckets.capacity() / 4 {
            self.buckets.shrink_to_fit();
        }
    }

    /// Over the cap: the publish time before which history goes, to fall to 90% of the cap —
    /// but never the newest slice (what was just published stays; the cap may be passed by what
    /// is published within one [`TICK`]). `None`: under the cap, or nothing older to drop.
    pub(super) fn cutoff(&self) -> Option<Instant> {
        if self.cap == 0 || self.total <= self.cap || self.buckets.len() < 2 {
            return None;
        }
        let target = self.cap / 10 * 9;
        let mut left = self.total;
        let older = self.buckets.len() - 1;
        let mut end = older;
        for (i, b) in self.buckets.iter().take(older).enumerate() {
            left = left.saturating_sub(*b);
            if left <= target {
                end = i + 1;
                break;
            }
        }
        Some(self.start_of(self.first + end as u64))
    }

    /// Every entry published before `at` is gone (dropped for the cap or expired): forgets
    /// their slices, also any bytes left in them by a publish stamped out of order.
    pub(super) fn forget_before(&mut self, at: Instant) {
        let end = self.tick(at);
        while self.first < end && self.buckets.pop_front().is_some() {
            self.first += 1;
        }
    }

    pub(super) fn start_of(&self, tick: u64) -> Instant {
        self.origin + Duration::from_nanos((TICK.as_nanos() as u64).saturating_mul(tick))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_finds_how_far_back_history_must_go() {
        let mut b = Budget::new(1000);
        let at = |tick: u32| b.origin + TICK * tick;
        let (t0, t1, t2) = (at(0), at(1), at(5));
        b.add(t0, 400);
        b.add(t1, 400);
        assert_eq!(b.cutoff(), None, "under the cap");
        b.add(t2, 400);
        // 1200 > 1000: down to 900 means dropping the first slice (800 left).
        assert_eq!(b.cutoff(), Some(b.start_of(1)));
        b.remove(t0, 400);
        assert_eq!((b.total, b.first, b.buckets.len()), (800, 1, 5), "the empty front slice is forgotten");
        b.add(t2, 800);
        // 1600: everything older than the newest slice goes (1200 left), the newest stays.
        assert_eq!(b.cutoff(), Some(b.start_of(5)));
        b.forget_before(b.start_of(5));
        assert_eq!((b.first, b.buckets.len()), (5, 1));
        assert_eq!(b.cutoff(), None, "only the newest slice is left: it stays");
        b.remove(t1, 400);
        b.remove(t2, 400);
        b.remove(t2, 800);
        assert_eq!((b.total, b.buckets.len()), (0, 0), "nothing left, nothing counted");
    }
}
