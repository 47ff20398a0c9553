//! The server around the router: the accept loop (hyper's HTTP/1 connections, with upgrades),
//! the background chores (node registry, limiter housekeeping, the heartbeat sweep, giving a
//! burst's freed memory back to the system) and the drain on shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::metrics as m;
use crate::state::AppState;
use crate::{heartbeat, http, rebalance, trim};

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
    let trims = tokio::spawn(trim::run());
    let rebalancing = tokio::spawn(rebalance::run(st.clone()));
    let refresher = st.proxies.clone().map(|p| tokio::spawn(crate::proxy::run_refresher(p)));
    let channel_counts = tokio::spawn(crate::api_channels::mirror(st.clone()));
    let revocations = tokio::spawn(crate::control::sync_revocations(st.broker().clone(), st.revocations.clone()));
    let webhooks = st.config.webhooks.clone().map(|w| tokio::spawn(crate::webhooks::run(st.broker().clone(), w)));
    let drain_st = st.clone();
    let max_pending = st.config.max_pending_handshakes;
    accept_loop(listener, http::app(st.clone()), max_pending, async move {
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
    rebalancing.abort();
    if let Some(r) = refresher {
        r.abort();
    }
    channel_counts.abort();
    revocations.abort();
    if let Some(w) = webhooks {
        w.abort();
        // Another node delivers from now on (a batch this node was delivering is pending: the
        // next delivering node sends it first, same ids).
        match tokio::time::timeout(Duration::from_secs(2), st.broker().hook_release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "webhooks: could not release the delivery lease"),
            Err(_) => tracing::debug!("webhooks: releasing the delivery lease timed out"),
        }
    }
    Ok(())
}

/// How long a client may take to send its request headers (slowloris defence), from its
/// connection's first poll (and, on a kept-alive connection, between requests). 10 s: a mobile
/// client on a poor link sends its head in well under that, backends' pools keep idle
/// connections for less (5 s, docs/operations.md), and with `max_pending_handshakes` it bounds
/// what half-open connections hold: at most that many × (16 KiB + a task) for 10 s.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The answer to a connection beyond `max_pending_handshakes`: written with one non-blocking
/// write (no task, no buffer), then the socket is closed.
const PENDING_CAP_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
connection: close\r\ncontent-length: 93\r\n\r\n\
{\"error\":\"unavailable\",\"message\":\"too many connections are still sending their request head\"}";

/// A connection counted among those whose first request head is not complete yet; uncounted
/// once, when hyper hands the head to the router or the connection ends first.
struct PendingHead {
    count: Arc<AtomicUsize>,
    done: AtomicBool,
}

impl PendingHead {
    fn new(count: Arc<AtomicUsize>) -> PendingHead {
        count.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!(m::PENDING_HANDSHAKES).increment(1.0);
        PendingHead { count, done: AtomicBool::new(false) }
    }

    /// Uncounts it; `true` the first time.
    fn finish(&self) -> bool {
        if self.done.swap(true, Ordering::Relaxed) {
            return false;
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!(m::PENDING_HANDSHAKES).decrement(1.0);
        true
    }
}

impl Drop for PendingHead {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Largest request head (request line + headers) accepted, in bytes; larger ones get 431.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Accepts connections until `stop` resolves (the listener stays open during the drain, so late
/// handshakes get a clear 503 rather than a refused connection), then waits a bounded time for
/// in-flight HTTP requests. HTTP/1.1 only, with a header read timeout and a header size bound.
///
/// At most `max_pending` connections may be waiting for their first request head at once
/// (each may hold hyper's read buffer, up to [`MAX_HEADER_BYTES`], until
/// [`HEADER_READ_TIMEOUT`]); more are answered 503 and closed at once. Both the refusals and the
/// timeouts are counted (`crier_incomplete_request_heads_total`).
async fn accept_loop(listener: TcpListener, app: axum::Router, max_pending: usize, stop: impl Future<Output = ()>) {
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
    let pending = Arc::new(AtomicUsize::new(0));
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
        if pending.load(Ordering::Relaxed) >= max_pending {
            metrics::counter!(m::INCOMPLETE_HEADS, "reason" => "over_cap").increment(1);
            let _ = stream.try_write(PENDING_CAP_RESPONSE);
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let takeover = TakeOver::default();
        let claimed = takeover.clone();
        let head = Arc::new(PendingHead::new(pending.clone()));
        let head_seen = head.clone();
        let svc = app.clone().map_request(move |mut req: axum::extract::Request<hyper::body::Incoming>| {
            head_seen.finish();
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            req.extensions_mut().insert(takeover.clone());
            req
        });
        let mut conn = http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc)).with_upgrades();
        let mut closing = closing.subscribe();
        let open = open.clone();
        tokio::spawn(async move {
            let _open = open;
            let served = tokio::select! {
                r = drive(&mut conn, &claimed) => Some(r),
                _ = closing.wait_for(|c| *c) => None,
            };
            let served = match served {
                Some(r) => r,
                None => {
                    std::pin::Pin::new(&mut conn).graceful_shutdown();
                    drive(&mut conn, &claimed).await
                }
            };
            let timed_out = matches!(&served, Served::Ended(Err(e)) if e.is_timeout());
            match served {
                Served::Claimed => match conn.into_parts() {
                    Some(parts) => claimed.hand_over(parts.io.into_inner()),
                    None => tracing::error!("a claimed connection was already upgraded"),
                },
                Served::Ended(Err(e)) => tracing::debug!(error = %e, "connection ended with an error"),
                Served::Ended(Ok(())) => {}
            }
            if head.finish() {
                // The connection ended before its first request head was complete.
                let reason = if timed_out { "timeout" } else { "abandoned" };
                metrics::counter!(m::INCOMPLETE_HEADS, "reason" => reason).increment(1);
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

/// How hyper's part of a connection ended.
enum Served {
    /// A handler claimed the socket ([`TakeOver`]).
    Claimed,
    /// hyper is done with the connection (closed, or upgraded and handed to its transport).
    Ended(hyper::Result<()>),
}

/// Polls hyper's connection until it ends or a handler claims the socket. The claim is made
/// while hyper polls that handler (inside this poll), so it is seen right after it.
fn drive<'a, C>(conn: &'a mut C, claimed: &'a TakeOver) -> impl Future<Output = Served> + 'a
where
    C: Future<Output = hyper::Result<()>> + Unpin,
{
    std::future::poll_fn(move |cx| {
        let r = std::pin::Pin::new(&mut *conn).poll(cx);
        if claimed.is_claimed() {
            return Poll::Ready(Served::Claimed);
        }
        r.map(Served::Ended)
    })
}

/// What a handler that takes its connection's socket over does with it.
type Claim = Box<dyn FnOnce(TcpStream) + Send>;

/// Lets a handler take its connection's socket over from hyper once the request is checked
/// (SSE: the stream then writes its own response head and events on the raw socket, holding no
/// HTTP buffers). One per connection, in every request's extensions; see [`TakeOver::claim`].
#[derive(Clone, Default)]
pub struct TakeOver(Arc<Mutex<Option<Claim>>>);

impl TakeOver {
    /// Claims the socket: once this handler's future is next parked, hyper's connection is taken
    /// apart (nothing more is written or read by hyper; bytes it read past this request are
    /// dropped) and `f` gets the socket. The handler must not complete after claiming: its
    /// response would never be sent (await [`std::future::pending`]).
    pub fn claim(&self, f: impl FnOnce(TcpStream) + Send + 'static) {
        *self.lock() = Some(Box::new(f));
    }

    fn is_claimed(&self) -> bool {
        self.lock().is_some()
    }

    fn hand_over(&self, io: TcpStream) {
        let claim = self.lock().take();
        if let Some(f) = claim {
            f(io);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Claim>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
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
    rebalance::close_paced(&outboxes, window, || false, || {}).await;
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
