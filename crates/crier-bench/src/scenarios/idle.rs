//! `idle`: how much gateway memory one idle subscribed connection costs.
//!
//! RSS of the gateway processes (VmRSS summed over their PIDs) is read before any connection and
//! after each size is reached (plus a settle time); the cost per connection is
//! `(RSS(N) − RSS(0)) / N`. Kernel socket buffers are not in RSS.
//!
//! Two shapes, each in its own table (`--broker`, default both):
//! - **memory**: independent memory-broker nodes, connections on `--channels` shared channels
//!   (the figure of the earlier passes);
//! - **redis**: the shape users deploy — `--redis-nodes` (2) nodes sharing one `redis-server`,
//!   every connection subscribed to a channel of its own, every subscribe acknowledged. Redis's
//!   own RSS is reported next to the gateway's, not in it.
//!
//! A process holds at most RLIMIT_NOFILE descriptors. When a size does not fit, the connections
//! are held by helper processes (`crier-bench hold`, see [`super::hold`]), and the bench starts
//! as many nodes as needed to keep each under the limit (the report says so).

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{Outcome, base_report, kib, token};
use crate::cli::{IdleArgs, IdleBroker};
use crate::clients::{ConnectSummary, SourceAddrs, Subscribers, Target, open_many_over};
use crate::gateway::Gateway;
use crate::procfs;
use crate::report::{Table, int, opt_f};
use crate::stats::Stats;

/// Descriptors a process keeps for itself besides connections.
const FD_MARGIN: u64 = 1000;
/// Connections per source address. The ephemeral range (32768–60999 by default) holds ~28k, but
/// `bind(port 0)` slows down sharply as an address's range fills (at 100k connections over 4
/// addresses the connect rate fell from ~6,500/s to ~160/s), so the bench stays well below it.
const PORTS_PER_SOURCE: usize = 10_000;

#[derive(Debug, Serialize)]
struct SizeResult {
    connections: usize,
    connect: ConnectSummary,
    gateway_rss_before_kib: Option<u64>,
    gateway_rss_kib: Option<u64>,
    gateway_kib_per_connection: Option<f64>,
    gateway_cpu_connect_s: Option<f64>,
    generator_rss_kib: Option<u64>,
    generator_kib_per_connection: Option<f64>,
    crier_connections_gauge: Option<f64>,
    ended_connections: u64,
    /// Redis shape only: redis-server's RSS growth per connection (not in the gateway figure).
    redis_kib_per_connection: Option<f64>,
}

/// Connections held in this process or in helper processes.
struct Holders {
    local: Subscribers,
    stats: Arc<Stats>,
    helpers: Vec<Child>,
}

impl Holders {
    fn rss_kib(&self) -> Option<u64> {
        let helpers: Option<u64> = self.helpers.iter().map(|c| c.id().and_then(procfs::rss_kib)).sum();
        Some(procfs::self_rss_kib()? + helpers?)
    }
}

/// One shape's measurement.
struct ShapeRun {
    table: Table,
    results: Vec<SizeResult>,
    notes: Vec<String>,
    gateway: serde_json::Value,
    helpers: usize,
}

pub async fn run(a: IdleArgs, nofile: u64) -> anyhow::Result<Outcome> {
    let machine = procfs::machine();
    let shapes: &[bool] = match a.broker {
        IdleBroker::Memory => &[false],
        IdleBroker::Redis => &[true],
        IdleBroker::Both => &[false, true],
    };
    let (mut tables, mut notes, mut by_shape, mut gateways) = (Vec::new(), Vec::new(), json!({}), json!({}));
    let mut helpers = 0;
    let mut last_gw = None;
    for &redis in shapes {
        let name = if redis { "redis" } else { "memory" };
        let (run, gw_info) = run_shape(&a, nofile, redis).await?;
        tables.push(run.table);
        notes.extend(run.notes.into_iter().map(|n| format!("{name}: {n}")));
        by_shape[name] = serde_json::to_value(&run.results)?;
        gateways[name] = run.gateway;
        helpers = helpers.max(run.helpers);
        if let Some(previous) = last_gw.replace(gw_info) {
            previous.stop(a.gateway.stop_grace).await;
        }
    }
    let mut sizes = a.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let mut report = base_report(
        "idle",
        last_gw.as_ref().context("no shape measured")?,
        &a.gateway,
        json!({"sizes": sizes, "broker": format!("{:?}", a.broker).to_lowercase(), "memory_channels": a.channels,
               "redis_channels": "one per connection", "settle_s": a.settle.as_secs_f64(),
               "helper_processes": helpers, "rlimit_nofile": nofile, "gateways": gateways}),
        machine,
    );
    report.results = by_shape;
    report.notes = notes;
    if let Some(gw) = last_gw {
        gw.stop(a.gateway.stop_grace).await;
    }
    Ok(Outcome { report, tables })
}

/// Measures one shape; returns the gateway (still running, for the report) too.
async fn run_shape(a: &IdleArgs, nofile: u64, redis: bool) -> anyhow::Result<(ShapeRun, Gateway)> {
    let mut sizes = a.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let max = sizes.last().copied().unwrap_or(0);
    // Redis shape: a channel per connection (i mod max = i).
    let channels = if redis { max.max(1) } else { a.channels };
    let per_process = nofile.saturating_sub(FD_MARGIN).max(100) as usize;
    let mut notes = Vec::new();
    let mut nodes_wanted = if redis { a.redis_nodes.max(1) } else { a.nodes.max(1) };
    if a.gateway.url.is_empty() && max > per_process * nodes_wanted {
        nodes_wanted = max.div_ceil(per_process);
        let what = if redis { "nodes sharing one redis-server" } else { "independent memory-broker nodes" };
        notes.push(format!(
            "RLIMIT_NOFILE is {nofile} per process and cannot be raised here, so one node holds at most ~{per_process} \
             connections: {max} connections were spread over {nodes_wanted} {what}"
        ));
    }
    let helpers_needed = a.procs > 0 || max > per_process;
    if helpers_needed && a.transport != crate::clients::Transport::Ws {
        anyhow::bail!("--transport {:?} runs in one process: at most {per_process} connections here", a.transport);
    }
    let sources = SourceAddrs::new(a.gateway.source_addrs.max(max.div_ceil(PORTS_PER_SOURCE)));
    let gw = Gateway::new(&a.gateway, nodes_wanted, redis).await?;
    let redis_rss = || gw.redis.as_ref().and_then(|r| r.pid).and_then(procfs::rss_kib);
    let nodes: Vec<_> = gw.nodes.iter().map(|n| n.addr).collect();
    let mut holders = Holders { local: Subscribers::default(), stats: Arc::new(Stats::new()), helpers: Vec::new() };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = gw.rss_kib();
    let gen0 = holders.rss_kib();
    let redis0 = redis_rss();
    let mut results = Vec::new();
    let mut have = 0usize;
    let mut connected_total = 0usize;
    for &size in &sizes {
        if size <= have {
            continue;
        }
        eprintln!(
            "idle: connecting up to {size} on {} node(s), from {} source addresses{}",
            nodes.len(),
            sources.len(),
            if helpers_needed { " (helper processes)" } else { "" }
        );
        let cpu0 = gw.cpu_secs();
        let summary = if helpers_needed {
            let procs = if a.procs > 0 { a.procs } else { (size - have).div_ceil(per_process) };
            spawn_helpers(a, channels, &gw, have, size - have, procs, &sources, &mut holders.helpers).await?
        } else {
            let target = |i: usize| Target {
                server: nodes[i % nodes.len()],
                local: sources.get(i),
                token: token(&gw, &format!("idle-{i}")),
                channel: (channels > 0).then(|| format!("bench:idle:{}", i % channels)),
            };
            let conc = a.gateway.connect_concurrency;
            open_many_over(a.transport, have, size - have, conc, target, &holders.stats, &mut holders.local, true).await
        };
        let cpu1 = gw.cpu_secs();
        have = size;
        connected_total += summary.connected;
        eprintln!("  {} connected, {} failed in {:.1}s", summary.connected, summary.failed, summary.elapsed_s);
        tokio::time::sleep(a.settle).await;
        let rss = gw.rss_kib();
        let gen_rss = holders.rss_kib();
        let up = connected_total.saturating_sub(holders.stats.ended_total() as usize);
        let per = |now: Option<u64>, before: Option<u64>| match (now, before) {
            (Some(n), Some(b)) if up > 0 => Some((n as f64 - b as f64) / up as f64),
            _ => None,
        };
        results.push(SizeResult {
            connections: size,
            gateway_rss_before_kib: rss0,
            gateway_rss_kib: rss,
            gateway_kib_per_connection: per(rss, rss0),
            gateway_cpu_connect_s: cpu0.zip(cpu1).map(|(a, b)| b - a),
            generator_rss_kib: gen_rss,
            generator_kib_per_connection: per(gen_rss, gen0),
            crier_connections_gauge: gw.metric_sum("crier_connections").await,
            ended_connections: holders.stats.ended_total(),
            redis_kib_per_connection: if redis { per(redis_rss(), redis0) } else { None },
            connect: summary,
        });
    }
    let title = if redis {
        format!(
            "idle, redis broker: gateway memory per subscribed connection ({:?}, {} nodes sharing one redis-server, a channel per connection)",
            a.transport,
            nodes.len()
        )
    } else {
        format!(
            "idle, memory broker: gateway memory per subscribed connection ({:?}, {} node(s), {} channels shared)",
            a.transport,
            nodes.len(),
            a.channels
        )
    };
    let mut t = Table::new(title, results.iter().map(|r| int(r.connections as f64)).collect());
    let col = |f: &dyn Fn(&SizeResult) -> String| results.iter().map(f).collect::<Vec<_>>();
    t.row("connected (ok / failed)", col(&|r| format!("{} / {}", r.connect.connected, r.connect.failed)));
    t.row("connect time s (this step)", col(&|r| format!("{:.1}", r.connect.elapsed_s)));
    t.row("connect rate /s", col(&|r| int(r.connect.connects_per_s)));
    t.row(
        "setup latency p50 / p99 ms",
        col(&|r| format!("{:.1} / {:.1}", r.connect.setup_latency.p50_ms, r.connect.setup_latency.p99_ms)),
    );
    t.row("gateway RSS before, KiB", col(&|r| kib(r.gateway_rss_before_kib)));
    t.row("gateway RSS now, KiB", col(&|r| kib(r.gateway_rss_kib)));
    t.row("gateway KiB per connection", col(&|r| opt_f(r.gateway_kib_per_connection, 2)));
    t.row("gateway CPU s while connecting", col(&|r| opt_f(r.gateway_cpu_connect_s, 2)));
    if redis {
        t.row("redis-server KiB per connection (not in the above)", col(&|r| opt_f(r.redis_kib_per_connection, 2)));
    }
    t.row("generator KiB per connection", col(&|r| opt_f(r.generator_kib_per_connection, 2)));
    t.row("crier_connections gauge", col(&|r| opt_f(r.crier_connections_gauge, 0)));
    t.row("connections ended by server", col(&|r| int(r.ended_connections as f64)));
    let errors: Vec<_> =
        results.iter().flat_map(|r| r.connect.errors.iter()).map(|(k, v)| format!("{k}: {v}")).collect();
    let gateway = json!({"info": gw.info(&a.gateway), "nodes": nodes.len(), "transport": a.transport, "channels": channels,
                         "source_addrs": sources.len()});
    if !errors.is_empty() {
        notes.push(format!("connect errors: {}", errors.join(", ")));
    }
    let helpers = holders.helpers.len();
    if holders.helpers.is_empty() {
        notes.push("RSS is user-space memory; kernel socket buffers are not included".into());
    } else {
        notes.push(format!(
            "connections held by {} helper processes; their setup latency is the worst helper's; generator RSS includes them; \
             kernel socket buffers are not in RSS",
            holders.helpers.len()
        ));
    }
    holders.local.abort_all();
    for mut h in holders.helpers.drain(..) {
        drop(h.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(5), h.wait()).await;
        let _ = h.kill().await;
    }
    Ok((ShapeRun { table: t, results, notes, gateway, helpers }, gw))
}

/// Starts `procs` helper processes holding connections `first..first+count` between them, waits
/// for each one's summary, and merges them.
#[allow(clippy::too_many_arguments)]
async fn spawn_helpers(
    a: &IdleArgs,
    channels: usize,
    gw: &Gateway,
    first: usize,
    count: usize,
    procs: usize,
    sources: &SourceAddrs,
    helpers: &mut Vec<Child>,
) -> anyhow::Result<ConnectSummary> {
    let exe = std::env::current_exe().context("locating crier-bench for its helper processes")?;
    let nodes = gw.nodes.iter().map(|n| n.addr.to_string()).collect::<Vec<_>>().join(",");
    let started = Instant::now();
    let per = count.div_ceil(procs.max(1));
    let mut readers = Vec::new();
    let mut at = first;
    while at < first + count {
        let n = per.min(first + count - at);
        let mut child = Command::new(&exe)
            .arg("hold")
            .args(["--node", &nodes])
            .args(["--first", &at.to_string(), "--count", &n.to_string()])
            .args(["--channels", &channels.to_string(), "--source-addrs", &sources.len().to_string()])
            .args(["--connect-concurrency", &a.gateway.connect_concurrency.to_string()])
            .env(super::hold::SECRET_ENV, &gw.secret)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting a helper process")?;
        let stdout = child.stdout.take().context("helper stdout")?;
        eprintln!("  helper pid {} holds connections {at}..{}", child.id().unwrap_or(0), at + n);
        readers.push(tokio::spawn(async move { BufReader::new(stdout).lines().next_line().await }));
        helpers.push(child);
        at += n;
    }
    let mut merged = ConnectSummary { requested: count, ..Default::default() };
    for r in readers {
        let line = tokio::time::timeout(Duration::from_secs(600), r)
            .await
            .context("a helper took over 10 minutes")???
            .context("a helper exited without a summary")?;
        let s: ConnectSummary = serde_json::from_str(&line).context("a helper's summary")?;
        merged.connected += s.connected;
        merged.failed += s.failed;
        for (k, v) in s.errors {
            *merged.errors.entry(k).or_default() += v;
        }
        if s.setup_latency.p99_ms >= merged.setup_latency.p99_ms {
            merged.setup_latency = s.setup_latency;
        }
    }
    merged.elapsed_s = started.elapsed().as_secs_f64();
    merged.connects_per_s = merged.connected as f64 / merged.elapsed_s.max(1e-9);
    Ok(merged)
}
