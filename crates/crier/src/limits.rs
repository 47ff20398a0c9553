//! Rate limits (governor GCRA, keyed): WebSocket handshakes per client IP, and client frames per
//! user (shared by all of the user's connections on this node).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// The node's limiters.
pub struct Limits {
    handshakes: DefaultKeyedRateLimiter<IpAddr>,
    frames: DefaultKeyedRateLimiter<Arc<str>>,
    clock: DefaultClock,
}

fn quota(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

impl Limits {
    pub fn new(handshake_rate: u32, handshake_burst: u32, user_rate: u32, user_burst: u32) -> Limits {
        Limits {
            handshakes: DefaultKeyedRateLimiter::keyed(quota(handshake_rate, handshake_burst)),
            frames: DefaultKeyedRateLimiter::keyed(quota(user_rate, user_burst)),
            clock: DefaultClock::default(),
        }
    }

    /// `Err(retry_after)` when `ip` is over its handshake rate.
    pub fn check_handshake(&self, ip: IpAddr) -> Result<(), Duration> {
        self.handshakes.check_key(&ip).map_err(|nu| nu.wait_time_from(self.clock.now()))
    }

    /// `false` when `user` is over its frame rate.
    pub fn check_frame(&self, user: &Arc<str>) -> bool {
        self.frames.check_key(user).is_ok()
    }

    /// Forgets keys whose limits have fully replenished (called periodically).
    pub fn shrink(&self) {
        self.handshakes.retain_recent();
        self.frames.retain_recent();
        self.handshakes.shrink_to_fit();
        self.frames.shrink_to_fit();
    }
}
