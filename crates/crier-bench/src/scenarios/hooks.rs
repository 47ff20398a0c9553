//! `hooks`: webhook events (`channel_occupied` / `channel_vacated`) through `--nodes` nodes
//! sharing one redis-server, into a local backend the bench runs itself (a minimal HTTP/1.1
//! server on loopback that acknowledges every batch with a 204 and records the events' ids).
//!
//! `--connections` WebSockets per node each keep `--window` distinct channels in flight: a
//! subscribe to a fresh channel `bench:h:<conn>:<k>` (its first subscriber in the cluster: one
//! `channel_occupied`), and, once acknowledged, its unsubscribe (the last: one
//! `channel_vacated`), then the next channel. After `--duration` the loops stop subscribing and
//! unsubscribe what they hold; the bench then waits until the backend has every event.
//!
//! Reports the events produced per second (2 × the subscribes acknowledged), the events the
//! backend took per second, distinct ids and duplicates, and `crier_webhook_queue_length`
//! (summed over the nodes) sampled every second: a queue that does not grow over the run is
//! a delivery keeping up with the production.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{Outcome, base_report, token};
use crate::cli::HooksArgs;
use crate::clients::{SourceAddrs, connect};
use crate::gateway::Gateway;
use crate::procfs;
use crate::report::{Table, int, opt_f};

/// What the backend saw.
#[derive(Default)]
struct Seen {
    ids: Mutex<HashSet<String>>,
    events: AtomicU64,
    batches: AtomicU64,
    bad: AtomicU64,
}

#[derive(Debug, Serialize)]
struct Sample {
    t_s: f64,
    produced: u64,
    delivered: u64,
    queue: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Results {
    connections: usize,
    errors: u64,
    run_s: f64,
    produced: u64,
    produced_per_s: f64,
    delivered_in_run: u64,
    delivered_per_s_in_run: f64,
    delivered_total: u64,
    distinct_ids: u64,
    duplicates: u64,
    batches: u64,
    drain_s: f64,
    queue_max: Option<f64>,
    queue_first_half_mean: Option<f64>,
    queue_second_half_mean: Option<f64>,
    gateway_cpu_s: Option<f64>,
    redis_cpu_s: Option<f64>,
    generator_cpu_s: f64,
    samples: Vec<Sample>,
}

pub async fn run(mut a: HooksArgs) -> anyhow::Result<Outcome> {
    let machine = procfs::machine();
    let seen = Arc::new(Seen::default());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let backend = listener.local_addr()?;
    let on_body: crate::backend::Handler = {
        let seen = seen.clone();
        Arc::new(move |body: &[u8]| record(body, &seen))
    };
    let server =
        tokio::spawn(crate::backend::serve(listener, Arc::new(crate::backend::no_content()), Duration::ZERO, on_body));
    let dir = std::env::temp_dir().join(format!("crier-bench-hooks-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("hooks.toml");
    std::fs::write(
        &file,
        format!(
            "[webhooks]\nurl = \"http://{backend}/events\"\nsecret = \"crier-bench-webhook-secret-0123456789abcdef\"\n\
             events = [\"channel_occupied\", \"channel_vacated\"]\nbatch = {}\nmax_queue = 1000000\n",
            a.batch
        ) + if a.no_presence { "[namespaces.bench]\npresence = false\n" } else { "" },
    )?;
    a.gateway.crier_arg.push(format!("--config={}", file.display()));
    let gw = Arc::new(Gateway::new(&a.gateway, a.nodes, true).await?);
    let nodes: Vec<_> = gw.nodes.iter().map(|n| n.addr).collect();
    let sources = SourceAddrs::new(a.gateway.source_addrs);
    let total = a.connections * nodes.len();
    eprintln!(
        "hooks: {total} connections on {} nodes, {} channels in flight each, for {:?}",
        nodes.len(),
        a.window,
        a.duration
    );
    let mut conns = Vec::with_capacity(total);
    for i in 0..total {
        let ws = connect(nodes[i % nodes.len()], sources.get(i), &token(&gw, &format!("hooks-{i}"))).await;
        conns.push(ws.map_err(|e| anyhow::anyhow!("connection {i}: {e}"))?);
    }
    let subscribed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let (g0, r0, s0) = (gw.cpu_secs(), gw.redis_cpu_secs(), procfs::self_cpu_secs());
    let started = Instant::now();
    let deadline = started + a.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut ws) in conns.into_iter().enumerate() {
        let (subscribed, errors, window) = (subscribed.clone(), errors.clone(), a.window.max(1) as u64);
        tasks.spawn(async move {
            // Frame id 2k+1 subscribes channel k, 2k+2 unsubscribes it.
            let frame = |id: u64| {
                let (op, k) = if id % 2 == 1 { ("subscribe", id / 2) } else { ("unsubscribe", id / 2 - 1) };
                Message::text(format!(r#"{{"type":"{op}","id":{id},"channel":"bench:h:{i}:{k}"}}"#))
            };
            let mut next = 0u64;
            let mut held = 0u64;
            for _ in 0..window {
                if ws.send(frame(2 * next + 1)).await.is_err() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                next += 1;
                held += 1;
            }
            while held > 0 {
                let Some(Ok(m)) = ws.next().await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                let Message::Text(t) = m else { continue };
                let Ok(v) = serde_json::from_str::<serde_json::Value>(t.as_str()) else { continue };
                let id = v["id"].as_u64().unwrap_or(0);
                let send = match v["type"].as_str() {
                    Some("ack") if id % 2 == 1 => {
                        subscribed.fetch_add(1, Ordering::Relaxed);
                        Some(id + 1)
                    }
                    Some("ack") if id > 0 => {
                        held -= 1;
                        (Instant::now() < deadline).then(|| {
                            held += 1;
                            next += 1;
                            2 * (next - 1) + 1
                        })
                    }
                    Some("error") => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        // Refused: count it as released (no event to wait for).
                        if id % 2 == 1 {
                            held -= 1;
                        }
                        None
                    }
                    _ => None,
                };
                if let Some(id) = send
                    && ws.send(frame(id)).await.is_err()
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            let _ = ws.close(None).await;
        });
    }
    // Samples every second until the loops are done and every event is delivered.
    let mut samples = Vec::new();
    let mut delivered_in_run = 0;
    let mut run_s = a.duration.as_secs_f64();
    let mut loops_done_at: Option<Instant> = None;
    let give_up = Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let produced = 2 * subscribed.load(Ordering::Relaxed);
        let delivered = seen.ids.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
        let queue = gw.metric_sum("crier_webhook_queue_length").await;
        let t_s = started.elapsed().as_secs_f64();
        eprintln!("  {t_s:5.1}s produced {produced:8} delivered {delivered:8} queue {queue:?}");
        samples.push(Sample { t_s, produced, delivered, queue });
        if loops_done_at.is_none() {
            while tasks.try_join_next().is_some() {}
            if tasks.is_empty() {
                loops_done_at = Some(Instant::now());
                run_s = t_s;
                delivered_in_run = delivered;
            }
        }
        if let Some(at) = loops_done_at
            && (delivered >= produced || at.elapsed() > give_up)
        {
            break;
        }
        if started.elapsed() > a.duration + give_up * 2 {
            break;
        }
    }
    let drain_s = loops_done_at.map_or(0.0, |at| at.elapsed().as_secs_f64());
    let (g1, r1, s1) = (gw.cpu_secs(), gw.redis_cpu_secs(), procfs::self_cpu_secs());
    let produced = 2 * subscribed.load(Ordering::Relaxed);
    let distinct = seen.ids.lock().unwrap_or_else(|e| e.into_inner()).len() as u64;
    let delivered_total = seen.events.load(Ordering::Relaxed);
    let in_run: Vec<f64> = samples.iter().filter(|s| s.t_s <= run_s).filter_map(|s| s.queue).collect();
    let mean = |xs: &[f64]| (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64);
    let half = in_run.len() / 2;
    let results = Results {
        connections: total,
        errors: errors.load(Ordering::Relaxed) + seen.bad.load(Ordering::Relaxed),
        run_s,
        produced,
        produced_per_s: produced as f64 / run_s,
        delivered_in_run,
        delivered_per_s_in_run: delivered_in_run as f64 / run_s,
        delivered_total,
        distinct_ids: distinct,
        duplicates: delivered_total.saturating_sub(distinct),
        batches: seen.batches.load(Ordering::Relaxed),
        drain_s,
        queue_max: samples.iter().filter_map(|s| s.queue).reduce(f64::max),
        queue_first_half_mean: mean(&in_run[..half]),
        queue_second_half_mean: mean(&in_run[half..]),
        gateway_cpu_s: g0.zip(g1).map(|(a, b)| b - a),
        redis_cpu_s: r0.zip(r1).map(|(a, b)| b - a),
        generator_cpu_s: s1 - s0,
        samples,
    };
    let mut t = Table::new(
        format!("hooks: {} connections × {} channels in flight on {} nodes + redis", total, a.window, nodes.len()),
        vec!["value".into()],
    );
    t.row("run s", vec![format!("{:.1}", results.run_s)]);
    t.row("events produced", vec![int(results.produced as f64)]);
    t.row("events produced /s", vec![int(results.produced_per_s)]);
    t.row("events delivered /s during the run", vec![int(results.delivered_per_s_in_run)]);
    t.row("distinct ids delivered / duplicates", vec![format!("{} / {}", results.distinct_ids, results.duplicates)]);
    t.row("batches", vec![int(results.batches as f64)]);
    t.row("drain after the run s", vec![format!("{:.1}", results.drain_s)]);
    t.row("queue length max", vec![opt_f(results.queue_max, 0)]);
    t.row(
        "queue mean first / second half",
        vec![format!("{} / {}", opt_f(results.queue_first_half_mean, 0), opt_f(results.queue_second_half_mean, 0))],
    );
    t.row("gateway CPU s (all nodes)", vec![opt_f(results.gateway_cpu_s, 2)]);
    t.row("redis CPU s", vec![opt_f(results.redis_cpu_s, 2)]);
    t.row("generator CPU s", vec![format!("{:.2}", results.generator_cpu_s)]);
    t.row("errors", vec![int(results.errors as f64)]);
    let mut report = base_report(
        "hooks",
        &gw,
        &a.gateway,
        json!({"nodes": a.nodes, "connections_per_node": a.connections, "window": a.window,
               "duration_s": a.duration.as_secs_f64(), "batch": a.batch,
               "presence": !a.no_presence}),
        machine,
    );
    if results.distinct_ids < results.produced {
        report.notes.push(format!("{} events never delivered", results.produced - results.distinct_ids));
    }
    report.results = serde_json::to_value(&results)?;
    server.abort();
    let _ = std::fs::remove_dir_all(&dir);
    if let Ok(gw) = Arc::try_unwrap(gw) {
        gw.stop(a.gateway.stop_grace).await;
    }
    Ok(Outcome { report, tables: vec![t] })
}

fn record(body: &[u8], seen: &Seen) {
    #[derive(serde::Deserialize)]
    struct Event {
        id: String,
    }
    #[derive(serde::Deserialize)]
    struct Body {
        events: Vec<Event>,
    }
    match serde_json::from_slice::<Body>(body) {
        Ok(b) => {
            seen.batches.fetch_add(1, Ordering::Relaxed);
            seen.events.fetch_add(b.events.len() as u64, Ordering::Relaxed);
            let mut ids = seen.ids.lock().unwrap_or_else(|e| e.into_inner());
            for e in b.events {
                ids.insert(e.id);
            }
        }
        Err(_) => {
            seen.bad.fetch_add(1, Ordering::Relaxed);
        }
    }
}
