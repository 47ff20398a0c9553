//! The token-verification settings: the secret, the one key source, the algorithms.

#[allow(clippy::wildcard_imports)]
use super::*;

#[test]
fn short_secret_is_refused_unless_dev_and_never_shown() -> TestResult {
    let p = problems(&["--jwt-secret", "hunter2"], &[]);
    assert_eq!(
        p,
        vec![
            "jwt_secret: the value (from --jwt-secret): is 7 bytes; HS256 secrets shorter than 32 \
             bytes are guessable, so use at least 32 random bytes (e.g. `openssl rand -base64 48`), \
             or --dev for local testing"
        ]
    );
    let c = load_with(&["--jwt-secret", "hunter2", "--dev"], &[])?;
    assert_eq!(c.jwt.key, Some(KeySource::Secret("hunter2".to_owned())));
    // A secret may start with a hyphen.
    let hyphen = format!("-{SECRET}");
    let c = load_with(&["--jwt-secret", &hyphen], &[])?;
    assert_eq!(c.jwt.key, Some(KeySource::Secret(hyphen.to_owned())));
    // Nor is an API key or a Redis password ever shown.
    let p = problems(
        &[],
        &[
            ("CRIER_JWT_SECRET", "short-secret"),
            ("CRIER_JWT_ALGORITHMS", "RS256"),
            ("CRIER_REDIS_URL", "http://user:hunter3@redis"),
        ],
    );
    let all = p.join("\n");
    assert!(!all.contains("short-secret") && !all.contains("hunter3"), "{all}");
    assert!(all.contains("`http://***@redis`"), "{all}");
    let c = load_with(&["--api-keys", "k-secret-1", "--redis-url", "redis://u:pw@r/0"], &[])?;
    let debug = format!("{c:?}");
    assert!(!debug.contains("k-secret-1") && !debug.contains("pw@"), "{debug}");
    let c = load_with(&[], &[("CRIER_JWT_SECRET", SECRET)])?;
    assert!(!format!("{c:?}").contains(SECRET));
    Ok(())
}

#[test]
fn at_most_one_key_source() {
    let p = problems(
        &["--jwt-jwks-file", "/k/jwks.json"],
        &[("CRIER_JWT_SECRET", SECRET), ("CRIER_JWT_PUBLIC_KEY_FILE", "/k/pub.pem")],
    );
    assert_eq!(
        p,
        vec![
            "jwt_secret (from CRIER_JWT_SECRET), jwt_public_key_file (from \
             CRIER_JWT_PUBLIC_KEY_FILE), jwt_jwks_file (from --jwt-jwks-file): set only one of \
             jwt_secret, jwt_public_key_file and jwt_jwks_file"
        ]
    );
}

#[test]
fn jwt_algorithms() -> TestResult {
    let c = load_with(&["--jwt-algorithms", "hs256, EDDSA,HS256"], &[])?;
    assert_eq!(c.jwt.algorithms, vec![Algorithm::HS256, Algorithm::EdDSA]);
    assert!(load_with(&[], &[])?.jwt.algorithms.is_empty());

    let p = problems(&["--jwt-algorithms", "RS256,none"], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("jwt_algorithms: `none` (from --jwt-algorithms): `none` is never accepted"), "{p:#?}");

    let p = problems(&["--jwt-algorithms", "HS256,RS256"], &[("CRIER_JWT_SECRET", SECRET)]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("jwt_algorithms: `RS256`") && p[0].contains("does not fit jwt_secret"), "{p:#?}");

    let p = problems(&["--jwt-algorithms", "HS256,RS256", "--jwt-public-key-file", "k.pem"], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].starts_with("jwt_algorithms: `HS256`") && p[0].contains("forge"), "{p:#?}");

    let c = load_with(&["--jwt-algorithms", "RS256", "--jwt-jwks-file", "jwks.json"], &[])?;
    assert_eq!(c.jwt.algorithms, vec![Algorithm::RS256]);
    Ok(())
}
