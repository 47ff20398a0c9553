//! Unit tests of the verifier: every algorithm and key kind, every claim rule, every refusal.

use super::*;
use crate::auth::{generate_secret, mint_hs256};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// Settings with this key and nothing else.
fn key(source: KeySource) -> JwtSettings {
    JwtSettings { key: Some(source), ..Default::default() }
}

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
    Verifier::new(&key(KeySource::Secret(SECRET.into())))
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
    let v = Verifier::new(&JwtSettings {
        key: Some(KeySource::Secret(SECRET.into())),
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
    let forged =
        format!("{}.{}.{}", parts[0], b64(&json!({"sub": "admin", "exp": now() + 600, "channels": ["*"]})), parts[2]);
    assert_eq!(err_of(v.verify(&forged)), "signature invalid");
    Ok(())
}

#[test]
fn rs256_and_ps256_with_pem() -> TestResult {
    let v = Verifier::new(&key(KeySource::PublicKeyFile(fixture("rsa_public.pem"))))?;
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
    let v = Verifier::new(&JwtSettings {
        key: Some(KeySource::PublicKeyFile(fixture("rsa_public.pem"))),
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
    let v = Verifier::new(&key(KeySource::PublicKeyFile(path.clone())));
    std::fs::remove_file(&path)?;
    let v = v?;
    let key = EncodingKey::from_rsa_pem(&read("rsa_private.pem")?)?;
    assert_eq!(v.verify(&sign(Algorithm::RS512, None, &good_claims(), &key))?.sub, "u1");
    Ok(())
}

#[test]
fn es256_with_pem() -> TestResult {
    let v = Verifier::new(&key(KeySource::PublicKeyFile(fixture("ec_public.pem"))))?;
    assert_eq!(v.algorithms(), &[Algorithm::ES256]);
    let key = EncodingKey::from_ec_pem(&read("ec_private.pem")?)?;
    assert_eq!(v.verify(&sign(Algorithm::ES256, None, &good_claims(), &key))?.sub, "u1");
    Ok(())
}

#[test]
fn eddsa_with_pem() -> TestResult {
    let v = Verifier::new(&key(KeySource::PublicKeyFile(fixture("ed25519_public.pem"))))?;
    let key = EncodingKey::from_ed_pem(&read("ed25519_private.pem")?)?;
    assert_eq!(v.verify(&sign(Algorithm::EdDSA, None, &good_claims(), &key))?.sub, "u1");
    // Signed by another key family entirely: refused by algorithm.
    assert_eq!(err_of(v.verify(&hs(&good_claims()))), "algorithm not allowed: HS256");
    Ok(())
}

#[test]
fn jwks_picks_key_by_kid() -> TestResult {
    let v = Verifier::new(&key(KeySource::JwksFile(fixture("jwks.json"))))?;
    let rsa = EncodingKey::from_rsa_pem(&read("rsa_private.pem")?)?;
    let ec = EncodingKey::from_ec_pem(&read("ec_private.pem")?)?;
    let claims = good_claims();
    assert_eq!(v.verify(&sign(Algorithm::RS256, Some("rsa-1"), &claims, &rsa))?.sub, "u1");
    assert_eq!(v.verify(&sign(Algorithm::ES256, Some("ec-1"), &claims, &ec))?.sub, "u1");
    // An RSA token pointing at the EC key: the EC key does not accept RS256.
    assert_eq!(err_of(v.verify(&sign(Algorithm::RS256, Some("ec-1"), &claims, &rsa))), "algorithm not allowed: RS256");
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
    let v = Verifier::new(&key(KeySource::JwksFile(path.clone())));
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
    let v = Verifier::new(&key(KeySource::JwksFile(path.clone())));
    let key = EncodingKey::from_rsa_pem(&read("rsa_private.pem")?)?;
    let v = v?;
    assert_eq!(
        err_of(v.verify(&sign(Algorithm::RS256, Some("rsa-1"), &good_claims(), &key))),
        "algorithm not allowed: RS256"
    );
    assert_eq!(v.verify(&sign(Algorithm::PS256, Some("rsa-1"), &good_claims(), &key))?.sub, "u1");
    // Configured algorithms must fit some key of the set.
    let err = Verifier::new(&JwtSettings {
        key: Some(KeySource::JwksFile(path.clone())),
        algorithms: vec![Algorithm::EdDSA],
        ..Default::default()
    })
    .err()
    .unwrap_or_default();
    assert!(err.contains("EdDSA") && err.contains("JWKS"), "{err}");
    let only_es = Verifier::new(&JwtSettings {
        key: Some(KeySource::JwksFile(path.clone())),
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
    let v = Verifier::new(&key(KeySource::PublicKeyFile(fixture("rsa_public.pem"))))?;
    // Signed HS256 with the RSA public key's PEM bytes as the HMAC secret.
    let forged = sign(Algorithm::HS256, None, &good_claims(), &EncodingKey::from_secret(&pem));
    assert_eq!(err_of(v.verify(&forged)), "algorithm not allowed: HS256");
    // And configuring HS256 next to an RSA key is refused at startup.
    let err = Verifier::new(&JwtSettings {
        key: Some(KeySource::PublicKeyFile(fixture("rsa_public.pem"))),
        algorithms: vec![Algorithm::RS256, Algorithm::HS256],
        ..Default::default()
    })
    .err()
    .unwrap_or_default();
    assert!(err.contains("HS256") && err.contains("RSA") && err.contains("rsa_public.pem"));
    // Same for the JWKS: the forged token names the RSA key.
    let v = Verifier::new(&key(KeySource::JwksFile(fixture("jwks.json"))))?;
    let forged = sign(Algorithm::HS256, Some("rsa-1"), &good_claims(), &EncodingKey::from_secret(&pem));
    assert_eq!(err_of(v.verify(&forged)), "algorithm not allowed: HS256");
    Ok(())
}

#[test]
fn config_errors() -> TestResult {
    let err = Verifier::new(&JwtSettings::default()).err().unwrap_or_default();
    assert!(err.contains("no JWT key configured"), "{err}");
    let err = Verifier::new(&JwtSettings {
        key: Some(KeySource::Secret("s".into())),
        algorithms: vec![Algorithm::RS256],
        ..Default::default()
    })
    .err()
    .unwrap_or_default();
    assert!(err.contains("RS256") && err.contains("jwt_secret"), "{err}");
    let err = Verifier::new(&JwtSettings {
        key: Some(KeySource::PublicKeyFile(fixture("ec_public.pem"))),
        algorithms: vec![Algorithm::ES384],
        ..Default::default()
    })
    .err()
    .unwrap_or_default();
    assert!(err.contains("ES384") && err.contains("P-256"), "{err}");
    let err = Verifier::new(&key(KeySource::PublicKeyFile(fixture("rsa_private.pem")))).err().unwrap_or_default();
    assert!(err.contains("rsa_private.pem") && err.contains("private key"), "{err}");
    let err =
        Verifier::new(&key(KeySource::JwksFile(PathBuf::from("/nonexistent/jwks.json")))).err().unwrap_or_default();
    assert!(err.contains("/nonexistent/jwks.json"), "{err}");
    // The secret never shows in Debug output.
    let src = key(KeySource::Secret("hunter2".into()));
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
    let crit = format!("{}.{}.{}", b64(&json!({"alg": "HS256", "crit": ["b64"], "b64": false})), parts[1], parts[2]);
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
    assert!(err_of(v.verify(&with(json!({"exp": t - 60})))).starts_with("token expired 6"));
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
    assert!(err_of(at(&tok, t + LEEWAY_SECS)).starts_with("token expired "));
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
    assert_eq!(minimal, Claims { sub: "u2".into(), exp, channels: vec![], publish: vec![], iat: None, subs: vec![] });
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
    let v = Verifier::new(&JwtSettings {
        key: Some(KeySource::Secret(SECRET.into())),
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
    let long_kid_jwks = Verifier::new(&key(KeySource::JwksFile(fixture("jwks.json"))))?;
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
    let v = Verifier::new(&key(KeySource::Secret(secret.clone())))?;
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
fn verifier_is_shareable() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Verifier>();
}
