//! Tokens and secrets crier makes itself: the `--dev` secret and token, and tokens for the
//! tests and the bench.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

/// Mint an HS256 token for `sub` with `iat` = now and `exp` = now + `ttl` (whole seconds),
/// plus the `channels` and `publish` claims. `secret` is used as-is (pass
/// `jwt_secret.as_bytes()`, the same bytes [`Verifier`] uses).
pub fn mint_hs256(
    secret: &[u8],
    sub: &str,
    channels: &[&str],
    publish: &[&str],
    ttl: Duration,
) -> Result<String, String> {
    if secret.is_empty() {
        return Err("cannot mint a token: the secret is empty".into());
    }
    if sub.is_empty() {
        return Err("cannot mint a token: `sub` is empty".into());
    }
    let now = now_secs();
    let claims = serde_json::json!({
        "sub": sub,
        "iat": now,
        "exp": now.saturating_add(ttl.as_secs()),
        "channels": channels,
        "publish": publish,
    });
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret))
        .map_err(|e| format!("cannot mint a token: {e}"))
}

/// A fresh random HS256 secret for `--dev`: 32 random bytes, base64url without padding
/// (43 characters). Use the string itself (its bytes) as the secret.
pub fn generate_secret() -> String {
    URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
