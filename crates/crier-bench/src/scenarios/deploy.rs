//! `deploy`: a rolling restart of every node under load, the way an operator deploys.
//!
//! Three nodes on one redis-server behind nginx running the shipped `deploy/nginx.conf`
//! (rendered for loopback by `deploy/local/render.py`, see [`crate::lb`]). `--clients`
//! subscribers built on `crier-client` — the project's own client: reconnect with the
//! documented full-jitter backoff, resubscribe with recovery from the last delivered position,
//! drop what it already delivered — all connect through nginx; each subscribes to a channel of its
//! own and to one of `--shared-channels` shared ones. A REST publisher sends `--rate` messages/s
//! through nginx (a `--shared-fraction` of them on the shared channels), each with an
//! idempotency key, retried until acknowledged. Then every node in turn gets SIGTERM (it drains
//! over `--drain`, closing its clients with 1012), exits, and a new process starts on the same
//! port; the next node is stopped only once the new one answers `/readyz` (and `--between` has
//! passed), as a Kubernetes rolling update with a readiness gate does.
//!
//! (~760 lines, one file: `deploy` and `scaleout` are one run — nodes, nginx, clients, publisher,
//! accounting, report — that reads top to bottom in the order the scenario happens.)
//!
//! Reported: messages lost (a subscriber's offsets skipped, or short of the last acknowledged
//! one), duplicates delivered to the application, per-outage time without a live subscription
//! (from the client leaving `connected` to both subscriptions acknowledged again), clients that
//! never came back, peak handshakes/s, CPU and RSS per node (sampled every second), `/healthz`
//! misses of nodes not being restarted, and the publisher's errors and lost publishes.
//!
//! `scaleout` ([`scaleout`]) uses the same clients, publisher and accounting: the third node is
//! killed before anyone connects (nginx still lists it: with `max_fails=0` a refused connection
//! makes nginx try the next upstream), the clients connect to the two others, then the third
//! starts and the nodes rebalance (`rebalance_rate`: the fuller nodes close their oldest
//! connections with 1012, a few per second). Reported besides: the time from the third node
//! being ready until every node holds within `--within` of the mean (each node's
//! `crier_connections`, polled every 250 ms, all clients connected), and the connections moved
//! (`crier_rebalanced_total`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use crier_client::{Client, Event, State};
use hdrhistogram::Histogram;
use serde::Serialize;
use serde_json::json;
use tokio::time::Instant;

use super::{Outcome, base_report, token};
use crate::cli::{DeployArgs, ScaleoutArgs};
use crate::gateway::{Gateway, scrape};
use crate::lb::{Nginx, find_nginx};
use crate::procfs;
use crate::report::{Table, int};
use crate::stats::{Latency, new_histogram, now_us, percentile};

const NODES: usize = 3;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One subscription's delivery record: O(1) however many messages.
#[derive(Default, Clone, Copy)]
struct Chan {
    last: u64,
    received: u64,
    duplicates: u64,
    skipped: u64,
    gaps_reported: u64,
    subscribed: bool,
    /// A recovery's replay runs up to this offset: those are not timed as live deliveries.
    replay_until: u64,
    /// The node of the connection this subscription was last acknowledged on (its deliveries'
    /// latency is that node's), read from the client's `welcome` once per subscription.
    node: Option<usize>,
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    chans: [Chan; 2],
    down_since: Option<Instant>,
    /// Subscriptions still to be acknowledged since `down_since`.
    pending: u8,
    outages_ms: Vec<f64>,
    /// Reconnections whose start this client's watcher did not observe (state changes coalesced).
    unmeasured: u32,
    ended: bool,
}

#[derive(Default)]
struct Acked {
    /// Highest acknowledged offset per shared channel, then per private channel.
    shared: Vec<u64>,
    private: Vec<u64>,
    count: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
struct NodePeaks {
    handshakes_per_s: f64,
    cpu_percent: f64,
    rss_mib: f64,
    healthz_misses: u64,
    drain_s: f64,
    start_to_ready_s: f64,
    /// Still running `--exit-grace` after SIGTERM: SIGKILLed (its last clients were not closed).
    killed_at_grace: bool,
    delivery_latency: Latency,
}

#[derive(Debug, Serialize)]
struct Results {
    clients: usize,
    shared_channels: usize,
    publishes_acked: u64,
    publish_errors_retried: u64,
    publishes_lost: u64,
    deliveries: u64,
    lost: u64,
    duplicates: u64,
    gaps_reported: u64,
    clients_not_back: usize,
    reconnections: u64,
    outages: usize,
    outages_unmeasured: u64,
    outage_ms_p50: Option<f64>,
    outage_ms_p99: Option<f64>,
    outage_ms_max: Option<f64>,
    nodes: Vec<NodePeaks>,
    nginx_cpu_percent_peak: f64,
    redis_cpu_percent_peak: f64,
    nginx_no_live_upstreams: usize,
    clients_per_node_at_end: Vec<usize>,
    duration_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    scaleout: Option<ScaleOut>,
}

/// What a scale-out run adds.
#[derive(Debug, Clone, Serialize)]
struct ScaleOut {
    within: f64,
    /// Start of the third node until it answered `/readyz`.
    join_start_to_ready_s: f64,
    /// From the third node ready until every node was within `within` of the mean (none: not
    /// within `--balance-timeout`).
    balanced_after_s: Option<f64>,
    /// Each node's `crier_connections` when balanced (or at the timeout).
    connections_at_balance: Vec<u64>,
    /// `crier_rebalanced_total` summed over the nodes at the end.
    moved: u64,
}

/// What happens to the cluster under load.
#[derive(Clone, Copy)]
enum Action {
    RollingRestart,
    ScaleOut { within: f64, balance_timeout: Duration },
}

/// Each node's `crier_connections` (none for a node that does not answer).
async fn node_connections(http: &reqwest::Client, addrs: &[std::net::SocketAddr]) -> Vec<Option<u64>> {
    let mut out = Vec::with_capacity(addrs.len());
    for &a in addrs {
        out.push(scrape(http, a, "crier_connections").await.map(|v| v as u64));
    }
    out
}

/// Every node within `within` of the mean, and every client placed.
pub(crate) fn balanced(counts: &[u64], clients: usize, within: f64) -> bool {
    let total: u64 = counts.iter().sum();
    if counts.is_empty() || (total as usize) < clients {
        return false;
    }
    let mean = total as f64 / counts.len() as f64;
    counts.iter().all(|&c| (c as f64 - mean).abs() <= within * mean)
}

/// A client's node index from its `welcome` (`bench-<i>`).
fn node_index(c: &Client) -> Option<usize> {
    c.welcome().and_then(|w| w.node.strip_prefix("bench-").and_then(|n| n.parse().ok()))
}

/// Follows one client: its two subscriptions and its connection state, in one task.
async fn follow(
    client: Client,
    mut subs: [crier_client::Subscription; 2],
    seen: Arc<Mutex<Seen>>,
    latency: Arc<Vec<Mutex<Histogram<u64>>>>,
) {
    let mut state = client.watch_state();
    let mut connections = client.connections();
    let [a, b] = &mut subs;
    loop {
        let (k, ev) = tokio::select! {
            biased;
            changed = state.changed() => {
                if changed.is_err() {
                    break;
                }
                let now = *state.borrow_and_update();
                let n = client.connections();
                let mut s = lock(&seen);
                if now != State::Connected {
                    if s.down_since.is_none() {
                        s.down_since = Some(Instant::now());
                        s.pending = 2;
                    }
                } else if n > connections.max(1) && s.down_since.is_none() {
                    // Connected again without this task seeing it leave: not timed.
                    s.unmeasured += 1;
                }
                connections = n;
                continue;
            }
            ev = a.next() => (0, ev),
            ev = b.next() => (1, ev),
        };
        let Some(ev) = ev else { break };
        let mut s = lock(&seen);
        match ev {
            Event::Message(m) => {
                let c = &mut s.chans[k];
                if m.offset <= c.last {
                    c.duplicates += 1;
                } else {
                    c.skipped += m.offset - c.last - 1;
                    c.last = m.offset;
                    c.received += 1;
                }
                let (live, node) = (m.offset > c.replay_until, c.node);
                drop(s);
                if live
                    && let Some(t) = m.data.get("t").and_then(|t| t.as_u64())
                    && let Some(h) = node.and_then(|i| latency.get(i))
                {
                    let _ = lock(h).record(now_us().saturating_sub(t).max(1));
                }
            }
            Event::Subscribed { offset, recovered, .. } => {
                let c = &mut s.chans[k];
                c.node = node_index(&client);
                if !c.subscribed {
                    // The first subscription: deliveries start after this position.
                    c.subscribed = true;
                    c.last = offset;
                } else if recovered == Some(true) {
                    c.replay_until = offset;
                } else if recovered == Some(false) {
                    // Recovery failed: messages up to `offset` were not replayed.
                    c.skipped += offset.saturating_sub(c.last);
                    c.last = c.last.max(offset);
                }
                if let Some(since) = s.down_since {
                    s.pending = s.pending.saturating_sub(1);
                    if s.pending == 0 {
                        s.outages_ms.push(since.elapsed().as_secs_f64() * 1000.0);
                        s.down_since = None;
                    }
                }
            }
            Event::Gap(_) => s.chans[k].gaps_reported += 1,
            Event::Join(_) | Event::Leave(_) => {}
            Event::Ended(_) => {
                s.ended = true;
                break;
            }
        }
    }
}

pub async fn run(a: DeployArgs) -> anyhow::Result<Outcome> {
    run_with(a, Action::RollingRestart).await
}

pub async fn scaleout(a: ScaleoutArgs) -> anyhow::Result<Outcome> {
    if !(a.within > 0.0 && a.within < 1.0) {
        bail!("--within must be a share between 0 and 1, e.g. 0.1");
    }
    run_with(a.deploy, Action::ScaleOut { within: a.within, balance_timeout: a.balance_timeout }).await
}

async fn run_with(a: DeployArgs, action: Action) -> anyhow::Result<Outcome> {
    let machine = procfs::machine();
    let name = match action {
        Action::RollingRestart => "deploy",
        Action::ScaleOut { .. } => "scaleout",
    };
    if !a.gateway.url.is_empty() {
        bail!("{name} restarts the nodes: it starts its own (no --url)");
    }
    let Some(nginx_bin) = find_nginx() else {
        bail!("nginx not found (apt-get install -y nginx-light): the scenario runs the shipped deploy/nginx.conf");
    };
    let started = Instant::now();
    let mut gargs = a.gateway.clone();
    gargs.crier_arg.push(format!("--shutdown-drain={}", humantime::format_duration(a.drain)));
    // Behind nginx's least_conn, which spreads new connections: on, as the shipped deployment
    // files set it (off by default).
    gargs.crier_arg.push("--rebalance-rate=50".to_owned());
    let mut gw = Gateway::new(&gargs, NODES, true).await?;
    let addrs: Vec<_> = gw.nodes.iter().map(|n| n.addr).collect();
    let lb = Nginx::start(&nginx_bin, &addrs).await?;
    if let Action::ScaleOut { .. } = action {
        // The joining node: down before anyone connects, its address already in nginx's list.
        gw.kill_node(NODES - 1).await;
        eprintln!("  node {} stopped: it joins later", NODES - 1);
    }
    let ws = format!("ws://{}/ws", lb.addr);
    let shared_n = a.shared_channels.max(1);
    eprintln!(
        "{name}: {} crier-client subscribers through nginx {} over {NODES} nodes, {} msg/s ({}% on {shared_n} shared channels)",
        a.clients,
        lb.addr,
        a.rate,
        (a.shared_fraction * 100.0).round()
    );

    // Subscribers, connected in batches (a first connect is not the storm under test).
    let latency: Arc<Vec<Mutex<Histogram<u64>>>> = Arc::new((0..NODES).map(|_| Mutex::new(new_histogram())).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::with_capacity(a.clients);
    let mut seen: Vec<Arc<Mutex<Seen>>> = Vec::with_capacity(a.clients);
    let mut followers = Vec::with_capacity(a.clients);
    let connect_deadline = Instant::now() + Duration::from_secs(120);
    for start in (0..a.clients).step_by(a.connect_batch.max(1)) {
        let end = (start + a.connect_batch.max(1)).min(a.clients);
        for i in start..end {
            let c = Client::builder(ws.clone())
                .token(token(&gw, &format!("deploy-{i}")))
                .backoff(a.backoff.base, a.backoff.cap)
                .connect()?;
            let subs =
                [c.subscribe(format!("bench:shared-{}", i % shared_n)), c.subscribe(format!("bench:private-{i}"))];
            let s = Arc::new(Mutex::new(Seen::default()));
            followers.push(tokio::spawn(follow(c.clone(), subs, s.clone(), latency.clone())));
            clients.push(c);
            seen.push(s);
        }
        while !seen[start..end].iter().all(|s| lock(s).chans.iter().all(|c| c.subscribed)) {
            if Instant::now() > connect_deadline {
                bail!("subscribers {start}..{end} not all subscribed within 120s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eprintln!("  {} subscribers connected and subscribed in {:.1}s", a.clients, started.elapsed().as_secs_f64());
    for h in latency.iter() {
        lock(h).reset();
    }

    // Sampler: every second, per node CPU, RSS, handshakes/s and /healthz (nodes not being
    // restarted must answer it), plus nginx's and redis-server's CPU.
    let pids: Arc<Mutex<Vec<Option<u32>>>> = Arc::new(Mutex::new((0..NODES).map(|i| gw.node_pid(i)).collect()));
    // The node being restarted (or still to join): its /healthz misses are expected.
    let restarting = Arc::new(AtomicUsize::new(match action {
        Action::RollingRestart => usize::MAX,
        Action::ScaleOut { .. } => NODES - 1,
    }));
    let peaks: Arc<Mutex<Vec<NodePeaks>>> = Arc::new(Mutex::new(vec![NodePeaks::default(); NODES]));
    let aux_peaks: Arc<Mutex<(f64, f64)>> = Default::default();
    let sampler = {
        let (pids, restarting, peaks, aux_peaks, stop) =
            (pids.clone(), restarting.clone(), peaks.clone(), aux_peaks.clone(), stop.clone());
        let (nginx_pid, redis_pid) = (lb.pid, gw.redis.as_ref().and_then(|r| r.pid));
        let addrs = addrs.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap_or_default();
            let mut prev_cpu: Vec<Option<(u32, f64)>> = vec![None; NODES];
            let mut prev_hs: Vec<Option<f64>> = vec![None; NODES];
            let (mut prev_nginx, mut prev_redis) = (None::<f64>, None::<f64>);
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let dt = last.elapsed().as_secs_f64().max(0.001);
                last = Instant::now();
                let now_pids = lock(&pids).clone();
                for i in 0..NODES {
                    let hs = scrape(&http, addrs[i], "crier_handshakes_total{result=\"ok\"}");
                    let health = http.get(format!("http://{}/healthz", addrs[i])).send();
                    let (hs, health) = tokio::join!(hs, health);
                    let healthy = health.is_ok_and(|r| r.status().is_success());
                    let mut p = lock(&peaks);
                    if !healthy && restarting.load(Ordering::Relaxed) != i {
                        p[i].healthz_misses += 1;
                    }
                    if let Some(hs) = hs {
                        if let Some(prev) = prev_hs[i] {
                            // A restarted node's counter starts again at 0.
                            let d = if hs >= prev { hs - prev } else { hs };
                            p[i].handshakes_per_s = p[i].handshakes_per_s.max(d / dt);
                        }
                        prev_hs[i] = Some(hs);
                    }
                    if let Some(pid) = now_pids[i] {
                        if let Some(rss) = procfs::rss_kib(pid) {
                            p[i].rss_mib = p[i].rss_mib.max(rss as f64 / 1024.0);
                        }
                        if let Some(cpu) = procfs::cpu_secs(pid) {
                            if let Some((ppid, pcpu)) = prev_cpu[i]
                                && ppid == pid
                            {
                                p[i].cpu_percent = p[i].cpu_percent.max((cpu - pcpu) / dt * 100.0);
                            }
                            prev_cpu[i] = Some((pid, cpu));
                        }
                    }
                }
                let mut aux = lock(&aux_peaks);
                if let Some(cpu) = nginx_pid.and_then(nginx_cpu_secs) {
                    if let Some(prev) = prev_nginx {
                        aux.0 = aux.0.max((cpu - prev) / dt * 100.0);
                    }
                    prev_nginx = Some(cpu);
                }
                if let Some(cpu) = redis_pid.and_then(procfs::cpu_secs) {
                    if let Some(prev) = prev_redis {
                        aux.1 = aux.1.max((cpu - prev) / dt * 100.0);
                    }
                    prev_redis = Some(cpu);
                }
            }
        })
    };

    // Publisher: through nginx, each message with an idempotency key, retried until acknowledged
    // (or for 60 s at most: then it counts as a lost publish).
    let acked = Arc::new(Mutex::new(Acked { shared: vec![0; shared_n], private: vec![0; a.clients], count: 0 }));
    let publish_errors = Arc::new(AtomicU64::new(0));
    let publishes_lost = Arc::new(AtomicU64::new(0));
    let publishing = Arc::new(AtomicBool::new(true));
    let publisher = {
        let (acked, errors, lost, publishing) =
            (acked.clone(), publish_errors.clone(), publishes_lost.clone(), publishing.clone());
        let url = format!("http://{}/api/v1/publish", lb.addr);
        let key = gw.api_key.clone();
        let (rate, fraction, clients, concurrency) =
            (a.rate.max(1.0), a.shared_fraction.clamp(0.0, 1.0), a.clients.max(1), a.publish_concurrency.max(1));
        let run_id = format!("{}-{}", std::process::id(), now_us());
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap_or_default();
            let permits = Arc::new(tokio::sync::Semaphore::new(concurrency));
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut j: u64 = 0;
            let mut tasks = tokio::task::JoinSet::new();
            while publishing.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(permit) = permits.clone().acquire_owned().await else { break };
                let shared = rand::random::<f64>() < fraction;
                let idx = if shared { rand::random_range(0..shared_n) } else { rand::random_range(0..clients) };
                let channel = if shared { format!("bench:shared-{idx}") } else { format!("bench:private-{idx}") };
                let (http, url, key, acked, errors, lost) =
                    (http.clone(), url.clone(), key.clone(), acked.clone(), errors.clone(), lost.clone());
                let ikey = format!("deploy-{run_id}-{j}");
                j += 1;
                tasks.spawn(async move {
                    let _permit = permit;
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let mut delay = Duration::from_millis(20);
                    loop {
                        let body =
                            json!({"channel": channel, "data": {"t": now_us(), "j": j}, "idempotency_key": ikey});
                        let r = http.post(&url).bearer_auth(&key).json(&body).send().await;
                        let offset = match r {
                            Ok(r) if r.status().is_success() => {
                                r.json::<serde_json::Value>().await.ok().and_then(|v| v["offset"].as_u64())
                            }
                            _ => None,
                        };
                        if let Some(o) = offset {
                            let mut ac = lock(&acked);
                            let slot = if shared { &mut ac.shared[idx] } else { &mut ac.private[idx] };
                            *slot = (*slot).max(o);
                            ac.count += 1;
                            return;
                        }
                        errors.fetch_add(1, Ordering::Relaxed);
                        if Instant::now() > deadline {
                            lost.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(1));
                    }
                });
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        })
    };

    tokio::time::sleep(a.before).await;
    let deploy_started = Instant::now();
    let mut timings = [(0.0, 0.0, false); NODES];
    let mut scale = None;
    if let Action::ScaleOut { within, balance_timeout } = action {
        let i = NODES - 1;
        eprintln!("  node {i} joins");
        let t0 = Instant::now();
        gw.start_killed_node(i, &gargs).await?;
        lock(&pids)[i] = gw.node_pid(i);
        restarting.store(usize::MAX, Ordering::Relaxed);
        let joined = Instant::now();
        let start_to_ready = t0.elapsed().as_secs_f64();
        timings[i].1 = start_to_ready;
        eprintln!("  node {i} ready {start_to_ready:.1}s after its start; waiting for the balance");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().unwrap_or_default();
        let (mut balanced_after_s, mut last) = (None, Vec::new());
        let mut shown = Instant::now();
        while joined.elapsed() < balance_timeout {
            if let Some(counts) = node_connections(&http, &addrs).await.into_iter().collect::<Option<Vec<u64>>>() {
                let done = balanced(&counts, a.clients, within);
                if done || shown.elapsed() >= Duration::from_secs(5) {
                    eprintln!(
                        "  {:.1}s after the join: connections per node {counts:?}",
                        joined.elapsed().as_secs_f64()
                    );
                    shown = Instant::now();
                }
                last = counts;
                if done {
                    balanced_after_s = Some(joined.elapsed().as_secs_f64());
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        scale = Some(ScaleOut {
            within,
            join_start_to_ready_s: start_to_ready,
            balanced_after_s,
            connections_at_balance: last,
            moved: 0,
        });
    }
    let rolling = matches!(action, Action::RollingRestart);
    for (i, timing) in timings.iter_mut().enumerate().filter(|_| rolling) {
        restarting.store(i, Ordering::Relaxed);
        eprintln!("  SIGTERM node {i} (drain {:?})", a.drain);
        let (drained, started, killed) = gw.restart_node(i, &gargs, a.drain + a.exit_grace).await?;
        lock(&pids)[i] = gw.node_pid(i);
        restarting.store(usize::MAX, Ordering::Relaxed);
        eprintln!(
            "  node {i}: exited {:.1}s after SIGTERM, ready again {:.1}s later",
            drained.as_secs_f64(),
            started.as_secs_f64()
        );
        *timing = (drained.as_secs_f64(), started.as_secs_f64(), killed);
        if i + 1 < NODES {
            tokio::time::sleep(a.between).await;
        }
    }
    let deploy_s = deploy_started.elapsed().as_secs_f64();
    tokio::time::sleep(a.after).await;
    publishing.store(false, Ordering::Relaxed);
    let _ = publisher.await;
    // The publisher has ended: what was acknowledged is final.
    let (shared_acked, private_acked, publishes_acked) = {
        let ac = lock(&acked);
        (ac.shared.clone(), ac.private.clone(), ac.count)
    };

    // Every client back and holding every acknowledged message (or the deadline).
    let final_deadline = Instant::now() + a.settle;
    let complete = |i: usize| {
        let want = [shared_acked[i % shared_n], private_acked[i]];
        let s = lock(&seen[i]);
        let back = clients[i].state() == State::Connected && s.down_since.is_none() && !s.ended;
        (back, s.chans.iter().zip(want).all(|(c, w)| c.last >= w))
    };
    // Judged in one pass: with rebalancing on, a node may move a client between two passes
    // (it is back a moment later), so "back" is what the pass that ended the wait saw.
    let mut back_at_end = vec![false; a.clients];
    loop {
        let mut all_delivered = true;
        for (i, b) in back_at_end.iter_mut().enumerate() {
            let (back, delivered) = complete(i);
            *b = back;
            all_delivered &= delivered;
        }
        if (all_delivered && back_at_end.iter().all(|b| *b)) || Instant::now() >= final_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = sampler.await;

    // The figures.
    let (mut lost, mut dups, mut gaps, mut deliveries, mut not_back, mut unmeasured) = (0, 0, 0, 0, 0, 0u64);
    let mut outages = Vec::new();
    let mut per_node = vec![0usize; NODES];
    let mut reconnections = 0;
    for (i, s) in seen.iter().enumerate() {
        let s = lock(s);
        let want = [shared_acked[i % shared_n], private_acked[i]];
        for (c, w) in s.chans.iter().zip(want) {
            lost += c.skipped + w.saturating_sub(c.last);
            dups += c.duplicates;
            gaps += c.gaps_reported;
            deliveries += c.received;
        }
        outages.extend_from_slice(&s.outages_ms);
        unmeasured += u64::from(s.unmeasured);
        if !back_at_end[i] {
            not_back += 1;
        }
        if let Some(n) = node_index(&clients[i]).filter(|n| *n < NODES) {
            per_node[n] += 1;
        }
        reconnections += clients[i].connections().saturating_sub(1);
    }
    outages.sort_by(f64::total_cmp);
    let mut nodes = lock(&peaks).clone();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.drain_s = timings[i].0;
        n.start_to_ready_s = timings[i].1;
        n.killed_at_grace = timings[i].2;
        n.delivery_latency = Latency::from_histogram(&lock(&latency[i]));
    }
    let (nginx_cpu, redis_cpu) = *lock(&aux_peaks);
    if let Some(s) = &mut scale {
        s.moved = gw.metric_sum("crier_rebalanced_total").await.unwrap_or(0.0) as u64;
    }
    let results = Results {
        clients: a.clients,
        shared_channels: shared_n,
        publishes_acked,
        publish_errors_retried: publish_errors.load(Ordering::Relaxed),
        publishes_lost: publishes_lost.load(Ordering::Relaxed),
        deliveries,
        lost,
        duplicates: dups,
        gaps_reported: gaps,
        clients_not_back: not_back,
        reconnections,
        outages: outages.len(),
        outages_unmeasured: unmeasured,
        outage_ms_p50: percentile(&outages, 0.5),
        outage_ms_p99: percentile(&outages, 0.99),
        outage_ms_max: outages.last().copied(),
        nodes,
        nginx_cpu_percent_peak: nginx_cpu,
        redis_cpu_percent_peak: redis_cpu,
        nginx_no_live_upstreams: lb.error_log_count("no live upstreams"),
        clients_per_node_at_end: per_node,
        duration_s: started.elapsed().as_secs_f64(),
        scaleout: scale.clone(),
    };

    let ms = |v: Option<f64>| v.map_or("n/a".to_string(), |x| format!("{x:.0}"));
    let title = match action {
        Action::RollingRestart => {
            format!("deploy: rolling restart of {NODES} nodes behind nginx (deploy/nginx.conf), drain {:?}", a.drain)
        }
        Action::ScaleOut { within, .. } => format!(
            "scaleout: {} → {NODES} nodes behind nginx (deploy/nginx.conf), balanced = every node within ±{:.0}% of the mean",
            NODES - 1,
            within * 100.0
        ),
    };
    let mut t = Table::new(title, vec!["value".into()]);
    if let Some(s) = &scale {
        t.row(
            "third node ready → balanced (s)",
            vec![s.balanced_after_s.map_or("not within the timeout".into(), |v| format!("{v:.1}"))],
        );
        t.row("connections per node when balanced", vec![format!("{:?}", s.connections_at_balance)]);
        t.row("connections moved (crier_rebalanced_total)", vec![int(s.moved as f64)]);
    }
    t.row("subscribers (crier-client, 2 channels each)", vec![int(a.clients as f64)]);
    t.row("publishes acknowledged / lost", vec![format!("{publishes_acked} / {}", results.publishes_lost)]);
    t.row("publish errors seen (retried)", vec![int(results.publish_errors_retried as f64)]);
    t.row("deliveries", vec![int(deliveries as f64)]);
    t.row("lost / duplicates / gaps reported", vec![format!("{lost} / {dups} / {gaps}")]);
    t.row("clients not back at the end", vec![int(not_back as f64)]);
    t.row("reconnections", vec![int(reconnections as f64)]);
    t.row("time without a live subscription p50 (ms)", vec![ms(results.outage_ms_p50)]);
    t.row("time without a live subscription p99 (ms)", vec![ms(results.outage_ms_p99)]);
    t.row("time without a live subscription max (ms)", vec![ms(results.outage_ms_max)]);
    t.row("  outages timed / not timed", vec![format!("{} / {unmeasured}", results.outages)]);
    for (i, n) in results.nodes.iter().enumerate() {
        t.row(
            &format!("node {i}: peak handshakes/s, CPU %, RSS MiB"),
            vec![format!("{:.0}, {:.0}, {:.0}", n.handshakes_per_s, n.cpu_percent, n.rss_mib)],
        );
        t.row(
            &format!("node {i}: delivery p50/p99/max ms, /healthz misses"),
            vec![format!(
                "{:.1}/{:.1}/{:.1}, {}",
                n.delivery_latency.p50_ms, n.delivery_latency.p99_ms, n.delivery_latency.max_ms, n.healthz_misses
            )],
        );
        if !rolling {
            continue;
        }
        t.row(
            &format!("node {i}: SIGTERM to exit, exit to ready (s)"),
            vec![format!(
                "{:.1}{}, {:.1}",
                n.drain_s,
                if n.killed_at_grace { " (SIGKILL)" } else { "" },
                n.start_to_ready_s
            )],
        );
    }
    t.row("nginx / redis-server peak CPU %", vec![format!("{nginx_cpu:.0} / {redis_cpu:.0}")]);
    t.row("nginx 'no live upstreams'", vec![int(results.nginx_no_live_upstreams as f64)]);
    t.row("clients per node at the end", vec![format!("{:?}", results.clients_per_node_at_end)]);
    if rolling {
        t.row("rolling restart took (s)", vec![format!("{deploy_s:.1}")]);
    }

    let mut report = base_report(
        name,
        &gw,
        &gargs,
        json!({"clients": a.clients, "rate": a.rate, "shared_fraction": a.shared_fraction, "shared_channels": shared_n,
               "drain_s": a.drain.as_secs_f64(), "between_s": a.between.as_secs_f64(), "before_s": a.before.as_secs_f64(),
               "after_s": a.after.as_secs_f64(), "exit_grace_s": a.exit_grace.as_secs_f64(), "backoff_base_ms": a.backoff.base.as_millis() as u64,
               "backoff_cap_ms": a.backoff.cap.as_millis() as u64, "nginx": nginx_bin.display().to_string(),
               "within": scale.as_ref().map(|s| s.within)}),
        machine,
    );
    report.notes.push(
        "time without a live subscription = from the client leaving `connected` (its node closed it with 1012) to \
         both its subscriptions acknowledged again on another node (backoff + handshake through nginx + recovery)"
            .into(),
    );
    if unmeasured > 0 {
        report.notes.push(format!(
            "{unmeasured} reconnections were not timed (the client's state changes were coalesced before its task ran)"
        ));
    }
    report.results = serde_json::to_value(&results)?;
    for c in &clients {
        c.close();
    }
    drop(clients);
    for f in followers {
        f.abort();
    }
    lb.stop(Duration::from_secs(3)).await;
    gw.stop(a.gateway.stop_grace).await;
    Ok(Outcome { report, tables: vec![t] })
}

/// nginx's CPU: the master's and its workers' (its children).
fn nginx_cpu_secs(master: u32) -> Option<f64> {
    let mut total = procfs::cpu_secs(master)?;
    let children = std::fs::read_to_string(format!("/proc/{master}/task/{master}/children")).unwrap_or_default();
    for pid in children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
        total += procfs::cpu_secs(pid).unwrap_or(0.0);
    }
    Some(total)
}
