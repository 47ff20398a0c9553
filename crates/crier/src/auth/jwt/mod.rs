//! JWT verification: the [`Verifier`] built once from the `jwt_*` settings, and what it checks
//! — size, header (`alg` must be one the key accepts, `crit` refused), key by `kid` for a JWKS,
//! signature — before [`claims`] checks the claims. Keys are loaded and classified in
//! [`super::keys`].

mod claims;
#[cfg(test)]
mod tests;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use jsonwebtoken::errors::ErrorKind;
use serde_json::{Map, Value};

use super::keys::{self, LoadedKey};
use crate::config::{JwtSettings, KeySource};
pub use claims::Claims;
use claims::check_claims;

/// Tokens longer than this are refused before any parsing ("token too large").
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Why there is no verifier without a key.
pub const NO_KEY: &str = "no JWT key configured. Set jwt_secret, jwt_public_key_file or jwt_jwks_file \
     (flags --jwt-secret..., env CRIER_JWT_SECRET..., or the config file), or run `crier --dev`.";

/// Clock-skew allowance, in seconds, for `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 5;

/// Why a token was refused: the human reason for the `message` of a `token_invalid` response.
/// Never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

impl TokenError {
    fn new(reason: impl Into<String>) -> TokenError {
        TokenError(reason.into())
    }
    fn malformed() -> TokenError {
        TokenError::new("malformed token")
    }
    fn malformed_claim(name: &str) -> TokenError {
        TokenError(format!("malformed claim `{name}`"))
    }
    fn missing_claim(name: &str) -> TokenError {
        TokenError(format!("missing claim `{name}`"))
    }
    fn alg_not_allowed(alg: &str) -> TokenError {
        TokenError(format!("algorithm not allowed: {}", sanitize(alg, 32)))
    }
}

/// Verifies tokens. Cheap to clone (the keys are shared); `Send + Sync`.
#[derive(Clone, Debug)]
pub struct Verifier {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// JWKS: keys are chosen by `kid`. Otherwise there is exactly one key and `kid` is ignored.
    by_kid: bool,
    keys: Vec<LoadedKey>,
    /// Every algorithm some key accepts.
    algorithms: Vec<Algorithm>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl Verifier {
    /// Loads the key(s) of the settings. The error says which setting or file is wrong and
    /// why, including configured algorithms that do not fit the key. The settings were checked
    /// when parsed (one key source, algorithm names, duplicates, HS* only with a secret); what
    /// needs the key itself (its kind, from the file) is checked here.
    pub fn new(settings: &JwtSettings) -> Result<Verifier, String> {
        let configured = &settings.algorithms;
        let (by_kid, keys) = match &settings.key {
            Some(KeySource::Secret(secret)) => {
                let mut key = keys::load_secret(secret)?;
                keys::restrict_single(&mut key, configured, "jwt_secret")?;
                (false, vec![key])
            }
            Some(KeySource::PublicKeyFile(path)) => {
                let mut key = keys::load_pem_file(path)?;
                keys::restrict_single(&mut key, configured, &format!("the public key file {}", path.display()))?;
                (false, vec![key])
            }
            Some(KeySource::JwksFile(path)) => {
                let mut loaded = keys::load_jwks_file(path)?;
                keys::restrict_jwks(&mut loaded, configured, path)?;
                (true, loaded.into_iter().map(|(key, _)| key).collect())
            }
            None => return Err(NO_KEY.into()),
        };
        let mut algorithms: Vec<Algorithm> = Vec::new();
        for key in &keys {
            for (alg, _) in &key.validations {
                if !algorithms.contains(alg) {
                    algorithms.push(*alg);
                }
            }
        }
        let non_empty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
        Ok(Verifier {
            inner: Arc::new(Inner {
                by_kid,
                keys,
                algorithms,
                issuer: non_empty(&settings.issuer),
                audience: non_empty(&settings.audience),
            }),
        })
    }

    /// The algorithms this verifier accepts (for a startup log line).
    pub fn algorithms(&self) -> &[Algorithm] {
        &self.inner.algorithms
    }

    /// Verify `token` now: size, header, algorithm, key, signature, then the claims.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        self.verify_at(token, now_secs())
    }

    /// [`Verifier::verify`] at the given Unix time (seconds).
    fn verify_at(&self, token: &str, now: u64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::new("token too large"));
        }
        let header = parse_header(token)?;
        let alg = Algorithm::from_str(&header.alg)
            .ok()
            .filter(|alg| self.inner.algorithms.contains(alg))
            .ok_or_else(|| TokenError::alg_not_allowed(&header.alg))?;
        let key = self.select_key(header.kid.as_deref())?;
        let validation = key.validation_for(alg).ok_or_else(|| TokenError::alg_not_allowed(&header.alg))?;
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation).map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::new("signature invalid"),
                ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => TokenError::alg_not_allowed(&header.alg),
                ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Json(_) | ErrorKind::Utf8(_) => {
                    TokenError::malformed()
                }
                // Key/provider failures: the signature could not be verified.
                _ => TokenError::new("signature invalid"),
            })?;
        check_claims(&data.claims, now, self.inner.issuer.as_deref(), self.inner.audience.as_deref())
    }

    fn select_key(&self, kid: Option<&str>) -> Result<&LoadedKey, TokenError> {
        let keys = &self.inner.keys;
        if !self.inner.by_kid {
            return keys.first().ok_or_else(|| TokenError::new("no verification key"));
        }
        match kid {
            Some(kid) => keys
                .iter()
                .find(|k| k.kid.as_deref() == Some(kid))
                .ok_or_else(|| TokenError(format!("unknown key id `{}`", sanitize(kid, 64)))),
            None if keys.len() == 1 => keys.first().ok_or_else(|| TokenError::new("no verification key")),
            None => Err(TokenError::new("missing key id (`kid` header)")),
        }
    }
}

struct TokenHeader {
    alg: String,
    kid: Option<String>,
}

/// Read `alg` and `kid` from the (unverified) header, so that the algorithm and the key are
/// chosen before anything else, and so that `alg: none` gets a precise message.
fn parse_header(token: &str) -> Result<TokenHeader, TokenError> {
    let mut parts = token.split('.');
    let (Some(header), Some(_payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::malformed());
    };
    let bytes = URL_SAFE_NO_PAD.decode(header).map_err(|_| TokenError::malformed())?;
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(TokenError::malformed());
    };
    let Some(Value::String(alg)) = map.get("alg") else {
        return Err(TokenError::malformed());
    };
    let kid = match map.get("kid") {
        None | Some(Value::Null) => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(TokenError::malformed()),
    };
    if map.contains_key("crit") {
        // RFC 7515 §4.1.11: extensions we do not understand must make the token invalid.
        return Err(TokenError::new("unsupported critical header"));
    }
    Ok(TokenHeader { alg: alg.clone(), kid })
}

/// Token-supplied text for an error message: printable ASCII only, at most `max` chars.
fn sanitize(text: &str, max: usize) -> String {
    let mut out: String =
        text.chars().take(max).map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    if text.chars().count() > max {
        out.push_str("...");
    }
    out
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
