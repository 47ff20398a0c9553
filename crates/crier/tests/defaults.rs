//! Defaults that must not get in a production deployment's way, against the real binary:
//! - a backend publishing thousands of messages per second with one API key gets no 429 out of
//!   the box (`api_rate` defaults to 0, unlimited; an explicit rate still limits, see
//!   `limits.rs`);
//! - `CRIER_*` environment variables that name no setting (Kubernetes service links such as
//!   `CRIER_PORT`, wrapper scripts' own names) are a warning with a "did you mean" hint, not a
//!   start-up failure; unknown flags and unknown TOML keys stay errors (exit 64).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use crier_testkit::until;
use std::process::Command;

use futures_util::StreamExt;
use serde_json::json;
use support::{API_KEY, SECRET, Server};

/// More requests than the old default (1,000/s with a burst of 2,000) lets through in the
/// seconds they take here.
const PUBLISHES: usize = 6_000;

#[tokio::test]
async fn a_busy_backend_is_not_rate_limited_by_default() {
    let server = Server::start(&[]).await;
    let statuses: Vec<u16> = futures_util::stream::iter(0..PUBLISHES)
        .map(|i| {
            let req = server
                .http
                .post(server.url("/api/v1/publish"))
                .bearer_auth(API_KEY)
                .json(&json!({"channel": format!("c{}", i % 100), "data": i}));
            async move { req.send().await.map(|r| r.status().as_u16()).unwrap_or(0) }
        })
        .buffer_unordered(64)
        .collect()
        .await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((ok, limited), (PUBLISHES, 0), "statuses other than 200: {:?}", {
        let mut other: Vec<u16> = statuses.iter().copied().filter(|s| *s != 200).collect();
        other.dedup();
        other
    });
    assert_eq!(server.metric("crier_rate_limited_total{kind=\"api\"}").await, 0.0);
}

fn base_args() -> Vec<&'static str> {
    vec!["--listen", "127.0.0.1:0", "--jwt-secret", SECRET, "--api-keys", API_KEY, "--shutdown-drain", "500ms"]
}

#[tokio::test]
async fn unknown_crier_env_vars_are_warnings_not_failures() {
    let env = [
        ("CRIER_PORT", "tcp://10.96.0.12:8080"),
        ("CRIER_SERVICE_HOST", "10.96.0.12"),
        ("CRIER_PORT_8080_TCP_ADDR", "10.96.0.12"),
        ("CRIER_REDIS_URLS", "redis://127.0.0.1:1"),
        ("CRIER_PING_INTERVAL", "7s"),
    ];
    let server = Server::start_raw(&base_args(), &env).await.expect("starts despite unknown CRIER_* names");
    // The node serves.
    let health = server.http.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    // Each unknown name is logged once, as a warning, with the hint where one is close. The
    // log is read from the process's stderr as it comes: wait for the start line, logged after
    // the warnings (and possibly after the node already answered).
    until("the warnings and the start line in the log", async || {
        let logs = server.logs();
        logs.contains("CRIER_SERVICE_HOST") && logs.contains("crier started")
    })
    .await;
    let logs = server.logs();
    for (name, _) in &env[..4] {
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains(&format!("{name}:"))).collect();
        assert_eq!(lines.len(), 1, "{name} once in the logs:\n{logs}");
        assert!(lines[0].contains("WARN"), "{name} as a warning: {}", lines[0]);
        assert!(lines[0].contains("not a crier setting"), "{}", lines[0]);
    }
    assert!(
        logs.contains(
            "CRIER_REDIS_URLS: not a crier setting (from the environment), ignored; did you mean `CRIER_REDIS_URL`?"
        ),
        "{logs}"
    );
    assert!(!logs.contains("CRIER_PING_INTERVAL:"), "a known name is no warning:\n{logs}");
    // The misspelt CRIER_REDIS_URLS was ignored: the node runs on the memory broker.
    let started = logs.lines().find(|l| l.contains("crier started")).unwrap_or_default();
    assert!(started.contains("\"memory\""), "{logs}");
}

/// Runs the binary to completion (it must exit on its own) and returns (exit code, stderr).
fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_crier"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("CRIER_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().expect("runs");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn unknown_flags_and_toml_keys_stay_errors() {
    let mut args = base_args();
    args.push("--ping-intervall=5s");
    let (code, stderr) = run_to_exit(&args);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("ping-intervall"), "{stderr}");

    let dir = std::env::temp_dir().join(format!("crier-defaults-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("crier.toml");
    std::fs::write(&file, "ping_intervall = \"5s\"\n").unwrap();
    let file_arg = file.to_string_lossy().into_owned();
    let mut args = base_args();
    args.extend(["--config", file_arg.as_str()]);
    let (code, stderr) = run_to_exit(&args);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("ping_intervall: unknown key in"), "{stderr}");
    assert!(stderr.contains("did you mean `ping_interval`?"), "{stderr}");
}
