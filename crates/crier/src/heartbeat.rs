//! Heartbeats and token expiry for every connection of the node, from one periodic sweep.
//!
//! Each connection's liveness lives in its [`Outbox`](crier_core::Outbox) as three atomics (last
//! heard from, last ping, token expiry); this task walks the registry every `tick` and acts
//! through the outbox: a ping once a client has been silent for `ping_interval`, 4010 when a ping
//! went unanswered for `pong_timeout`, 4001 (after what is queued) when the token expired.
//! Connections therefore keep no timers of their own: an idle connection costs no timer memory
//! and no wake-ups, and a busy one does not re-arm timers on every message.

use std::time::Duration;

use crier_core::{Beat, clock_ms};
use crier_protocol::CloseCode;

use crate::metrics as m;
use crate::state::AppState;

/// How often the sweep runs: a quarter of the shorter heartbeat setting, between 10 ms and 1 s.
/// Pings and closes are therefore late by at most that much; token expiry by at most 1 s.
pub fn tick(ping_interval: Duration, pong_timeout: Duration) -> Duration {
    (ping_interval.min(pong_timeout) / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
}

/// Runs the sweep forever (the caller aborts it at shutdown).
pub async fn run(st: AppState) {
    let cfg = &st.config;
    let mut ticker = tokio::time::interval(tick(cfg.ping_interval, cfg.pong_timeout));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let interval_ms = cfg.ping_interval.as_millis() as u64;
    let timeout_ms = cfg.pong_timeout.as_millis() as u64;
    loop {
        ticker.tick().await;
        let now = clock_ms();
        let mut timed_out = 0u64;
        st.registry.for_each(|outbox| match outbox.heartbeat(now, interval_ms, timeout_ms) {
            Beat::Alive => {}
            Beat::Ping => outbox.ping(),
            Beat::TimedOut => {
                if outbox.close(CloseCode::HEARTBEAT_TIMEOUT) {
                    timed_out += 1;
                }
            }
            Beat::Expired => {
                outbox.close(CloseCode::TOKEN_EXPIRED);
            }
        });
        if timed_out > 0 {
            metrics::counter!(m::HEARTBEAT_TIMEOUTS).increment(timed_out);
        }
    }
}
