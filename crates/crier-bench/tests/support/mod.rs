//! What the nginx scenarios' tests share: the check that nginx, redis-server and python3 are
//! installed, and a run of `crier-bench` (on crier-testkit's `crier_bin`, the crier binary of the
//! test's profile) read back from its JSON report.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::Command;

use crier_testkit::bin::crier_bin;
use serde_json::Value;

fn installed(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Whether the programs the nginx scenarios start are all installed; prints why the test is
/// skipped when one is not.
pub fn nginx_scenario_can_run() -> bool {
    for program in ["nginx", "redis-server", "python3"] {
        if installed(program).is_none() {
            eprintln!(
                "SKIPPED: {program} is not installed (apt-get install -y nginx-light redis-server python3); \
                 this test runs the shipped deploy/nginx.conf in a real nginx"
            );
            return false;
        }
    }
    true
}

/// Runs `crier-bench <args> --crier <crier_bin()> --json <file>` (`args` split at whitespace),
/// asserts it succeeded, and returns the report's `results`.
pub fn run_bench(args: &str) -> Value {
    let scenario = args.split_whitespace().next().unwrap_or_default();
    let json = std::env::temp_dir().join(format!("crier-bench-{scenario}-test-{}.json", std::process::id()));
    let status = Command::new(env!("CARGO_BIN_EXE_crier-bench"))
        .args(args.split_whitespace())
        .arg("--crier")
        .arg(crier_bin())
        .arg("--json")
        .arg(&json)
        .status()
        .expect("run crier-bench");
    assert!(status.success(), "crier-bench {scenario} failed: {status}");
    let mut report: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("the JSON report")).unwrap();
    let _ = std::fs::remove_file(&json);
    report["results"].take()
}
