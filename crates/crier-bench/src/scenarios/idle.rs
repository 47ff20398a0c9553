//! `idle`: how much gateway memory one idle subscribed connection costs.
//!
//! RSS of the gateway processes (VmRSS summed over their PIDs) is read before any connection and
//! after each size is reached (plus a settle time); the cost per connection is
//! `(RSS(N) − RSS(0)) / N`. Kernel socket buffers are not in RSS.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;

use super::{Outcome, base_report, kib, token};
use crate::clients::{ConnectSummary, SourceAddrs, Subscribers, Target, open_many};
use crate::cli::IdleArgs;
use crate::gateway::Gateway;
use crate::procfs;
use crate::report::{Table, int, opt_f};
use crate::stats::Stats;

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
}

pub async fn run(a: IdleArgs) -> anyhow::Result<Outcome> {
    let machine = procfs::machine();
    let gw = Gateway::new(&a.gateway, 1, false).await?;
    let mut sizes = a.sizes.clone();
    sizes.sort_unstable();
    sizes.dedup();
    let sources = SourceAddrs::new(a.gateway.source_addrs);
    let stats = Arc::new(Stats::new());
    let mut subs = Subscribers::default();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss0 = gw.rss_kib();
    let gen0 = procfs::self_rss_kib();
    let nodes: Vec<_> = gw.nodes.iter().map(|n| n.addr).collect();
    let mut results = Vec::new();
    let mut have = 0usize;
    let mut connected_total = 0usize;
    for &size in &sizes {
        if size <= have {
            continue;
        }
        eprintln!("idle: connecting up to {size} (from {} source addresses)", sources.len());
        let cpu0 = gw.cpu_secs();
        let target = |i: usize| Target {
            server: nodes[i % nodes.len()],
            local: sources.get(i),
            token: token(&gw, &format!("idle-{i}")),
            channel: (a.channels > 0).then(|| format!("bench:idle:{}", i % a.channels)),
        };
        let summary =
            open_many(have, size - have, a.gateway.connect_concurrency, target, &stats, &mut subs, true).await;
        let cpu1 = gw.cpu_secs();
        have = size;
        connected_total += summary.connected;
        tokio::time::sleep(a.settle).await;
        let rss = gw.rss_kib();
        let gen_rss = procfs::self_rss_kib();
        let up = connected_total.saturating_sub(stats.ended_total() as usize);
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
            ended_connections: stats.ended_total(),
            connect: summary,
        });
    }
    let mut t = Table::new(
        format!("idle: gateway memory per idle connection ({} channels)", a.channels),
        results.iter().map(|r| int(r.connections as f64)).collect(),
    );
    let col = |f: &dyn Fn(&SizeResult) -> String| results.iter().map(f).collect::<Vec<_>>();
    t.row("connected (ok / failed)", col(&|r| format!("{} / {}", r.connect.connected, r.connect.failed)));
    t.row("connect time s (this step)", col(&|r| format!("{:.1}", r.connect.elapsed_s)));
    t.row("connect rate /s", col(&|r| int(r.connect.connects_per_s)));
    t.row("setup latency p50 / p99 ms", col(&|r| format!("{:.1} / {:.1}", r.connect.setup_latency.p50_ms, r.connect.setup_latency.p99_ms)));
    t.row("gateway RSS before, KiB", col(&|r| kib(r.gateway_rss_before_kib)));
    t.row("gateway RSS now, KiB", col(&|r| kib(r.gateway_rss_kib)));
    t.row("gateway KiB per connection", col(&|r| opt_f(r.gateway_kib_per_connection, 2)));
    t.row("gateway CPU s while connecting", col(&|r| opt_f(r.gateway_cpu_connect_s, 2)));
    t.row("generator KiB per connection", col(&|r| opt_f(r.generator_kib_per_connection, 2)));
    t.row("crier_connections gauge", col(&|r| opt_f(r.crier_connections_gauge, 0)));
    t.row("connections ended by server", col(&|r| int(r.ended_connections as f64)));
    let errors: Vec<_> = results.iter().flat_map(|r| r.connect.errors.iter()).map(|(k, v)| format!("{k}: {v}")).collect();
    let mut report = base_report(
        "idle",
        &gw,
        &a.gateway,
        json!({"sizes": sizes, "channels": a.channels, "settle_s": a.settle.as_secs_f64(), "source_addrs": sources.len()}),
        machine,
    );
    report.results = serde_json::to_value(&results)?;
    if !errors.is_empty() {
        report.notes.push(format!("connect errors: {}", errors.join(", ")));
    }
    report.notes.push("RSS is user-space memory; kernel socket buffers are not included".into());
    subs.abort_all();
    gw.stop(a.gateway.stop_grace).await;
    Ok(Outcome { report, tables: vec![t] })
}
