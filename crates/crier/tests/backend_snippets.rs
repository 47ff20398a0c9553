//! The backend snippets in examples/backend (Node, Python; Go is shown but not run: no Go
//! toolchain here) mint tokens the node accepts and publish through the REST API. Each runs
//! where its interpreter is installed and is skipped, saying so, where it is not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use serde_json::json;
use support::{API_KEY, SECRET, Server};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/backend");

fn installed(program: &str) -> bool {
    Command::new(program).arg("--version").output().is_ok_and(|o| o.status.success())
}

/// Runs a snippet; (success, stdout, stderr).
fn run(program: &str, file: &str, args: &[&str], server: &Server, api_key: &str) -> (bool, String, String) {
    let out = Command::new(program)
        .arg(format!("{DIR}/{file}"))
        .args(args)
        .env("CRIER_JWT_SECRET", SECRET)
        .env("CRIER_URL", server.url(""))
        .env("CRIER_API_KEY", api_key)
        .output()
        .expect("the interpreter runs");
    let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

async fn snippet_mints_and_publishes(program: &str, file: &str) {
    if !installed(program) {
        eprintln!("SKIPPED: {program} is not installed, {file} not run");
        return;
    }
    let server = Server::start(&[]).await;
    let (ok, token, err) = run(program, file, &["token", "dana"], &server, API_KEY);
    assert!(ok, "{file} token: {err}");
    let mut dana = server.client(&token).await; // asserts the welcome: the node accepts the token
    dana.subscribe("chat:backend", 1).await;
    dana.subscribe("user:dana", 2).await;

    let (ok, out, err) = run(program, file, &["publish", "chat:backend", r#"{"text":"hello"}"#], &server, API_KEY);
    assert!(ok, "{file} publish: {err}");
    let result: serde_json::Value = serde_json::from_str(&out).expect("the publish result is JSON");
    assert_eq!(result["offset"], 1, "{out}");
    let msg = dana.recv_type("message").await;
    assert_eq!((msg["channel"].clone(), msg["data"].clone()), (json!("chat:backend"), json!({"text":"hello"})));

    let (ok, _, err) = run(program, file, &["publish", "chat:backend", "1"], &server, "not-a-key");
    assert!(!ok, "{file}: a refused publish fails");
    assert!(err.contains("401") && err.contains("unauthorized"), "{file} says why: {err}");
}

#[tokio::test]
async fn the_node_snippet_mints_and_publishes() {
    snippet_mints_and_publishes("node", "mint_and_publish.mjs").await;
}

#[tokio::test]
async fn the_python_snippet_mints_and_publishes() {
    snippet_mints_and_publishes("python3", "mint_and_publish.py").await;
}
