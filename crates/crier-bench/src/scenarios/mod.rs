//! The scenarios. Each returns a [`Outcome`]: the JSON report and the tables to print.
//!
//! - [`idle`]: gateway RSS per idle subscribed connection at given sizes.
//! - [`pubsub`]: fan-out, many channels and cluster — subscribers on channels, REST publishes
//!   stepped through rates; deliveries/s, latency, loss, CPU.
//! - [`churn`]: connect → subscribe → close loops over a base of idle connections.
//! - [`failover`]: crier-client subscribers on two nodes, one SIGKILLed: resume time, loss.
//! - [`deploy`]: a rolling restart of three nodes behind nginx under crier-client subscribers;
//!   and `scaleout` (same machinery): a third node joins two loaded ones, the nodes rebalance.
//! - [`listing`]: `GET /api/v1/channels` over many active channels on several nodes + Redis.
//! - [`hooks`]: webhook events through several nodes + Redis into a local backend.
//! - [`hold`]: a helper process holding a slice of `idle`'s connections (descriptor limits).

pub mod churn;
pub mod deploy;
pub mod failover;
pub mod hold;
pub mod hooks;
pub mod idle;
pub mod listing;
pub mod pubsub;
pub mod soak;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::cli::GatewayArgs;
use crate::gateway::Gateway;
use crate::report::{Report, Table};

pub struct Outcome {
    pub report: Report,
    pub tables: Vec<Table>,
}

/// The pattern every bench token may subscribe to; bench channels are `bench:...`.
pub const CHANNEL_PATTERN: &str = "bench:*";

/// Also allowed: `--dev`'s `chat` namespace, whose channels push join/leave (`fanout --channel
/// chat:fanout --crier-arg=--dev` measures fan-out with join/leave on).
pub const JOIN_LEAVE_PATTERN: &str = "chat:*";

/// A token for user `sub` allowed to subscribe to `bench:*` (and `chat:*`), valid for two hours.
pub fn token(gw: &Gateway, sub: &str) -> String {
    token_with(&gw.secret, sub)
}

pub fn token_with(secret: &str, sub: &str) -> String {
    crier::auth::mint_hs256(
        secret.as_bytes(),
        sub,
        &[CHANNEL_PATTERN, JOIN_LEAVE_PATTERN],
        &[],
        Duration::from_secs(7200),
    )
    .unwrap_or_default()
}

pub fn base_report(
    scenario: &str,
    gw: &Gateway,
    args: &GatewayArgs,
    params: serde_json::Value,
    machine: crate::procfs::Machine,
) -> Report {
    Report {
        scenario: scenario.to_owned(),
        crier_bench_version: env!("CARGO_PKG_VERSION"),
        started_at_unix: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        command_line: std::env::args().collect(),
        machine,
        gateway: gw.info(args),
        params,
        results: serde_json::Value::Null,
        notes: Vec::new(),
    }
}

/// Gateway RSS in KiB, or "n/a".
pub fn kib(v: Option<u64>) -> String {
    v.map(|k| crate::report::int(k as f64)).unwrap_or_else(|| "n/a".into())
}
