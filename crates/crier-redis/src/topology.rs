//! Which Redis the broker talks to: one fixed server (`redis_url`), or the master named by
//! Redis Sentinel, re-resolved after every lost connection (`redis_sentinel_urls` +
//! `redis_sentinel_master`). Either way over TLS for `rediss://` ([`crate::tls`]).
//!
//! The pub/sub task resolves before every (re)connect; when the master changed, it swaps the
//! command connection over to the new one too (see `pubsub::Task::connect`).

use std::time::Duration;

use redis::{ConnectionInfo, ProtocolVersion};

use crate::sentinel::Sentinels;
use crate::tls::{self, Tls};

/// How to find Redis (from [`crate::RedisOptions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One Redis: `redis://`, `rediss://` or `unix://`.
    Single(String),
    /// Sentinel addresses (`redis://` or `rediss://`) and the master's name.
    Sentinel { urls: Vec<String>, master: String },
}

/// Why a resolution failed.
pub(crate) struct Unresolved {
    /// A setting problem (unknown master name, certificate that does not verify): reported at
    /// start as a bad setting instead of being retried silently.
    pub setting: bool,
    pub why: String,
}

enum Source {
    Fixed(ConnectionInfo),
    Sentinel(Sentinels),
}

/// The current master, as clients: RESP2 for the command connection, RESP3 for pub/sub.
pub(crate) struct Target {
    /// Names the server (`host:port`): a change means a new master.
    pub key: String,
    pub commands: redis::Client,
    pub pubsub: redis::Client,
}

pub(crate) struct Resolver {
    source: Source,
    tls: Tls,
    timeout: Duration,
}

impl Resolver {
    /// Checks the settings (URLs, CA file); no I/O on the network.
    pub(crate) fn new(topology: &Topology, tls: Tls, timeout: Duration) -> Result<Resolver, String> {
        let source = match topology {
            Topology::Single(url) => {
                let info = tls::parse_url(url)?;
                tls.client(info.clone())?;
                Source::Fixed(info)
            }
            Topology::Sentinel { urls, master } => {
                if urls.is_empty() {
                    return Err("redis_sentinel_urls: no Sentinel address".to_owned());
                }
                if master.trim().is_empty() {
                    return Err("redis_sentinel_master: empty master name".to_owned());
                }
                let mut sentinels = Vec::with_capacity(urls.len());
                for url in urls {
                    let info = tls::parse_url(url)?;
                    if let redis::ConnectionAddr::Unix(_) = info.addr() {
                        return Err(
                            "redis_sentinel_urls: Sentinels are reached over TCP (redis:// or rediss://)".into()
                        );
                    }
                    tls.client(info.clone())?;
                    sentinels.push(info);
                }
                Source::Sentinel(Sentinels { sentinels, master: master.trim().to_owned() })
            }
        };
        Ok(Resolver { source, tls, timeout })
    }

    pub(crate) fn is_sentinel(&self) -> bool {
        matches!(self.source, Source::Sentinel(_))
    }

    /// The fixed server's clients, if the topology has one.
    pub(crate) fn fixed(&self) -> Option<Target> {
        match &self.source {
            Source::Fixed(info) => self.target(info.clone()).ok(),
            Source::Sentinel(_) => None,
        }
    }

    pub(crate) async fn resolve(&self) -> Result<Target, Unresolved> {
        let info = match &self.source {
            Source::Fixed(info) => info.clone(),
            Source::Sentinel(s) => match s.master(&self.tls, self.timeout).await {
                Ok(info) => info,
                Err(e) => {
                    let setting = e.unknown_name || tls::message_is_certificate_error(&e.why);
                    return Err(Unresolved { setting, why: format!("no Redis master: {}", e.why) });
                }
            },
        };
        self.target(info).map_err(|why| Unresolved { setting: true, why })
    }

    fn target(&self, info: ConnectionInfo) -> Result<Target, String> {
        let key = info.addr().to_string();
        let resp3 = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let pubsub = self.tls.client(info.clone().set_redis_settings(resp3))?;
        let commands = self.tls.client(info)?;
        Ok(Target { key, commands, pubsub })
    }
}
