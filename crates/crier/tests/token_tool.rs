//! `crier token`: the token tool mints what the node's own settings accept (HS secret from a
//! flag, the environment or the TOML file; asymmetric keys from a private key file), with the
//! claims asked for, and refuses clearly (exit 64) when it cannot.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use serde_json::{Value, json};
use support::{API_KEY, SECRET, Server};

/// Runs `crier token <args>` with `env` (and no other CRIER_* variable); (exit code, stdout, stderr).
fn token(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
    cmd.arg("token").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("CRIER_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("crier runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn claims(token: &str) -> Value {
    use base64::Engine;
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url"))
        .expect("JSON claims")
}

const KEYS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys");

#[tokio::test]
async fn a_minted_token_carries_its_claims_and_the_node_accepts_exactly_them() {
    let (code, tok, err) = token(
        &[
            "--sub",
            "alice",
            "--channels",
            "chat:*,user:alice",
            "--publish",
            "chat:*",
            "--ttl",
            "2h",
            "--jwt-secret",
            SECRET,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let c = claims(&tok);
    assert_eq!(c["sub"], "alice");
    assert_eq!(c["channels"], json!(["chat:*", "user:alice"]));
    assert_eq!(c["publish"], json!(["chat:*"]));
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 7200);
    assert!(c.get("subs").is_none());

    let server = Server::start(&[]).await;
    let mut alice = server.client(&tok).await; // asserts the welcome: the node accepted the token
    assert_eq!(alice.subscribe("chat:lobby", 1).await["type"], "ack");
    let refused = alice.request(json!({"type":"subscribe","channel":"news:today"}), 2).await;
    assert_eq!((refused["type"].as_str(), refused["code"].as_str()), (Some("error"), Some("forbidden")), "{refused}");
    let published = alice.request(json!({"type":"publish","channel":"chat:lobby","data":1}), 3).await;
    assert_eq!(published["type"], "ack", "{published}");
    let _ = API_KEY;
}

#[tokio::test]
async fn the_secret_comes_from_the_environment_or_the_toml_file_like_the_node_s() {
    let (code, tok, err) = token(&["--sub", "bob"], &[("CRIER_JWT_SECRET", SECRET)]);
    assert_eq!(code, 0, "{err}");
    let file = std::env::temp_dir().join(format!("crier-token-tool-{}.toml", std::process::id()));
    std::fs::write(&file, format!("jwt_secret = \"{SECRET}\"\njwt_issuer = \"https://auth.example\"\n")).unwrap();
    let (code, from_file, err) =
        token(&["--sub", "bob", "--subs", "user:bob", "--config", file.to_str().unwrap()], &[]);
    let _ = std::fs::remove_file(&file);
    assert_eq!(code, 0, "{err}");
    let c = claims(&from_file);
    assert_eq!(c["iss"], "https://auth.example", "the node's jwt_issuer is put in the token");
    assert_eq!(c["subs"], json!(["user:bob"]));
    let server = Server::start(&[]).await;
    let mut bob = server.client(&tok).await;
    assert_eq!(bob.subscribe("user:bob", 1).await["type"], "ack", "the personal channel of the token's user");
}

#[tokio::test]
async fn asymmetric_keys_sign_with_the_private_key_file() {
    for (private, public, alg) in
        [("rsa_private.pem", "rsa_public.pem", "RS256"), ("ec_private.pem", "ec_public.pem", "ES256")]
    {
        let (private, public) = (format!("{KEYS}/{private}"), format!("{KEYS}/{public}"));
        let (code, tok, err) = token(
            &[
                "--sub",
                "carol",
                "--channels",
                "*",
                "--jwt-private-key-file",
                &private,
                "--jwt-public-key-file",
                &public,
            ],
            &[],
        );
        assert_eq!(code, 0, "{alg}: {err}");
        use base64::Engine;
        let header: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(tok.split('.').next().unwrap()).unwrap(),
        )
        .unwrap();
        assert_eq!(header["alg"], alg);
        let server = Server::start_raw(
            &["--listen", "127.0.0.1:0", "--jwt-public-key-file", &public, "--api-keys", API_KEY],
            &[],
        )
        .await
        .expect("server starts");
        let mut carol = server.client(&tok).await;
        assert_eq!(carol.subscribe("user:carol", 1).await["type"], "ack", "{alg}");
    }
}

#[test]
fn what_it_cannot_do_it_says_and_exits_64() {
    let public = format!("{KEYS}/rsa_public.pem");
    let cases: &[(&[&str], &str)] = &[
        (&["--sub", "x"], "no key to sign with"),
        (&["--sub", "x", "--jwt-public-key-file", &public], "--jwt-private-key-file"),
        (&["--channels", "*", "--jwt-secret", SECRET], "--sub"),
        (&["--sub", "x", "--ttl", "soon", "--jwt-secret", SECRET], "--ttl soon"),
        (&["--sub", "x", "--jwt-private-key-file", &public], "not a PEM private key"),
        (&["--sub", "x", "--jwt-secret", SECRET, "--jwt-algorithms", "RS256"], "invalid configuration"),
        (&["--sub"], "--sub needs a value"),
    ];
    for (args, says) in cases {
        let (code, out, err) = token(args, &[]);
        assert_eq!(code, 64, "{args:?}: {out} {err}");
        assert!(out.is_empty(), "{args:?}: no token printed: {out}");
        assert!(err.contains(says), "{args:?}: {err:?} should say {says:?}");
        assert!(!err.contains(SECRET), "{args:?}: the secret is never printed");
    }
    let (code, out, _) = token(&["--help"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("--sub USER"), "{out}");
}
