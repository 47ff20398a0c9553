//! Hostile and buggy clients against the real binary (issue 4): junk on the raw socket, broken
//! WebSocket framing, invalid UTF-8, binary and fragmented frames, deeply nested JSON, unknown
//! fields, absurd numbers, subscription churn, thousands of abandoned handshakes, slowloris and
//! oversized request heads.
//!
//! Every case checks three things: the abuse is answered as docs/protocol.md says (HTTP status,
//! error frame or close code), the node stays up (`/healthz`), and a bystander subscribed to a
//! channel receives every message published while the abuse goes on — exact offsets `1..=N`,
//! nothing lost, nothing duplicated (see [`bystander::Bystander`]).
//!
//! Raw sockets speak WebSocket by hand ([`raw::RawWs`], [`raw::frame`]) because no client
//! library will send malformed frames. Waits poll with deadlines; nothing sleeps to synchronise.
//!
//! One test crate, by the layer that is abused:
//! - [`http`]: HTTP-level abuse (junk bytes, malformed bodies, oversized heads, slowloris);
//! - [`handshake`]: connection churn below and at the handshake;
//! - [`framing`]: WebSocket framing abuse (protocol errors, control frames, UTF-8, binary,
//!   fragmentation, sizes);
//! - [`json`]: JSON abuse (nesting, unknown fields, numbers and types);
//! - [`subscriptions`]: subscription churn.
//!
//! and the tools they share: [`bystander`] and [`raw`].

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../support/mod.rs"]
mod support;

mod bystander;
mod framing;
mod handshake;
mod http;
mod json;
mod raw;
mod subscriptions;

use std::time::Duration;

use support::Server;

/// The bystander's channel.
const NEWS: &str = "news";
/// The bystander's publisher publishes one message per tick, at most this many.
const MAX_BYSTANDER_MESSAGES: u64 = 5_000;
const PUBLISH_TICK: Duration = Duration::from_millis(20);

/// Limits that keep the rate limiters out of the way: these tests abuse other things.
const NO_RATE_LIMITS: [&str; 8] =
    ["--user-rate", "100000", "--user-burst", "100000", "--handshake-rate", "100000", "--handshake-burst", "100000"];

async fn start(extra: &[&str]) -> Server {
    let mut args: Vec<&str> = NO_RATE_LIMITS.to_vec();
    args.extend_from_slice(extra);
    Server::start(&args).await
}

fn hostile_token(server: &Server) -> String {
    server.token("mallory", &["junk:*"], &["junk:*"])
}

async fn assert_healthy(server: &Server) {
    let r = reqwest::get(server.url("/healthz")).await.expect("the node answers /healthz");
    assert_eq!(r.status(), 200);
}
