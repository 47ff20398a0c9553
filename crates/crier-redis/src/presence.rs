//! Cluster state that expires by itself: channel presence, connections per user, the node
//! registry. Each is a ZSET member → expiry time (ms, Redis clock), plus a HASH member → JSON
//! where there is an entry to show; readers drop expired members first (see `scripts.rs`).
//!
//! This node's own entries are remembered here and refreshed by a background task every
//! `ttl / 3`, so they live while the node does and vanish within one TTL after it dies (or after
//! the broker is dropped). The refresh also re-creates them after Redis lost its data.
//! Members are `<broker instance>/<client>`, so two nodes can never overwrite each other's
//! entries even if their client ids collide.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crier_core::{BrokerError, NodeInfo};
use crier_protocol::frames::PresenceEntry;
use redis::Value;
use serde::Deserialize;
use tokio::sync::watch;

use crate::command::Commands;
use crate::keys::Keys;
use crate::scripts::{Scripts, bulk, int};

/// Refresh calls per pipeline.
const REFRESH_BATCH: usize = 500;

#[derive(Default)]
struct Local {
    /// (channel, member) → entry JSON.
    presence: HashMap<(String, String), String>,
    /// (user, member).
    connections: HashSet<(String, String)>,
    /// (node, NodeInfo JSON).
    node: Option<(String, String)>,
}

/// `NodeInfo` as read back (the core type is serialise-only).
#[derive(Deserialize)]
struct StoredNode {
    node: String,
    connections: u64,
    version: String,
}

/// See the module docs.
pub(crate) struct ClusterState {
    commands: Commands,
    keys: Keys,
    scripts: Arc<Scripts>,
    instance: String,
    presence_ttl: Duration,
    node_ttl: Duration,
    local: Mutex<Local>,
}

use crate::millis as ms;

impl ClusterState {
    pub(crate) fn new(
        commands: Commands,
        keys: Keys,
        scripts: Arc<Scripts>,
        instance: String,
        presence_ttl: Duration,
        node_ttl: Duration,
    ) -> ClusterState {
        ClusterState { commands, keys, scripts, instance, presence_ttl, node_ttl, local: Mutex::default() }
    }

    fn local(&self) -> MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn member(&self, client: &str) -> String {
        format!("{}/{client}", self.instance)
    }

    /// How often the background task refreshes this node's entries.
    pub(crate) fn refresh_period(&self) -> Duration {
        (self.presence_ttl.min(self.node_ttl) / 3).max(Duration::from_millis(100))
    }

    pub(crate) async fn presence_add(&self, channel: &str, entry: &PresenceEntry) -> Result<(), BrokerError> {
        let json = serde_json::to_string(entry).map_err(|e| BrokerError::Internal(e.to_string()))?;
        let member = self.member(&entry.client);
        let (z, h) = self.keys.presence(channel);
        // Remembered first: if Redis is down now, the refresh adds it once Redis is back.
        self.local().presence.insert((channel.to_owned(), member.clone()), json.clone());
        let mut inv = self.scripts.ttl_add.key(&z);
        inv.key(&h).arg(&member).arg(ms(self.presence_ttl)).arg(&json);
        self.commands.invoke(&inv).await.map(drop)
    }

    pub(crate) async fn presence_remove(&self, channel: &str, client: &str) -> Result<(), BrokerError> {
        let member = self.member(client);
        self.local().presence.remove(&(channel.to_owned(), member.clone()));
        let (z, h) = self.keys.presence(channel);
        let mut inv = self.scripts.ttl_remove.key(&z);
        inv.key(&h).arg(&member);
        self.commands.invoke(&inv).await.map(drop)
    }

    pub(crate) async fn presence(&self, channel: &str) -> Result<Vec<PresenceEntry>, BrokerError> {
        let (z, h) = self.keys.presence(channel);
        let mut inv = self.scripts.ttl_list.key(&z);
        inv.key(&h);
        Ok(json_values::<PresenceEntry>(&self.commands.invoke(&inv).await?))
    }

    pub(crate) async fn connection_opened(&self, user: &str, client: &str) -> Result<u64, BrokerError> {
        let member = self.member(client);
        let mut inv = self.scripts.ttl_add.key(self.keys.connections(user));
        inv.arg(&member).arg(ms(self.presence_ttl));
        let count = count(&self.commands.invoke(&inv).await?)?;
        self.local().connections.insert((user.to_owned(), member));
        Ok(count)
    }

    pub(crate) async fn connection_closed(&self, user: &str, client: &str) -> Result<(), BrokerError> {
        let member = self.member(client);
        self.local().connections.remove(&(user.to_owned(), member.clone()));
        let mut inv = self.scripts.ttl_remove.key(self.keys.connections(user));
        inv.arg(&member);
        self.commands.invoke(&inv).await.map(drop)
    }

    /// The user's live connections, cluster-wide.
    pub(crate) async fn connection_count(&self, user: &str) -> Result<u64, BrokerError> {
        let inv = self.scripts.ttl_list.key(self.keys.connections(user));
        count(&self.commands.invoke(&inv).await?)
    }

    pub(crate) async fn report_node(&self, info: &NodeInfo) -> Result<(), BrokerError> {
        let json = serde_json::to_string(info).map_err(|e| BrokerError::Internal(e.to_string()))?;
        self.local().node = Some((info.node.clone(), json.clone()));
        let (z, h) = self.keys.nodes();
        let mut inv = self.scripts.ttl_add.key(&z);
        inv.key(&h).arg(&info.node).arg(ms(self.node_ttl)).arg(&json);
        self.commands.invoke(&inv).await.map(drop)
    }

    pub(crate) async fn nodes(&self) -> Result<Vec<NodeInfo>, BrokerError> {
        let (z, h) = self.keys.nodes();
        let mut inv = self.scripts.ttl_list.key(&z);
        inv.key(&h);
        let stored = json_values::<StoredNode>(&self.commands.invoke(&inv).await?);
        Ok(stored
            .into_iter()
            .map(|n| NodeInfo { node: n.node, connections: n.connections, version: n.version })
            .collect())
    }

    /// Re-adds every entry of this node with a fresh expiry (pipelined).
    pub(crate) async fn refresh(&self) -> Result<(), BrokerError> {
        let (presence, connections, node) = {
            let local = self.local();
            if local.presence.is_empty() && local.connections.is_empty() && local.node.is_none() {
                return Ok(());
            }
            (
                local.presence.iter().map(|(k, v)| (k.clone(), v.clone())).collect::<Vec<_>>(),
                local.connections.iter().cloned().collect::<Vec<_>>(),
                local.node.clone(),
            )
        };
        let sha = self.commands.load(&self.scripts.ttl_add).await?;
        let add = |keys: &[String], member: &str, ttl: Duration, value: Option<&str>| {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(&sha).arg(keys.len()).arg(keys).arg(member).arg(ms(ttl));
            if let Some(v) = value {
                cmd.arg(v);
            }
            cmd
        };
        let mut calls = Vec::with_capacity(presence.len() + connections.len() + 1);
        for ((channel, member), json) in &presence {
            let (z, h) = self.keys.presence(channel);
            calls.push(add(&[z, h], member, self.presence_ttl, Some(json)));
        }
        for (user, member) in &connections {
            calls.push(add(&[self.keys.connections(user)], member, self.presence_ttl, None));
        }
        if let Some((name, json)) = &node {
            let (z, h) = self.keys.nodes();
            calls.push(add(&[z, h], name, self.node_ttl, Some(json)));
        }
        for chunk in calls.chunks(REFRESH_BATCH) {
            let mut pipe = redis::pipe();
            for cmd in chunk {
                pipe.add_command(cmd.clone()).ignore();
            }
            self.commands.pipeline(&pipe).await?;
        }
        Ok(())
    }
}

/// Refreshes this node's entries until the broker is dropped.
pub(crate) async fn refresh_loop(state: Arc<ClusterState>, mut shutdown: watch::Receiver<()>) {
    let period = state.refresh_period();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if let Err(e) = state.refresh().await {
            tracing::debug!(error = %e, "refreshing presence/connections/node failed; retrying next period");
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
