//! Authentication: JWT verification, token extraction, the Origin allow-list and REST API keys.
//!
//! - `Verifier` (in `jwt`) checks a client's JWT (the contract's "JWT claims") against the
//!   configured key ([`crate::config::KeySource`]: an HMAC secret, a PEM public key or a JWKS
//!   file, loaded by `keys`) and yields its `Claims`.
//!   A rejection is a [`TokenError`] whose text is the human reason for the `message` field of a
//!   `token_invalid` response; it never contains the token.
//! - `extract_token` finds the token of a handshake: `Authorization: Bearer`, then the
//!   `crier.bearer.<jwt>` WebSocket subprotocol, then `?token=`.
//! - `OriginPolicy` is the `allowed_origins` list.
//! - `api_key_index` finds a REST API key in constant time.
//! - [`mint_hs256`] and [`generate_secret`] (in `mint`) serve `--dev`, the tests and the bench.

mod extract;
mod jwt;
mod keys;
mod mint;
mod origin;

pub(crate) use extract::{bearer_credentials, extract_token};
pub use jwt::NO_KEY;
pub(crate) use jwt::{Claims, Verifier};
pub use mint::{SigningKey, TokenRequest, generate_secret, mint, mint_hs256};

/// Loads what the settings name for verifying tokens (the secret, the public key file, the JWKS
/// file) and the Origin allow-list, and says what is wrong, without keeping anything. The binary
/// calls it before it binds, so a missing, unreadable or wrong key file is a configuration error
/// (exit 64) reported with the others, never after "listening".
pub fn check(config: &crate::config::Config) -> Result<(), String> {
    Verifier::new(&config.jwt)?;
    OriginPolicy::new(&config.allowed_origins).map_err(|e| format!("allowed_origins: {e}"))?;
    Ok(())
}
pub(crate) use origin::OriginPolicy;

use std::sync::OnceLock;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq};

/// Which of `keys` is `presented` (the first, should a key be configured twice)?
///
/// Every configured key is compared, with no early exit — also after a match, whichever key
/// matched — and the comparison is on fixed-size keyed digests (HMAC-SHA256 under a random
/// per-process key) so neither the content, the length nor the position of a configured key
/// leaks through timing. An empty `presented` key and empty configured keys never match.
pub(crate) fn api_key_index(keys: &[String], presented: &str) -> Option<usize> {
    if presented.is_empty() {
        return None;
    }
    let presented_digest = api_key_digest(presented.as_bytes())?;
    let mut found = Choice::from(0u8);
    let mut index = 0u64;
    for (i, key) in keys.iter().enumerate() {
        let Some(digest) = api_key_digest(key.as_bytes()) else {
            continue;
        };
        let non_empty = Choice::from(u8::from(!key.is_empty()));
        let hit = digest.as_bytes().ct_eq(presented_digest.as_bytes()) & non_empty & !found;
        index = u64::conditional_select(&index, &(i as u64), hit);
        found |= hit;
    }
    bool::from(found).then_some(index as usize)
}

/// HMAC-SHA256 of `data` under a random per-process key, base64url (always 43 bytes).
fn api_key_digest(data: &[u8]) -> Option<String> {
    static DIGEST_KEY: OnceLock<jsonwebtoken::EncodingKey> = OnceLock::new();
    let key = DIGEST_KEY.get_or_init(|| jsonwebtoken::EncodingKey::from_secret(&rand::random::<[u8; 32]>()));
    jsonwebtoken::crypto::sign(data, key, jsonwebtoken::Algorithm::HS256).ok()
}

/// The [`crier_core::clock_ms`] at which a token with this `exp` (Unix seconds) expires; `u64::MAX` if never.
pub(crate) fn expiry_ms(exp: u64) -> u64 {
    let now_unix =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let left = exp as f64 - now_unix;
    if left > 10.0 * 365.0 * 86400.0 {
        return u64::MAX;
    }
    crier_core::clock_ms() + (left.max(0.0) * 1000.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_key_matches(keys: &[String], presented: &str) -> bool {
        api_key_index(keys, presented).is_some()
    }

    #[test]
    fn api_keys() {
        let keys = vec!["alpha-key-123".to_string(), "beta".to_string()];
        assert!(api_key_matches(&keys, "alpha-key-123"));
        assert!(api_key_matches(&keys, "beta"));
        assert!(!api_key_matches(&keys, "alpha-key-12"));
        assert!(!api_key_matches(&keys, "alpha-key-1234"));
        assert!(!api_key_matches(&keys, "Beta"));
        assert!(!api_key_matches(&keys, ""));
        assert!(!api_key_matches(&[], "beta"));
        // An empty configured key matches nothing, not even an empty presented key.
        let with_empty = vec![String::new()];
        assert!(!api_key_matches(&with_empty, ""));
        assert!(!api_key_matches(&with_empty, "x"));
        // Which key: every one compared, the first match kept.
        let keys = vec!["a".to_string(), "b".to_string(), "c".to_string(), "b".to_string()];
        assert_eq!(api_key_index(&keys, "a"), Some(0));
        assert_eq!(api_key_index(&keys, "b"), Some(1));
        assert_eq!(api_key_index(&keys, "c"), Some(2));
        assert_eq!(api_key_index(&keys, "d"), None);
    }

    #[test]
    fn api_key_digests_are_fixed_size() {
        let short = api_key_digest(b"a");
        let long = api_key_digest(&[b'z'; 4096]);
        assert_eq!(short.map(|d| d.len()), Some(43));
        assert_eq!(long.map(|d| d.len()), Some(43));
    }
}
