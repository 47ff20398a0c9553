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

/// What `crier token` puts in a token (besides `iat` and `exp`).
#[derive(Debug, Default, Clone)]
pub struct TokenRequest {
    pub sub: String,
    pub channels: Vec<String>,
    pub publish: Vec<String>,
    /// Channels the connection is subscribed to at connect (`subs` claim); `None` = no claim.
    pub subs: Option<Vec<String>>,
    pub ttl: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The `kid` header (keys chosen from a JWKS).
    pub kid: Option<String>,
}

/// The key `crier token` signs with.
pub enum SigningKey<'a> {
    /// An HS* secret (its UTF-8 bytes, as the verifier uses them).
    Secret(&'a [u8]),
    /// A PEM private key: RSA, EC (P-256/P-384) or Ed25519.
    PrivatePem(&'a [u8]),
}

/// Signs `req` with `key`. `algorithms` is the node's `jwt_algorithms` (empty: chosen from the
/// key): the first one of the key's family is used.
pub fn mint(key: &SigningKey<'_>, algorithms: &[Algorithm], req: &TokenRequest) -> Result<String, String> {
    if req.sub.is_empty() {
        return Err("`--sub` is required and may not be empty".into());
    }
    let (encoding, family): (EncodingKey, &[Algorithm]) = match key {
        SigningKey::Secret([]) => return Err("the secret is empty".into()),
        SigningKey::Secret(s) => (EncodingKey::from_secret(s), &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]),
        SigningKey::PrivatePem(pem) if !String::from_utf8_lossy(pem).contains("PRIVATE KEY-----") => {
            return Err("the private key file is not a PEM private key (a public key cannot sign)".into());
        }
        SigningKey::PrivatePem(pem) => {
            use Algorithm::{ES256, ES384, EdDSA, PS256, PS384, PS512, RS256, RS384, RS512};
            if let Ok(k) = EncodingKey::from_rsa_pem(pem) {
                (k, &[RS256, RS384, RS512, PS256, PS384, PS512])
            } else if let Ok(k) = EncodingKey::from_ec_pem(pem) {
                (k, &[ES256, ES384])
            } else if let Ok(k) = EncodingKey::from_ed_pem(pem) {
                (k, &[EdDSA])
            } else {
                return Err("the private key file is not a PEM RSA, EC or Ed25519 private key".into());
            }
        }
    };
    let alg = if algorithms.is_empty() {
        family[0]
    } else {
        *algorithms.iter().find(|a| family.contains(a)).ok_or_else(|| {
            format!("jwt_algorithms ({algorithms:?}) lists no algorithm this key can sign with ({family:?})")
        })?
    };
    let now = now_secs();
    let mut claims = serde_json::json!({
        "sub": req.sub,
        "iat": now,
        "exp": now.saturating_add(req.ttl.as_secs().max(1)),
        "channels": req.channels,
        "publish": req.publish,
    });
    if let Some(subs) = &req.subs {
        claims["subs"] = serde_json::json!(subs);
    }
    if let Some(iss) = &req.issuer {
        claims["iss"] = serde_json::json!(iss);
    }
    if let Some(aud) = &req.audience {
        claims["aud"] = serde_json::json!(aud);
    }
    let mut header = Header::new(alg);
    header.kid = req.kid.clone();
    jsonwebtoken::encode(&header, &claims, &encoding).map_err(|e| format!("cannot sign the token: {e}"))
}
