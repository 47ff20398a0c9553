//! crier, the server: everything between a TCP listener and the delivery core (crier-core).
//!
//! How a connection flows through the modules:
//!
//! - [`server`]: the accept loop hands each HTTP/1 connection to the router, runs the background
//!   chores and the drain on shutdown.
//! - [`http`]: the router ([`http::app`]): `/ws`, the REST API, health, metrics, demo page.
//! - [`transport`]: how a connection's bytes travel — [`transport::ws`] is WebSocket (the
//!   upgrade, crier's own framing, the connection's task).
//! - [`handshake`]: the checks every transport runs before a connection opens.
//! - [`session`]: what a client's frames mean (subscriptions, recovery, limits, refresh),
//!   independent of the transport; it answers through the connection's outbox.
//! - [`proxy`]: backend proxies (connect, subscribe, publish, refresh): HTTP calls to the
//!   application with deadlines, bounded concurrency and circuit breakers.
//! - [`heartbeat`]: one sweep per node: pings, heartbeat timeouts, token expiry.
//! - [`api`]: the REST API (publish, broadcast, history, presence, info); [`api_control`] its
//!   server-side control routes (disconnect, subscribe, unsubscribe, invalidate, connections) and
//!   [`control`] what a node does with them.
//! - [`state`]: the shared state handle, how it is built, and the broker → hub handler.
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
mod memory;
mod metrics;
mod proxy;
mod rebalance;
mod refusal;
mod server;
mod session;
mod state;
mod transport;
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
    let st = state::build(config, dev_token).await?;
    server::serve(listener, st, shutdown).await
}
