//! Rebalancing after a scale-out: a node holding clearly more than its share of the cluster's
//! connections closes the excess with 1012 (reconnect after a jittered delay, with recovery), a
//! few per second, so the load balancer places them on the emptier nodes and recovery makes
//! each move lossless.
//!
//! Once a second the node refreshes its own entry in the node registry (its fresh count, and
//! whether it is ready), reads everyone's, and decides ([`Shedder::decide`]): the mean counts
//! only ready nodes (not draining, broker reachable) — a draining node neither counts nor sheds
//! (it drains). A node starts shedding once it holds more than `rebalance_threshold` above the
//! mean and then keeps shedding, at most `rebalance_rate` per second, until it is down to the
//! mean (hysteresis: stopping at the threshold would leave the new node short of the mean). No
//! node sheds while the mean is below `rebalance_min_connections`. The oldest connections go
//! first (connection ids only grow): one that just came back to the same node is not moved
//! again. The closes are spread over the second, paced against its clock like the drain.

use std::sync::Arc;
use std::time::Duration;

use crier_protocol::CloseCode;

use crate::metrics as m;
use crate::state::AppState;

/// How often a node re-reads the cluster's counts and decides.
const TICK: Duration = Duration::from_secs(1);

/// The settings of the decision.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Closes per second at most (0 = off).
    pub rate: u32,
    /// Start shedding above `mean * (1 + threshold_percent / 100)`.
    pub threshold_percent: u32,
    /// No shedding while the mean is below this.
    pub min_mean: u64,
}

/// The decision's one piece of state: whether this node is shedding (between crossing the
/// threshold and reaching the mean).
#[derive(Debug, Default)]
pub struct Shedder {
    active: bool,
}

impl Shedder {
    /// How many connections to close within the next `tick`: `own` is this node's count (it is
    /// ready: the caller does not ask while draining), `others` the other ready nodes' counts.
    pub fn decide(&mut self, own: u64, others: &[u64], policy: Policy, tick: Duration) -> u64 {
        let nodes = others.len() as u64 + 1;
        let total = own + others.iter().sum::<u64>();
        // mean = total / nodes, compared without rounding: own * nodes against total.
        let (own_n, total) = (u128::from(own) * u128::from(nodes), u128::from(total));
        if policy.rate == 0 || others.is_empty() || total < u128::from(policy.min_mean) * u128::from(nodes) {
            self.active = false;
            return 0;
        }
        // own > mean * (1 + t/100)  ⇔  own * nodes * 100 > total * (100 + t)
        if own_n * 100 > total * (100 + u128::from(policy.threshold_percent)) {
            self.active = true;
        }
        // Down to the mean, rounded up: never below it.
        let mean_up = total.div_ceil(u128::from(nodes)) as u64;
        let excess = own.saturating_sub(mean_up);
        if excess == 0 {
            self.active = false;
        }
        if !self.active {
            return 0;
        }
        let budget = (u128::from(policy.rate) * tick.as_millis() / 1000).max(1) as u64;
        excess.min(budget)
    }
}

/// Runs the rebalancing loop until the task is aborted (off when `rebalance_rate` is 0).
pub async fn run(st: AppState) {
    let policy = Policy {
        rate: st.config.rebalance_rate,
        threshold_percent: st.config.rebalance_threshold_percent,
        min_mean: st.config.rebalance_min_connections,
    };
    if policy.rate == 0 {
        return;
    }
    let mut shedder = Shedder::default();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Reported even while draining or cut off: the others stop counting this node at once.
        st.report_node().await;
        if st.is_draining() || !st.broker().is_up() {
            shedder = Shedder::default();
            continue;
        }
        let nodes = match st.broker().nodes().await {
            Ok(nodes) => nodes,
            Err(e) => {
                tracing::debug!(error = %e, "rebalance: node list unavailable");
                continue;
            }
        };
        let me = &st.config.node_id;
        let others: Vec<u64> = nodes.iter().filter(|n| n.ready && n.node != *me).map(|n| n.connections).collect();
        let own = st.registry.len() as u64;
        let n = shedder.decide(own, &others, policy, TICK);
        if n == 0 {
            continue;
        }
        tracing::info!(own, others = ?others, shedding = n, "rebalancing: closing the oldest connections with 1012");
        shed(&st, n as usize).await;
    }
}

/// Closes the `n` oldest open connections with 1012, spread evenly over one tick (stopping if the
/// node starts draining: the drain closes everyone anyway).
async fn shed(st: &AppState, n: usize) {
    let outboxes = st.registry.oldest_open(n);
    let counted = || metrics::counter!(m::REBALANCED).increment(1);
    close_paced(&outboxes, TICK, || st.is_draining(), counted).await;
}

/// Closes `outboxes` with 1012, spread evenly over `window` (a rebalancing tick; the drain,
/// `server::drain`, uses it too),
/// unless `stop()` says otherwise before a close; `closed()` is called for each connection it
/// closed (not one already closing). Paced against the window's clock, not by a sleep per connection: each sleep costs at
/// least a timer tick, and with thousands of connections the ticks added up to twice the window
/// (measured: 10,000 clients, a 10 s drain took 23-28 s). Behind schedule (or with a zero
/// window), the next close goes at once.
pub(crate) async fn close_paced(
    outboxes: &[Arc<crier_core::Outbox>],
    window: Duration,
    mut stop: impl FnMut() -> bool,
    mut closed: impl FnMut(),
) {
    let n = outboxes.len() as u32;
    let step = window / n.max(1);
    let start = tokio::time::Instant::now();
    for (i, o) in outboxes.iter().enumerate() {
        if stop() {
            break;
        }
        if o.close(CloseCode::RESTART) {
            closed();
        }
        let next = start + step * (i as u32 + 1);
        if (i as u32) + 1 < n && next > tokio::time::Instant::now() {
            tokio::time::sleep_until(next).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Policy = Policy { rate: 50, threshold_percent: 20, min_mean: 100 };

    fn once(own: u64, others: &[u64]) -> u64 {
        Shedder::default().decide(own, others, P, TICK)
    }

    #[test]
    fn sheds_above_the_threshold_at_the_rate() {
        // 2 → 3 nodes: mean 3,334; each full node is 50% above; at most 50 a second.
        assert_eq!(once(5_000, &[5_000, 0]), 50);
        // The rate scales with the tick.
        assert_eq!(Shedder::default().decide(5_000, &[5_000, 0], P, Duration::from_millis(500)), 25);
        // Close to the mean only the excess goes: 400 vs mean 300 (threshold 360) → 100.
        let p = Policy { rate: 1_000, ..P };
        assert_eq!(Shedder::default().decide(400, &[250, 250], p, TICK), 100);
    }

    #[test]
    fn within_the_threshold_nothing_moves() {
        // mean 1,000, 20% above is 1,200: 1,200 itself is not above.
        assert_eq!(once(1_200, &[900, 900]), 0);
        assert_eq!(once(1_000, &[1_000, 1_000]), 0);
        assert_eq!(once(0, &[1_500, 1_500]), 0, "a node below the mean never sheds");
    }

    #[test]
    fn once_started_it_sheds_down_to_the_mean_then_stops() {
        let mut s = Shedder::default();
        let p = Policy { rate: 1_000, ..P };
        // mean 1,000: 1,300 is 30% above → starts.
        assert_eq!(s.decide(1_300, &[850, 850], p, TICK), 300);
        // Below the threshold now but still above the mean: keeps going to the mean (1,100 vs
        // mean 1,034 rounded up → 66).
        assert_eq!(s.decide(1_100, &[1_000, 1_000], p, TICK), 66);
        // At the mean: stops, and does not restart within the threshold.
        assert_eq!(s.decide(1_000, &[1_000, 1_000], p, TICK), 0);
        assert_eq!(s.decide(1_100, &[950, 950], p, TICK), 0);
    }

    #[test]
    fn no_shedding_when_small_alone_or_off() {
        // Mean 90 < 100: nothing, however uneven.
        assert_eq!(once(270, &[0, 0]), 0);
        // Mean exactly the minimum: sheds.
        assert_eq!(once(300, &[0, 0]), 50);
        // Alone (no other ready node): nothing.
        assert_eq!(once(10_000, &[]), 0);
        // Rate 0 = off.
        assert_eq!(Shedder::default().decide(5_000, &[0], Policy { rate: 0, ..P }, TICK), 0);
        // A small rate still closes one per tick.
        assert_eq!(Shedder::default().decide(5_000, &[0], Policy { rate: 1, ..P }, Duration::from_millis(100)), 1);
    }
}
