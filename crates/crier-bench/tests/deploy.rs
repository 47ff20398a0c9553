//! `crier-bench deploy`, shortened: 1,000 crier-client subscribers through nginx running the
//! shipped `deploy/nginx.conf` over three crier nodes on a redis-server, publishes through nginx
//! throughout, and every node restarted in turn (SIGTERM, drain, a new process on the same port,
//! ready before the next). Asserts what must hold whatever the machine: nothing lost, nothing
//! duplicated, every client back, no publish lost. Timings are the benchmark's (BENCHMARKS.md),
//! not asserted. Skips with a message when nginx or redis-server is not installed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

/// The `crier` binary of this test's profile. A dev-dependency builds crier's library, not its
/// binary (artifact dependencies are unstable), so ask cargo for it — a no-op when it is fresh —
/// as crates/crier-client/tests/support does. `CRIER_BIN` overrides.
fn crier_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("CRIER_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe.parent().and_then(Path::parent).expect("test executable in target/<profile>/deps");
    let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO")));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")).args([
        "build",
        "--locked",
        "-p",
        "crier",
        "--bin",
        "crier",
        "--message-format=json",
    ]);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target_dir) = profile_dir.parent().filter(|d| d.join("CACHEDIR.TAG").exists()) {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("run cargo build");
    assert!(out.status.success(), "cargo build -p crier failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "crier")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo reported the crier executable")
}

fn installed(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[test]
fn rolling_restart_behind_the_shipped_nginx_loses_nothing_and_leaves_no_one_behind() {
    for program in ["nginx", "redis-server", "python3"] {
        if installed(program).is_none() {
            eprintln!(
                "SKIPPED: {program} is not installed (apt-get install -y nginx-light redis-server python3); \
                 this test runs the shipped deploy/nginx.conf in a real nginx"
            );
            return;
        }
    }
    let json = std::env::temp_dir().join(format!("crier-bench-deploy-test-{}.json", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_crier-bench"))
        .args(["deploy", "--clients", "1000", "--rate", "200", "--shared-channels", "10"])
        .args(["--drain", "3s", "--between", "1s", "--before", "2s", "--after", "2s", "--settle", "60s"])
        .arg("--crier")
        .arg(crier_bin())
        .arg("--json")
        .arg(&json)
        .status()
        .expect("run crier-bench");
    assert!(status.success(), "crier-bench deploy failed: {status}");
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON report")).unwrap();
    let _ = std::fs::remove_file(&json);
    let r = &report["results"];
    let n = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("results.{k} in {r}"));
    assert!(n("publishes_acked") > 100, "{r}");
    assert!(n("deliveries") > n("publishes_acked"), "{r}");
    assert_eq!(n("publishes_lost"), 0, "publishes never acknowledged: {r}");
    assert_eq!(n("lost"), 0, "messages lost: {r}");
    assert_eq!(n("duplicates"), 0, "duplicates delivered to the application: {r}");
    assert_eq!(n("gaps_reported"), 0, "gaps reported by the client: {r}");
    assert_eq!(n("clients_not_back"), 0, "clients left behind: {r}");
    // Every node was restarted, so every client was moved at least once.
    assert!(n("reconnections") >= 1000, "{r}");
    assert_eq!(n("nginx_no_live_upstreams"), 0, "nginx ran out of upstreams: {r}");
}
