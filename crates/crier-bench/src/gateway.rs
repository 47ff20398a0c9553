//! The gateway under test: crier nodes (and a `redis-server` for a cluster) that the bench starts
//! on loopback and stops afterwards, or nodes already running that it is pointed at with `--url`.
//!
//! Nodes the bench starts get limits fit for a load test (handshake and per-user frame rates
//! raised), a fresh HS256 secret and API key, `RUST_LOG=warn`, and their stderr in a log file.
//! Their PIDs give the RSS and CPU figures. Everything started here is killed by PID when the
//! [`Gateway`] is stopped or dropped (`kill_on_drop`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::cli::GatewayArgs;
use crate::procfs;

/// Flags given to every node the bench starts, before the user's `--crier-arg`s.
const NODE_FLAGS: &[&str] = &[
    "--handshake-rate",
    "1000000",
    "--handshake-burst",
    "1000000",
    "--user-rate",
    "100000",
    "--user-burst",
    "100000",
    "--max-connections-per-user",
    "0",
    "--max-connections",
    "0",
    "--api-rate",
    "1000000",
    "--api-burst",
    "1000000",
];

pub struct Node {
    pub addr: SocketAddr,
    pub pid: Option<u32>,
    pub log: Option<PathBuf>,
    child: Option<Child>,
}

pub struct Redis {
    pub url: String,
    pub pid: Option<u32>,
    child: Child,
}

/// See the module docs.
pub struct Gateway {
    pub nodes: Vec<Node>,
    pub redis: Option<Redis>,
    pub secret: String,
    pub api_key: String,
    pub started_by_bench: bool,
}

/// What the report says about the gateway.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayInfo {
    pub started_by_bench: bool,
    pub nodes: Vec<String>,
    pub pids: Vec<u32>,
    pub broker: String,
    pub crier_binary: Option<String>,
    pub extra_flags: Vec<String>,
    pub node_logs: Vec<String>,
}

fn random_token(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

/// A free TCP port on 127.0.0.1 (bound, read, released; good enough for a test harness).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl Gateway {
    /// Starts `nodes` crier nodes (with a `redis-server` when `redis`), or connects to the
    /// `--url` nodes given.
    pub async fn new(args: &GatewayArgs, nodes: usize, redis: bool) -> anyhow::Result<Gateway> {
        if !args.url.is_empty() {
            return Gateway::existing(args);
        }
        let crier = args.crier_path();
        if !crier.exists() {
            bail!(
                "crier binary not found at {} (build it with `cargo build --release -p crier`, or pass --crier PATH, or --url to use running nodes)",
                crier.display()
            );
        }
        let mut gw = Gateway {
            nodes: Vec::new(),
            redis: None,
            secret: random_token(48),
            api_key: format!("bench-{}", random_token(24)),
            started_by_bench: true,
        };
        if redis && args.nats {
            gw.redis = Some(start_nats(&args.nats_server).await?);
        } else if redis {
            gw.redis = Some(start_redis(&args.redis_server).await?);
        }
        let threads = worker_threads(nodes, &args.crier_arg);
        for i in 0..nodes {
            let node = start_node(&crier, i, &gw, args, threads, "127.0.0.1:0").await?;
            let threads = threads.map_or("one per core".to_string(), |t| t.to_string());
            eprintln!(
                "  started crier node {i} at {} (pid {}, worker threads: {threads})",
                node.addr,
                node.pid.unwrap_or(0)
            );
            gw.nodes.push(node);
        }
        // A node that prints its address and then fails (e.g. its broker) must not pass for a
        // running one: give it a moment, check it is alive and ready.
        tokio::time::sleep(Duration::from_millis(300)).await;
        for (i, n) in gw.nodes.iter_mut().enumerate() {
            if let Some(c) = &mut n.child
                && let Ok(Some(status)) = c.try_wait()
            {
                bail!("crier node {i} exited ({status}); its log {}:\n{}", log_path(n), log_tail(n));
            }
        }
        gw.wait_ready().await?;
        Ok(gw)
    }

    fn existing(args: &GatewayArgs) -> anyhow::Result<Gateway> {
        let secret = args.jwt_secret.clone().context("--url needs --jwt-secret (the nodes' HS256 secret)")?;
        let api_key = args.api_key.clone().context("--url needs --api-key (one of the nodes' API keys)")?;
        let mut nodes = Vec::new();
        for (i, u) in args.url.iter().enumerate() {
            let hostport = u.trim_start_matches("http://").trim_start_matches("ws://").trim_end_matches('/');
            let addr: SocketAddr = hostport.parse().with_context(|| format!("--url {u}: expected http://IP:PORT"))?;
            if !addr.ip().is_loopback() {
                bail!("--url {u}: crier-bench only sends traffic to loopback addresses");
            }
            nodes.push(Node { addr, pid: args.gateway_pid.get(i).copied(), log: None, child: None });
        }
        Ok(Gateway { nodes, redis: None, secret, api_key, started_by_bench: false })
    }

    /// Waits (10 s at most) until every node answers 200 on `/readyz`.
    async fn wait_ready(&self) -> anyhow::Result<()> {
        let client = reqwest::Client::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        for (i, n) in self.nodes.iter().enumerate() {
            loop {
                let ok =
                    client.get(format!("http://{}/readyz", n.addr)).send().await.is_ok_and(|r| r.status().is_success());
                if ok {
                    break;
                }
                if tokio::time::Instant::now() > deadline {
                    bail!(
                        "crier node {i} at {} is not ready after 10s; its log {}:\n{}",
                        n.addr,
                        log_path(n),
                        log_tail(n)
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// SIGKILL to node `i` (a crash: no drain, no close frames). Its PID is forgotten, so
    /// nothing is later sent to a PID the system may have reused.
    pub async fn kill_node(&mut self, i: usize) {
        if let Some(n) = self.nodes.get_mut(i)
            && let Some(mut c) = n.child.take()
        {
            let _ = c.kill().await;
            n.pid = None;
        }
    }

    /// A rolling restart's step for node `i`, as Kubernetes does it: SIGTERM (the node drains
    /// over its `shutdown_drain` and exits), then a new process on the same address, awaited
    /// until `/readyz` answers 200 (the readiness gate). A node still running `exit_within` after
    /// SIGTERM is SIGKILLed, as Kubernetes does at `terminationGracePeriodSeconds`. Returns
    /// (SIGTERM to exit, exit to ready, whether it had to be killed).
    pub async fn restart_node(
        &mut self,
        i: usize,
        args: &GatewayArgs,
        exit_within: Duration,
    ) -> anyhow::Result<(Duration, Duration, bool)> {
        let Some(n) = self.nodes.get_mut(i) else { bail!("no node {i}") };
        let Some(mut child) = n.child.take() else { bail!("node {i} was not started by the bench") };
        let t0 = tokio::time::Instant::now();
        if let Some(pid) = n.pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        n.pid = None;
        let mut killed = false;
        match tokio::time::timeout(exit_within, child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => eprintln!("  warning: node {i} exited with {status} after SIGTERM"),
            Ok(Err(e)) => bail!("waiting for node {i}: {e}"),
            Err(_) => {
                eprintln!("  node {i} did not exit within {exit_within:?} of SIGTERM: SIGKILL");
                let _ = child.kill().await;
                killed = true;
            }
        }
        let drained = t0.elapsed();
        let t1 = tokio::time::Instant::now();
        self.start_again(i, args).await?;
        Ok((drained, t1.elapsed(), killed))
    }

    /// Starts node `i` again on its old address after [`Gateway::kill_node`] (a node joining:
    /// the load balancer already lists its address), and waits until it is ready.
    pub async fn start_killed_node(&mut self, i: usize, args: &GatewayArgs) -> anyhow::Result<()> {
        let Some(n) = self.nodes.get(i) else { bail!("no node {i}") };
        if n.child.is_some() {
            bail!("node {i} is still running");
        }
        self.start_again(i, args).await
    }

    /// Starts node `i` (stopped) again on its address, and waits until every node is ready.
    async fn start_again(&mut self, i: usize, args: &GatewayArgs) -> anyhow::Result<()> {
        let crier = args.crier_path();
        let addr = self.nodes[i].addr;
        let threads = worker_threads(self.nodes.len(), &args.crier_arg);
        // The port was just released; a bind can still race another program for it.
        let mut node = None;
        for _ in 0..50 {
            match start_node(&crier, i, self, args, threads, &addr.to_string()).await {
                Ok(nd) => {
                    node = Some(nd);
                    break;
                }
                Err(e) => {
                    eprintln!("  node {i} did not start on {addr} yet: {e:#}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let Some(node) = node else { bail!("node {i} could not be started again on {addr}") };
        self.nodes[i] = node;
        self.wait_ready().await
    }

    /// The PID of node `i` now (a restarted node has a new one).
    pub fn node_pid(&self, i: usize) -> Option<u32> {
        self.nodes.get(i).and_then(|n| n.pid)
    }

    /// PIDs of the crier nodes known to the bench.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes.iter().filter_map(|n| n.pid).collect()
    }

    pub fn rss_kib(&self) -> Option<u64> {
        procfs::total_rss_kib(&self.pids())
    }

    pub fn cpu_secs(&self) -> Option<f64> {
        procfs::total_cpu_secs(&self.pids())
    }

    pub fn redis_cpu_secs(&self) -> Option<f64> {
        self.redis.as_ref().and_then(|r| r.pid).and_then(procfs::cpu_secs)
    }

    pub fn info(&self, args: &GatewayArgs) -> GatewayInfo {
        GatewayInfo {
            started_by_bench: self.started_by_bench,
            nodes: self.nodes.iter().map(|n| n.addr.to_string()).collect(),
            pids: self.pids(),
            broker: match &self.redis {
                Some(r) if r.url.starts_with("nats://") => format!("nats {}", r.url),
                Some(r) => format!("redis {}", r.url),
                None if self.started_by_bench => "memory".into(),
                None => "unknown (running nodes)".into(),
            },
            crier_binary: self.started_by_bench.then(|| args.crier_path().display().to_string()),
            extra_flags: args.crier_arg.clone(),
            node_logs: self.nodes.iter().filter_map(|n| n.log.as_ref()).map(|p| p.display().to_string()).collect(),
        }
    }

    /// Scrapes `/metrics` of every node and sums the `name` samples (no labels).
    pub async fn metric_sum(&self, name: &str) -> Option<f64> {
        let client = reqwest::Client::new();
        let mut sum = 0.0;
        for n in &self.nodes {
            sum += scrape(&client, n.addr, name).await?;
        }
        Some(sum)
    }

    /// Stops what the bench started, by PID: SIGTERM to every node (crier drains and exits, and a
    /// wrapper such as valgrind writes its output), SIGKILL to what is still running after
    /// `grace`; then redis-server.
    pub async fn stop(mut self, grace: Duration) {
        for n in &self.nodes {
            if n.child.is_some()
                && let Some(pid) = n.pid.and_then(|p| rustix::process::Pid::from_raw(p as i32))
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        for n in &mut self.nodes {
            if let Some(c) = &mut n.child
                && tokio::time::timeout(grace, c.wait()).await.is_err()
            {
                let _ = c.kill().await;
            }
        }
        if let Some(r) = &mut self.redis {
            let _ = r.child.kill().await;
        }
    }
}

/// One series (name and labels exactly as exposed) of the node at `addr`'s `/metrics`; none when
/// the node does not answer or does not expose it.
pub async fn scrape(http: &reqwest::Client, addr: SocketAddr, series: &str) -> Option<f64> {
    let text = http.get(format!("http://{addr}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

fn log_path(n: &Node) -> String {
    n.log.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
}

fn log_tail(n: &Node) -> String {
    let text = n.log.as_ref().and_then(|p| std::fs::read_to_string(p).ok()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Worker threads per node when several nodes share this machine: each gets its share of the
/// cores (as a deployment co-locating nodes would configure `worker_threads`), unless the user
/// set `--worker-threads` through `--crier-arg`. With one node: the node's default (one per core).
/// Measured with 2 nodes on 2 cores: 2 threads each oversubscribe the cores and cost ~30% of
/// the deliveries per CPU-second (BENCHMARKS.md).
fn worker_threads(nodes: usize, crier_args: &[String]) -> Option<usize> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let user_set = crier_args.iter().any(|a| a.starts_with("--worker-threads"));
    (nodes > 1 && !user_set).then(|| (cores / nodes).max(1))
}

async fn start_node(
    crier: &Path,
    i: usize,
    gw: &Gateway,
    args: &GatewayArgs,
    threads: Option<usize>,
    listen: &str,
) -> anyhow::Result<Node> {
    let log = std::env::temp_dir().join(format!("crier-bench-{}-node{i}.log", std::process::id()));
    // A restarted node appends to the log of the process it replaces.
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = Command::new(crier);
    cmd.arg("--listen")
        .arg(listen)
        .arg("--node-id")
        .arg(format!("bench-{i}"))
        .arg("--jwt-secret")
        .arg(&gw.secret)
        .arg("--api-keys")
        .arg(&gw.api_key)
        .args(NODE_FLAGS)
        .args(threads.map(|t| format!("--worker-threads={t}")))
        .args(&args.crier_arg)
        .env("RUST_LOG", std::env::var("CRIER_BENCH_NODE_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true);
    // The node's own settings come from the flags above, not from this shell's CRIER_* variables.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CRIER_") {
            cmd.env_remove(k);
        }
    }
    if let Some(r) = &gw.redis {
        if r.url.starts_with("nats://") {
            cmd.env("CRIER_NATS_URL", &r.url);
        } else {
            cmd.env("CRIER_REDIS_URL", &r.url);
        }
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {}", crier.display()))?;
    let pid = child.id();
    let stdout = child.stdout.take().context("crier stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let wait = async {
        while let Some(line) = lines.next_line().await? {
            if let Some(a) = line.strip_prefix("crier listening on http://") {
                return Ok::<_, anyhow::Error>(Some(a.trim().parse::<SocketAddr>()?));
            }
        }
        Ok(None)
    };
    let addr = match tokio::time::timeout(Duration::from_secs(20), wait).await {
        Ok(Ok(Some(a))) => a,
        other => {
            let _ = child.kill().await;
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: String =
                tail.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
            bail!(
                "crier node {i} did not start ({:?}); its log {}:\n{tail}",
                other.err().map(|_| "timeout"),
                log.display()
            );
        }
    };
    // Keep draining stdout so the node never blocks on a full pipe.
    tokio::spawn(async move {
        let mut rest = lines.into_inner();
        let mut buf = [0u8; 4096];
        while matches!(rest.read(&mut buf).await, Ok(n) if n > 0) {}
    });
    Ok(Node { addr, pid, log: Some(log), child: Some(child) })
}

/// A nats-server with JetStream on a fresh temporary store directory (the shared broker of
/// `--nats` runs; `Redis` holds it like a redis-server: its URL, PID and process).
async fn start_nats(binary: &str) -> anyhow::Result<Redis> {
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("crier-bench-nats-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let bin = if binary == "nats-server" && !std::path::Path::new("/usr/bin/nats-server").exists() {
        "/usr/sbin/nats-server"
    } else {
        binary
    };
    // Its log next to its store (what to read when a run goes wrong).
    let log = std::fs::File::create(dir.join("nats-server.log"))?;
    let mut child = Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {bin} (install nats-server, or pass --nats-server PATH)"))?;
    let pid = child.id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let mut buf = [0u8; 4];
            if matches!(s.read(&mut buf).await, Ok(4) if &buf == b"INFO") {
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill().await;
            bail!("nats-server did not greet on port {port} within 10s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("  started nats-server on 127.0.0.1:{port} (pid {}, store {})", pid.unwrap_or(0), dir.display());
    Ok(Redis { url: format!("nats://127.0.0.1:{port}"), pid, child })
}

async fn start_redis(binary: &str) -> anyhow::Result<Redis> {
    let port = free_port()?;
    let mut child = Command::new(binary)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--loglevel", "warning", "--protected-mode", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {binary} (install redis-server, or pass --redis-server PATH)"))?;
    let pid = child.id();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            let mut buf = [0u8; 16];
            if s.write_all(b"PING\r\n").await.is_ok()
                && matches!(s.read(&mut buf).await, Ok(n) if buf[..n].starts_with(b"+PONG"))
            {
                break;
            }
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill().await;
            bail!("redis-server did not answer PING on port {port} within 10s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("  started redis-server on 127.0.0.1:{port} (pid {})", pid.unwrap_or(0));
    Ok(Redis { url: format!("redis://127.0.0.1:{port}/0"), pid, child })
}
