//! Gives memory freed by a burst back to the system (glibc's `malloc_trim`, [`crier_malloc`]).
//!
//! After 10,000 clients connect or subscribe at once, the allocator keeps the burst's high-water
//! mark resident: the freed handshake buffers and request futures sit between live allocations,
//! and `free` only returns the top of a heap. In the peers rig's `mem` shape that was ~1 KB per
//! connection (BENCHMARKS.md, "Memory per subscription on the Redis broker"). So the chore below
//! trims once a burst is over: when at least [`MIN_EVENTS`] connections opened or closed or
//! broker-bound requests ran since the last trim, and none in the last [`TICK`] (or
//! [`MAX_DEFER`] has passed under steady churn). The trim runs on a blocking thread, never on
//! a request's path, at most once per [`TICK`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often the chore looks; also the quiet time that ends a burst.
const TICK: Duration = Duration::from_millis(500);
/// Activity since the last trim below which a trim is not worth its walk over the heap.
const MIN_EVENTS: u64 = 256;
/// Under steady churn (never a quiet tick), trim at most this long after the last trim.
const MAX_DEFER: Duration = Duration::from_secs(30);

/// Connections opened and closed plus broker-bound requests started, since the start.
static EVENTS: AtomicU64 = AtomicU64::new(0);

/// Counts one event that allocates and frees a few KiB (a connection opened or closed, a
/// broker-bound request).
pub fn note() {
    EVENTS.fetch_add(1, Ordering::Relaxed);
}

/// What the chore decided at one tick.
#[derive(Debug)]
struct Policy {
    at_last_trim: u64,
    at_last_tick: u64,
    last_trim: Instant,
}

impl Policy {
    /// Counts from `events`, as if a trim had just run (nothing is held yet at start).
    fn new(events: u64, now: Instant) -> Policy {
        Policy { at_last_trim: events, at_last_tick: events, last_trim: now }
    }

    /// Whether to trim now, given the event count and the time.
    fn tick(&mut self, events: u64, now: Instant) -> bool {
        let pending = events.wrapping_sub(self.at_last_trim);
        let quiet = events == self.at_last_tick;
        self.at_last_tick = events;
        let overdue = now.duration_since(self.last_trim) >= MAX_DEFER;
        if pending >= MIN_EVENTS && (quiet || overdue) {
            self.at_last_trim = events;
            self.last_trim = now;
            return true;
        }
        false
    }
}

/// The chore: runs until the task is aborted. Does nothing where [`crier_malloc::trim`] does not.
pub async fn run() {
    if !crier_malloc::AVAILABLE {
        return;
    }
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut policy = Policy::new(EVENTS.load(Ordering::Relaxed), Instant::now());
    loop {
        tick.tick().await;
        if !policy.tick(EVENTS.load(Ordering::Relaxed), Instant::now()) {
            continue;
        }
        let trimmed = tokio::task::spawn_blocking(|| {
            let start = Instant::now();
            let released = crier_malloc::trim();
            (released, start.elapsed())
        })
        .await;
        if let Ok((released, took)) = trimmed {
            tracing::debug!(released, took_us = took.as_micros() as u64, "malloc_trim");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_a_burst_is_over() {
        let t0 = Instant::now();
        let mut p = Policy::new(0, t0);
        // Too little activity: never.
        assert!(!p.tick(10, t0 + TICK));
        assert!(!p.tick(10, t0 + TICK * 2));
        // A burst: not while it goes on...
        assert!(!p.tick(5_000, t0 + TICK * 2));
        assert!(!p.tick(9_000, t0 + TICK * 3));
        assert!(!p.tick(12_000, t0 + TICK * 4));
        // ... but at the first quiet tick after it.
        assert!(p.tick(12_000, t0 + TICK * 5));
        assert!(!p.tick(12_000, t0 + TICK * 6), "nothing new since");
        // Steady churn with no quiet tick: once MAX_DEFER has passed.
        let mut e = 12_000;
        let mut trims = 0;
        let ticks = (MAX_DEFER.as_millis() / TICK.as_millis()) as u32 + 1;
        for s in 6..6 + ticks {
            e += 500;
            trims += usize::from(p.tick(e, t0 + TICK * s));
        }
        assert_eq!(trims, 1);
    }
}
