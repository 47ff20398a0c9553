//! The load balancer in front of the nodes: nginx from the system (Debian's `nginx` or
//! `nginx-light`) running the project's own `deploy/nginx.conf`, rewritten for loopback by
//! `deploy/local/render.py` exactly as `deploy/local/up` runs it (upstream servers, listen
//! address and file paths change; every other directive is used as shipped). Started as a child
//! in the foreground (`daemon off`), killed by PID when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

/// The repository's `deploy/` directory (the one this bench was built from), unless
/// `CRIER_BENCH_DEPLOY_DIR` names another.
pub fn deploy_dir() -> PathBuf {
    std::env::var_os("CRIER_BENCH_DEPLOY_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy"))
}

/// The nginx binary: `nginx` on PATH, else /usr/sbin/nginx; None when neither exists.
pub fn find_nginx() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

pub struct Nginx {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub dir: PathBuf,
    child: Child,
}

impl Nginx {
    /// Renders `deploy/nginx.conf` for `upstreams` (one per `crierN` server line, in order) on a
    /// free loopback port and starts nginx with it; returns once a proxied `/healthz` answers.
    pub async fn start(nginx: &Path, upstreams: &[SocketAddr]) -> anyhow::Result<Nginx> {
        let deploy = deploy_dir();
        let dir = std::env::temp_dir().join(format!("crier-bench-{}-nginx", std::process::id()));
        std::fs::create_dir_all(dir.join("tmp")).with_context(|| format!("creating {}", dir.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let conf = dir.join("nginx.conf");
        let ups: Vec<String> = upstreams.iter().map(|a| a.to_string()).collect();
        let out = Command::new("python3")
            .arg(deploy.join("local/render.py"))
            .arg("nginx")
            .arg(deploy.join("nginx.conf"))
            .arg(&conf)
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--upstreams")
            .arg(ups.join(","))
            .arg("--prefix")
            .arg(&dir)
            .output()
            .await
            .context("running python3 deploy/local/render.py")?;
        if !out.status.success() {
            bail!("deploy/local/render.py failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let prefix = format!("{}/", dir.display());
        let error_log = dir.join("error.log");
        let test = Command::new(nginx)
            .args(["-t", "-q", "-p", &prefix, "-e"])
            .arg(&error_log)
            .arg("-c")
            .arg(&conf)
            .output()
            .await
            .with_context(|| format!("running {} -t", nginx.display()))?;
        if !test.status.success() {
            bail!("nginx -t rejected {}: {}", conf.display(), String::from_utf8_lossy(&test.stderr));
        }
        let mut child = Command::new(nginx)
            .args(["-p", &prefix, "-e"])
            .arg(&error_log)
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", nginx.display()))?;
        let pid = child.id();
        let http = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if http.get(format!("http://{addr}/healthz")).send().await.is_ok_and(|r| r.status() == 200) {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                bail!("nginx exited ({status}); see {}", error_log.display());
            }
            if tokio::time::Instant::now() > deadline {
                let _ = child.kill().await;
                bail!("nginx on {addr} did not proxy /healthz within 10s; see {}", error_log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!("  started nginx on {addr} (pid {}) with the shipped deploy/nginx.conf", pid.unwrap_or(0));
        Ok(Nginx { addr, pid, dir, child })
    }

    /// Lines of nginx's error log containing `needle` (e.g. "no live upstreams").
    pub fn error_log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(self.dir.join("error.log"))
            .map_or(0, |t| t.lines().filter(|l| l.contains(needle)).count())
    }

    /// SIGTERM (nginx's fast shutdown) then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(grace, self.child.wait()).await.is_err() {
            let _ = self.child.kill().await;
        }
    }
}
