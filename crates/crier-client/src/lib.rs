//! Rust client for [crier](https://example.invalid/crier), the WebSocket pub/sub gateway (tokio).
//!
//! crier's promise — every message of a channel once, in order, across reconnects, or the
//! client is told — needs the client to do its part. This crate does it, with the semantics of
//! the JavaScript client (`clients/js`; docs/protocol.md, *Client libraries*):
//!
//! - **Reconnects** as crier's close-code table (`crier_protocol::codes::CLOSE_CODES`) says:
//!   "stop" codes end it, 4001 asks the token provider again, 1001 reconnects at once, 1012
//!   after a jittered delay, the rest with full-jitter exponential backoff (default base 500 ms,
//!   cap 20 s). A refused handshake (401/403) asks the provider once, then [`State::Failed`].
//! - **Recovers** every subscription after a reconnect: it resubscribes with `recover` from the
//!   last position it delivered, so the application sees each message once, in order.
//!   Messages are deduplicated by offset: one already delivered is never delivered again, even
//!   when a server replays it.
//! - **Tells** the application when messages were lost ([`Event::Gap`]): a `gap` frame,
//!   `recovered: false`, or a new epoch. It should then resync the channel from its own source
//!   of truth.
//! - **Refreshes its token**: a token provider is asked again before the token's `exp` (the new
//!   token goes in a `refresh` frame; the connection continues) and after a 4001 close.
//! - **Notices dead connections**: it sends `{"type":"ping"}` when it has heard nothing for the
//!   server's ping interval, and reconnects when even that gets no answer.
//! - `publish`, `presence` and `history` are async functions returning typed results, or an
//!   [`Error`] carrying the contract's error code ([`Error::code`]).
//!
//! ```no_run
//! use crier_client::{Client, Event};
//!
//! # async fn demo() -> Result<(), crier_client::Error> {
//! let client = Client::builder("ws://127.0.0.1:8080/ws")
//!     .token_provider(|| async { Ok::<_, std::io::Error>(String::from("<jwt from your backend>")) })
//!     .connect()?;
//! let mut sub = client.subscribe("chat:lobby");
//! client.publish("chat:lobby", &serde_json::json!({"text": "hi"})).await?;
//! while let Some(event) = sub.next().await {
//!     match event {
//!         Event::Message(m) => println!("{} #{}: {}", m.channel, m.offset, m.data),
//!         Event::Gap(gap) => println!("lost messages before {}: resync", gap.offset),
//!         Event::Join(who) => println!("{} joined", who.user),
//!         Event::Subscribed { .. } | Event::Leave(_) => {}
//!         Event::Ended(why) => println!("subscription over: {why:?}"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! Modules, each depending only on those above it (no cycle):
//! - `state`: the public [`State`] and [`Welcome`]; `events`: what a subscription yields
//!   ([`Event`], [`Message`], [`Gap`], [`EndReason`]).
//! - `app_position`: the last position delivered to the application on a channel; drops
//!   replays by offset and tells the application of losses (it never fills them: that is the
//!   server's recovery; crier-redis's `NodePosition` is the node's side, which does).
//! - `protocol`: the handle-to-task protocol (what the handles send the task and share with it).
//! - `subscription`: [`Subscription`] (a stream of [`Event`]s; dropping it unsubscribes).
//! - `driver`: the one task per client that owns the connection — the state machine; the
//!   close-code table (`driver/close.rs`) and what each server frame does (`driver/incoming.rs`).
//! - `client`: [`Client`] (the handle: state, subscribe, requests, close) and [`ClientBuilder`].
//! - `frames`: the client's side of the wire format (the shared types come from
//!   `crier-protocol`).
//! - `token`: token sources and refresh scheduling (the full-jitter [`Backoff`] is
//!   `crier_protocol::backoff`'s, re-exported).
//!
//! TLS: `wss://` URLs work when `tokio-tungstenite` is built with one of its TLS features
//! (e.g. add `tokio-tungstenite = { version = "0.29", features = ["rustls-tls-webpki-roots"] }`
//! to the application); this crate enables none itself.

mod app_position;
mod client;
mod driver;
mod error;
mod events;
mod frames;
mod protocol;
mod state;
mod subscription;
mod token;

pub use client::{Client, ClientBuilder, History, HistoryOptions, PresenceStats, Published, ServerSubscriptions};
/// The reconnect backoff (moved to crier-protocol, shared with the server's Redis reconnects).
pub use crier_protocol::backoff::Backoff;
pub use crier_protocol::frames::PresenceEntry;
pub use crier_protocol::{ErrorCode, StreamPosition};
pub use error::{CloseReason, Error, ServerError};
pub use events::{EndReason, Event, Gap, GapReason, Message};
pub use state::{State, Welcome};
pub use subscription::Subscription;
pub use token::BoxError;

/// The README's example is compiled as a doctest, so it cannot drift from the API.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctest;
