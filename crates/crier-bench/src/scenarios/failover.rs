//! `failover`: subscribers built on the project's Rust client (`crier-client`: reconnect with
//! backoff, recovery, dedupe by offset) spread over two nodes sharing a redis-server, each client
//! knowing both nodes; a REST publisher on node 1 at `--rate`; node 0 is SIGKILLed mid-run.
//! Reports how long node 0's clients took to be subscribed again on node 1 (recovered), and
//! whether any subscriber lost, duplicated or reordered an acknowledged message.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use crier_client::{Client, Event};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::{Outcome, base_report, token};
use crate::cli::FailoverArgs;
use crate::gateway::Gateway;
use crate::procfs;
use crate::report::{Table, int};
use crate::stats::percentile;

const CHANNEL: &str = "bench:failover";

/// What one subscriber saw.
#[derive(Default)]
struct Seen {
    offsets: Vec<u64>,
    gaps: u64,
    /// When its subscription was acknowledged again after the first time (the recovery).
    resubscribed_at: Option<Instant>,
    recovered: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Results {
    clients: usize,
    clients_moved: usize,
    clients_resumed: usize,
    resume_ms_p50: Option<f64>,
    resume_ms_p99: Option<f64>,
    resume_ms_max: Option<f64>,
    recovered_true: usize,
    publishes_acked: usize,
    deliveries: u64,
    lost: u64,
    duplicates: u64,
    out_of_order: u64,
    gaps_reported: u64,
    clients_unfinished: usize,
}

pub async fn run(a: FailoverArgs) -> anyhow::Result<Outcome> {
    let machine = procfs::machine();
    if !a.gateway.url.is_empty() {
        bail!("failover kills a node: it starts its own (no --url)");
    }
    let mut gw = Gateway::new(&a.gateway, 2, true).await?;
    let ws: Vec<String> = gw.nodes.iter().map(|n| format!("ws://{}/ws", n.addr)).collect();
    eprintln!("failover: {} crier-client subscribers over 2 nodes, publishing {}/s on node 1", a.clients, a.rate);

    let mut clients = Vec::with_capacity(a.clients);
    let mut seen: Vec<Arc<Mutex<Seen>>> = Vec::with_capacity(a.clients);
    let mut readers = Vec::with_capacity(a.clients);
    for i in 0..a.clients {
        let c = Client::builder(ws[i % 2].clone())
            .also_url(ws[(i + 1) % 2].clone())
            .token(token(&gw, &format!("failover-{i}")))
            .backoff(a.backoff.base, a.backoff.cap)
            .connect()?;
        let mut sub = c.subscribe(CHANNEL);
        match tokio::time::timeout(Duration::from_secs(20), sub.next()).await {
            Ok(Some(Event::Subscribed { .. })) => {}
            other => bail!("subscriber {i} was not subscribed: {other:?}"),
        }
        let s = Arc::new(Mutex::new(Seen::default()));
        let s2 = s.clone();
        readers.push(tokio::spawn(async move {
            while let Some(ev) = sub.next().await {
                let mut s = s2.lock().unwrap_or_else(|e| e.into_inner());
                match ev {
                    Event::Message(m) => {
                        s.offsets.push(m.offset);
                        if m.data == "last" {
                            return;
                        }
                    }
                    Event::Gap(_) => s.gaps += 1,
                    Event::Subscribed { recovered, .. } => {
                        s.resubscribed_at.get_or_insert_with(Instant::now);
                        s.recovered = recovered;
                    }
                    Event::Ended(_) => return,
                    Event::Join(_) | Event::Leave(_) => {}
                }
            }
        }));
        clients.push(c);
        seen.push(s);
    }

    // The publisher, on the node that survives.
    let acked: Arc<Mutex<Vec<u64>>> = Default::default();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let url = format!("http://{}/api/v1/publish", gw.nodes[1].addr);
    let (key, acked2, rate) = (gw.api_key.clone(), acked.clone(), a.rate.max(1.0));
    let publisher = tokio::spawn(async move {
        let http = reqwest::Client::new();
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        let mut i = 0u64;
        loop {
            tick.tick().await;
            let last = *stop_rx.borrow();
            let data = if last { json!("last") } else { json!(i) };
            let r = http.post(&url).bearer_auth(&key).json(&json!({"channel": CHANNEL, "data": data})).send().await;
            if let Ok(r) = r
                && r.status().is_success()
                && let Ok(v) = r.json::<Value>().await
                && let Some(o) = v["offset"].as_u64()
            {
                acked2.lock().unwrap_or_else(|e| e.into_inner()).push(o);
                if last {
                    return true;
                }
            } else if last {
                return false;
            }
            i += 1;
        }
    });

    tokio::time::sleep(a.before).await;
    let killed_at = Instant::now();
    gw.kill_node(0).await;
    eprintln!("  SIGKILLed node 0 ({})", ws[0]);
    let moved: Vec<usize> = (0..a.clients).filter(|i| i % 2 == 0).collect();
    let deadline = killed_at + Duration::from_secs(60);
    while Instant::now() < deadline
        && !moved.iter().all(|&i| seen[i].lock().unwrap_or_else(|e| e.into_inner()).resubscribed_at.is_some())
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(a.after).await;
    let _ = stop_tx.send(true);
    let last_published = publisher.await.unwrap_or(false);
    let wait_until = Instant::now() + Duration::from_secs(30);
    let mut unfinished = 0;
    for r in readers {
        if tokio::time::timeout_at(wait_until, r).await.is_err() {
            unfinished += 1;
        }
    }

    let acked = acked.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let (mut lost, mut duplicates, mut out_of_order, mut gaps, mut deliveries) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut resume_ms = Vec::new();
    let mut recovered_true = 0;
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().unwrap_or_else(|e| e.into_inner());
        deliveries += s.offsets.len() as u64;
        gaps += s.gaps;
        out_of_order += s.offsets.windows(2).filter(|w| w[1] <= w[0]).count() as u64;
        let mut unique = s.offsets.clone();
        unique.sort_unstable();
        unique.dedup();
        duplicates += (s.offsets.len() - unique.len()) as u64;
        let first = s.offsets.first().copied().unwrap_or(u64::MAX);
        lost += acked.iter().filter(|o| **o >= first && unique.binary_search(o).is_err()).count() as u64;
        if i % 2 == 0
            && let Some(at) = s.resubscribed_at
        {
            resume_ms.push(at.saturating_duration_since(killed_at).as_secs_f64() * 1000.0);
            if s.recovered == Some(true) {
                recovered_true += 1;
            }
        }
    }
    resume_ms.sort_by(f64::total_cmp);
    let results = Results {
        clients: a.clients,
        clients_moved: moved.len(),
        clients_resumed: resume_ms.len(),
        resume_ms_p50: percentile(&resume_ms, 0.5),
        resume_ms_p99: percentile(&resume_ms, 0.99),
        resume_ms_max: resume_ms.last().copied(),
        recovered_true,
        publishes_acked: acked.len(),
        deliveries,
        lost,
        duplicates,
        out_of_order,
        gaps_reported: gaps,
        clients_unfinished: unfinished,
    };

    let ms = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.0}"));
    let mut t = Table::new("failover: node 0 SIGKILLed, its clients resume on node 1", vec!["value".into()]);
    t.row("subscribers (crier-client)", vec![int(a.clients as f64)]);
    t.row("moved to node 1 / resubscribed", vec![format!("{} / {}", moved.len(), resume_ms.len())]);
    t.row("  of which recovered:true", vec![int(recovered_true as f64)]);
    t.row("resume after kill p50 (ms)", vec![ms(results.resume_ms_p50)]);
    t.row("resume after kill p99 (ms)", vec![ms(results.resume_ms_p99)]);
    t.row("resume after kill max (ms)", vec![ms(results.resume_ms_max)]);
    t.row("publishes acknowledged", vec![int(acked.len() as f64)]);
    t.row("deliveries", vec![int(deliveries as f64)]);
    t.row("lost / duplicated / out of order", vec![format!("{lost} / {duplicates} / {out_of_order}")]);
    t.row("gaps reported", vec![int(gaps as f64)]);

    let mut report = base_report(
        "failover",
        &gw,
        &a.gateway,
        json!({"clients": a.clients, "rate": a.rate, "before_s": a.before.as_secs_f64(), "after_s": a.after.as_secs_f64(),
               "backoff_base_ms": a.backoff.base.as_millis() as u64, "backoff_cap_ms": a.backoff.cap.as_millis() as u64}),
        machine,
    );
    report.notes.push(
        "resume = from the SIGKILL to the client's subscription being acknowledged again on node 1 \
         (detection + full-jitter backoff + handshake + recovery); node 1's clients never move"
            .into(),
    );
    if !last_published {
        report.notes.push("the final publish failed: deliveries may be short".into());
    }
    if unfinished > 0 {
        report.notes.push(format!("{unfinished} subscribers did not receive the final message within 30 s"));
    }
    report.results = serde_json::to_value(&results)?;
    drop(clients);
    gw.stop(a.gateway.stop_grace).await;
    Ok(Outcome { report, tables: vec![t] })
}
