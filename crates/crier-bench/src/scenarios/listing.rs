//! `listing`: `GET /api/v1/channels` over a large cluster. `--nodes` nodes sharing one
//! redis-server hold `--channels` active channels (each subscribed once, `--per-connection`
//! subscriptions per WebSocket connection, connections spread round-robin over the nodes);
//! once every node's counts are mirrored into Redis, the first page (`limit` 100), a page by
//! prefix and a page deep behind a cursor are each timed `--samples` times from node 0 over
//! one keep-alive connection. The issue's target: 100,000 channels over 2 nodes, first page
//! ≤ 100 ms.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use super::{Outcome, base_report, kib, token};
use crate::cli::ListingArgs;
use crate::clients::{SourceAddrs, connect};
use crate::gateway::Gateway;
use crate::procfs;
use crate::report::{Table, int, opt_f};

#[derive(Debug, Serialize)]
struct Timing {
    query: String,
    samples: usize,
    returned: usize,
    first_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Results {
    channels: usize,
    connections: usize,
    subscribe_s: f64,
    mirrored_s: f64,
    timings: Vec<Timing>,
    gateway_rss_kib: Option<u64>,
}

fn name(i: usize) -> String {
    format!("bench:ch:{i:06}")
}

/// Opens connection `k` and subscribes it to its channels, the frames pipelined (every
/// subscribe sent, then the acks read); the connection is then read until it ends.
async fn open(
    server: std::net::SocketAddr,
    local: std::net::IpAddr,
    token: String,
    channels: std::ops::Range<usize>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mut ws = connect(server, local, &token).await?;
    let n = channels.len();
    for (id, i) in channels.enumerate() {
        let frame = format!(r#"{{"type":"subscribe","id":{},"channel":"{}"}}"#, id + 1, name(i));
        ws.feed(Message::text(frame)).await.map_err(|e| e.to_string())?;
    }
    ws.flush().await.map_err(|e| e.to_string())?;
    let mut acks = 0;
    let wait = async {
        while acks < n {
            match ws.next().await {
                Some(Ok(Message::Text(t))) if t.as_str().starts_with(r#"{"type":"ack""#) => acks += 1,
                Some(Ok(Message::Text(t))) if t.as_str().starts_with(r#"{"type":"error""#) => {
                    return Err(format!("subscribe refused: {:.100}", t.as_str()));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("closed before every ack".into()),
            }
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(120), wait).await.map_err(|_| "subscribe timeout".to_string())??;
    // Keep reading: WebSocket pings are answered while reading.
    Ok(tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} }))
}

async fn page(http: &reqwest::Client, url: &str, key: &str) -> anyhow::Result<Value> {
    let r = http.get(url).bearer_auth(key).send().await?;
    let status = r.status();
    let body: Value = r.json().await?;
    anyhow::ensure!(status.is_success(), "GET {url}: {status} {body}");
    Ok(body)
}

pub async fn run(a: ListingArgs) -> anyhow::Result<Outcome> {
    let machine = procfs::machine();
    let mut gargs = a.gateway.clone();
    gargs.crier_arg.push(format!("--max-subscriptions-per-connection={}", a.per_connection));
    let gw = Gateway::new(&gargs, a.nodes.max(1), true).await?;
    let nodes: Vec<_> = gw.nodes.iter().map(|n| n.addr).collect();
    let sources = SourceAddrs::new(a.gateway.source_addrs);
    let per = a.per_connection.max(1);
    let connections = a.channels.div_ceil(per);
    eprintln!(
        "listing: {} channels over {} node(s), {per} per connection ({connections} connections)",
        a.channels,
        nodes.len()
    );

    let started = Instant::now();
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(a.gateway.connect_concurrency.max(1)));
    let mut opening = Vec::with_capacity(connections);
    for k in 0..connections {
        let (server, local, tok) = (nodes[k % nodes.len()], sources.get(k), token(&gw, &format!("lister-{k}")));
        let range = k * per..((k + 1) * per).min(a.channels);
        let sem = sem.clone();
        opening.push(tokio::spawn(async move {
            let _permit = sem.acquire_owned().await;
            open(server, local, tok, range).await
        }));
    }
    let mut readers = Vec::with_capacity(connections);
    for o in opening {
        match o.await {
            Ok(Ok(h)) => readers.push(h),
            Ok(Err(e)) => anyhow::bail!("a connection failed: {e}"),
            Err(e) => anyhow::bail!("a connection task failed: {e}"),
        }
    }
    let subscribe_s = started.elapsed().as_secs_f64();
    eprintln!("  subscribed in {subscribe_s:.1} s; waiting for every node's counts in the listing");

    let http = reqwest::Client::new();
    let base = format!("http://{}/api/v1/channels", nodes[0]);
    // Every node's last channel listed: each node's full report is written in one pass.
    let lasts: Vec<usize> = (0..nodes.len())
        .filter_map(|n| (0..connections).rev().find(|k| k % nodes.len() == n))
        .map(|k| ((k + 1) * per).min(a.channels) - 1)
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut all = true;
        for i in &lasts {
            let p = page(&http, &format!("{base}?prefix={}&limit=1", name(*i)), &gw.api_key).await?;
            all &= p["channels"].as_array().is_some_and(|c| c.len() == 1);
        }
        if all {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the listing did not show every node's channels within 120 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mirrored_s = started.elapsed().as_secs_f64() - subscribe_s;

    let queries = [
        ("first page (limit 100)".to_owned(), format!("{base}?limit=100")),
        ("prefix bench:ch:05 (limit 100)".to_owned(), format!("{base}?prefix=bench:ch:05&limit=100")),
        (
            format!("cursor {} (limit 100)", name(a.channels / 2)),
            format!("{base}?limit=100&cursor={}", name(a.channels / 2)),
        ),
        ("limit 1000".to_owned(), format!("{base}?limit=1000")),
    ];
    let mut timings = Vec::new();
    for (label, url) in &queries {
        let mut ms = Vec::with_capacity(a.samples);
        let mut returned = 0;
        for _ in 0..a.samples.max(1) {
            let t = Instant::now();
            let p = page(&http, url, &gw.api_key).await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            returned = p["channels"].as_array().map_or(0, Vec::len);
        }
        let first_ms = ms[0];
        ms.sort_by(f64::total_cmp);
        let pct = |q: f64| ms[((ms.len() as f64 * q).ceil() as usize).clamp(1, ms.len()) - 1];
        timings.push(Timing {
            query: label.clone(),
            samples: ms.len(),
            returned,
            first_ms,
            p50_ms: pct(0.5),
            p99_ms: pct(0.99),
            max_ms: ms[ms.len() - 1],
        });
    }
    let rss = gw.rss_kib();

    let mut table = Table::new(
        format!(
            "GET /api/v1/channels, {} active channels over {} node(s) + redis",
            int(a.channels as f64),
            nodes.len()
        ),
        vec!["returned".into(), "first ms".into(), "p50 ms".into(), "p99 ms".into(), "max ms".into()],
    );
    for t in &timings {
        table.row(
            &t.query,
            vec![
                int(t.returned as f64),
                opt_f(Some(t.first_ms), 2),
                opt_f(Some(t.p50_ms), 2),
                opt_f(Some(t.p99_ms), 2),
                opt_f(Some(t.max_ms), 2),
            ],
        );
    }
    let mut setup = Table::new("setup", vec!["value".into()]);
    setup.row("connections", vec![int(connections as f64)]);
    setup.row("subscribe time (s)", vec![opt_f(Some(subscribe_s), 1)]);
    setup.row("until listed (s)", vec![opt_f(Some(mirrored_s), 1)]);
    setup.row("gateway RSS, all nodes (KiB)", vec![kib(rss)]);

    let results = Results { channels: a.channels, connections, subscribe_s, mirrored_s, timings, gateway_rss_kib: rss };
    let params = json!({"channels": a.channels, "nodes": nodes.len(), "per_connection": per, "samples": a.samples});
    let mut report = base_report("listing", &gw, &a.gateway, params, machine);
    report.results = serde_json::to_value(&results)?;
    report.notes.push(
        "each node mirrors its changed counts into Redis once a second; timings are from node 0, one keep-alive connection"
            .into(),
    );
    for r in readers {
        r.abort();
    }
    gw.stop(a.gateway.stop_grace).await;
    Ok(Outcome { report, tables: vec![table, setup] })
}
