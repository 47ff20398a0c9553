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
    /// The TLS port, when started with [`RedisServer::start_tls`].
    tls_port: Option<u16>,
    dir: PathBuf,
    args: Vec<String>,
}

/// A free TCP port on 127.0.0.1 (never 6379).
pub fn free_port() -> u16 {
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

    /// Plaintext on [`RedisServer::port`] (for the test's own commands) and TLS on
    /// [`RedisServer::tls_port`] with `ca`'s server certificate.
    pub fn start_tls(ca: &crate::tls::TestCa) -> RedisServer {
        let tls_port = free_port();
        let extra = [
            "--tls-port".to_owned(),
            tls_port.to_string(),
            "--tls-cert-file".to_owned(),
            ca.server_cert.display().to_string(),
            "--tls-key-file".to_owned(),
            ca.server_key.display().to_string(),
            "--tls-ca-cert-file".to_owned(),
            ca.ca_cert.display().to_string(),
            "--tls-auth-clients".to_owned(),
            "no".to_owned(),
        ];
        let mut server = RedisServer::prepare(false, &extra);
        server.tls_port = Some(tls_port);
        server.launch();
        server
    }

    /// A replica of `master` (asynchronous replication), without persistence.
    pub fn start_replica_of(master: &RedisServer) -> RedisServer {
        let extra = ["--replicaof", "127.0.0.1", &master.port().to_string(), "--repl-diskless-sync-delay", "0"]
            .map(String::from);
        let mut server = RedisServer::prepare(false, &extra);
        server.launch();
        server
    }

    /// A Sentinel monitoring `master` as `name` (quorum 2, the master is down after 1s of
    /// silence, a failover may take 5s).
    pub fn start_sentinel(master: &RedisServer, name: &str) -> RedisServer {
        let mut server = RedisServer::prepare(false, &[]);
        let conf = server.dir.join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\nsentinel monitor {name} 127.0.0.1 {master} 2\n\
             sentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 5000\n\
             sentinel parallel-syncs {name} 1\n",
            port = server.port,
            dir = server.dir.display(),
            master = master.port(),
        );
        std::fs::write(&conf, text).unwrap_or_else(|e| panic!("write {conf:?}: {e}"));
        server.args = vec![conf.display().to_string(), "--sentinel".to_owned()];
        server.launch();
        server
    }

    fn spawn(persistent: bool) -> RedisServer {
        let mut server = RedisServer::prepare(persistent, &[]);
        server.launch();
        server
    }

    fn prepare(persistent: bool, extra: &[String]) -> RedisServer {
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
        args.extend(extra.iter().cloned());
        RedisServer { child: None, port, tls_port: None, dir, args }
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

    /// The TLS port (panics unless started with [`RedisServer::start_tls`]).
    pub fn tls_port(&self) -> u16 {
        self.tls_port.unwrap_or_else(|| panic!("redis on port {} has no TLS port", self.port))
    }

    /// `rediss://<host>:<tls port>/`.
    pub fn tls_url(&self, host: &str) -> String {
        format!("rediss://{host}:{}/", self.tls_port())
    }

    /// The process id (while running).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
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

/// A master, one replica and three Sentinels (quorum 2) monitoring it as `name`, all on
/// loopback; [`SentinelGroup::start`] returns once the Sentinels see the replica and each other.
pub struct SentinelGroup {
    /// `None` once killed.
    pub master: Option<RedisServer>,
    pub replica: RedisServer,
    pub sentinels: Vec<RedisServer>,
    pub name: String,
}

impl SentinelGroup {
    pub fn start(name: &str) -> SentinelGroup {
        let master = RedisServer::start();
        let replica = RedisServer::start_replica_of(&master);
        until_blocking("the replica to sync", Duration::from_secs(30), || {
            replica.try_cmd(&["INFO", "replication"]).is_some_and(|r| r.contains("master_link_status:up"))
        });
        let sentinels: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_sentinel(&master, name)).collect();
        until_blocking("the sentinels to see the replica and each other", Duration::from_secs(30), || {
            sentinels.iter().all(|s| {
                s.try_cmd(&["SENTINEL", "MASTER", name]).is_some_and(|r| {
                    r.contains("num-slaves\r\n$1\r\n1") && r.contains("num-other-sentinels\r\n$1\r\n2")
                })
            })
        });
        SentinelGroup { master: Some(master), replica, sentinels, name: name.to_owned() }
    }

    /// The Sentinels' addresses, comma-separated (`redis_sentinel_urls`).
    pub fn urls(&self) -> String {
        self.sentinels.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
    }

    /// SIGKILL the master (the replica gets promoted after ~1s of silence plus the election).
    pub fn kill_master(&mut self) {
        self.master.take();
    }
}

/// A Redis Cluster of `masters` masters with one replica each (`redis-server --cluster-enabled
/// yes` × 2·masters + `redis-cli --cluster create --cluster-replicas 1`), on loopback.
pub struct RedisCluster {
    /// `None` once killed.
    pub nodes: Vec<Option<RedisServer>>,
}

/// A port whose cluster bus port (+10000) is free too.
fn free_redis_cluster_port() -> u16 {
    for attempt in 0..200u32 {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let port = 20000 + ((nanos / 7 + attempt * 7919) % 25000) as u16;
        let ok =
            TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port + 10000)).is_ok();
        if ok {
            return port;
        }
    }
    panic!("no free cluster port");
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        let mut nodes = Vec::new();
        for _ in 0..masters * 2 {
            let port = free_redis_cluster_port();
            let mut server = RedisServer::prepare(false, &[]);
            server.port = port;
            let conf = server.dir.join("nodes.conf").display().to_string();
            let mut args: Vec<String> = vec!["--port".into(), port.to_string()];
            args.extend(server.args.iter().skip(2).cloned());
            args.extend(
                ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000", "--repl-diskless-sync-delay", "0"]
                    .map(String::from),
            );
            args.push("--cluster-config-file".into());
            args.push(conf);
            server.args = args;
            server.launch();
            nodes.push(Some(server));
        }
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in nodes.iter().flatten() {
            cmd.arg(format!("127.0.0.1:{}", n.port()));
        }
        cmd.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = cmd.output().expect("redis-cli --cluster create");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        let cluster = RedisCluster { nodes };
        until_blocking("the cluster to be ok on every node, every replica in sync", Duration::from_secs(60), || {
            cluster.nodes.iter().flatten().all(|n| {
                let ok = n
                    .try_cmd(&["CLUSTER", "INFO"])
                    .is_some_and(|r| r.contains("cluster_state:ok") && r.contains("cluster_slots_ok:16384"));
                let synced = n.try_cmd(&["INFO", "replication"]).is_some_and(|r| {
                    r.contains("role:master") && r.contains("connected_slaves:1")
                        || r.contains("role:slave") && r.contains("master_link_status:up")
                });
                ok && synced
            })
        });
        cluster
    }

    /// Every node's URL, comma-separated (`redis_cluster_urls`).
    pub fn urls(&self) -> String {
        self.seeds().join(",")
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().flatten().map(RedisServer::url).collect()
    }

    /// Indices of the nodes that are masters now.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                self.nodes[i].as_ref().and_then(|n| n.try_cmd(&["ROLE"])).is_some_and(|r| r.contains("master"))
            })
            .collect()
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i) {
            n.take();
        }
    }

    /// Moves hash slot `slot` from its master to the master `to` (a node index), keys included,
    /// the way `redis-cli --cluster reshard` does: IMPORTING/MIGRATING, MIGRATE in batches, then
    /// SETSLOT NODE everywhere. Blocking.
    pub fn migrate_slot(&self, slot: u16, to: usize) {
        let dst = self.nodes[to].as_ref().unwrap_or_else(|| panic!("node {to} is dead"));
        let id = |n: &RedisServer| bulk_lines(&n.cmd(&["CLUSTER", "MYID"])).pop().unwrap_or_default();
        let src = self
            .nodes
            .iter()
            .flatten()
            .find(|n| n.try_cmd(&["ROLE"]).is_some_and(|r| r.contains("master")) && owns(n, slot))
            .unwrap_or_else(|| panic!("no owner of slot {slot}"));
        let (src_id, dst_id) = (id(src), id(dst));
        assert_ne!(src_id, dst_id, "slot {slot} is on node {to} already");
        let s = slot.to_string();
        assert!(dst.cmd(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &src_id]).starts_with("+OK"));
        assert!(src.cmd(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &dst_id]).starts_with("+OK"));
        loop {
            let keys = bulk_lines(&src.cmd(&["CLUSTER", "GETKEYSINSLOT", &s, "100"]));
            if keys.is_empty() {
                break;
            }
            let port = dst.port().to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "5000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            let r = src.cmd(&args);
            assert!(r.starts_with("+OK") || r.starts_with("+NOKEY"), "MIGRATE: {r}");
        }
        for n in self.nodes.iter().flatten() {
            let r = n.cmd(&["CLUSTER", "SETSLOT", &s, "NODE", &dst_id]);
            assert!(r.starts_with("+OK") || r.starts_with("-ERR"), "SETSLOT NODE: {r}");
        }
    }

    /// The index of the master serving `slot`.
    pub fn owner_of(&self, slot: u16) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            self.nodes[i]
                .as_ref()
                .is_some_and(|n| n.try_cmd(&["ROLE"]).is_some_and(|r| r.contains("master")) && owns(n, slot))
        })
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot_of(&self, key: &str) -> u16 {
        let r = self.any().cmd(&["CLUSTER", "KEYSLOT", key]);
        r.trim().trim_start_matches(':').parse().unwrap_or_else(|e| panic!("KEYSLOT {key}: {r} ({e})"))
    }

    /// A live node.
    pub fn any(&self) -> &RedisServer {
        self.nodes.iter().flatten().next().unwrap_or_else(|| panic!("no live cluster node"))
    }
}

/// The bulk strings of a raw RESP reply (enough for lists of keys and ids).
fn bulk_lines(reply: &str) -> Vec<String> {
    let lines: Vec<&str> = reply.split("\r\n").collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if lines[i].starts_with('$') && i + 1 < lines.len() {
            out.push(lines[i + 1].to_owned());
            i += 2;
        } else {
            if let Some(simple) = lines[i].strip_prefix('+') {
                out.push(simple.to_owned());
            }
            i += 1;
        }
    }
    out
}

/// Whether master `n` serves `slot` (its own view, CLUSTER NODES "myself" line).
fn owns(n: &RedisServer, slot: u16) -> bool {
    let nodes = n.cmd(&["CLUSTER", "NODES"]);
    nodes.lines().filter(|l| l.contains("myself")).any(|l| {
        l.split(' ').skip(8).any(|range| {
            let mut parts = range.splitn(2, '-');
            let a = parts.next().and_then(|a| a.parse::<u16>().ok());
            let b = parts.next().and_then(|b| b.parse::<u16>().ok()).or(a);
            matches!((a, b), (Some(a), Some(b)) if a <= slot && slot <= b)
        })
    })
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.pause(false);
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
