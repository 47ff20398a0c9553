//! The server around the router: the accept loop (hyper's HTTP/1 connections, with upgrades),
//! the background chores (node registry, limiter housekeeping, the heartbeat sweep, giving a
//! burst's freed memory back to the system) and the drain on shutdown.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crier_protocol::CloseCode;
use tokio::net::TcpListener;

use crate::state::AppState;
use crate::{heartbeat, http, memory};

/// How often a node refreshes its entry in the node registry.
const REPORT_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stopping node waits for its sessions to end after the drain.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Serves a built state (see [`run`]).
pub async fn serve(
    listener: TcpListener,
    st: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let background = tokio::spawn(background(st.clone()));
    let heartbeats = tokio::spawn(heartbeat::run(st.clone()));
    let trims = tokio::spawn(memory::run());
    let drain_st = st.clone();
    accept_loop(listener, http::app(st.clone()), async move {
        shutdown.await;
        drain(&drain_st).await;
    })
    .await;
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    while !st.registry.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    background.abort();
    heartbeats.abort();
    trims.abort();
    Ok(())
}

/// How long a client may take to send its request headers (slowloris defence).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head (request line + headers) accepted, in bytes; larger ones get 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Accepts connections until `stop` resolves (the listener stays open during the drain, so late
/// handshakes get a clear 503 rather than a refused connection), then waits a bounded time for
/// in-flight HTTP requests. HTTP/1.1 only, with a header read timeout and a header size bound.
async fn accept_loop(listener: TcpListener, app: axum::Router, stop: impl Future<Output = ()>) {
    use hyper::server::conn::http1;
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt;

    // hyper's HTTP/1 connection directly, not hyper_util's auto builder: the auto builder's
    // protocol sniffing has no timeout (a silent connection stayed open forever) and it serves
    // HTTP/2 even when told http1_only together with upgrades. Here the header read timeout runs
    // from the first poll.
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).max_buf_size(MAX_HEADER_BYTES);
    let (closing, _) = tokio::sync::watch::channel(false);
    // Each connection task holds a clone: the strong count is the number of open connections.
    let open = Arc::new(());
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = app.clone().map_request(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            req
        });
        let conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc)).with_upgrades();
        let mut closing = closing.subscribe();
        let open = open.clone();
        tokio::spawn(async move {
            let _open = open;
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = async { let _ = closing.wait_for(|c| *c).await; } => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let _ = closing.send(true);
    let deadline = tokio::time::Instant::now() + DRAIN_GRACE;
    while Arc::strong_count(&open) > 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Stops a node gently: readiness turns 503 and new upgrades are refused, then every client is
/// closed with 1012, the closes spread evenly over `shutdown_drain` so they do not all reconnect
/// to the other nodes at once. The drain lasts the whole `shutdown_drain` even with few or no
/// clients: the node stays visibly unready (and answers late handshakes with 503 instead of a
/// refused connection) long enough for a load balancer's health check to notice.
pub async fn drain(st: &AppState) {
    st.draining.store(true, Ordering::SeqCst);
    let window = st.config.shutdown_drain;
    let end = tokio::time::Instant::now() + window;
    let outboxes = st.registry.outboxes();
    tracing::info!(connections = outboxes.len(), over = ?window, "draining");
    let n = outboxes.len() as u32;
    if n > 0 {
        let step = window / n;
        let start = tokio::time::Instant::now();
        for (i, o) in outboxes.iter().enumerate() {
            o.close(CloseCode::RESTART);
            // Paced against the window's clock, not by a sleep per connection: each sleep costs
            // at least a timer tick, and with thousands of connections the ticks added up to
            // twice the window (measured: 10,000 clients, a 10 s drain took 23-28 s). Behind
            // schedule (or with a zero window), the next close goes at once.
            let next = start + step * (i as u32 + 1);
            if (i as u32) + 1 < n && next > tokio::time::Instant::now() {
                tokio::time::sleep_until(next).await;
            }
        }
    }
    tokio::time::sleep_until(end).await;
}

/// Periodic chores: node registry, limiter housekeeping.
async fn background(st: AppState) {
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    let mut n: u64 = 0;
    loop {
        tick.tick().await;
        st.report_node().await;
        n += 1;
        if n.is_multiple_of(12) {
            st.limits.shrink();
        }
    }
}
