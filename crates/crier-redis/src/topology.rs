//! Which Redis the broker talks to: one fixed server (`redis_url`), or the master named by
//! Redis Sentinel, re-resolved after every lost connection (`redis_sentinel_urls` +
//! `redis_sentinel_master`). Either way over TLS for `rediss://` ([`crate::tls`]).
//!
//! The pub/sub task resolves before every (re)connect; when the master changed, it swaps the
//! command connection over to the new one too (see `pubsub::Task::connect`).

use std::time::Duration;

use redis::{ConnectionInfo, ProtocolVersion};

use crate::error::Fault;
use crate::sentinel::Sentinels;
use crate::slots::SlotMap;
use crate::tls::{self, Tls};

/// How to find Redis (from [`crate::RedisOptions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    /// One Redis: `redis://`, `rediss://` or `unix://`.
    Single(String),
    /// Sentinel addresses (`redis://` or `rediss://`) and the master's name.
    Sentinel { urls: Vec<String>, master: String },
    /// Seed nodes of a Redis Cluster (`redis://` or `rediss://`).
    Cluster(Vec<String>),
}

enum Source {
    Fixed(ConnectionInfo),
    Sentinel(Sentinels),
    Cluster(Vec<ConnectionInfo>),
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
    pub(crate) fn new(topology: &Topology, tls: Tls, timeout: Duration) -> Result<Resolver, Fault> {
        let source = match topology {
            Topology::Single(url) => {
                let info = tls::parse_url(url)?;
                tls.client(info.clone())?;
                Source::Fixed(info)
            }
            Topology::Sentinel { urls, master } => {
                if urls.is_empty() {
                    return Err(Fault::Setting("redis_sentinel_urls: no Sentinel address".to_owned()));
                }
                if master.trim().is_empty() {
                    return Err(Fault::Setting("redis_sentinel_master: empty master name".to_owned()));
                }
                let mut sentinels = Vec::with_capacity(urls.len());
                for url in urls {
                    let info = tls::parse_url(url)?;
                    if let redis::ConnectionAddr::Unix(_) = info.addr() {
                        return Err(Fault::Setting(
                            "redis_sentinel_urls: Sentinels are reached over TCP (redis:// or rediss://)".into(),
                        ));
                    }
                    tls.client(info.clone())?;
                    sentinels.push(info);
                }
                Source::Sentinel(Sentinels { sentinels, master: master.trim().to_owned() })
            }
            Topology::Cluster(urls) => {
                if urls.is_empty() {
                    return Err(Fault::Setting("redis_cluster_urls: no seed node".to_owned()));
                }
                let mut seeds = Vec::with_capacity(urls.len());
                for url in urls {
                    let info = tls::parse_url(url)?;
                    if let redis::ConnectionAddr::Unix(_) = info.addr() {
                        return Err(Fault::Setting("redis_cluster_urls: cluster nodes are reached over TCP".into()));
                    }
                    if info.redis_settings().db() != 0 {
                        return Err(Fault::Setting("redis_cluster_urls: a Redis Cluster has only database 0".into()));
                    }
                    tls.client(info.clone())?;
                    seeds.push(info);
                }
                Source::Cluster(seeds)
            }
        };
        Ok(Resolver { source, tls, timeout })
    }

    pub(crate) fn is_sentinel(&self) -> bool {
        matches!(self.source, Source::Sentinel(_))
    }

    pub(crate) fn is_redis_cluster(&self) -> bool {
        matches!(self.source, Source::Cluster(_))
    }

    /// A Cluster's current slot map (from the first seed that answers) and a RESP3 pub/sub client
    /// per master. `Fault::Setting`: a problem retrying cannot fix (reported at start as a bad
    /// setting instead of being retried silently).
    pub(crate) async fn shards(&self) -> Result<(SlotMap, Vec<Target>), Fault> {
        let Source::Cluster(seeds) = &self.source else {
            let target = self.resolve().await?;
            return Err(Fault::Setting(format!("not a cluster ({})", target.key)));
        };
        let mut problems = Vec::new();
        for seed in seeds {
            let reply = match self.ask(seed, redis::cmd("CLUSTER").arg("SLOTS")).await {
                Ok(reply) => reply,
                Err(e) => {
                    let text = e.to_string();
                    if text.contains("cluster support disabled") || tls::message_is_certificate_error(&text) {
                        return Err(Fault::Setting(format!("redis_cluster_urls {}: {e}", seed.addr())));
                    }
                    problems.push(format!("{}: {e}", seed.addr()));
                    continue;
                }
            };
            match SlotMap::parse(&reply, seed) {
                Ok(map) => {
                    let mut targets = Vec::with_capacity(map.masters.len());
                    for m in &map.masters {
                        targets.push(self.target(m.clone())?);
                    }
                    return Ok((map, targets));
                }
                Err(e) => problems.push(format!("{}: {e}", seed.addr())),
            }
        }
        Err(Fault::Connection(format!("no usable Redis Cluster seed: {}", problems.join("; "))))
    }

    /// A Cluster command connection (routes by slot, follows MOVED/ASK).
    pub(crate) async fn cluster_commands(&self) -> Result<redis::cluster_async::ClusterConnection, Fault> {
        let Source::Cluster(seeds) = &self.source else { return Err(Fault::Setting("not a cluster".into())) };
        let mut builder = redis::cluster::ClusterClientBuilder::new(seeds.clone())
            .connection_timeout(self.timeout)
            .response_timeout(self.timeout)
            .retries(2);
        if let Some(certs) = self.tls.certificates() {
            builder = builder.certs(certs);
        }
        let client = builder.build().map_err(|e| Fault::Setting(e.to_string()))?;
        match tokio::time::timeout(self.timeout * 2, client.get_async_connection()).await {
            Ok(Ok(con)) => Ok(con),
            Ok(Err(e)) => Err(Fault::Connection(e.to_string())),
            Err(_) => Err(Fault::Timeout { what: "no cluster connection", after: self.timeout * 2 }),
        }
    }

    async fn ask(&self, info: &ConnectionInfo, cmd: &redis::Cmd) -> Result<redis::Value, Fault> {
        let client = self.tls.client(info.clone())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        let fut = async {
            let mut con = client.get_multiplexed_async_connection_with_config(&config).await?;
            cmd.query_async::<redis::Value>(&mut con).await
        };
        match tokio::time::timeout(self.timeout * 2, fut).await {
            Ok(r) => r.map_err(|e| Fault::Connection(e.to_string())),
            Err(_) => Err(Fault::Timeout { what: "no answer", after: self.timeout * 2 }),
        }
    }

    /// The fixed server's clients, if the topology has one.
    pub(crate) fn fixed(&self) -> Option<Target> {
        match &self.source {
            Source::Fixed(info) => self.target(info.clone()).ok(),
            Source::Sentinel(_) | Source::Cluster(_) => None,
        }
    }

    /// The server to connect to; `Fault::Setting` as for [`Resolver::shards`].
    pub(crate) async fn resolve(&self) -> Result<Target, Fault> {
        let info = match &self.source {
            Source::Fixed(info) => info.clone(),
            Source::Sentinel(s) => match s.master(&self.tls, self.timeout).await {
                Ok(info) => info,
                Err(e) => {
                    let why = format!("no Redis master: {}", e.why);
                    let setting = e.unknown_name || tls::message_is_certificate_error(&e.why);
                    return Err(if setting { Fault::Setting(why) } else { Fault::Connection(why) });
                }
            },
            Source::Cluster(_) => return Err(Fault::Setting("a cluster has many masters".into())),
        };
        self.target(info)
    }

    fn target(&self, info: ConnectionInfo) -> Result<Target, Fault> {
        let key = info.addr().to_string();
        let resp3 = info.redis_settings().clone().set_protocol(ProtocolVersion::RESP3);
        let pubsub = self.tls.client(info.clone().set_redis_settings(resp3))?;
        let commands = self.tls.client(info)?;
        Ok(Target { key, commands, pubsub })
    }
}
