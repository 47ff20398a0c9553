//! Real `nats-server` processes with JetStream, each on free ports with its own temporary store
//! directory, killed when dropped: one server ([`NatsServer::start`]) or a cluster of them with
//! routes on loopback ([`NatsServer::start_cluster`]). Waits poll with deadlines.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::redis::free_port;
use crate::wait::until_blocking;

/// The `nats-server` binary (`PATH`, then /usr/sbin and /usr/bin, where Debian puts it), or
/// `None` when it is not installed (tests then skip, saying so).
pub fn nats_server_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/bin".into(), "/usr/local/bin".into()])
        .map(|d: PathBuf| d.join("nats-server"))
        .find(|p| p.is_file())
}

/// Whether a NATS test can run; prints why not when it cannot.
pub fn nats_available(test: &str) -> bool {
    let ok = nats_server_bin().is_some();
    if !ok {
        eprintln!("SKIP {test}: nats-server not found (apt-get install -y nats-server; scripts/test installs it)");
    }
    ok
}

/// A `nats-server` child process with JetStream.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    monitor_port: u16,
    /// The route port (cluster members only).
    pub cluster_port: Option<u16>,
    dir: PathBuf,
    args: Vec<String>,
}

impl NatsServer {
    /// One server, JetStream on a temporary store directory (kept across [`NatsServer::restart`]).
    pub fn start() -> NatsServer {
        let mut s = NatsServer::prepare("n1");
        s.launch_on_free_ports();
        s
    }

    /// One server like [`NatsServer::start`] with `config` (nats-server configuration syntax)
    /// in a configuration file: TLS ([`NatsServer::tls_config`]), `authorization { token: "…" }`,
    /// `authorization { users: [{nkey: "U…"}] }`, … (the command-line ports and store win).
    pub fn start_with_config(config: &str) -> NatsServer {
        let mut s = NatsServer::prepare("n1");
        let file = s.dir.join("server.conf");
        std::fs::write(&file, config).unwrap_or_else(|e| panic!("write {file:?}: {e}"));
        s.args.extend(["-c".to_owned(), file.display().to_string()]);
        s.launch_on_free_ports();
        s
    }

    /// Replaces the configuration file of a server started with
    /// [`NatsServer::start_with_config`] and makes the server reload it (SIGHUP). The store
    /// directory and the server's name are added (a reload forgets the `-js` and `-n` flags
    /// and refuses to rename the server).
    pub fn reload_config(&self, config: &str) {
        let file = self.dir.join("server.conf");
        let name = self.args.iter().skip_while(|a| *a != "-n").nth(1).cloned().unwrap_or_default();
        let config = format!(
            "{config}\nserver_name: {name:?}\njetstream {{ store_dir: {:?} }}\n",
            self.dir.display().to_string()
        );
        std::fs::write(&file, config).unwrap_or_else(|e| panic!("write {file:?}: {e}"));
        let pid = self.child.as_ref().map(|c| c.id()).unwrap_or_else(|| panic!("nats-server not running"));
        let ok = Command::new("kill").args(["-HUP", &pid.to_string()]).status().is_ok_and(|s| s.success());
        assert!(ok, "SIGHUP to nats-server {pid}");
    }

    /// The configuration block of a server whose clients must use TLS, with the certificate of
    /// `ca` (make it for `IP:127.0.0.1`: the server is reached on loopback).
    pub fn tls_config(ca: &crate::tls::TestCa) -> String {
        format!(
            "tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  timeout: 5\n}}\n",
            ca.server_cert.display().to_string(),
            ca.server_key.display().to_string()
        )
    }

    /// `n` servers in one cluster (routes on loopback), JetStream clustered; returns once every
    /// one is healthy (JetStream meta leader elected).
    pub fn start_cluster(n: usize) -> Vec<NatsServer> {
        let mut servers: Vec<NatsServer> = (0..n).map(|i| NatsServer::prepare(&format!("n{}", i + 1))).collect();
        let cports: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let routes: Vec<String> = cports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect();
        for (i, s) in servers.iter_mut().enumerate() {
            s.cluster_port = Some(cports[i]);
            s.args.extend([
                "--cluster_name".into(),
                "crier".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{}", cports[i]),
                "--routes".into(),
                routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, r)| r.clone())
                    .collect::<Vec<_>>()
                    .join(","),
            ]);
            s.spawn();
        }
        for s in &servers {
            s.wait_healthy();
        }
        for s in &servers {
            let what = format!("nats-server on port {} to know its JetStream meta leader", s.port);
            until_blocking(what, Duration::from_secs(30), || s.get("/jsz").is_some_and(|r| r.contains("\"leader\"")));
        }
        servers
    }

    fn prepare(name: &str) -> NatsServer {
        let port = free_port();
        let monitor_port = free_port();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("crier-nats-test-{}-{port}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("temp dir {dir:?}: {e}"));
        let args = [
            "-a",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-m",
            &monitor_port.to_string(),
            "-n",
            name,
            "-js",
            "-sd",
            &dir.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        NatsServer { child: None, port, monitor_port, cluster_port: None, dir, args }
    }

    fn spawn(&mut self) {
        let bin = nats_server_bin().unwrap_or_else(|| panic!("nats-server not found: apt-get install -y nats-server"));
        let log = std::fs::File::create(self.dir.join("server.log")).ok();
        let child = Command::new(bin)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log.map_or_else(Stdio::null, Stdio::from))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nats-server: {e}"));
        self.child = Some(child);
    }

    fn launch(&mut self) {
        self.spawn();
        self.wait_healthy();
    }

    /// [`NatsServer::launch`] for a fresh server: a port taken between [`free_port`] and the
    /// server's bind (another process's listener or outgoing connection) is replaced by a new
    /// one and the server started again.
    fn launch_on_free_ports(&mut self) {
        for _ in 0..3 {
            self.spawn();
            if !self.exited_on_a_taken_port() {
                self.wait_healthy();
                return;
            }
            let (port, monitor) = (free_port(), free_port());
            for (flag, value) in [("-p", port), ("-m", monitor)] {
                if let Some(i) = self.args.iter().position(|a| a == flag) {
                    self.args[i + 1] = value.to_string();
                }
            }
            (self.port, self.monitor_port) = (port, monitor);
        }
        self.spawn();
        self.wait_healthy();
    }

    /// Waits until the server is healthy or has exited; `true` when it exited because a port
    /// was taken.
    fn exited_on_a_taken_port(&mut self) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if self.healthz().is_some_and(|r| r.contains("\"ok\"")) {
                return false;
            }
            if let Some(child) = self.child.as_mut()
                && child.try_wait().ok().flatten().is_some()
            {
                self.child = None;
                return self.log().contains("address already in use");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    fn wait_healthy(&self) {
        let what = format!("nats-server on port {} healthy (JetStream ready)", self.port);
        let healthy = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            until_blocking(&what, Duration::from_secs(20), || self.healthz().is_some_and(|r| r.contains("\"ok\"")))
        }));
        if healthy.is_err() {
            panic!("timed out waiting for {what}; its log:\n{}", self.log());
        }
    }

    /// `GET /healthz` on the monitoring port (`None`: unreachable).
    pub fn healthz(&self) -> Option<String> {
        self.get("/healthz")
    }

    /// `GET path` on the monitoring port (`None`: unreachable).
    pub fn get(&self, path: &str) -> Option<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.monitor_port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URL with the `tls://` scheme (the client requires TLS).
    pub fn tls_url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    /// The server's directory (its store; removed when dropped): a place for test files.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The server's log (stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// SIGSTOP / SIGCONT: the server hangs with its sockets open (a wedged server).
    pub fn pause(&self, paused: bool) {
        let Some(pid) = self.child.as_ref().map(|c| c.id()) else { return };
        let sig = if paused { "-STOP" } else { "-CONT" };
        let ok = std::process::Command::new("kill").arg(sig).arg(pid.to_string()).status().is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same ports with the same store directory. A cluster member does not
    /// wait for health (its peers decide when it is current).
    pub fn restart(&mut self) {
        self.kill();
        if self.cluster_port.is_some() {
            self.spawn();
        } else {
            self.launch();
        }
    }
}

impl NatsServer {
    /// SIGKILL, then starts again on the same ports with an empty store directory: everything
    /// JetStream held (streams, key-value buckets) is lost, as with a server moved to a new disk.
    pub fn restart_with_empty_store(&mut self) {
        self.kill();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            if e.file_name() == "server.log" {
                continue;
            }
            let p = e.path();
            let _ = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
        }
        if self.cluster_port.is_some() {
            self.spawn();
        } else {
            self.launch();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port taken between `free_port` and the server's bind: the server starts on another.
    #[test]
    fn a_taken_port_is_replaced() {
        if !nats_available("a_taken_port_is_replaced") {
            return;
        }
        let mut s = NatsServer::prepare("n1");
        let taken = s.port;
        let _holder = std::net::TcpListener::bind(("127.0.0.1", taken)).expect("the port is still free");
        s.launch_on_free_ports();
        assert_ne!(s.port, taken);
        assert!(s.healthz().is_some_and(|r| r.contains("\"ok\"")), "healthy on port {}", s.port);
    }
}
