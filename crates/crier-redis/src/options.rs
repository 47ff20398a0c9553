//! The broker's options, each declared once with its default ([`RedisOptions::default`]), and
//! why [`crate::RedisBroker::start`] can fail ([`StartError`]).
//!
//! The channels' history options are not repeated here: they are the namespaces' policies
//! ([`RedisOptions::namespaces`]; channels outside every declared namespace get its default
//! policy), as for the memory broker.

use std::sync::Arc;
use std::time::Duration;

use crier_core::Namespaces;

use crate::topology::Topology;

/// How to reach Redis and how long things live. [`RedisOptions::default`] holds the defaults;
/// [`RedisOptions::new`], [`RedisOptions::sentinel`] and [`RedisOptions::cluster`] set where
/// Redis is.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Where Redis is: one server (`redis://[user:password@]host:port[/db]`, `rediss://` for
    /// TLS), Sentinel, or a Redis Cluster.
    pub topology: Topology,
    /// PEM file of the CA that signed the Redis servers' certificates (`rediss://`); unset =
    /// the system's roots. Certificates are always verified.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// This node's name (names the pub/sub connection in `CLIENT LIST`).
    pub node_id: String,
    /// The channels' namespaces: each channel's history size and TTL (0 disables history and
    /// gap-fill), presence, join/leave are its namespace's policy; channels outside every
    /// declared namespace get the default policy. Default: none declared, the default policy
    /// `ChannelPolicy::default()` (100 messages for 300s).
    pub namespaces: Arc<Namespaces>,
    /// How long a channel's epoch and offset outlive its last publish. Never less than any
    /// history TTL. Default 24h.
    pub meta_ttl: Duration,
    /// Expiry of presence and connection entries; a dead node's entries vanish within it.
    /// Live ones are refreshed every third of it. Default 30s.
    pub presence_ttl: Duration,
    /// Expiry of node registry entries (refreshed like presence). Default 30s.
    pub node_ttl: Duration,
    /// Prefix of every key and pub/sub channel. Default `crier`.
    pub key_prefix: String,
    /// Deadline of every Redis call, and of a connection attempt. Default 2s.
    pub command_timeout: Duration,
    /// PING period on the pub/sub connection. Default 1s.
    pub probe_interval: Duration,
    /// Reconnect backoff bounds. Default 50ms → 2s.
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
    /// How long [`crate::RedisBroker::connect`] waits for a first connection before returning
    /// with `is_up() == false`. Default 2s.
    pub connect_wait: Duration,
    /// How long a token revocation is kept after its `before` (the longest token lifetime).
    /// Default 7 days.
    pub revocation_ttl: Duration,
}

impl Default for RedisOptions {
    /// The defaults, with a single server at an empty URL (set [`RedisOptions::topology`]).
    fn default() -> RedisOptions {
        RedisOptions {
            topology: Topology::Single(String::new()),
            tls_ca_file: None,
            node_id: String::new(),
            namespaces: Arc::new(Namespaces::default()),
            meta_ttl: Duration::from_secs(24 * 3600),
            presence_ttl: Duration::from_secs(30),
            node_ttl: Duration::from_secs(30),
            key_prefix: "crier".into(),
            command_timeout: Duration::from_secs(2),
            probe_interval: Duration::from_secs(1),
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(2),
            connect_wait: Duration::from_secs(2),
            revocation_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

impl RedisOptions {
    /// Options for one server at `url` (the rest [`RedisOptions::default`]).
    pub fn new(url: impl Into<String>, node_id: impl Into<String>) -> RedisOptions {
        RedisOptions { topology: Topology::Single(url.into()), node_id: node_id.into(), ..RedisOptions::default() }
    }

    /// Options for a Redis Cluster reached through `seeds` (the rest [`RedisOptions::default`]).
    pub fn cluster(seeds: Vec<String>, node_id: impl Into<String>) -> RedisOptions {
        RedisOptions { topology: Topology::Cluster(seeds), node_id: node_id.into(), ..RedisOptions::default() }
    }

    /// Options for a Sentinel-managed master (the rest [`RedisOptions::default`]).
    pub fn sentinel(urls: Vec<String>, master: impl Into<String>, node_id: impl Into<String>) -> RedisOptions {
        RedisOptions {
            topology: Topology::Sentinel { urls, master: master.into() },
            node_id: node_id.into(),
            ..RedisOptions::default()
        }
    }
}

/// Why [`crate::RedisBroker::start`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// A setting is wrong (malformed URL, unreadable CA file, a certificate that does not
    /// verify, a master name no Sentinel knows): retrying cannot help.
    #[error("{0}")]
    Setting(String),
}
