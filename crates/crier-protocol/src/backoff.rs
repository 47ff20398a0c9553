//! Jittered exponential backoff, the one the project uses: attempt `n`'s delay is drawn below
//! `min(cap, base * 2^n)` ([`Backoff::ceiling`]) — from all of it for clients (full jitter,
//! [`Backoff::delay`]: clients that lost the same node do not come back in step), from its upper
//! half for a server's own reconnects to its broker ([`Backoff::equal_jitter`]: never sooner
//! than half the step). crier-client re-exports it as `crier_client::Backoff`; crier-redis's
//! pub/sub reconnects use it with `reconnect_min`/`reconnect_max`. The one module of this crate
//! that is not a pure function of its input: its draws are random.

use std::time::Duration;

use rand::Rng;

/// Backoff settings (defaults: base 500 ms, cap 20 s, as both clients use; docs/protocol.md,
/// *Client libraries*).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff { base: Duration::from_millis(500), cap: Duration::from_secs(20) }
    }
}

impl Backoff {
    /// The upper bound of attempt `attempt`'s delay (0-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The delay before reconnecting after a close the table marks "reconnect after jitter"
    /// (1012, a draining or rebalancing node): uniformly random in `[0, min(cap, 2 × base)]`
    /// (0–1 s by default). The node already spreads those closes over its drain window (or its
    /// rebalancing rate), so the client only breaks up what still comes at once; a wider window
    /// would only add to every moved client's time without a live subscription
    /// (`crier-bench deploy`: p99 5.0 s with 0–5 s, BENCHMARKS.md).
    pub fn jitter(&self) -> Duration {
        let ceiling = self.base.saturating_mul(2).min(self.cap).as_millis().min(u128::from(u64::MAX)) as u64;
        Duration::from_millis(rand::rng().random_range(0..=ceiling))
    }

    /// A random delay for attempt `attempt` (0-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt).as_millis().min(u128::from(u64::MAX)) as u64;
        Duration::from_millis(rand::rng().random_range(0..=ceiling))
    }

    /// A random delay for attempt `attempt` (0-based) in the upper half of its step:
    /// `[ceiling / 2, ceiling]` ("equal jitter").
    pub fn equal_jitter(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + ceiling.saturating_sub(half).mul_f64(rand::rng().random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_below_it() {
        let b = Backoff::default();
        assert_eq!(b.ceiling(0), Duration::from_millis(500));
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(5), Duration::from_secs(16));
        assert_eq!(b.ceiling(6), Duration::from_secs(20));
        assert_eq!(b.ceiling(1000), Duration::from_secs(20));
        let delays: Vec<Duration> = (0..200).map(|_| b.delay(3)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(4)));
        // Jitter: 200 draws from [0, 4000] ms are not all the same.
        assert!(delays.iter().any(|d| *d != delays[0]));
    }

    #[test]
    fn equal_jitter_stays_in_the_upper_half_of_each_step() {
        let b = Backoff { base: Duration::from_millis(50), cap: Duration::from_secs(2) };
        let delays: Vec<Duration> = (0..10).map(|n| b.equal_jitter(n)).collect();
        assert!(delays[0] >= Duration::from_millis(25) && delays[0] <= Duration::from_millis(50));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[9] >= Duration::from_secs(1), "capped at the cap, jittered down to half");
    }
}
