//! Counters and latency histograms shared by the subscriber tasks.
//!
//! Each connection records into one of a few shards (by connection index) so the two worker
//! threads rarely meet on a lock; a step's figures are taken by merging and resetting them.
//! Latencies are in microseconds, publish (timestamp written into the message's `data` just
//! before the HTTP request) → receive (the frame parsed by the subscriber).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

const SHARDS: usize = 32;
/// Highest latency the histograms hold (1 hour in µs); larger values are clamped.
const MAX_US: u64 = 3_600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    // 3 significant figures: 0.1% precision. The bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|_| unreachable!("valid histogram bounds"))
}

/// Microseconds since the Unix epoch (the clock the publisher stamps messages with).
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// The `p` quantile (0..=1, nearest rank) of values sorted ascending; none when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).copied()
}

struct Shard {
    latency: Histogram<u64>,
    received: u64,
    gaps: u64,
    dups: u64,
}

/// See the module docs.
pub struct Stats {
    shards: Vec<Mutex<Shard>>,
    closed: Mutex<BTreeMap<String, u64>>,
    closed_total: AtomicU64,
}

/// What a step's subscribers saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Received {
    pub received: u64,
    /// Frames whose offset skipped ahead of the previous one + 1 (per connection).
    pub gaps: u64,
    /// Frames whose offset was not above the previous one (per connection).
    pub duplicates: u64,
    pub latency: Latency,
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    pub samples: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn from_histogram(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Latency {
            samples: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats::new()
    }
}

impl Stats {
    pub fn new() -> Stats {
        Stats {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { latency: new_histogram(), received: 0, gaps: 0, dups: 0 }))
                .collect(),
            closed: Mutex::new(BTreeMap::new()),
            closed_total: AtomicU64::new(0),
        }
    }

    fn shard(&self, conn: usize) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[conn % SHARDS].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One `message` frame received by connection `conn`.
    pub fn record(&self, conn: usize, latency_us: Option<u64>, gap: bool, dup: bool) {
        let mut s = self.shard(conn);
        s.received += 1;
        if gap {
            s.gaps += 1;
        }
        if dup {
            s.dups += 1;
        }
        if let Some(us) = latency_us {
            s.latency.saturating_record(us.clamp(1, MAX_US));
        }
    }

    /// A connection ended without being asked to (server close code, or read error).
    pub fn connection_ended(&self, why: String) {
        self.closed_total.fetch_add(1, Ordering::Relaxed);
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()).entry(why).or_default() += 1;
    }

    /// Connections that ended by themselves so far, by reason.
    pub fn ended(&self) -> BTreeMap<String, u64> {
        self.closed.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn ended_total(&self) -> u64 {
        self.closed_total.load(Ordering::Relaxed)
    }

    /// Messages received so far (all steps).
    pub fn received(&self) -> u64 {
        (0..SHARDS).map(|i| self.shard(i).received).sum()
    }

    /// Everything recorded since the last call, and resets the counters.
    pub fn take(&self) -> Received {
        let mut h = new_histogram();
        let mut out = Received::default();
        for i in 0..SHARDS {
            let mut s = self.shard(i);
            let _ = h.add(&s.latency);
            s.latency.reset();
            out.received += std::mem::take(&mut s.received);
            out.gaps += std::mem::take(&mut s.gaps);
            out.duplicates += std::mem::take(&mut s.dups);
        }
        out.latency = Latency::from_histogram(&h);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_merges_and_resets() {
        let s = Stats::new();
        for i in 0..100u64 {
            s.record(i as usize, Some(1000 * (i + 1)), false, false);
        }
        s.record(3, None, true, false);
        assert_eq!(s.received(), 101);
        let r = s.take();
        assert_eq!((r.received, r.gaps, r.duplicates), (101, 1, 0));
        assert_eq!(r.latency.samples, 100);
        assert!((r.latency.p50_ms - 50.0).abs() < 0.1, "{:?}", r.latency);
        assert!((r.latency.max_ms - 100.0).abs() < 0.1);
        assert_eq!(s.received(), 0);
    }
}
