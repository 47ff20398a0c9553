//! crier, the server: everything between a TCP listener and the delivery core (crier-core).
//!
//! How a connection flows through the modules (in the order it meets them; then the rest):
//!
//! - [`server`]: the accept loop hands each HTTP/1 connection to the router, runs the background
//!   chores and the drain on shutdown.
//! - [`http`]: the router ([`http::app`]): `/ws`, `/sse`, the REST API, health, metrics, demo page.
//! - [`handshake`]: the checks every transport runs before a connection opens; [`refusal`]
//!   counts and logs every refused handshake and REST call.
//! - [`transport`]: how a connection's bytes travel — [`transport::ws`] is WebSocket (the
//!   upgrade, crier's own framing, the connection's task), [`transport::sse`] Server-Sent Events
//!   (receive only, on the raw socket).
//! - [`session`]: what a client's frames mean (subscriptions, recovery, limits, refresh),
//!   independent of the transport; it answers through the connection's outbox.
//! - [`proxy`]: backend proxies (connect, subscribe, publish, refresh): HTTP calls to the
//!   application with deadlines, bounded concurrency and circuit breakers.
//! - [`heartbeat`]: one sweep per node: pings, heartbeat timeouts, token expiry.
//! - [`rebalance`]: after a scale-out, a node over the mean closes its oldest connections
//!   (1012), paced; [`trim`]: gives a burst's freed memory back to the system.
//! - [`webhooks`]: one task per node POSTs the broker's queued events to the backend.
//! - [`api`]: the REST API (publish, broadcast, history, presence, info); [`api_control`] its
//!   server-side control routes (disconnect, subscribe, unsubscribe, invalidate, connections) and
//!   [`control`] what a node does with them; [`api_presence`] presence counts; [`api_channels`]
//!   the channel listing and history deletion; [`admin`] the admin page and `/api/v1/info`.
//! - [`state`]: the shared state handle and the types it holds.
//! - [`startup`]: how the state is built, and the broker → hub handler.
//! - [`config`]: settings from flags, `CRIER_*` environment, a TOML file and defaults.
//! - [`auth`]: JWT verification, token extraction, the Origin allow-list, API keys.
//! - [`limits`]: rate limits (per-IP handshakes, per-user frames, per-key REST requests).
//! - [`metrics`]: metric names and the Prometheus recorder; [`error`]: the JSON error body.
//!
//! The library never binds ports or reads signals: `main` does, and calls [`run`] with the
//! listener, the settings and a shutdown future. Its public surface is what the binary, the
//! bench and the tests use: [`run`], [`config`], [`auth::mint_hs256`] and
//! [`auth::generate_secret`], and the request-head bounds.

mod admin;
mod api;
mod api_channels;
mod api_control;
mod api_presence;
pub mod auth;
pub mod config;
mod control;
mod error;
mod handshake;
mod heartbeat;
mod http;
mod limits;
mod metrics;
mod node_details;
mod proxy;
mod rebalance;
mod refusal;
mod revocations;
mod server;
mod session;
mod startup;
mod state;
mod transport;
mod trim;
mod webhooks;

use std::future::Future;

use tokio::net::TcpListener;

use crate::config::Config;
pub use crate::server::{HEADER_READ_TIMEOUT, MAX_HEADER_BYTES};

/// Serves until `shutdown` resolves, then drains (every client closed with 1012, spread over
/// `shutdown_drain`) and returns. `dev_token` (from `--dev`) enables the demo page.
pub async fn run(
    listener: TcpListener,
    config: Config,
    dev_token: Option<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let st = startup::build(config, dev_token).await?;
    server::serve(listener, st, shutdown).await
}
