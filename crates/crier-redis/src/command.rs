//! The command connection: every request/response call (publish, history, presence, ...) goes
//! through one multiplexed, auto-reconnecting connection with a hard deadline per call, and
//! Redis errors become typed [`Fault`]s (see `error.rs`).

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, RedisResult, ScriptInvocation, Value};
use tokio::sync::Notify;

use crate::error::Fault;

/// One server (auto-reconnecting), or a Redis Cluster (routing by key slot, following MOVED and
/// ASK, refreshing its slot map by itself).
#[derive(Clone)]
pub(crate) enum Con {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Con {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Con::Single(c) => c.req_packed_command(cmd),
            Con::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Con::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Con::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::Single(c) => c.get_db(),
            Con::Cluster(c) => c.get_db(),
        }
    }
}

/// A cheap handle to the command connection. Its server can change (Sentinel failover: the
/// pub/sub task swaps in a connection to the new master, [`Commands::replace`]); with none yet,
/// calls are `Unavailable`.
#[derive(Clone)]
pub(crate) struct Commands {
    /// The connection and the generation of its server (see [`Commands::generational`]).
    manager: Arc<RwLock<Option<(Con, String)>>>,
    timeout: Duration,
    /// Notified when a call hit a read-only replica (`READONLY`): the master moved.
    pub(crate) readonly: Arc<Notify>,
    /// Whether Redis ever answered a call (a reply, even an error reply). Until it has, no
    /// connection ever worked, and a publish that found no answer was not sent (`Unavailable`).
    answered: Arc<AtomicBool>,
}

/// A lazily connecting, auto-reconnecting command connection to `client`'s server.
pub(crate) fn manager(
    client: redis::Client,
    timeout: Duration,
    min: Duration,
    max: Duration,
) -> Result<ConnectionManager, Fault> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(min)
        .set_max_delay(max);
    ConnectionManager::new_lazy_with_config(client, config).map_err(|e| Fault::from_redis(&e))
}

impl Commands {
    pub(crate) fn new(manager: Option<ConnectionManager>, timeout: Duration) -> Commands {
        let manager = manager.map(|m| (Con::Single(m), String::new()));
        Commands {
            manager: Arc::new(RwLock::new(manager)),
            timeout,
            readonly: Arc::new(Notify::new()),
            answered: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Points every later call at another server, whose process is `generation` (its run id).
    pub(crate) fn replace(&self, manager: Con, generation: String) {
        *self.manager.write().unwrap_or_else(|e| e.into_inner()) = Some((manager, generation));
    }

    /// Whether a connection is set (a Cluster's is made by the pub/sub task once reachable).
    pub(crate) fn is_set(&self) -> bool {
        self.manager.read().unwrap_or_else(|e| e.into_inner()).is_some()
    }

    fn current(&self) -> Result<(Con, String), Fault> {
        self.manager
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| Fault::Connection("no Redis master known yet".into()))
    }

    fn con(&self) -> Result<Con, Fault> {
        self.current().map(|(con, _)| con)
    }

    /// The connection for a script about channels, with the generation of its server to pass
    /// the script ('' for a fixed server; a Sentinel master's run id), read together so they
    /// match: the publish script starts a new epoch on a server whose data another process
    /// wrote (a promoted replica), see `scripts::PUBLISH`. On a Cluster `*`: the script reads
    /// the run id of the master it runs on itself (the cluster client picks the node; no map
    /// here can be fresher).
    pub(crate) fn generational(&self) -> Result<(Con, String), Fault> {
        let (con, generation) = self.current()?;
        if let Con::Cluster(_) = con {
            return Ok((con, "*".to_owned()));
        }
        Ok((con, generation))
    }

    /// Runs a script that writes (the publish script) on `con` (from
    /// [`Commands::generational`]). Failures after the call may have reached Redis are
    /// `OutcomeUnknown`: no answer within the deadline, or the connection lost on the way
    /// (a refused connection or an error reply means it was not applied).
    pub(crate) async fn invoke_on(&self, mut con: Con, invocation: &ScriptInvocation<'_>) -> Result<Value, Fault> {
        let result = self.answer(invocation.invoke_async::<Value>(&mut con)).await.map_err(|e| match e {
            Some(e) => Fault::from_write(&e),
            None => Fault::MaybeApplied(Fault::late(self.timeout).to_string()),
        });
        match result {
            Err(Fault::MaybeApplied(why)) if !self.answered.load(Ordering::Relaxed) => {
                Err(Fault::Connection(format!("{why} (no connection to Redis has worked yet)")))
            }
            other => other,
        }
    }

    async fn run<T>(&self, fut: impl Future<Output = RedisResult<T>>) -> Result<T, Fault> {
        self.answer(fut).await.map_err(|e| match e {
            Some(e) => Fault::from_redis(&e),
            None => Fault::late(self.timeout),
        })
    }

    /// Awaits a call for at most the deadline, noting whether Redis answered (a reply, even an
    /// error reply) and whether the call hit a read-only replica. `Err(None)`: no answer in time.
    async fn answer<T>(&self, fut: impl Future<Output = RedisResult<T>>) -> Result<T, Option<RedisError>> {
        let result = tokio::time::timeout(self.timeout, fut).await.map_err(|_| None)?;
        if !result.as_ref().is_err_and(RedisError::is_io_error) {
            self.answered.store(true, Ordering::Relaxed);
        }
        result.map_err(|e| {
            if e.code() == Some("READONLY") {
                self.readonly.notify_one();
            }
            Some(e)
        })
    }

    /// Runs a script (EVALSHA, loading it on NOSCRIPT).
    pub(crate) async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, Fault> {
        let mut con = self.con()?;
        self.run(invocation.invoke_async::<Value>(&mut con)).await
    }

    /// Runs a plain command.
    pub(crate) async fn query(&self, cmd: &redis::Cmd) -> Result<Value, Fault> {
        let mut con = self.con()?;
        self.run(cmd.query_async::<Value>(&mut con)).await
    }

    /// Whether commands go to a Redis Cluster (a multi-key script must then keep its keys in
    /// one slot).
    pub(crate) fn is_redis_cluster(&self) -> bool {
        matches!(self.manager.read().unwrap_or_else(|e| e.into_inner()).as_ref(), Some((Con::Cluster(_), _)))
    }
}

/// Awaits `fut` for at most `timeout`; a late answer is a [`Fault::Timeout`].
pub(crate) async fn bounded<T>(timeout: Duration, fut: impl Future<Output = RedisResult<T>>) -> Result<T, Fault> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Fault::from_redis(&e)),
        Err(_) => Err(Fault::late(timeout)),
    }
}
