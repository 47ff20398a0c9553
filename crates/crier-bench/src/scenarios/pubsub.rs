//! `fanout`, `channels`, `cluster`: subscribers on channels, REST publishes stepped through rates.
//!
//! Per step: the publisher holds a rate for `--step-duration`, then the bench waits until every
//! expected delivery arrived (or `--drain-timeout` passes without progress). Expected deliveries
//! are, per accepted publish, the number of subscribers of its channel. The step's window runs
//! from the first publish to the later of the last publish and the last delivery; CPU figures are
//! deltas of `/proc/<pid>/stat` over the step.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use super::{Outcome, base_report, kib, token};
use crate::cli::{GatewayArgs, PublishArgs};
use crate::clients::{ConnectSummary, SourceAddrs, Subscribers, Target, open_many_over};
use crate::gateway::Gateway;
use crate::procfs;
use crate::publisher::{Published, Publisher};
use crate::report::{Table, int, opt_f};
use crate::stats::{Received, Stats};

/// What to run.
pub struct Plan {
    pub scenario: &'static str,
    pub nodes: usize,
    pub redis: bool,
    pub channels: usize,
    pub subscribers: usize,
    pub default_rates: Vec<f64>,
    /// The one channel's name instead of `bench:<scenario>` (with `channels` 1).
    pub channel: Option<String>,
    pub publish: PublishArgs,
    pub gateway: GatewayArgs,
}

#[derive(Debug, Serialize)]
struct Step {
    published: Published,
    expected: u64,
    received: Received,
    lost: i64,
    window_s: f64,
    deliveries_per_s: f64,
    /// Bytes the subscribers read off their sockets per message received (WebSocket frames,
    /// compressed or not; pings and other frames included).
    wire_bytes_per_delivery: Option<f64>,
    gateway_cpu_s: Option<f64>,
    /// Of which user / system (kernel: socket writes, epoll, wakeups).
    gateway_cpu_user_s: Option<f64>,
    gateway_cpu_sys_s: Option<f64>,
    gateway_cpu_by_node_s: Vec<Option<f64>>,
    gateway_cores: Option<f64>,
    deliveries_per_gateway_cpu_s: Option<f64>,
    generator_cpu_s: f64,
    redis_cpu_s: Option<f64>,
    connections_ended: u64,
    gateway_rss_kib: Option<u64>,
}

#[derive(Debug, Serialize)]
struct Results {
    connect: ConnectSummary,
    subscribers_per_channel_min: u64,
    subscribers_per_channel_max: u64,
    gateway_rss_before_kib: Option<u64>,
    gateway_rss_connected_kib: Option<u64>,
    steps: Vec<Step>,
}

fn channel_name(scenario: &str, channels: usize, i: usize) -> String {
    if channels == 1 { format!("bench:{scenario}") } else { format!("bench:{scenario}:{i}") }
}

pub async fn run(plan: Plan) -> anyhow::Result<Outcome> {
    let machine = procfs::machine();
    let rates = if plan.publish.rate.is_empty() { plan.default_rates.clone() } else { plan.publish.rate.clone() };
    anyhow::ensure!(rates.iter().all(|r| *r > 0.0), "--rate values must be positive");
    anyhow::ensure!(plan.channels > 0 && plan.subscribers > 0, "channels and subscribers must be positive");
    let gw = Gateway::new(&plan.gateway, plan.nodes, plan.redis).await?;
    let nodes: Vec<_> = gw.nodes.iter().map(|n| n.addr).collect();
    let channels: Vec<String> = match &plan.channel {
        Some(name) if plan.channels == 1 => vec![name.clone()],
        _ => (0..plan.channels).map(|i| channel_name(plan.scenario, plan.channels, i)).collect(),
    };
    let sources = SourceAddrs::new(plan.gateway.source_addrs);
    let stats = Arc::new(Stats::new());
    let mut subs = Subscribers::default();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss0 = gw.rss_kib();

    eprintln!(
        "{}: connecting {} subscribers to {} channel(s) on {} node(s)",
        plan.scenario,
        plan.subscribers,
        channels.len(),
        nodes.len()
    );
    let target = |i: usize| Target {
        server: nodes[i % nodes.len()],
        local: sources.get(i),
        token: token(&gw, &format!("sub-{i}")),
        channel: Some(channels[i % channels.len()].clone()),
    };
    let connect = open_many_over(
        plan.publish.transport,
        0,
        plan.subscribers,
        plan.gateway.connect_concurrency,
        target,
        &stats,
        &mut subs,
        true,
    )
    .await;
    let mut per_channel = vec![0u64; channels.len()];
    for &i in &connect.ok_indices {
        per_channel[i % channels.len()] += 1;
    }
    eprintln!(
        "  {} connected, {} failed in {:.1}s ({:.0}/s)",
        connect.connected, connect.failed, connect.elapsed_s, connect.connects_per_s
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss1 = gw.rss_kib();

    let publisher = Publisher::with_payload(
        &nodes,
        &gw.api_key,
        plan.publish.payload_bytes,
        plan.publish.realistic_payload,
        plan.publish.publish_concurrency,
    )
    .spread(plan.publish.spread_publishes);
    // Warm-up (not measured): a second at the lowest rate, so connection pools and channel
    // entries exist before the first measured step.
    let warm = rates.iter().cloned().fold(f64::INFINITY, f64::min).max(1.0);
    let _ = publisher.run(&channels, warm, Duration::from_secs(1)).await;
    wait_quiet(&stats, Duration::from_millis(500)).await;
    let _ = stats.take();

    let mut steps = Vec::new();
    for &rate in &rates {
        eprintln!("  step: {rate} msg/s for {:?}", plan.publish.step_duration);
        run_hook(plan.publish.hook_step_start.as_deref(), &gw).await;
        let _ = stats.take();
        let ended0 = stats.ended_total();
        let (g0, s0, r0) = (gw.cpu_secs(), procfs::self_cpu_secs(), gw.redis_cpu_secs());
        let split0 = procfs::total_cpu_split(&gw.pids());
        let per_node0: Vec<_> = gw.nodes.iter().map(|n| n.pid.and_then(procfs::cpu_secs)).collect();
        let t0 = Instant::now();
        let wire0 = crate::clients::wire_bytes();
        let published = publisher.run(&channels, rate, plan.publish.step_duration).await;
        let publish_end = Instant::now();
        let expected: u64 = published.ok_per_channel.iter().zip(&per_channel).map(|(p, s)| p * s).sum();
        let last_progress = wait_for(&stats, expected, plan.publish.drain_timeout).await;
        let end = last_progress.max(publish_end);
        let (g1, s1, r1) = (gw.cpu_secs(), procfs::self_cpu_secs(), gw.redis_cpu_secs());
        let split1 = procfs::total_cpu_split(&gw.pids());
        let split = split0.zip(split1).map(|(a, b)| (b.0 - a.0, b.1 - a.1));
        let per_node1: Vec<_> = gw.nodes.iter().map(|n| n.pid.and_then(procfs::cpu_secs)).collect();
        let received = stats.take();
        let wire_bytes = crate::clients::wire_bytes() - wire0;
        run_hook(plan.publish.hook_step_end.as_deref(), &gw).await;
        let window_s = (end - t0).as_secs_f64();
        let gateway_cpu_s = g0.zip(g1).map(|(a, b)| b - a);
        steps.push(Step {
            lost: expected as i64 - received.received as i64,
            wire_bytes_per_delivery: (received.received > 0).then(|| wire_bytes as f64 / received.received as f64),
            deliveries_per_s: received.received as f64 / window_s.max(1e-9),
            gateway_cores: gateway_cpu_s.map(|c| c / window_s.max(1e-9)),
            deliveries_per_gateway_cpu_s: gateway_cpu_s.filter(|c| *c > 0.0).map(|c| received.received as f64 / c),
            gateway_cpu_s,
            gateway_cpu_user_s: split.map(|s| s.0),
            gateway_cpu_sys_s: split.map(|s| s.1),
            gateway_cpu_by_node_s: per_node0
                .iter()
                .zip(&per_node1)
                .map(|(a, b)| a.zip(*b).map(|(a, b)| b - a))
                .collect(),
            generator_cpu_s: s1 - s0,
            redis_cpu_s: r0.zip(r1).map(|(a, b)| b - a),
            connections_ended: stats.ended_total() - ended0,
            gateway_rss_kib: gw.rss_kib(),
            window_s,
            expected,
            received,
            published,
        });
    }

    let tables = vec![table(&plan, &connect, &steps, &gw)];
    let mut report = base_report(
        plan.scenario,
        &gw,
        &plan.gateway,
        json!({
            "nodes": nodes.len(), "channels": channels.len(), "subscribers": plan.subscribers,
            "rates": rates, "step_duration_s": plan.publish.step_duration.as_secs_f64(),
            "payload_bytes": plan.publish.payload_bytes, "realistic_payload": plan.publish.realistic_payload,
            "transport": plan.publish.transport, "publish_concurrency": plan.publish.publish_concurrency,
            "spread_publishes": plan.publish.spread_publishes,
            "source_addrs": sources.len(),
        }),
        machine,
    );
    if connect.failed > 0 {
        report.notes.push(format!("connect errors: {:?}", connect.errors));
    }
    if plan.publish.transport == crate::clients::Transport::WsDeflate {
        // What compress-once costs the gateway: one deflate per message (timed here, same code,
        // same build), whatever the number of subscribers.
        let frame = publisher.sample_frame(&channels[0]);
        let runs = 2000u32;
        let t = Instant::now();
        let mut out = 0usize;
        for _ in 0..runs {
            out = crier_protocol::ws::deflate(&frame).map_or(frame.len(), |z| z.len());
        }
        let us = t.elapsed().as_secs_f64() * 1e6 / f64::from(runs);
        let messages: u64 = steps.iter().map(|s| s.published.ok).sum();
        report.notes.push(format!(
            "deflate of one {}-byte message frame: {:.1} µs ({} bytes out, {:.0}%); the gateway compresses once per \
             message: {} messages ≈ {:.1} ms of gateway CPU for all {} subscribers",
            frame.len(),
            us,
            out,
            100.0 * out as f64 / frame.len() as f64,
            messages,
            us * messages as f64 / 1000.0,
            plan.subscribers
        ));
    }
    let ended = stats.ended();
    if !ended.is_empty() {
        report.notes.push(format!("connections ended by the server or the network: {ended:?}"));
    }
    report.results = serde_json::to_value(Results {
        subscribers_per_channel_min: per_channel.iter().copied().min().unwrap_or(0),
        subscribers_per_channel_max: per_channel.iter().copied().max().unwrap_or(0),
        gateway_rss_before_kib: rss0,
        gateway_rss_connected_kib: rss1,
        connect,
        steps,
    })?;
    subs.abort_all();
    gw.stop(plan.gateway.stop_grace).await;
    Ok(Outcome { report, tables })
}

/// Runs a step hook through `sh -c`, with the gateway PIDs in `CRIER_BENCH_PIDS`.
async fn run_hook(cmd: Option<&str>, gw: &Gateway) {
    let Some(cmd) = cmd else { return };
    let pids = gw.pids().iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ");
    let status = tokio::process::Command::new("sh").arg("-c").arg(cmd).env("CRIER_BENCH_PIDS", pids).status().await;
    if !status.as_ref().is_ok_and(|s| s.success()) {
        eprintln!("  hook `{cmd}` failed: {status:?}");
    }
}

/// Waits until `expected` messages were received since the last `take`, or until `quiet` passes
/// without any progress. Returns when the last message arrived.
async fn wait_for(stats: &Stats, expected: u64, quiet: Duration) -> Instant {
    let mut last = stats.received();
    let mut last_at = Instant::now();
    while last < expected && last_at.elapsed() < quiet {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = stats.received();
        if now != last {
            last = now;
            last_at = Instant::now();
        }
    }
    last_at
}

async fn wait_quiet(stats: &Stats, quiet: Duration) {
    let _ = wait_for(stats, u64::MAX, quiet).await;
}

fn table(plan: &Plan, connect: &ConnectSummary, steps: &[Step], gw: &Gateway) -> Table {
    let title = format!(
        "{}: {} subscribers ({} connected) on {} channel(s), {} node(s){}",
        plan.scenario,
        int(plan.subscribers as f64),
        int(connect.connected as f64),
        plan.channels,
        plan.nodes,
        if gw.redis.is_some() { " + redis" } else { "" }
    );
    let mut t = Table::new(title, steps.iter().map(|s| format!("{} msg/s", s.published.target_rate)).collect());
    let col = |f: &dyn Fn(&Step) -> String| steps.iter().map(f).collect::<Vec<_>>();
    t.row("published ok / failed", col(&|s| format!("{} / {}", s.published.ok, s.published.failed)));
    t.row("publish rate achieved /s", col(&|s| format!("{:.1}", s.published.achieved_rate)));
    t.row("publisher behind schedule", col(&|s| int(s.published.behind as f64)));
    t.row("deliveries expected", col(&|s| int(s.expected as f64)));
    t.row("deliveries received", col(&|s| int(s.received.received as f64)));
    t.row("lost (expected - received)", col(&|s| int(s.lost as f64)));
    t.row("gaps / duplicates seen", col(&|s| format!("{} / {}", s.received.gaps, s.received.duplicates)));
    t.row("deliveries/s", col(&|s| int(s.deliveries_per_s)));
    t.row("wire bytes per delivery", col(&|s| opt_f(s.wire_bytes_per_delivery, 0)));
    t.row("latency p50 ms", col(&|s| format!("{:.2}", s.received.latency.p50_ms)));
    t.row("latency p90 ms", col(&|s| format!("{:.2}", s.received.latency.p90_ms)));
    t.row("latency p99 ms", col(&|s| format!("{:.2}", s.received.latency.p99_ms)));
    t.row("latency p99.9 ms", col(&|s| format!("{:.2}", s.received.latency.p999_ms)));
    t.row("latency max ms", col(&|s| format!("{:.2}", s.received.latency.max_ms)));
    t.row("gateway CPU s", col(&|s| opt_f(s.gateway_cpu_s, 2)));
    t.row(
        "gateway CPU user / sys s",
        col(&|s| format!("{} / {}", opt_f(s.gateway_cpu_user_s, 2), opt_f(s.gateway_cpu_sys_s, 2))),
    );
    t.row("gateway cores busy", col(&|s| opt_f(s.gateway_cores, 2)));
    t.row(
        "deliveries per gateway CPU-s",
        col(&|s| s.deliveries_per_gateway_cpu_s.map(int).unwrap_or_else(|| "n/a".into())),
    );
    t.row("generator CPU s", col(&|s| format!("{:.2}", s.generator_cpu_s)));
    if gw.redis.is_some() {
        t.row("redis CPU s", col(&|s| opt_f(s.redis_cpu_s, 2)));
    }
    if plan.nodes > 1 {
        t.row(
            "gateway CPU s per node",
            col(&|s| s.gateway_cpu_by_node_s.iter().map(|c| opt_f(*c, 2)).collect::<Vec<_>>().join("/")),
        );
    }
    t.row("connections ended", col(&|s| int(s.connections_ended as f64)));
    t.row("gateway RSS KiB", col(&|s| kib(s.gateway_rss_kib)));
    t
}
