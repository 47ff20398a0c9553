//! Cluster state that expires by itself: channel presence, connections per user, the node
//! registry. Each is a ZSET member → expiry time (ms, Redis clock), plus a HASH member → JSON
//! where there is an entry to show; readers drop expired members first (see `scripts.rs`).
//!
//! This node's own entries are remembered here and refreshed by a background task every
//! `ttl / 3`, so they live while the node does and vanish within one TTL after it dies (or after
//! the broker is dropped). The refresh also re-creates them after Redis lost its data.
//! Members are `<broker instance>/<client>`, so two nodes can never overwrite each other's
//! entries even if their client ids collide.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crier_core::broker::OwnEntries;
use crier_core::{BrokerError, NodeInfo, PresenceStats};
use crier_protocol::frames::PresenceEntry;
use futures_util::StreamExt;
use redis::Value;
use serde::Deserialize;
use tokio::sync::watch;

use crate::context::Context;
use crate::hooks::Hooks;
use crate::scripts::{bulk, int};

/// Refresh calls per pipeline.
const REFRESH_BATCH: usize = 500;
/// Join/leave sweeps of different channels in flight at once.
const SWEEP_CONCURRENCY: usize = 16;

/// This node's own entries (one per subscription and per connection, compact: the member and
/// the entry JSON are rebuilt when refreshing) and its registry entry.
#[derive(Default)]
struct Local {
    own: OwnEntries,
    /// (node, NodeInfo JSON).
    node: Option<(String, String)>,
}

/// `NodeInfo` as read back (the core type is serialise-only).
#[derive(Deserialize)]
struct StoredNode {
    node: String,
    connections: u64,
    version: String,
    /// Absent in entries written by nodes before rebalancing: those count as ready.
    #[serde(default = "ready_by_default")]
    ready: bool,
    /// Absent in entries written by nodes before the admin page's details: zeros.
    #[serde(default)]
    uptime_s: u64,
    #[serde(default)]
    transports: crier_core::TransportCounts,
    #[serde(default)]
    memory_bytes: u64,
}

fn ready_by_default() -> bool {
    true
}

/// See the module docs.
pub(crate) struct Presence {
    pub(crate) ctx: Arc<Context>,
    local: Mutex<Local>,
    /// Webhooks (`hooks.rs`): set once they are enabled.
    pub(crate) hooks: Arc<Hooks>,
}

use crate::clock::millis as ms;

impl Presence {
    pub(crate) fn new(ctx: Arc<Context>) -> Presence {
        Presence { hooks: Arc::new(Hooks::new(ctx.clone())), ctx, local: Mutex::default() }
    }

    /// The pub/sub channel a presence script announces `channel`'s joins and leaves on: `''`
    /// when its policy has no `join_leave`.
    fn events_to(&self, channel: &str) -> String {
        if self.ctx.options.namespaces.policy(channel).join_leave {
            self.ctx.keys.pubsub(channel)
        } else {
            String::new()
        }
    }

    /// A presence script call on `channel`'s three keys.
    fn presence_call<'a>(&self, script: &'a redis::Script, channel: &str) -> redis::ScriptInvocation<'a> {
        let (z, h) = self.ctx.keys.presence(channel);
        let mut inv = script.key(z);
        inv.key(h).key(self.ctx.keys.presence_users(channel));
        inv
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn member(&self, client: &str) -> String {
        format!("{}/{client}", self.ctx.instance)
    }

    /// How often the background task refreshes this node's entries.
    pub(crate) fn refresh_period(&self) -> Duration {
        (self.ctx.options.presence_ttl.min(self.ctx.options.node_ttl) / 3).max(Duration::from_millis(100))
    }

    pub(crate) async fn presence_add(&self, channel: &str, entry: &PresenceEntry) -> Result<(), BrokerError> {
        self.presence_add_counted(channel, entry, 0).await.map(drop)
    }

    /// [`Presence::presence_add`], returning the channel's live presence entries after it
    /// (the script's answer: no extra round trip); `max` > 0: not added when the channel holds
    /// `max` others already (see `Broker::presence_add_counted`).
    pub(crate) async fn presence_add_counted(
        &self,
        channel: &str,
        entry: &PresenceEntry,
        max: u64,
    ) -> Result<u64, BrokerError> {
        let json = serde_json::to_string(entry).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let member = self.member(&entry.client);
        // Remembered first: if Redis is down now, the refresh adds it once Redis is back.
        {
            self.local().own.add_presence(channel, entry);
        }
        let mut inv = self.presence_call(&self.ctx.scripts.pres_add, channel);
        inv.arg(&member).arg(ms(self.ctx.options.presence_ttl)).arg(&json);
        inv.arg(self.ctx.keys.publish_command()).arg(self.events_to(channel)).arg(channel).arg(max);
        self.hooks.hook_args(&mut inv);
        let n = count(&self.ctx.commands.invoke(&inv).await?)?;
        if max > 0 && n > max {
            // Not added (full): not to be re-added by the refresh either.
            self.local().own.remove_presence(channel, &entry.client);
        }
        Ok(n)
    }

    pub(crate) async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let member = self.member(client);
        self.local().own.remove_presence(channel, client);
        let mut inv = self.presence_call(&self.ctx.scripts.pres_remove, channel);
        inv.arg(&member).arg(self.ctx.keys.publish_command()).arg(self.events_to(channel)).arg(channel);
        self.hooks.hook_args(&mut inv);
        self.ctx.commands.invoke(&inv).await.map(drop).map_err(Into::into)
    }

    /// A sweeping read of `channel`'s presence (`list` or `stats`, see `scripts::PRES_READ`).
    async fn presence_read(&self, channel: &str, what: &str) -> Result<Value, BrokerError> {
        let mut inv = self.presence_call(&self.ctx.scripts.pres_read, channel);
        inv.arg(self.ctx.keys.publish_command()).arg(self.events_to(channel)).arg(channel).arg(what);
        self.hooks.hook_args(&mut inv);
        Ok(self.ctx.commands.invoke(&inv).await?)
    }

    pub(crate) async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        Ok(json_values::<PresenceEntry>(&self.presence_read(channel, "list").await?))
    }

    /// One script call: expired members swept (their leaves announced), then `ZCARD` and `HLEN`.
    pub(crate) async fn presence_stats(&self, channel: &str) -> Result<PresenceStats, BrokerError> {
        let v = self.presence_read(channel, "stats").await?;
        let bad = || BrokerError::Internal("unexpected reply from redis: presence stats".into());
        let Value::Array(items) = v else { return Err(bad()) };
        match items.as_slice() {
            [clients, users] => Ok(PresenceStats { clients: count(clients)?, users: count(users)? }),
            _ => Err(bad()),
        }
    }

    /// Sweeps the presence of every channel with join/leave where this node has members, so
    /// that a dead node's members are announced (`leave`) within a refresh period of their
    /// expiry. Every node does it; the sweep and its leaves are one script, so each expired
    /// member is announced once, by whichever node swept it first.
    pub(crate) async fn sweep_join_leave(&self) -> Result<(), BrokerError> {
        let channels: HashSet<String> = {
            let local = self.local();
            local
                .own
                .presence()
                .map(|p| p.channel)
                .filter(|c| self.ctx.options.namespaces.policy(c).join_leave || self.hooks.members_enabled())
                .map(str::to_owned)
                .collect()
        };
        // A few calls in flight at once (the command connection is multiplexed), not one round
        // trip after another per channel.
        let mut sweeps = futures_util::stream::iter(channels)
            .map(|channel| async move { self.presence_read(&channel, "stats").await.map(drop) })
            .buffer_unordered(SWEEP_CONCURRENCY);
        let mut result = Ok(());
        while let Some(r) = sweeps.next().await {
            if r.is_err() {
                result = r;
            }
        }
        result
    }

    pub(crate) async fn connection_opened(&self, user: &str, client: &str) -> Result<u64, BrokerError> {
        let member = self.member(client);
        let mut inv = self.ctx.scripts.ttl_add.key(self.ctx.keys.connections(user));
        inv.arg(&member).arg(ms(self.ctx.options.presence_ttl));
        let count = count(&self.ctx.commands.invoke(&inv).await?)?;
        self.local().own.add_connection(user, client);
        Ok(count)
    }

    pub(crate) async fn connection_closed(&self, user: &str, client: &str) -> Result<(), BrokerError> {
        let member = self.member(client);
        self.local().own.remove_connection(user, client);
        let mut inv = self.ctx.scripts.ttl_remove.key(self.ctx.keys.connections(user));
        inv.arg(&member);
        self.ctx.commands.invoke(&inv).await.map(drop).map_err(Into::into)
    }

    /// The user's live connections, cluster-wide.
    pub(crate) async fn connection_count(&self, user: &str) -> Result<u64, BrokerError> {
        let inv = self.ctx.scripts.ttl_list.key(self.ctx.keys.connections(user));
        count(&self.ctx.commands.invoke(&inv).await?)
    }

    pub(crate) async fn report_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        let json = serde_json::to_string(info).map_err(|e| BrokerError::Internal(e.to_string()))?;
        self.local().node = Some((info.node.clone(), json.clone()));
        let (z, h) = self.ctx.keys.nodes();
        let mut inv = self.ctx.scripts.ttl_add.key(&z);
        inv.key(&h).arg(&info.node).arg(ms(self.ctx.options.node_ttl)).arg(&json);
        self.ctx.commands.invoke(&inv).await.map(drop).map_err(Into::into)
    }

    pub(crate) async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        let (z, h) = self.ctx.keys.nodes();
        let mut inv = self.ctx.scripts.ttl_list.key(&z);
        inv.key(&h);
        let stored = json_values::<StoredNode>(&self.ctx.commands.invoke(&inv).await?);
        Ok(stored
            .into_iter()
            .map(|n| NodeInfo {
                node: n.node,
                connections: n.connections,
                version: n.version,
                ready: n.ready,
                uptime_s: n.uptime_s,
                transports: n.transports,
                memory_bytes: n.memory_bytes,
            })
            .collect())
    }

    /// Re-adds every entry of this node with a fresh expiry, [`REFRESH_BATCH`] entries per call
    /// of the refresh script (`TTL_REFRESH`). Each call is built under the lock from the entries
    /// after the ones already sent, so a refresh never copies the whole set (with 10,000
    /// subscriptions a full copy was ~1 KiB per connection every period, and the allocator kept
    /// that peak resident). An entry added or removed meanwhile may be skipped this time: it has
    /// two more periods before it expires. Presence entries take three keys (set, hash, users)
    /// and go through `PRES_REFRESH` (an entry Redis lost comes back counted, with a `join` on
    /// join/leave channels); connection and node entries follow through `TTL_REFRESH`.
    pub(crate) async fn refresh(&self) -> Result<(), BrokerError> {
        if self.is_empty() {
            return Ok(());
        }
        // On a Cluster each entry's keys live in their own slot: one entry per call there.
        let batch = if self.ctx.commands.is_redis_cluster() { 1 } else { REFRESH_BATCH };
        // Presence entries: three keys each (set, hash, users), through the presence script.
        let mut done = 0usize;
        loop {
            let mut inv = self.ctx.scripts.pres_refresh.prepare_invoke();
            inv.arg(ms(self.ctx.options.presence_ttl)).arg(self.ctx.keys.publish_command());
            let mut n = 0usize;
            {
                let local = self.local();
                for p in local.own.presence().skip(done).take(batch) {
                    let (channel, client) = (p.channel, p.client);
                    let json = serde_json::to_string(&p.entry()).map_err(|e| BrokerError::Internal(e.to_string()))?;
                    let (z, h) = self.ctx.keys.presence(channel);
                    inv.key(z).key(h).key(self.ctx.keys.presence_users(channel));
                    inv.arg(self.member(client)).arg(json).arg(self.events_to(channel)).arg(channel);
                    n += 1;
                }
            }
            if n > 0 {
                self.hooks.hook_args(&mut inv);
                self.ctx.commands.invoke(&inv).await?;
            }
            done += n;
            if n < batch {
                break;
            }
        }
        // Connection entries: a set without a hash, through the generic refresh.
        let mut done = 0usize;
        loop {
            let mut inv = self.ctx.scripts.ttl_refresh.prepare_invoke();
            inv.arg(ms(self.ctx.options.presence_ttl));
            let mut n = 0usize;
            {
                let local = self.local();
                for (user, client) in local.own.connections().skip(done).take(batch) {
                    let z = self.ctx.keys.connections(user);
                    inv.key(&z).key(z).arg(self.member(client)).arg("");
                    n += 1;
                }
            }
            if n > 0 {
                self.ctx.commands.invoke(&inv).await?;
            }
            done += n;
            if n < batch {
                break;
            }
        }
        let node = self.local().node.clone();
        if let Some((name, json)) = node {
            let (z, h) = self.ctx.keys.nodes();
            let mut inv = self.ctx.scripts.ttl_refresh.key(z);
            inv.key(h).arg(ms(self.ctx.options.node_ttl)).arg(name).arg(json);
            self.ctx.commands.invoke(&inv).await?;
        }
        Ok(())
    }

    fn is_empty(&self) -> bool {
        let local = self.local();
        local.own.is_empty() && local.node.is_none()
    }
}

/// Refreshes this node's entries until the broker is dropped.
pub(crate) async fn refresh_loop(state: Arc<Presence>, mut shutdown: watch::Receiver<()>) {
    let period = state.refresh_period();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if let Err(e) = state.refresh().await {
            tracing::debug!(error = %e, "refreshing presence/connections/node failed; retrying next period");
        }
        if let Err(e) = state.sweep_join_leave().await {
            tracing::debug!(error = %e, "sweeping join/leave presence failed; retrying next period");
        }
        if let Err(e) = state.hooks.hook_refresh().await {
            tracing::debug!(error = %e, "refreshing/sweeping webhook channel occupancy failed; retrying next period");
        }
    }
}

fn count(v: &Value) -> Result<u64, BrokerError> {
    int(v)
        .and_then(|i| u64::try_from(i).ok())
        .ok_or_else(|| BrokerError::Internal("unexpected reply from redis: count".into()))
}

/// An array of JSON strings → the ones that parse.
fn json_values<T: serde::de::DeserializeOwned>(v: &Value) -> Vec<T> {
    let Value::Array(items) = v else { return Vec::new() };
    items.iter().filter_map(bulk).filter_map(|b| serde_json::from_slice(b).ok()).collect()
}

#[cfg(test)]
mod key_tests {
    use super::*;

    #[test]
    fn a_node_entry_written_before_readiness_was_reported_reads_as_ready() -> serde_json::Result<()> {
        let old: StoredNode = serde_json::from_str(r#"{"node":"a","connections":1,"version":"0.1.0"}"#)?;
        assert!(old.ready);
        let draining: StoredNode =
            serde_json::from_str(r#"{"node":"a","connections":1,"version":"0.1.0","ready":false}"#)?;
        assert!(!draining.ready);
        Ok(())
    }
}
