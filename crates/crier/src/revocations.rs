//! The token revocations a node holds in memory ([`Revocations`]; loaded and kept current by
//! [`crate::control`]), and the clock they count in.

use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The token revocations in force on this node: user → `before` (tokens with an `iat` before it,
/// or without `iat`, are refused). An entry counts for `token_max_lifetime` after its `before`.
pub struct Revocations {
    by_user: RwLock<HashMap<Box<str>, u64>>,
    lifetime_s: u64,
}

impl Revocations {
    pub fn new(lifetime: Duration) -> Revocations {
        Revocations { by_user: RwLock::new(HashMap::new()), lifetime_s: lifetime.as_secs() }
    }

    /// Records that `user`'s tokens issued before `before` are revoked (a later `before` wins).
    pub fn record(&self, user: &str, before: u64) {
        let mut map = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        let at = map.entry(user.into()).or_insert(0);
        *at = (*at).max(before);
    }

    /// Whether a token of `user` issued at `iat` is revoked. A token without `iat` cannot show
    /// it was issued after the revocation: it is revoked while one is in force for its user.
    pub fn is_revoked(&self, user: &str, iat: Option<u64>) -> bool {
        let map = self.by_user.read().unwrap_or_else(|e| e.into_inner());
        let Some(&before) = map.get(user) else {
            return false;
        };
        if before.saturating_add(self.lifetime_s) < unix_now() {
            return false;
        }
        iat.is_none_or(|iat| iat < before)
    }

    /// Forgets revocations older than `token_max_lifetime` (every token they cover expired).
    pub fn prune(&self) {
        let stale = unix_now().saturating_sub(self.lifetime_s);
        let mut map = self.by_user.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, before| *before >= stale);
    }

    /// Since when revocations matter (what to load from the broker).
    pub fn since(&self) -> u64 {
        unix_now().saturating_sub(self.lifetime_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revocations_cover_older_and_iat_less_tokens_for_their_lifetime() {
        let r = Revocations::new(Duration::from_secs(100));
        let now = unix_now();
        assert!(!r.is_revoked("u", None));
        r.record("u", now);
        r.record("u", now - 50);
        assert!(r.is_revoked("u", Some(now - 1)));
        assert!(!r.is_revoked("u", Some(now)), "issued at `before`: not revoked");
        assert!(r.is_revoked("u", None), "no iat: revoked while in force");
        assert!(!r.is_revoked("v", Some(0)));
        r.record("old", now - 200);
        assert!(!r.is_revoked("old", Some(0)), "past token_max_lifetime the revocation no longer counts");
        r.prune();
        assert!(r.by_user.read().map(|m| !m.contains_key("old") && m.contains_key("u")).unwrap_or(false));
    }
}
