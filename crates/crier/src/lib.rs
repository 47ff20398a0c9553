//! crier, the server: everything between a TCP listener and the delivery core.
//!
//! - [`config`]: settings from flags, `CRIER_*` environment, a TOML file and defaults.
//! - [`auth`]: JWT verification, token extraction, the Origin allow-list.
pub mod auth;
pub mod config;
