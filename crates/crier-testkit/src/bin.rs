//! The `crier` binary for the tests of other packages (crier-client, crier-bench).
//!
//! `env!("CARGO_BIN_EXE_crier")` exists only in the `crier` package's own tests, and a
//! dev-dependency on `crier` builds its library, not its binary (artifact dependencies are
//! unstable). So [`crier_bin`] looks where cargo puts it — next to the test's own executable, in
//! the same target and profile directory (`target/debug/crier`) — and uses it when it is newer
//! than every source file it is built from (`cargo test --workspace` has just built it).
//! Otherwise (e.g. `cargo test -p crier-client` after editing the server) it runs
//! `cargo build -p crier --bin crier` for the same profile and target directory, once per test
//! binary, and takes the executable's path from cargo's JSON messages. `CRIER_BIN` overrides both.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// The workspace root (two levels above this crate).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Newest modification time of the files the `crier` binary is built from.
fn newest_source() -> SystemTime {
    fn walk(p: &Path, newest: &mut SystemTime) {
        let Ok(meta) = std::fs::metadata(p) else { return };
        if meta.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), newest);
            }
        } else if let Ok(m) = meta.modified() {
            *newest = (*newest).max(m);
        }
    }
    let root = workspace();
    let mut newest = UNIX_EPOCH;
    for krate in ["crier", "crier-core", "crier-protocol", "crier-redis"] {
        for part in ["src", "assets", "Cargo.toml"] {
            walk(&root.join("crates").join(krate).join(part), &mut newest);
        }
    }
    for f in ["Cargo.toml", "Cargo.lock", "docs/openapi.json"] {
        walk(&root.join(f), &mut newest);
    }
    newest
}

/// The `crier` binary of the calling test's profile (see the module docs).
pub fn crier_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("CRIER_BIN") {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().expect("current_exe");
        // target/<profile>/deps/<test>-<hash>
        let Some(profile_dir) = exe.parent().and_then(Path::parent) else {
            panic!("test executable {} not in target/<profile>/deps", exe.display())
        };
        let candidate = profile_dir.join(format!("crier{}", std::env::consts::EXE_SUFFIX));
        let fresh = std::fs::metadata(&candidate).and_then(|m| m.modified()).is_ok_and(|t| t >= newest_source());
        if fresh {
            return candidate;
        }
        build_crier(profile_dir)
    })
    .clone()
}

fn build_crier(profile_dir: &Path) -> PathBuf {
    let cargo = std::env::var_os("CARGO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO")));
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace()).args(["build", "--locked", "-p", "crier", "--bin", "crier", "--message-format=json"]);
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
    eprintln!("building the crier binary: {cmd:?}");
    let out = cmd.stderr(Stdio::inherit()).output().expect("run cargo build");
    assert!(out.status.success(), "cargo build -p crier failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "crier")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo did not report the crier executable"))
}
