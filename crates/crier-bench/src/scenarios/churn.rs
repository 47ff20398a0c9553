//! `churn`: connect → welcome → subscribe → close, in `--workers` loops, on top of `--base` idle
//! subscribed connections. Reports cycles per second, handshake and cycle latency, errors, the
//! gateway's CPU per cycle, and whether its connection gauge and RSS come back afterwards.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use super::{Outcome, base_report, kib, token};
use crate::cli::ChurnArgs;
use crate::clients::{ConnectSummary, SourceAddrs, Subscribers, Target, connect, open_many, subscribe};
use crate::gateway::Gateway;
use crate::procfs;
use crate::report::{Table, int, opt_f};
use crate::stats::{Latency, Stats, new_histogram};

#[derive(Debug, Serialize)]
struct Results {
    base: ConnectSummary,
    cycles: u64,
    errors: BTreeMap<String, u64>,
    elapsed_s: f64,
    cycles_per_s: f64,
    handshake_latency: Latency,
    cycle_latency: Latency,
    gateway_cpu_s: Option<f64>,
    gateway_cpu_us_per_cycle: Option<f64>,
    generator_cpu_s: f64,
    gateway_rss_before_kib: Option<u64>,
    gateway_rss_after_kib: Option<u64>,
    connections_gauge_before: Option<f64>,
    connections_gauge_after: Option<f64>,
    base_connections_ended: u64,
}

pub async fn run(a: ChurnArgs) -> anyhow::Result<Outcome> {
    let machine = procfs::machine();
    let gw = Arc::new(Gateway::new(&a.gateway, 1, false).await?);
    let nodes: Vec<_> = gw.nodes.iter().map(|n| n.addr).collect();
    let sources = SourceAddrs::new(a.gateway.source_addrs);
    let stats = Arc::new(Stats::new());
    let mut subs = Subscribers::default();
    eprintln!("churn: {} base connections, then {} loops for {:?}", a.base, a.workers, a.duration);
    let target = |i: usize| Target {
        server: nodes[i % nodes.len()],
        local: sources.get(i),
        token: token(&gw, &format!("base-{i}")),
        channel: Some(format!("bench:base:{}", i % 10)),
    };
    let base = open_many(0, a.base, a.gateway.connect_concurrency, target, &stats, &mut subs, true).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (rss0, gauge0) = (gw.rss_kib(), gw.metric_sum("crier_connections").await);
    let (g0, s0) = (gw.cpu_secs(), procfs::self_cpu_secs());

    let cycles = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + a.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..a.workers {
        let (gw, cycles, nodes, sources) = (gw.clone(), cycles.clone(), nodes.clone(), sources.clone());
        let max = a.max_cycles;
        tasks.spawn(async move {
            let tok = token(&gw, &format!("churn-{w}"));
            let channel = format!("bench:churn:{w}");
            let (mut hs, mut cyc) = (new_histogram(), new_histogram());
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut k = 0usize;
            while Instant::now() < deadline && cycles.fetch_add(1, Ordering::Relaxed) < max {
                let t0 = Instant::now();
                let server = nodes[(w + k) % nodes.len()];
                k += 1;
                let r = async {
                    let mut ws = connect(server, sources.get(w), &tok).await?;
                    hs.saturating_record((t0.elapsed().as_micros() as u64).max(1));
                    subscribe(&mut ws, &channel).await?;
                    ws.close(None).await.map_err(|e| format!("close {e}"))?;
                    // Read until the server's close answer and the end of the stream.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async { while ws.next().await.is_some() {} })
                        .await;
                    Ok::<_, String>(())
                }
                .await;
                match r {
                    Ok(()) => {
                        cyc.saturating_record((t0.elapsed().as_micros() as u64).max(1));
                    }
                    Err(e) => *errors.entry(e).or_default() += 1,
                }
            }
            (hs, cyc, errors)
        });
    }
    let (mut hs, mut cyc) = (new_histogram(), new_histogram());
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(r) = tasks.join_next().await {
        if let Ok((h, c, e)) = r {
            let _ = hs.add(&h);
            let _ = cyc.add(&c);
            for (k, v) in e {
                *errors.entry(k).or_default() += v;
            }
        }
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    let (g1, s1) = (gw.cpu_secs(), procfs::self_cpu_secs());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss1, gauge1) = (gw.rss_kib(), gw.metric_sum("crier_connections").await);
    let done = cyc.len();
    let gateway_cpu_s = g0.zip(g1).map(|(a, b)| b - a);
    let results = Results {
        cycles: done,
        cycles_per_s: done as f64 / elapsed_s,
        handshake_latency: Latency::from_histogram(&hs),
        cycle_latency: Latency::from_histogram(&cyc),
        gateway_cpu_us_per_cycle: gateway_cpu_s.filter(|_| done > 0).map(|c| c * 1e6 / done as f64),
        gateway_cpu_s,
        generator_cpu_s: s1 - s0,
        gateway_rss_before_kib: rss0,
        gateway_rss_after_kib: rss1,
        connections_gauge_before: gauge0,
        connections_gauge_after: gauge1,
        base_connections_ended: stats.ended_total(),
        errors,
        elapsed_s,
        base,
    };
    let mut t = Table::new(
        format!("churn: {} loops over {} base connections", a.workers, results.base.connected),
        vec!["value".into()],
    );
    t.row("cycles (connect+subscribe+close)", vec![int(results.cycles as f64)]);
    t.row("cycles/s", vec![int(results.cycles_per_s)]);
    t.row("errors", vec![int(results.errors.values().sum::<u64>() as f64)]);
    t.row(
        "handshake p50 / p99 ms",
        vec![format!("{:.2} / {:.2}", results.handshake_latency.p50_ms, results.handshake_latency.p99_ms)],
    );
    t.row(
        "cycle p50 / p99 ms",
        vec![format!("{:.2} / {:.2}", results.cycle_latency.p50_ms, results.cycle_latency.p99_ms)],
    );
    t.row("gateway CPU s", vec![opt_f(results.gateway_cpu_s, 2)]);
    t.row("gateway CPU µs per cycle", vec![opt_f(results.gateway_cpu_us_per_cycle, 0)]);
    t.row("generator CPU s", vec![format!("{:.2}", results.generator_cpu_s)]);
    t.row(
        "gateway RSS before / after KiB",
        vec![format!("{} / {}", kib(results.gateway_rss_before_kib), kib(results.gateway_rss_after_kib))],
    );
    t.row(
        "crier_connections before / after",
        vec![format!("{} / {}", opt_f(results.connections_gauge_before, 0), opt_f(results.connections_gauge_after, 0))],
    );
    t.row("base connections ended", vec![int(results.base_connections_ended as f64)]);
    let mut report = base_report(
        "churn",
        &gw,
        &a.gateway,
        json!({"base": a.base, "workers": a.workers, "duration_s": a.duration.as_secs_f64(), "max_cycles": a.max_cycles}),
        machine,
    );
    if !results.errors.is_empty() {
        report.notes.push(format!("errors: {:?}", results.errors));
    }
    report.results = serde_json::to_value(&results)?;
    subs.abort_all();
    drop(tasks);
    if let Ok(gw) = Arc::try_unwrap(gw) {
        gw.stop(a.gateway.stop_grace).await;
    }
    Ok(Outcome { report, tables: vec![t] })
}
