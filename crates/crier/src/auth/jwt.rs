//! JWT verification (CONTRACT §2 "JWT claims") and minting for `--dev`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value};

use super::keys::{self, LoadedKey};

/// Tokens longer than this are refused before any parsing ("token too large").
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Clock-skew allowance, in seconds, for `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 5;

/// The claims crier uses from a verified token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// The user id (`sub`): a non-empty string.
    pub sub: String,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// Channel patterns the user may subscribe to (missing claim = empty).
    pub channels: Vec<String>,
    /// Channel patterns the user may publish to from the client (missing claim = empty).
    pub publish: Vec<String>,
}

/// Where verification keys come from: the `jwt_*` settings. Exactly one of `secret`,
/// `public_key_file` and `jwks_file` must be set.
pub use crate::config::JwtSettings as KeySource;

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
    /// Load the key(s) of `src`. The error says which setting or file is wrong and why,
    /// including configured algorithms that do not fit the key.
    pub fn new(src: &KeySource) -> Result<Verifier, String> {
        let mut set = Vec::new();
        if src.secret.is_some() {
            set.push("jwt_secret");
        }
        if src.public_key_file.is_some() {
            set.push("jwt_public_key_file");
        }
        if src.jwks_file.is_some() {
            set.push("jwt_jwks_file");
        }
        if set.len() > 1 {
            return Err(format!(
                "set only one of jwt_secret, jwt_public_key_file and jwt_jwks_file (got {})",
                set.join(" and ")
            ));
        }
        let mut configured: Vec<Algorithm> = Vec::new();
        for alg in &src.algorithms {
            if !configured.contains(alg) {
                configured.push(*alg);
            }
        }
        let (by_kid, keys) = if let Some(secret) = &src.secret {
            let mut key = keys::load_secret(secret)?;
            keys::restrict_single(&mut key, &configured, "jwt_secret")?;
            (false, vec![key])
        } else if let Some(path) = &src.public_key_file {
            let mut key = keys::load_pem_file(path)?;
            keys::restrict_single(&mut key, &configured, &format!("the public key file {}", path.display()))?;
            (false, vec![key])
        } else if let Some(path) = &src.jwks_file {
            let mut loaded = keys::load_jwks_file(path)?;
            keys::restrict_jwks(&mut loaded, &configured, path)?;
            (true, loaded.into_iter().map(|(key, _)| key).collect())
        } else {
            return Err("no JWT key configured: set one of jwt_secret, jwt_public_key_file or jwt_jwks_file".into());
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
                issuer: non_empty(&src.issuer),
                audience: non_empty(&src.audience),
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

/// Check the claims of a token whose signature is valid.
fn check_claims(
    claims: &Map<String, Value>,
    now: u64,
    issuer: Option<&str>,
    audience: Option<&str>,
) -> Result<Claims, TokenError> {
    let exp = numeric_date(claims, "exp", false)?.ok_or_else(|| TokenError::missing_claim("exp"))?;
    if now >= exp.saturating_add(LEEWAY_SECS) {
        return Err(TokenError::new("token expired"));
    }
    if let Some(nbf) = numeric_date(claims, "nbf", true)?
        && nbf > now.saturating_add(LEEWAY_SECS)
    {
        return Err(TokenError::new("token not yet valid"));
    }
    if let Some(iat) = numeric_date(claims, "iat", true)?
        && iat > now.saturating_add(LEEWAY_SECS)
    {
        return Err(TokenError::new("token issued in the future"));
    }
    if let Some(want) = issuer {
        match claims.get("iss") {
            None | Some(Value::Null) => return Err(TokenError::missing_claim("iss")),
            Some(Value::String(iss)) if iss == want => {}
            Some(Value::String(_)) => return Err(TokenError::new("wrong issuer")),
            Some(_) => return Err(TokenError::malformed_claim("iss")),
        }
    }
    if let Some(want) = audience {
        let ok = match claims.get("aud") {
            None | Some(Value::Null) => return Err(TokenError::missing_claim("aud")),
            Some(Value::String(aud)) => aud == want,
            Some(Value::Array(list)) => {
                let mut found = false;
                for item in list {
                    let Value::String(aud) = item else {
                        return Err(TokenError::malformed_claim("aud"));
                    };
                    found |= aud == want;
                }
                found
            }
            Some(_) => return Err(TokenError::malformed_claim("aud")),
        };
        if !ok {
            return Err(TokenError::new("wrong audience"));
        }
    }
    let sub = match claims.get("sub") {
        None | Some(Value::Null) => return Err(TokenError::missing_claim("sub")),
        Some(Value::String(sub)) if sub.is_empty() => {
            return Err(TokenError::new("claim `sub` is empty"));
        }
        Some(Value::String(sub)) => sub.clone(),
        Some(_) => return Err(TokenError::malformed_claim("sub")),
    };
    Ok(Claims { sub, exp, channels: string_list(claims, "channels")?, publish: string_list(claims, "publish")? })
}

/// A NumericDate claim: absent/null = `None`; a non-negative integer or finite number
/// (fractions rounded towards the stricter side); anything else is malformed.
fn numeric_date(claims: &Map<String, Value>, name: &str, round_up: bool) -> Result<Option<u64>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(v) = n.as_u64() {
                return Ok(Some(v));
            }
            match n.as_f64() {
                Some(f) if f.is_finite() && (0.0..1.8e19).contains(&f) => {
                    Ok(Some(if round_up { f.ceil() } else { f.floor() } as u64))
                }
                _ => Err(TokenError::malformed_claim(name)),
            }
        }
        Some(_) => Err(TokenError::malformed_claim(name)),
    }
}

/// An optional array-of-strings claim: absent/null = empty.
fn string_list(claims: &Map<String, Value>, name: &str) -> Result<Vec<String>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                _ => Err(TokenError::malformed_claim(name)),
            })
            .collect(),
        Some(_) => Err(TokenError::malformed_claim(name)),
    }
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

/// Parse a configured algorithm name (`HS256` .. `EdDSA`, case-insensitive). `none` is refused.
pub fn parse_algorithm(name: &str) -> Result<Algorithm, String> {
    let trimmed = name.trim();
    let upper = trimmed.to_ascii_uppercase();
    if upper == "NONE" {
        return Err("JWT algorithm `none` is never accepted".into());
    }
    if upper == "EDDSA" {
        return Ok(Algorithm::EdDSA);
    }
    Algorithm::from_str(&upper).map_err(|_| {
        format!(
            "unknown JWT algorithm `{trimmed}` (expected one of HS256, HS384, HS512, RS256, \
             RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA)"
        )
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const SECRET: &str = "a-test-secret-that-is-long-enough-32+";

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys").join(name)
    }

    fn read(name: &str) -> Result<Vec<u8>, std::io::Error> {
        std::fs::read(fixture(name))
    }

    /// A temporary file with `contents`, unique per call.
    fn temp_file(contents: &str) -> Result<PathBuf, std::io::Error> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "crier-auth-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents)?;
        Ok(path)
    }

    fn now() -> u64 {
        now_secs()
    }

    fn good_claims() -> Value {
        json!({"sub": "u1", "exp": now() + 600, "channels": ["chat:*"], "publish": ["chat:lobby"]})
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_string);
        encode(&header, claims, key).unwrap_or_default()
    }

    fn hs(claims: &Value) -> String {
        sign(Algorithm::HS256, None, claims, &EncodingKey::from_secret(SECRET.as_bytes()))
    }

    fn secret_verifier() -> Result<Verifier, String> {
        Verifier::new(&KeySource { secret: Some(SECRET.into()), ..Default::default() })
    }

    fn err_of(result: Result<Claims, TokenError>) -> String {
        match result {
            Ok(claims) => format!("unexpectedly accepted: {claims:?}"),
            Err(e) => e.0,
        }
    }

    fn b64(json: &Value) -> String {
        URL_SAFE_NO_PAD.encode(json.to_string())
    }

    #[test]
    fn hs256_roundtrip() -> TestResult {
        let v = secret_verifier()?;
        let claims = v.verify(&hs(&good_claims()))?;
        assert_eq!(claims.sub, "u1");
        assert_eq!(claims.channels, vec!["chat:*"]);
        assert_eq!(claims.publish, vec!["chat:lobby"]);
        assert!(claims.exp > now());
        Ok(())
    }

    #[test]
    fn hs384_hs512_need_configuring() -> TestResult {
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let t384 = sign(Algorithm::HS384, None, &good_claims(), &key);
        let t512 = sign(Algorithm::HS512, None, &good_claims(), &key);
        // Default for a secret: HS256 only.
        let v = secret_verifier()?;
        assert_eq!(err_of(v.verify(&t384)), "algorithm not allowed: HS384");
        assert_eq!(err_of(v.verify(&t512)), "algorithm not allowed: HS512");
        let v = Verifier::new(&KeySource {
            secret: Some(SECRET.into()),
            algorithms: vec![Algorithm::HS384, Algorithm::HS512],
            ..Default::default()
        })?;
        assert_eq!(v.verify(&t384)?.sub, "u1");
        assert_eq!(v.verify(&t512)?.sub, "u1");
        assert_eq!(err_of(v.verify(&hs(&good_claims()))), "algorithm not allowed: HS256");
        Ok(())
    }

    #[test]
    fn wrong_secret_is_signature_invalid() -> TestResult {
        let v = secret_verifier()?;
        let other = sign(Algorithm::HS256, None, &good_claims(), &EncodingKey::from_secret(b"another-secret"));
        assert_eq!(err_of(v.verify(&other)), "signature invalid");
        // Tampered payload, original signature.
        let token = hs(&good_claims());
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(&json!({"sub": "admin", "exp": now() + 600, "channels": ["*"]})),
            parts[2]
        );
        assert_eq!(err_of(v.verify(&forged)), "signature invalid");
        Ok(())
    }

    #[test]
    fn rs256_and_ps256_with_pem() -> TestResult {
        let v = Verifier::new(&KeySource { public_key_file: Some(fixture("rsa_public.pem")), ..Default::default() })?;
        let key = EncodingKey::from_rsa_pem(&read("rsa_private.pem")?)?;
        assert_eq!(v.verify(&sign(Algorithm::RS256, None, &good_claims(), &key))?.sub, "u1");
        assert_eq!(v.verify(&sign(Algorithm::PS256, None, &good_claims(), &key))?.sub, "u1");
        // A tampered payload under a genuine RS256 signature.
        let token = sign(Algorithm::RS256, None, &good_claims(), &key);
        let parts: Vec<&str> = token.split('.').collect();
        let payload = b64(&json!({"sub": "admin", "exp": now() + 600}));
        let forged = format!("{}.{payload}.{}", parts[0], parts[2]);
        assert_eq!(err_of(v.verify(&forged)), "signature invalid");
        // Restricting to RS256 refuses PS256.
        let v = Verifier::new(&KeySource {
            public_key_file: Some(fixture("rsa_public.pem")),
            algorithms: vec![Algorithm::RS256],
            ..Default::default()
        })?;
        let ps = sign(Algorithm::PS256, None, &good_claims(), &key);
        assert_eq!(err_of(v.verify(&ps)), "algorithm not allowed: PS256");
        Ok(())
    }

    #[test]
    fn rs256_with_pkcs1_pem() -> TestResult {
        // `RSA PUBLIC KEY` (PKCS#1): for a 2048-bit key the SPKI DER is a fixed 24-byte prefix
        // followed by the PKCS#1 structure.
        let spki_pem = String::from_utf8(read("rsa_public.pem")?)?;
        let body: String = spki_pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD.decode(body)?;
        let pkcs1 = base64::engine::general_purpose::STANDARD.encode(&der[24..]);
        let path = temp_file(&format!("-----BEGIN RSA PUBLIC KEY-----\n{pkcs1}\n-----END RSA PUBLIC KEY-----\n"))?;
        let v = Verifier::new(&KeySource { public_key_file: Some(path.clone()), ..Default::default() });
        std::fs::remove_file(&path)?;
        let v = v?;
        let key = EncodingKey::from_rsa_pem(&read("rsa_private.pem")?)?;
        assert_eq!(v.verify(&sign(Algorithm::RS512, None, &good_claims(), &key))?.sub, "u1");
        Ok(())
    }

    #[test]
    fn es256_with_pem() -> TestResult {
        let v = Verifier::new(&KeySource { public_key_file: Some(fixture("ec_public.pem")), ..Default::default() })?;
        assert_eq!(v.algorithms(), &[Algorithm::ES256]);
        let key = EncodingKey::from_ec_pem(&read("ec_private.pem")?)?;
        assert_eq!(v.verify(&sign(Algorithm::ES256, None, &good_claims(), &key))?.sub, "u1");
        Ok(())
    }

    #[test]
    fn eddsa_with_pem() -> TestResult {
        let v =
            Verifier::new(&KeySource { public_key_file: Some(fixture("ed25519_public.pem")), ..Default::default() })?;
        let key = EncodingKey::from_ed_pem(&read("ed25519_private.pem")?)?;
        assert_eq!(v.verify(&sign(Algorithm::EdDSA, None, &good_claims(), &key))?.sub, "u1");
        // Signed by another key family entirely: refused by algorithm.
        assert_eq!(err_of(v.verify(&hs(&good_claims()))), "algorithm not allowed: HS256");
        Ok(())
    }

    #[test]
    fn jwks_picks_key_by_kid() -> TestResult {
        let v = Verifier::new(&KeySource { jwks_file: Some(fixture("jwks.json")), ..Default::default() })?;
        let rsa = EncodingKey::from_rsa_pem(&read("rsa_private.pem")?)?;
        let ec = EncodingKey::from_ec_pem(&read("ec_private.pem")?)?;
        let claims = good_claims();
        assert_eq!(v.verify(&sign(Algorithm::RS256, Some("rsa-1"), &claims, &rsa))?.sub, "u1");
        assert_eq!(v.verify(&sign(Algorithm::ES256, Some("ec-1"), &claims, &ec))?.sub, "u1");
        // An RSA token pointing at the EC key: the EC key does not accept RS256.
        assert_eq!(
            err_of(v.verify(&sign(Algorithm::RS256, Some("ec-1"), &claims, &rsa))),
            "algorithm not allowed: RS256"
        );
        assert_eq!(err_of(v.verify(&sign(Algorithm::RS256, Some("nope"), &claims, &rsa))), "unknown key id `nope`");
        // Two keys: a kid is required.
        assert_eq!(err_of(v.verify(&sign(Algorithm::RS256, None, &claims, &rsa))), "missing key id (`kid` header)");
        // HS256 is never accepted by a JWKS of public keys.
        let hs = sign(Algorithm::HS256, Some("rsa-1"), &claims, &EncodingKey::from_secret(b"x"));
        assert_eq!(err_of(v.verify(&hs)), "algorithm not allowed: HS256");
        Ok(())
    }

    #[test]
    fn jwks_single_key_without_kid() -> TestResult {
        let full: Value = serde_json::from_slice(&read("jwks.json")?)?;
        let mut ec_only = full["keys"][1].clone();
        if let Some(obj) = ec_only.as_object_mut() {
            obj.remove("kid");
        }
        let path = temp_file(&json!({"keys": [ec_only]}).to_string())?;
        let v = Verifier::new(&KeySource { jwks_file: Some(path.clone()), ..Default::default() });
        std::fs::remove_file(&path)?;
        let v = v?;
        let ec = EncodingKey::from_ec_pem(&read("ec_private.pem")?)?;
        assert_eq!(v.verify(&sign(Algorithm::ES256, None, &good_claims(), &ec))?.sub, "u1");
        assert_eq!(err_of(v.verify(&sign(Algorithm::ES256, Some("x"), &good_claims(), &ec))), "unknown key id `x`");
        Ok(())
    }

    #[test]
    fn jwks_alg_member_and_configured_algorithms() -> TestResult {
        let full: Value = serde_json::from_slice(&read("jwks.json")?)?;
        let mut rsa = full["keys"][0].clone();
        rsa["alg"] = json!("PS256");
        let path = temp_file(&json!({"keys": [rsa, full["keys"][1].clone()]}).to_string())?;
        let v = Verifier::new(&KeySource { jwks_file: Some(path.clone()), ..Default::default() });
        let key = EncodingKey::from_rsa_pem(&read("rsa_private.pem")?)?;
        let v = v?;
        assert_eq!(
            err_of(v.verify(&sign(Algorithm::RS256, Some("rsa-1"), &good_claims(), &key))),
            "algorithm not allowed: RS256"
        );
        assert_eq!(v.verify(&sign(Algorithm::PS256, Some("rsa-1"), &good_claims(), &key))?.sub, "u1");
        // Configured algorithms must fit some key of the set.
        let err = Verifier::new(&KeySource {
            jwks_file: Some(path.clone()),
            algorithms: vec![Algorithm::EdDSA],
            ..Default::default()
        })
        .err()
        .unwrap_or_default();
        assert!(err.contains("EdDSA") && err.contains("JWKS"), "{err}");
        let only_es = Verifier::new(&KeySource {
            jwks_file: Some(path.clone()),
            algorithms: vec![Algorithm::ES256],
            ..Default::default()
        });
        std::fs::remove_file(&path)?;
        assert_eq!(only_es?.algorithms(), &[Algorithm::ES256]);
        Ok(())
    }

    #[test]
    fn rs_to_hs_confusion_fails() -> TestResult {
        let pem = read("rsa_public.pem")?;
        let v = Verifier::new(&KeySource { public_key_file: Some(fixture("rsa_public.pem")), ..Default::default() })?;
        // Signed HS256 with the RSA public key's PEM bytes as the HMAC secret.
        let forged = sign(Algorithm::HS256, None, &good_claims(), &EncodingKey::from_secret(&pem));
        assert_eq!(err_of(v.verify(&forged)), "algorithm not allowed: HS256");
        // And configuring HS256 next to an RSA key is refused at startup.
        let err = Verifier::new(&KeySource {
            public_key_file: Some(fixture("rsa_public.pem")),
            algorithms: vec![Algorithm::RS256, Algorithm::HS256],
            ..Default::default()
        })
        .err()
        .unwrap_or_default();
        assert!(err.contains("HS256") && err.contains("RSA") && err.contains("rsa_public.pem"));
        // Same for the JWKS: the forged token names the RSA key.
        let v = Verifier::new(&KeySource { jwks_file: Some(fixture("jwks.json")), ..Default::default() })?;
        let forged = sign(Algorithm::HS256, Some("rsa-1"), &good_claims(), &EncodingKey::from_secret(&pem));
        assert_eq!(err_of(v.verify(&forged)), "algorithm not allowed: HS256");
        Ok(())
    }

    #[test]
    fn config_errors() -> TestResult {
        let err = Verifier::new(&KeySource::default()).err().unwrap_or_default();
        assert!(err.contains("no JWT key configured"), "{err}");
        let err = Verifier::new(&KeySource {
            secret: Some("s".into()),
            jwks_file: Some(fixture("jwks.json")),
            ..Default::default()
        })
        .err()
        .unwrap_or_default();
        assert!(err.contains("only one"), "{err}");
        let err = Verifier::new(&KeySource {
            secret: Some("s".into()),
            algorithms: vec![Algorithm::RS256],
            ..Default::default()
        })
        .err()
        .unwrap_or_default();
        assert!(err.contains("RS256") && err.contains("jwt_secret"), "{err}");
        let err = Verifier::new(&KeySource {
            public_key_file: Some(fixture("ec_public.pem")),
            algorithms: vec![Algorithm::ES384],
            ..Default::default()
        })
        .err()
        .unwrap_or_default();
        assert!(err.contains("ES384") && err.contains("P-256"), "{err}");
        let err = Verifier::new(&KeySource { public_key_file: Some(fixture("rsa_private.pem")), ..Default::default() })
            .err()
            .unwrap_or_default();
        assert!(err.contains("rsa_private.pem") && err.contains("private key"), "{err}");
        let err = Verifier::new(&KeySource {
            jwks_file: Some(PathBuf::from("/nonexistent/jwks.json")),
            ..Default::default()
        })
        .err()
        .unwrap_or_default();
        assert!(err.contains("/nonexistent/jwks.json"), "{err}");
        // The secret never shows in Debug output.
        let src = KeySource { secret: Some("hunter2".into()), ..Default::default() };
        assert!(!format!("{src:?}").contains("hunter2"));
        Ok(())
    }

    #[test]
    fn alg_none_is_refused() -> TestResult {
        let v = secret_verifier()?;
        let payload = b64(&json!({"sub": "u1", "exp": now() + 600}));
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.");
        assert_eq!(err_of(v.verify(&token)), "algorithm not allowed: none");
        let token = format!("{}.{payload}.", b64(&json!({"alg": "none", "typ": "JWT"})));
        assert_eq!(err_of(v.verify(&token)), "algorithm not allowed: none");
        let token = format!("{}.{payload}.", b64(&json!({"alg": "NONE"})));
        assert_eq!(err_of(v.verify(&token)), "algorithm not allowed: NONE");
        // Even with a signature appended.
        let token = format!("eyJhbGciOiJub25lIn0.{payload}.c2ln");
        assert_eq!(err_of(v.verify(&token)), "algorithm not allowed: none");
        Ok(())
    }

    #[test]
    fn malformed_tokens() -> TestResult {
        let v = secret_verifier()?;
        let good = hs(&good_claims());
        let parts: Vec<&str> = good.split('.').collect();
        let no_alg = format!("{}.{}.{}", b64(&json!({"typ": "JWT"})), parts[1], parts[2]);
        let kid_number = format!("{}.{}.{}", b64(&json!({"alg": "HS256", "kid": 7})), parts[1], parts[2]);
        for bad in [
            "",
            "abc",
            "a.b",
            "a.b.c.d",
            "!!!.b.c",
            "e30.e30.e30.e30.e30",
            &format!("{}.{}", parts[0], parts[1]),
            &format!("{}x.{}.{}", parts[0], parts[1], parts[2]),
            &format!(" {good}"),
            &no_alg,
            &kid_number,
        ] {
            assert_eq!(err_of(v.verify(bad)), "malformed token", "{bad}");
        }
        // A payload that is not a JSON object, correctly signed.
        let key = EncodingKey::from_secret(SECRET.as_bytes());
        let array = sign(Algorithm::HS256, None, &json!(["sub", "exp"]), &key);
        assert_eq!(err_of(v.verify(&array)), "malformed token");
        // Unknown algorithm names.
        let weird = format!("{}.{}.{}", b64(&json!({"alg": "HS1\u{1}"})), parts[1], parts[2]);
        assert_eq!(err_of(v.verify(&weird)), "algorithm not allowed: HS1?");
        let crit =
            format!("{}.{}.{}", b64(&json!({"alg": "HS256", "crit": ["b64"], "b64": false})), parts[1], parts[2]);
        assert_eq!(err_of(v.verify(&crit)), "unsupported critical header");
        Ok(())
    }

    #[test]
    fn token_too_large() -> TestResult {
        let v = secret_verifier()?;
        let mut claims = good_claims();
        claims["pad"] = json!("x".repeat(MAX_TOKEN_BYTES));
        let big = hs(&claims);
        assert!(big.len() > MAX_TOKEN_BYTES);
        assert_eq!(err_of(v.verify(&big)), "token too large");
        assert_eq!(err_of(v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1))), "token too large");
        // Just under the limit is parsed (and here fails for another reason).
        assert_eq!(err_of(v.verify(&"a".repeat(MAX_TOKEN_BYTES))), "malformed token");
        Ok(())
    }

    #[test]
    fn time_claims() -> TestResult {
        let v = secret_verifier()?;
        let t = now();
        let with = |extra: Value| {
            let mut c = json!({"sub": "u1", "exp": t + 600});
            if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
                for (k, val) in extra {
                    c.insert(k.clone(), val.clone());
                }
            }
            hs(&c)
        };
        assert_eq!(err_of(v.verify(&hs(&json!({"sub": "u1"})))), "missing claim `exp`");
        assert_eq!(err_of(v.verify(&with(json!({"exp": null})))), "missing claim `exp`");
        assert_eq!(err_of(v.verify(&with(json!({"exp": "soon"})))), "malformed claim `exp`");
        assert_eq!(err_of(v.verify(&with(json!({"exp": -5})))), "malformed claim `exp`");
        assert_eq!(err_of(v.verify(&with(json!({"exp": t - 60})))), "token expired");
        assert!(v.verify(&with(json!({"exp": (t + 600) as f64 + 0.5}))).is_ok());
        assert_eq!(err_of(v.verify(&with(json!({"nbf": t + 60})))), "token not yet valid");
        assert_eq!(err_of(v.verify(&with(json!({"nbf": "x"})))), "malformed claim `nbf`");
        assert!(v.verify(&with(json!({"nbf": t - 60}))).is_ok());
        assert_eq!(err_of(v.verify(&with(json!({"iat": t + 60})))), "token issued in the future");
        assert_eq!(err_of(v.verify(&with(json!({"iat": [1]})))), "malformed claim `iat`");
        assert!(v.verify(&with(json!({"iat": t - 60}))).is_ok());
        Ok(())
    }

    #[test]
    fn leeway_edges() -> TestResult {
        let v = secret_verifier()?;
        let t = 1_000_000;
        let token = |claims: Value| hs(&claims);
        let at = |tok: &str, now: u64| v.verify_at(tok, now);
        // exp: valid strictly before exp + leeway.
        let tok = token(json!({"sub": "u", "exp": t}));
        assert!(at(&tok, t).is_ok());
        assert!(at(&tok, t + LEEWAY_SECS - 1).is_ok());
        assert_eq!(err_of(at(&tok, t + LEEWAY_SECS)), "token expired");
        // nbf: valid from nbf - leeway.
        let tok = token(json!({"sub": "u", "exp": t + 100, "nbf": t + LEEWAY_SECS}));
        assert!(at(&tok, t).is_ok());
        assert_eq!(err_of(at(&tok, t - 1)), "token not yet valid");
        // iat likewise.
        let tok = token(json!({"sub": "u", "exp": t + 100, "iat": t + LEEWAY_SECS}));
        assert!(at(&tok, t).is_ok());
        assert_eq!(err_of(at(&tok, t - 1)), "token issued in the future");
        Ok(())
    }

    #[test]
    fn sub_and_list_claims() -> TestResult {
        let v = secret_verifier()?;
        let exp = now() + 600;
        assert_eq!(err_of(v.verify(&hs(&json!({"exp": exp})))), "missing claim `sub`");
        assert_eq!(err_of(v.verify(&hs(&json!({"exp": exp, "sub": null})))), "missing claim `sub`");
        assert_eq!(err_of(v.verify(&hs(&json!({"exp": exp, "sub": ""})))), "claim `sub` is empty");
        assert_eq!(err_of(v.verify(&hs(&json!({"exp": exp, "sub": 42})))), "malformed claim `sub`");
        let minimal = v.verify(&hs(&json!({"exp": exp, "sub": "u2"})))?;
        assert_eq!(minimal, Claims { sub: "u2".into(), exp, channels: vec![], publish: vec![] });
        for (claims, want) in [
            (json!({"exp": exp, "sub": "u", "channels": "chat:*"}), "malformed claim `channels`"),
            (json!({"exp": exp, "sub": "u", "channels": ["a", 1]}), "malformed claim `channels`"),
            (json!({"exp": exp, "sub": "u", "publish": {"a": 1}}), "malformed claim `publish`"),
            (json!({"exp": exp, "sub": "u", "publish": [null]}), "malformed claim `publish`"),
        ] {
            assert_eq!(err_of(v.verify(&hs(&claims))), want);
        }
        let null_lists = v.verify(&hs(&json!({"exp": exp, "sub": "u", "channels": null})))?;
        assert!(null_lists.channels.is_empty());
        Ok(())
    }

    #[test]
    fn issuer_and_audience() -> TestResult {
        let v = Verifier::new(&KeySource {
            secret: Some(SECRET.into()),
            issuer: Some("https://issuer.example".into()),
            audience: Some("crier".into()),
            ..Default::default()
        })?;
        let exp = now() + 600;
        let iss = "https://issuer.example";
        let ok = [
            json!({"sub": "u", "exp": exp, "iss": iss, "aud": "crier"}),
            json!({"sub": "u", "exp": exp, "iss": iss, "aud": ["other", "crier"]}),
        ];
        for claims in ok {
            assert!(v.verify(&hs(&claims)).is_ok(), "{claims}");
        }
        let bad = [
            (json!({"sub": "u", "exp": exp, "aud": "crier"}), "missing claim `iss`"),
            (json!({"sub": "u", "exp": exp, "iss": "evil", "aud": "crier"}), "wrong issuer"),
            (json!({"sub": "u", "exp": exp, "iss": [iss], "aud": "crier"}), "malformed claim `iss`"),
            (json!({"sub": "u", "exp": exp, "iss": iss}), "missing claim `aud`"),
            (json!({"sub": "u", "exp": exp, "iss": iss, "aud": "other"}), "wrong audience"),
            (json!({"sub": "u", "exp": exp, "iss": iss, "aud": ["a", "b"]}), "wrong audience"),
            (json!({"sub": "u", "exp": exp, "iss": iss, "aud": [1]}), "malformed claim `aud`"),
            (json!({"sub": "u", "exp": exp, "iss": iss, "aud": 5}), "malformed claim `aud`"),
        ];
        for (claims, want) in bad {
            assert_eq!(err_of(v.verify(&hs(&claims))), want, "{claims}");
        }
        // Not configured: iss and aud are not checked at all.
        let v = secret_verifier()?;
        let claims = json!({"sub": "u", "exp": exp, "iss": "anyone", "aud": "anything"});
        assert!(v.verify(&hs(&claims)).is_ok());
        Ok(())
    }

    #[test]
    fn error_messages_never_echo_the_token() -> TestResult {
        let v = secret_verifier()?;
        let long_kid_jwks = Verifier::new(&KeySource { jwks_file: Some(fixture("jwks.json")), ..Default::default() })?;
        let rsa = EncodingKey::from_rsa_pem(&read("rsa_private.pem")?)?;
        let kid = "k".repeat(500);
        let tok = sign(Algorithm::RS256, Some(&kid), &good_claims(), &rsa);
        let err = err_of(long_kid_jwks.verify(&tok));
        assert!(err.starts_with("unknown key id `kkk") && err.len() < 100, "{err}");
        let token = hs(&json!({"sub": "u1", "exp": now() - 100}));
        let err = err_of(v.verify(&token));
        assert!(!err.contains(&token) && !token.contains(&err));
        Ok(())
    }

    #[test]
    fn mint_and_verify() -> TestResult {
        let secret = generate_secret();
        assert_eq!(secret.len(), 43);
        assert_ne!(secret, generate_secret());
        let token = mint_hs256(
            secret.as_bytes(),
            "dev-user",
            &["chat:*", "user:dev-user"],
            &["chat:*"],
            Duration::from_secs(3600),
        )?;
        let v = Verifier::new(&KeySource { secret: Some(secret.clone()), ..Default::default() })?;
        let claims = v.verify(&token)?;
        assert_eq!(claims.sub, "dev-user");
        assert_eq!(claims.channels, vec!["chat:*", "user:dev-user"]);
        assert_eq!(claims.publish, vec!["chat:*"]);
        assert!(claims.exp >= now() + 3590 && claims.exp <= now() + 3600);
        assert!(mint_hs256(secret.as_bytes(), "", &[], &[], Duration::from_secs(1)).is_err());
        assert!(mint_hs256(b"", "u", &[], &[], Duration::from_secs(1)).is_err());
        Ok(())
    }

    #[test]
    fn parse_algorithm_names() {
        assert_eq!(parse_algorithm("HS256"), Ok(Algorithm::HS256));
        assert_eq!(parse_algorithm(" rs512 "), Ok(Algorithm::RS512));
        assert_eq!(parse_algorithm("EdDSA"), Ok(Algorithm::EdDSA));
        assert_eq!(parse_algorithm("eddsa"), Ok(Algorithm::EdDSA));
        assert!(parse_algorithm("none").err().unwrap_or_default().contains("never"));
        assert!(parse_algorithm("HS1").err().unwrap_or_default().contains("unknown"));
    }

    #[test]
    fn verifier_is_shareable() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Verifier>();
    }
}
