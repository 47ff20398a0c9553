//! Reaching the topology: one server, the master Sentinel names (the command connection
//! follows it), or every master of a Cluster; then the control channels and every tracked
//! channel are subscribed and gap-filled. And the probe that notices a lost or demoted server.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Value};
use tokio::sync::mpsc;

use super::shards::{Conn, Shard};
use super::{End, Step, Task, lost};
use crate::command::bounded;

/// The server process's run id (`INFO server`): changes with every restart and differs between
/// a master and the replica promoted in its place.
async fn run_id(con: &mut MultiplexedConnection, t: Duration) -> Result<String, End> {
    let info: String = bounded(t, redis::cmd("INFO").arg("server").query_async(con)).await.map_err(lost)?;
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(|id| id.trim().to_owned())
        .filter(|id| !id.is_empty())
        .ok_or_else(|| lost("INFO server has no run_id"))
}

impl Task {
    /// Connects (one connection, or one per Cluster master), subscribes the control channel and
    /// every channel, and gap-fills them.
    pub(super) async fn connect(&mut self) -> Result<Conn, End> {
        let t = self.ctx.options.command_timeout;
        let (targets, slots) = if self.resolver.is_redis_cluster() {
            match self.resolver.shards().await {
                Ok((map, targets)) => (targets, Some(map)),
                Err(f) => {
                    self.ctx.set_setting_problem(f.is_setting().then(|| f.to_string()));
                    return Err(lost(f));
                }
            }
        } else {
            match self.resolver.resolve().await {
                Ok(target) => (vec![target], None),
                Err(f) => {
                    self.ctx.set_setting_problem(f.is_setting().then(|| f.to_string()));
                    return Err(lost(f));
                }
            }
        };
        let (tx, pushes) = mpsc::unbounded_channel();
        let mut shards = Vec::with_capacity(targets.len());
        let mut first = None;
        for target in targets {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(t))
                .set_response_timeout(Some(t))
                .set_push_sender(tx.clone());
            let mut con = match bounded(t, target.pubsub.get_multiplexed_async_connection_with_config(&config)).await {
                Ok(con) => con,
                Err(e) => {
                    let why = format!("{} ({})", e, target.key);
                    let setting = crate::tls::message_is_certificate_error(&why);
                    self.ctx.set_setting_problem(setting.then(|| format!("redis TLS: {why}")));
                    return Err(lost(why));
                }
            };
            let mut name = redis::cmd("CLIENT");
            name.arg("SETNAME").arg(self.ctx.client_name());
            if let Err(e) = bounded(t, name.query_async::<Value>(&mut con)).await {
                tracing::debug!(error = %e, "CLIENT SETNAME failed");
            }
            let history_sha = bounded(t, self.ctx.scripts.history.load_async(&mut con)).await.map_err(lost)?;
            let key = target.key.clone();
            if first.is_none() {
                first = Some(target);
            }
            shards.push(Shard { con, history_sha, key });
        }
        self.ctx.set_setting_problem(None);
        if self.resolver.is_sentinel()
            && let (Some(shard), Some(target)) = (shards.first_mut(), first)
        {
            self.follow(&mut shard.con, target).await?;
        }
        if self.resolver.is_redis_cluster() && !self.ctx.commands.is_set() {
            let con = self.resolver.cluster_commands().await.map_err(|e| lost(format!("cluster commands: {e}")))?;
            self.ctx.commands.replace(crate::command::Con::Cluster(con), String::new());
        }
        let mut conn = Conn { shards, slots, pushes, unsubscribing: HashMap::new() };
        // The control channel: plain pub/sub (a Cluster broadcasts it to every node).
        if let Some(shard) = conn.shards.first_mut() {
            bounded(t, shard.con.subscribe(self.ctx.keys.control())).await.map_err(lost)?;
            bounded(t, shard.con.subscribe(self.ctx.keys.reply(&self.ctx.instance))).await.map_err(lost)?;
        }
        let tracked: Vec<String> = self.channels.keys().map(|c| c.to_string()).collect();
        for (shard, channels) in conn.group(&tracked) {
            let names: Vec<String> = channels.iter().map(|c| self.ctx.keys.pubsub(c)).collect();
            conn.subscribe(shard, &names, t).await?;
        }
        if conn.shards.len() > 1 {
            tracing::info!(shards = conn.shards.len(), masters = ?conn.shards.iter().map(|s| &s.key).collect::<Vec<_>>(), "redis cluster pub/sub connected");
        }
        self.fill(&mut conn, &tracked).await?;
        self.drain(&mut conn).await?;
        Ok(conn)
    }

    /// Sentinel: points the command connection at the master this connection reached (when it
    /// changed), with that server process's run id as the publish script's generation.
    async fn follow(&mut self, con: &mut MultiplexedConnection, target: crate::topology::Target) -> Step {
        let t = self.ctx.options.command_timeout;
        let run_id = run_id(con, t).await?;
        let manager =
            crate::command::manager(target.commands, t, self.ctx.options.reconnect_min, self.ctx.options.reconnect_max)
                .map_err(lost)?;
        if self.current.as_deref() != Some(target.key.as_str()) {
            tracing::info!(master = %target.key, previous = ?self.current, "redis master (from Sentinel)");
        }
        self.ctx.commands.replace(crate::command::Con::Single(manager), run_id);
        self.current = Some(target.key);
        Ok(())
    }

    /// The probe: PING, or with Sentinel or a Cluster ROLE on every connection (a demoted
    /// master still answers PING).
    pub(super) async fn probe(&self, conn: &mut Conn) -> Step {
        let t = self.ctx.options.command_timeout;
        let check_role = self.resolver.is_sentinel() || self.resolver.is_redis_cluster();
        for shard in &mut conn.shards {
            if !check_role {
                let ping = redis::cmd("PING");
                bounded(t, ping.query_async::<Value>(&mut shard.con))
                    .await
                    .map_err(|e| lost(format!("probe failed: {e}")))?;
                continue;
            }
            let reply = bounded(t, redis::cmd("ROLE").query_async::<Value>(&mut shard.con))
                .await
                .map_err(|e| lost(format!("probe of {} failed: {e}", shard.key)))?;
            match crate::sentinel::role_of(&reply).as_deref() {
                Some("master") => {}
                other => return Err(lost(format!("{} is no longer a master (role {other:?})", shard.key))),
            }
        }
        Ok(())
    }
}
