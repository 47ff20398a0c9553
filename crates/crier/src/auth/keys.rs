//! Loading verification keys: an HMAC secret, a PEM public key, or a JWKS file.
//!
//! Every key is classified into a [`KeyKind`] at load time, and each key only ever accepts the
//! algorithms of its own kind. That is the algorithm-confusion defence: an RSA public key can
//! never be used as an HMAC secret, whatever a token's header says.

use std::path::Path;

use base64::Engine;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

/// What a loaded key is, which decides the algorithms it may verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyKind {
    Hmac,
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    /// Every algorithm this kind of key can verify.
    pub(super) fn algorithms(self) -> &'static [Algorithm] {
        match self {
            KeyKind::Hmac => &[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512],
            KeyKind::Rsa => &[
                Algorithm::RS256,
                Algorithm::RS384,
                Algorithm::RS512,
                Algorithm::PS256,
                Algorithm::PS384,
                Algorithm::PS512,
            ],
            KeyKind::EcP256 => &[Algorithm::ES256],
            KeyKind::EcP384 => &[Algorithm::ES384],
            KeyKind::Ed25519 => &[Algorithm::EdDSA],
        }
    }

    /// The algorithms accepted when none are configured.
    fn default_algorithms(self) -> &'static [Algorithm] {
        match self {
            KeyKind::Hmac => &[Algorithm::HS256],
            other => other.algorithms(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            KeyKind::Hmac => "an HMAC secret",
            KeyKind::Rsa => "an RSA public key",
            KeyKind::EcP256 => "an EC P-256 public key",
            KeyKind::EcP384 => "an EC P-384 public key",
            KeyKind::Ed25519 => "an Ed25519 public key",
        }
    }
}

/// One usable verification key.
#[derive(Debug, Clone)]
pub(super) struct LoadedKey {
    pub(super) kid: Option<String>,
    pub(super) kind: KeyKind,
    pub(super) key: DecodingKey,
    /// The algorithms this key accepts, each with the (signature-only) validation to run.
    /// Claim checks are done by the caller, so these validate nothing but the signature.
    pub(super) validations: Vec<(Algorithm, Validation)>,
}

impl LoadedKey {
    fn new(kid: Option<String>, kind: KeyKind, key: DecodingKey) -> LoadedKey {
        LoadedKey { kid, kind, key, validations: Vec::new() }
    }

    pub(super) fn validation_for(&self, alg: Algorithm) -> Option<&Validation> {
        self.validations.iter().find(|(a, _)| *a == alg).map(|(_, v)| v)
    }

    /// Accept `algs` (already checked to be of this key's kind).
    fn set_algorithms(&mut self, algs: &[Algorithm]) {
        self.validations = algs.iter().map(|&alg| (alg, signature_only_validation(alg))).collect();
    }
}

/// A validation that checks the algorithm and the signature and nothing else: crier checks the
/// claims itself, for precise messages (see `jwt::check_claims`).
fn signature_only_validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.required_spec_claims.clear();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.validate_aud = false;
    v.leeway = 0;
    v
}

/// Lenient base64url for JWK members: some producers pad.
const B64URL_ANY_PAD: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Does `key` load into the crypto provider as a verifier for `alg`? (EC and Ed keys are parsed
/// eagerly by the provider, so this catches points that are not on the curve.)
fn provider_accepts(key: &DecodingKey, alg: Algorithm) -> bool {
    jsonwebtoken::crypto::verify("AA", b"crier key probe", key, alg).is_ok()
}

/// Apply the configured algorithm list to one key (secret or PEM file).
pub(super) fn restrict_single(key: &mut LoadedKey, configured: &[Algorithm], what: &str) -> Result<(), String> {
    if configured.is_empty() {
        key.set_algorithms(key.kind.default_algorithms());
        return Ok(());
    }
    for alg in configured {
        if !key.kind.algorithms().contains(alg) {
            return Err(format!(
                "JWT algorithm {alg:?} cannot be used with {what}: it is {} which only accepts {}",
                key.kind.describe(),
                alg_list(key.kind.algorithms())
            ));
        }
    }
    key.set_algorithms(configured);
    Ok(())
}

/// Apply the configured algorithm list to the keys of a JWKS: every configured algorithm must fit
/// at least one key, and each key accepts the configured algorithms of its own kind.
pub(super) fn restrict_jwks(
    keys: &mut [(LoadedKey, &'static [Algorithm])],
    configured: &[Algorithm],
    path: &Path,
) -> Result<(), String> {
    for alg in configured {
        if !keys.iter().any(|(_, natural)| natural.contains(alg)) {
            return Err(format!("JWT algorithm {alg:?} does not fit any key in the JWKS file {}", path.display()));
        }
    }
    for (key, natural) in keys.iter_mut() {
        if configured.is_empty() {
            key.set_algorithms(natural);
        } else {
            let algs: Vec<Algorithm> = natural.iter().copied().filter(|a| configured.contains(a)).collect();
            key.set_algorithms(&algs);
        }
    }
    Ok(())
}

pub(super) fn alg_list(algs: &[Algorithm]) -> String {
    algs.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ")
}

/// An HMAC secret (its UTF-8 bytes are the key).
pub(super) fn load_secret(secret: &str) -> Result<LoadedKey, String> {
    if secret.is_empty() {
        return Err("the JWT secret (jwt_secret) is empty".into());
    }
    Ok(LoadedKey::new(None, KeyKind::Hmac, DecodingKey::from_secret(secret.as_bytes())))
}

/// A PEM public key: RSA (`PUBLIC KEY` or `RSA PUBLIC KEY`), EC P-256/P-384 or Ed25519.
pub(super) fn load_pem_file(path: &Path) -> Result<LoadedKey, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the public key file {}: {e}", path.display()))?;
    load_pem(&bytes).map_err(|why| format!("public key file {}: {why}", path.display()))
}

fn load_pem(bytes: &[u8]) -> Result<LoadedKey, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not a PEM file (it is not text)".to_string())?;
    let Some(label) = pem_label(text) else {
        return Err("no PEM block found (expected -----BEGIN PUBLIC KEY-----)".into());
    };
    if label.contains("PRIVATE KEY") {
        return Err("it holds a private key; give crier the public key only \
                    (`openssl pkey -in private.pem -pubout`)"
            .into());
    }
    if label.contains("CERTIFICATE") {
        return Err("it holds a certificate; extract its public key \
                    (`openssl x509 -in cert.pem -pubkey -noout`)"
            .into());
    }
    if label != "PUBLIC KEY" && label != "RSA PUBLIC KEY" {
        return Err(format!("unsupported PEM block `{label}` (expected PUBLIC KEY)"));
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(bytes) {
        check_rsa_der(&key)?;
        return Ok(LoadedKey::new(None, KeyKind::Rsa, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(bytes) {
        let kind = if provider_accepts(&key, Algorithm::ES256) {
            KeyKind::EcP256
        } else if provider_accepts(&key, Algorithm::ES384) {
            KeyKind::EcP384
        } else {
            return Err("unsupported or invalid EC public key (P-256 and P-384 are supported)".into());
        };
        return Ok(LoadedKey::new(None, kind, key));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(bytes) {
        check_ed(&key)?;
        return Ok(LoadedKey::new(None, KeyKind::Ed25519, key));
    }
    Err("cannot parse the public key (RSA, EC P-256/P-384 and Ed25519 are supported)".into())
}

/// The label of the first `-----BEGIN <label>-----` line.
fn pem_label(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
}

fn check_rsa_der(key: &DecodingKey) -> Result<(), String> {
    let jwk = Jwk::from_decoding_key(key, None).map_err(|e| format!("invalid RSA public key: {e}"))?;
    let AlgorithmParameters::RSA(params) = &jwk.algorithm else {
        return Err("invalid RSA public key".into());
    };
    let n = URL_SAFE_NO_PAD.decode(&params.n).map_err(|_| "invalid RSA public key".to_string())?;
    let e = URL_SAFE_NO_PAD.decode(&params.e).map_err(|_| "invalid RSA public key".to_string())?;
    check_rsa_components(&n, &e)
}

/// Sanity checks on an RSA public key: 2048 to 4096 bits, odd modulus, a sane public exponent.
fn check_rsa_components(n: &[u8], e: &[u8]) -> Result<(), String> {
    let n = strip_leading_zeros(n);
    let bits = match n.first() {
        Some(&first) => (n.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    };
    if bits < 2048 {
        return Err(format!("RSA key is {bits} bits; at least 2048 are required"));
    }
    if bits > 4096 {
        return Err(format!("RSA key is {bits} bits; at most 4096 are supported"));
    }
    if n.last().is_some_and(|b| b % 2 == 0) {
        return Err("invalid RSA modulus".into());
    }
    let e = strip_leading_zeros(e);
    if e.is_empty() || e.len() > 8 {
        return Err("unsupported RSA public exponent".into());
    }
    let exponent = e.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b));
    if exponent < 3 || exponent % 2 == 0 || exponent > (1u64 << 33) - 1 {
        return Err(format!("unsupported RSA public exponent {exponent}"));
    }
    Ok(())
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// Ed25519 keys must be exactly 32 bytes (the provider would panic on fewer) and a valid point.
fn check_ed(key: &DecodingKey) -> Result<(), String> {
    let len = key.try_get_as_bytes().map(<[u8]>::len).unwrap_or(0);
    if len != 32 || !provider_accepts(key, Algorithm::EdDSA) {
        return Err("invalid Ed25519 public key".into());
    }
    Ok(())
}

/// JWK members that only private or symmetric keys have.
const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth"];

/// The usable signature keys of a JWKS file, each with every algorithm its kind can verify
/// (or the single `alg` the JWK names). Encryption keys (`"use": "enc"`, an encryption `alg`)
/// and key types crier cannot verify with are skipped; a file with no usable key is an error.
pub(super) fn load_jwks_file(path: &Path) -> Result<Vec<(LoadedKey, &'static [Algorithm])>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read the JWKS file {}: {e}", path.display()))?;
    load_jwks(&bytes).map_err(|why| format!("JWKS file {}: {why}", path.display()))
}

fn load_jwks(bytes: &[u8]) -> Result<Vec<(LoadedKey, &'static [Algorithm])>, String> {
    let doc: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| format!("not valid JSON: {e}"))?;
    let Some(entries) = doc.get("keys").and_then(serde_json::Value::as_array) else {
        return Err("expected a JSON object with a `keys` array".into());
    };
    let mut loaded: Vec<(LoadedKey, &'static [Algorithm])> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(obj) = entry.as_object() else {
            return Err(format!("key #{i} is not a JSON object"));
        };
        let name = match obj.get("kid").and_then(serde_json::Value::as_str) {
            Some(kid) => format!("key #{i} (kid `{kid}`)"),
            None => format!("key #{i}"),
        };
        if obj.get("kty").and_then(serde_json::Value::as_str) == Some("oct") || obj.contains_key("k") {
            return Err(format!(
                "{name} is a symmetric (`oct`) key; a JWKS file only holds public keys \
                 (use jwt_secret for an HMAC secret)"
            ));
        }
        if PRIVATE_MEMBERS.iter().any(|m| obj.contains_key(*m)) {
            return Err(format!("{name} contains private key material; the JWKS file must hold public keys only"));
        }
        let jwk: Jwk = serde_json::from_value(entry.clone()).map_err(|e| format!("{name}: invalid JWK: {e}"))?;
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            skipped.push(format!("{name}: an encryption key"));
            continue;
        }
        let named_alg = match jwk.common.key_algorithm {
            None => None,
            Some(ka) => match Algorithm::try_from(ka) {
                Ok(alg) => Some(alg),
                Err(_) => {
                    skipped.push(format!("{name}: unsupported alg {ka}"));
                    continue;
                }
            },
        };
        let Some((key, kind)) = jwk_key(&jwk, &name, &mut skipped)? else {
            continue;
        };
        let natural: &'static [Algorithm] = match named_alg {
            None => kind.algorithms(),
            Some(alg) => match kind.algorithms().iter().position(|a| *a == alg) {
                Some(pos) => &kind.algorithms()[pos..=pos],
                None => {
                    return Err(format!(
                        "{name}: alg {alg:?} does not fit {} (which accepts {})",
                        kind.describe(),
                        alg_list(kind.algorithms())
                    ));
                }
            },
        };
        let kid = jwk.common.key_id.clone();
        if let Some(kid) = &kid
            && loaded.iter().any(|(k, _)| k.kid.as_deref() == Some(kid.as_str()))
        {
            return Err(format!("{name}: duplicate kid `{kid}`"));
        }
        loaded.push((LoadedKey::new(kid, kind, key), natural));
    }
    if loaded.is_empty() {
        let why = if skipped.is_empty() {
            "it has no keys".to_string()
        } else {
            format!("no usable signature key ({})", skipped.join("; "))
        };
        return Err(why);
    }
    Ok(loaded)
}

/// Build the decoding key of one JWK. `Ok(None)` = skipped (reason pushed to `skipped`).
fn jwk_key(jwk: &Jwk, name: &str, skipped: &mut Vec<String>) -> Result<Option<(DecodingKey, KeyKind)>, String> {
    let decode = |member: &str, value: &str| {
        B64URL_ANY_PAD.decode(value).map_err(|_| format!("{name}: `{member}` is not base64url"))
    };
    match &jwk.algorithm {
        AlgorithmParameters::RSA(p) => {
            let n = decode("n", &p.n)?;
            let e = decode("e", &p.e)?;
            check_rsa_components(&n, &e).map_err(|why| format!("{name}: {why}"))?;
            Ok(Some((DecodingKey::from_rsa_raw_components(&n, &e), KeyKind::Rsa)))
        }
        AlgorithmParameters::EllipticCurve(p) => {
            let (kind, size, alg) = match p.curve {
                EllipticCurve::P256 => (KeyKind::EcP256, 32, Algorithm::ES256),
                EllipticCurve::P384 => (KeyKind::EcP384, 48, Algorithm::ES384),
                _ => {
                    skipped.push(format!("{name}: unsupported curve {:?}", p.curve));
                    return Ok(None);
                }
            };
            let x = decode("x", &p.x)?;
            let y = decode("y", &p.y)?;
            if x.len() != size || y.len() != size {
                return Err(format!("{name}: invalid EC point (wrong coordinate size)"));
            }
            let key = DecodingKey::from_ec_components(&URL_SAFE_NO_PAD.encode(&x), &URL_SAFE_NO_PAD.encode(&y))
                .map_err(|e| format!("{name}: invalid EC key: {e}"))?;
            if !provider_accepts(&key, alg) {
                return Err(format!("{name}: invalid EC key (the point is not on the curve)"));
            }
            Ok(Some((key, kind)))
        }
        AlgorithmParameters::OctetKeyPair(p) => {
            if p.curve != EllipticCurve::Ed25519 {
                skipped.push(format!("{name}: unsupported curve {:?}", p.curve));
                return Ok(None);
            }
            let x = decode("x", &p.x)?;
            let key = DecodingKey::from_ed_components(&URL_SAFE_NO_PAD.encode(&x))
                .map_err(|e| format!("{name}: invalid Ed25519 key: {e}"))?;
            check_ed(&key).map_err(|why| format!("{name}: {why}"))?;
            Ok(Some((key, KeyKind::Ed25519)))
        }
        AlgorithmParameters::OctetKey(_) => {
            Err(format!("{name} is a symmetric (`oct`) key; a JWKS file only holds public keys"))
        }
        _ => {
            skipped.push(format!("{name}: unsupported key type"));
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/keys").join(name)
    }

    #[test]
    fn pem_kinds() -> TestResult {
        assert_eq!(load_pem_file(&fixture("rsa_public.pem"))?.kind, KeyKind::Rsa);
        assert_eq!(load_pem_file(&fixture("ec_public.pem"))?.kind, KeyKind::EcP256);
        assert_eq!(load_pem_file(&fixture("ed25519_public.pem"))?.kind, KeyKind::Ed25519);
        Ok(())
    }

    #[test]
    fn pem_refuses_private_keys_and_junk() {
        for name in ["rsa_private.pem", "ec_private.pem", "ed25519_private.pem"] {
            let err = load_pem_file(&fixture(name)).err().unwrap_or_default();
            assert!(err.contains("private key") && err.contains(name), "{err}");
        }
        let err = load_pem(b"hello").err().unwrap_or_default();
        assert!(err.contains("no PEM block"), "{err}");
        let err = load_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").err().unwrap_or_default();
        assert!(err.contains("certificate"), "{err}");
        let err = load_pem(b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n").err().unwrap_or_default();
        assert!(err.contains("cannot parse"), "{err}");
        let err = load_pem_file(Path::new("/nonexistent/crier.pem")).err().unwrap_or_default();
        assert!(err.contains("/nonexistent/crier.pem") && err.contains("cannot read"), "{err}");
    }

    #[test]
    fn jwks_fixture() -> TestResult {
        let keys = load_jwks_file(&fixture("jwks.json"))?;
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0].0.kid.as_deref(), Some("rsa-1"));
        assert_eq!(keys[0].0.kind, KeyKind::Rsa);
        assert_eq!(keys[1].0.kid.as_deref(), Some("ec-1"));
        assert_eq!(keys[1].0.kind, KeyKind::EcP256);
        Ok(())
    }

    #[test]
    fn jwks_refusals() {
        let cases: &[(&str, &str)] = &[
            ("not json", "not valid JSON"),
            ("{}", "`keys` array"),
            (r#"{"keys":[]}"#, "no keys"),
            (r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, "symmetric"),
            (r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AA","y":"AA","d":"AA"}]}"#, "private"),
            (r#"{"keys":[{"kty":"EC","crv":"P-256","x":"AAAA","y":"AAAA"}]}"#, "coordinate size"),
            (r#"{"keys":[{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#, "at least 2048"),
            (r#"{"keys":[{"kty":"RSA","use":"enc","n":"AQAB","e":"AQAB"}]}"#, "encryption key"),
            (r#"{"keys":[{"kty":"XYZ","kid":"a"}]}"#, "unsupported key type"),
        ];
        for (json, want) in cases {
            let err = load_jwks(json.as_bytes()).err().unwrap_or_default();
            assert!(err.contains(want), "{json}: {err}");
        }
    }

    #[test]
    fn rsa_component_checks() {
        let mut n = vec![0xff; 256];
        assert!(check_rsa_components(&n, &[1, 0, 1]).is_ok());
        assert!(check_rsa_components(&n, &[3]).is_ok());
        assert!(check_rsa_components(&n, &[1]).is_err());
        assert!(check_rsa_components(&n, &[4]).is_err());
        assert!(check_rsa_components(&n[1..], &[1, 0, 1]).is_err()); // 2040 bits
        n[255] = 0xfe;
        assert!(check_rsa_components(&n, &[1, 0, 1]).is_err()); // even modulus
        assert!(check_rsa_components(&[0xff; 513], &[1, 0, 1]).is_err()); // > 4096 bits
    }

    #[test]
    fn single_key_algorithm_restriction() -> TestResult {
        let mut rsa = load_pem_file(&fixture("rsa_public.pem"))?;
        let err = restrict_single(&mut rsa, &[Algorithm::HS256], "x").err().unwrap_or_default();
        assert!(err.contains("HS256") && err.contains("RSA"), "{err}");
        restrict_single(&mut rsa, &[], "x")?;
        assert_eq!(rsa.validations.len(), 6);
        let mut ec = load_pem_file(&fixture("ec_public.pem"))?;
        assert!(restrict_single(&mut ec, &[Algorithm::ES384], "x").is_err());
        let mut secret = load_secret("s")?;
        restrict_single(&mut secret, &[], "x")?;
        assert!(secret.validation_for(Algorithm::HS256).is_some());
        assert!(secret.validation_for(Algorithm::HS512).is_none());
        assert!(load_secret("").is_err());
        Ok(())
    }
}
