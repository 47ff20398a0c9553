//! Rate limits (governor GCRA, keyed): WebSocket handshakes per client IP, client frames per
//! user (shared by all of the user's connections on this node), REST requests per API key; and
//! the client IP itself, which honours `X-Forwarded-For` only from trusted proxies.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};
use ipnet::IpNet;

use crate::config::Config;

/// The node's limiters.
pub struct Limits {
    handshakes: DefaultKeyedRateLimiter<IpAddr>,
    /// The node's handshake admission over all addresses; `None` when `node_handshake_rate` is 0.
    admission: Option<DefaultDirectRateLimiter>,
    frames: DefaultKeyedRateLimiter<Arc<str>>,
    /// `None` when `api_rate` is 0 (unlimited).
    api: Option<DefaultKeyedRateLimiter<usize>>,
    trusted_proxies: Vec<IpNet>,
    clock: DefaultClock,
}

fn quota(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

impl Limits {
    pub fn new(config: &Config) -> Limits {
        Limits {
            handshakes: DefaultKeyedRateLimiter::keyed(quota(config.handshake_rate, config.handshake_burst)),
            admission: (config.node_handshake_rate > 0).then(|| {
                DefaultDirectRateLimiter::direct(quota(config.node_handshake_rate, config.node_handshake_burst))
            }),
            frames: DefaultKeyedRateLimiter::keyed(quota(config.user_rate, config.user_burst)),
            api: (config.api_rate > 0)
                .then(|| DefaultKeyedRateLimiter::keyed(quota(config.api_rate, config.api_burst))),
            trusted_proxies: config.trusted_proxies.clone(),
            clock: DefaultClock::default(),
        }
    }

    /// The client's IP: the peer, unless the peer is a trusted proxy — then the right-most
    /// `X-Forwarded-For` address that is not itself a trusted proxy.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let trusted = |ip: &IpAddr| self.trusted_proxies.iter().any(|net| net.contains(ip));
        if !trusted(&peer) {
            return peer;
        }
        let mut client = peer;
        for value in headers.get_all("x-forwarded-for").iter().rev() {
            let Ok(value) = value.to_str() else { return client };
            for part in value.rsplit(',') {
                match part.trim().parse::<IpAddr>() {
                    Ok(ip) if trusted(&ip) => client = ip,
                    Ok(ip) => return ip,
                    Err(_) => return client,
                }
            }
        }
        client
    }

    /// `Err(retry_after)` when `ip` is over its handshake rate.
    pub fn check_handshake(&self, ip: IpAddr) -> Result<(), Duration> {
        self.handshakes.check_key(&ip).map_err(|nu| nu.wait_time_from(self.clock.now()))
    }

    /// `Err(retry_after)` when the node is admitting handshakes faster than `node_handshake_rate`
    /// (never when it is 0). One atomic compare-and-swap: cheap enough to run before anything
    /// else, so a storm of handshakes is shed before it costs token verification.
    pub fn check_admission(&self) -> Result<(), Duration> {
        match &self.admission {
            Some(a) => a.check().map_err(|nu| nu.wait_time_from(self.clock.now())),
            None => Ok(()),
        }
    }

    /// `Err(retry_after)` when the API key (by its index in `api_keys`) is over its rate (never
    /// with `api_rate = 0`).
    pub fn check_api(&self, key_index: usize) -> Result<(), Duration> {
        match &self.api {
            Some(api) => api.check_key(&key_index).map_err(|nu| nu.wait_time_from(self.clock.now())),
            None => Ok(()),
        }
    }

    /// `false` when `user` is over its frame rate.
    pub fn check_frame(&self, user: &Arc<str>) -> bool {
        self.frames.check_key(user).is_ok()
    }

    /// Forgets keys whose limits have fully replenished (called periodically).
    pub fn shrink(&self) {
        self.handshakes.retain_recent();
        self.frames.retain_recent();
        if let Some(api) = &self.api {
            api.retain_recent();
        }
        self.handshakes.shrink_to_fit();
        self.frames.shrink_to_fit();
    }
}

/// Seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let config = Config {
            trusted_proxies: vec!["10.0.0.0/8".parse().unwrap_or_else(|_| IpNet::default())],
            ..Config::default()
        };
        let limits = Limits::new(&config);
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "203.0.113.9, 10.1.1.1".parse().unwrap_or_else(|_| unreachable!()));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or_else(|_| unreachable!());
        assert_eq!(limits.client_ip(ip("10.0.0.1"), &h), ip("203.0.113.9"), "trusted peer, trusted hop skipped");
        assert_eq!(limits.client_ip(ip("198.51.100.1"), &h), ip("198.51.100.1"), "untrusted peer: header ignored");
        assert_eq!(limits.client_ip(ip("10.0.0.1"), &HeaderMap::new()), ip("10.0.0.1"));
        h.insert("x-forwarded-for", "junk".parse().unwrap_or_else(|_| unreachable!()));
        assert_eq!(limits.client_ip(ip("10.0.0.1"), &h), ip("10.0.0.1"), "junk: fall back to the proxy");
    }
}
