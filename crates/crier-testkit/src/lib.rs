//! crier's test support, shared by the tests of every crate (a dev-dependency only; never
//! published, never linked into the gateway):
//!
//! - [`wait`]: polling with a deadline, the one way tests wait for something asynchronous
//!   ([`until`], [`poll`]); a missed deadline fails the test with a message naming what it
//!   waited for (and the last state seen), never a hang.
//! - [`conformance`]: the promises of `crier_core::Broker` as executable checks; every broker
//!   (memory, Redis) runs them from its own tests.
//! - [`redis`]: real `redis-server` processes on free ports (never 6379), killed when dropped
//!   (plain, TLS, replicas, Sentinels).
//! - [`nats`]: real `nats-server` processes with JetStream (one, or a cluster with routes on
//!   loopback) on free ports, killed when dropped.
//! - [`tls`]: a throw-away CA and server certificate (openssl CLI) for TLS tests.
//! - [`process`]: a child process (e.g. the `crier` binary) with its stdout and stderr captured,
//!   killed when dropped; and [`process::metric_value`] to read a Prometheus text exposition.
//! - [`bin`]: the `crier` binary for the tests of other packages ([`bin::crier_bin`]).
//!
//! It depends on crier-core (the conformance suite needs the `Broker` trait) and is a
//! dev-dependency of crier-core: cargo allows that cycle for integration tests (`tests/`), whose
//! crier-core is the same library the testkit links. crier-core's own unit tests (`#[cfg(test)]`
//! in `src/`) must not use the testkit: they are compiled as a second copy of crier-core whose
//! types differ from the testkit's.

// Test support: a failed step panics with what failed, as a test does (`clippy.toml` allows
// unwrap/expect in tests; this library is only ever linked into them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod bin;
pub mod conformance;
pub mod nats;
pub mod process;
pub mod redis;
pub mod tls;
pub mod wait;

pub use wait::{WAIT, poll, poll_within, until, until_blocking, until_within};
