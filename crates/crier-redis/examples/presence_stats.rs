//! Benchmark (not a test): `presence_stats` on a channel with 100,000 members, Redis + 2 nodes.
//!
//! ```sh
//! cargo build --release -p crier
//! cargo run --release -p crier-redis --example presence_stats -- [MEMBERS] [USERS] [REQUESTS]
//! ```
//!
//! Starts a redis-server (crier-testkit) and fills one channel's presence at the broker level:
//! two `RedisBroker`s ("filler" nodes, which keep their entries refreshed as nodes do) add
//! MEMBERS entries (default 100,000) of USERS distinct users (default 20,000). Then it starts two
//! `crier` nodes on that Redis and asks `GET /api/v1/channels/{channel}/presence_stats`
//! REQUESTS times (default 2,000), alternating between the nodes, one request at a time on a
//! keep-alive connection each, and prints the latency percentiles; then the same through
//! `Broker::presence_stats` directly, and one full `presence` listing for contrast.

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crier_core::{Broker, ChannelPolicy, Namespaces};
use crier_protocol::frames::PresenceEntry;
use crier_redis::{RedisBroker, RedisOptions};
use crier_testkit::process::Process;
use crier_testkit::redis::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHANNEL: &str = "room:big";
const API_KEY: &str = "bench-api-key";

fn arg(i: usize, default: usize) -> usize {
    std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn percentiles(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{name}: n={} p50={:.3} ms p90={:.3} ms p99={:.3} ms p99.9={:.3} ms max={:.3} ms",
        v.len(),
        ms(at(0.5)),
        ms(at(0.9)),
        ms(at(0.99)),
        ms(at(0.999)),
        ms(v[v.len() - 1])
    );
}

/// One GET on a keep-alive connection; returns the body.
async fn get(con: &mut TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {API_KEY}\r\n\r\n");
    con.write_all(req.as_bytes()).await.unwrap_or_else(|e| panic!("write: {e}"));
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = con.read(&mut chunk).await.unwrap_or_else(|e| panic!("read: {e}"));
        assert!(n > 0, "the node closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len = text[..head_end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_owned()))
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= head_end + 4 + len {
                assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                return text[head_end + 4..head_end + 4 + len].to_owned();
            }
        }
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let (members, users, requests) = (arg(1, 100_000), arg(2, 20_000), arg(3, 2_000));
    let redis = RedisServer::start();
    let opts = |node: &str| {
        let mut o = RedisOptions::new(redis.url(), node);
        let jl = ChannelPolicy { join_leave: true, ..ChannelPolicy::default() };
        o.namespaces = Arc::new(Namespaces::new(ChannelPolicy::default()).with("room", jl));
        o
    };
    let fillers = [
        RedisBroker::connect(opts("filler-1")).await.unwrap_or_else(|e| panic!("connect: {e}")),
        RedisBroker::connect(opts("filler-2")).await.unwrap_or_else(|e| panic!("connect: {e}")),
    ];
    let started = Instant::now();
    let mut i = 0usize;
    while i < members {
        let batch: Vec<_> = (i..(i + 500).min(members))
            .map(|k| {
                let b = fillers[k % 2].clone();
                let node = if k % 2 == 0 { "filler-1" } else { "filler-2" };
                let e = PresenceEntry { client: format!("c{k}"), user: format!("u{}", k % users), node: node.into() };
                async move { b.presence_add(CHANNEL, &e).await }
            })
            .collect();
        for r in futures_util::future::join_all(batch).await {
            r.unwrap_or_else(|e| panic!("presence_add: {e}"));
        }
        i += 500;
    }
    println!("filled {members} members of {users} users in {:.1} s", started.elapsed().as_secs_f64());

    let mut nodes = Vec::new();
    for name in ["n1", "n2"] {
        let mut cmd = Command::new(crier_testkit::bin::crier_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--redis-url", &redis.url(), "--node-id", name]);
        cmd.args(["--jwt-secret", "bench-secret-bench-secret-bench-secret-0123", "--api-keys", API_KEY]);
        cmd.args(["--worker-threads", "1"]).env("RUST_LOG", "warn");
        let (p, addr) = Process::start(cmd, "crier listening on http://", Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("crier starts: {e}"));
        nodes.push((p, addr));
    }
    let mut cons = Vec::new();
    for (_, addr) in &nodes {
        cons.push(TcpStream::connect(addr.as_str()).await.unwrap_or_else(|e| panic!("connect {addr}: {e}")));
    }
    let path = format!("/api/v1/channels/{CHANNEL}/presence_stats");
    println!("{}", get(&mut cons[0], &path).await);
    for con in &mut cons {
        for _ in 0..50 {
            get(con, &path).await; // warm-up
        }
    }
    let mut http = Vec::with_capacity(requests);
    for k in 0..requests {
        let t = Instant::now();
        get(&mut cons[k % 2], &path).await;
        http.push(t.elapsed());
    }
    percentiles("REST presence_stats over 2 nodes", http);

    let mut direct = Vec::with_capacity(requests);
    for k in 0..requests {
        let t = Instant::now();
        let s = fillers[k % 2].presence_stats(CHANNEL).await.unwrap_or_else(|e| panic!("presence_stats: {e}"));
        direct.push(t.elapsed());
        assert_eq!(s.clients, members as u64);
    }
    percentiles("Broker::presence_stats (the script call alone)", direct);

    let t = Instant::now();
    let list = fillers[0].presence(CHANNEL).await.unwrap_or_else(|e| panic!("presence: {e}"));
    println!(
        "for contrast, one full presence listing: {} entries in {:.1} ms",
        list.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    drop(nodes);
}
