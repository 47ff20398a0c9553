//! Real `redis-server` processes, each on a free port (never 6379), started by the test that
//! needs it, killed when dropped. Waits poll with deadlines; nothing sleeps to synchronise.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait::until_blocking;

/// A `redis-server` child process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    args: Vec<String>,
}

fn free_port() -> u16 {
    for _ in 0..20 {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).unwrap_or(0);
        if port != 0 && port != 6379 {
            return port;
        }
    }
    panic!("no free port");
}

impl RedisServer {
    /// Without persistence: a restart loses everything.
    pub fn start() -> RedisServer {
        RedisServer::spawn(false)
    }

    /// With an append-only file fsynced on every write: a restart loses nothing.
    pub fn start_persistent() -> RedisServer {
        RedisServer::spawn(true)
    }

    fn spawn(persistent: bool) -> RedisServer {
        let port = free_port();
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let dir = std::env::temp_dir().join(format!("crier-redis-test-{}-{port}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("temp dir {dir:?}: {e}"));
        let mut args: Vec<String> =
            ["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", ""].iter().map(|s| s.to_string()).collect();
        args.extend(["--dir".to_string(), dir.display().to_string()]);
        if persistent {
            args.extend(["--appendonly", "yes", "--appendfsync", "always"].map(String::from));
        } else {
            args.extend(["--appendonly", "no"].map(String::from));
        }
        let mut server = RedisServer { child: None, port, dir, args };
        server.launch();
        server
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start redis-server ({e}); install it: apt-get install -y redis-server"));
        self.child = Some(child);
        let what = format!("redis-server on port {} to answer PING", self.port);
        until_blocking(what, Duration::from_secs(10), || {
            self.try_cmd(&["PING"]).is_some_and(|r| r.starts_with("+PONG"))
        });
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL: no goodbye to clients, no final save.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP / SIGCONT: the server hangs with its sockets open (a wedged Redis).
    pub fn pause(&self, paused: bool) {
        let Some(pid) = self.child.as_ref().map(|c| c.id()) else { return };
        let sig = if paused { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill").arg(sig).arg(pid.to_string()).status().is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    }

    /// Starts again on the same port with the same settings (and data directory).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// Sends one command, returns the raw reply (`None` if the server cannot be reached).
    pub fn try_cmd(&self, args: &[&str]) -> Option<String> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = s.read(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    pub fn cmd(&self, args: &[&str]) -> String {
        self.try_cmd(args).unwrap_or_else(|| panic!("redis on port {} unreachable for {args:?}", self.port))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.pause(false);
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
