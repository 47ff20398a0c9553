//! The command connection: every request/response call (publish, history, presence, ...) goes
//! through one multiplexed, auto-reconnecting connection with a hard deadline per call, and
//! Redis errors become [`BrokerError`]s (`Unavailable` for anything that means "Redis cannot
//! serve this right now").

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crier_core::BrokerError;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, RedisResult, ScriptInvocation, ServerErrorKind, Value};
use tokio::sync::Notify;

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
) -> Result<ConnectionManager, BrokerError> {
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_min_delay(min)
        .set_max_delay(max);
    ConnectionManager::new_lazy_with_config(client, config).map_err(|e| broker_error(&e))
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

    fn current(&self) -> Result<(Con, String), BrokerError> {
        self.manager
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or_else(|| BrokerError::Unavailable("no Redis master known yet".into()))
    }

    fn con(&self) -> Result<Con, BrokerError> {
        self.current().map(|(con, _)| con)
    }

    /// The connection for a script about channels, with the generation of its server to pass
    /// the script ('' for a fixed server; a Sentinel master's run id), read together so they
    /// match: the publish script starts a new epoch on a server whose data another process
    /// wrote (a promoted replica), see `scripts::PUBLISH`. On a Cluster `*`: the script reads
    /// the run id of the master it runs on itself (the cluster client picks the node; no map
    /// here can be fresher).
    pub(crate) fn generational(&self) -> Result<(Con, String), BrokerError> {
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
    pub(crate) async fn invoke_on(
        &self,
        mut con: Con,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Value, BrokerError> {
        let result = self.answer(invocation.invoke_async::<Value>(&mut con)).await.map_err(|e| match e {
            Some(e) => write_error(&e),
            None => BrokerError::OutcomeUnknown(self.late()),
        });
        match result {
            Err(BrokerError::OutcomeUnknown(why)) if !self.answered.load(Ordering::Relaxed) => {
                Err(BrokerError::Unavailable(format!("{why} (no connection to Redis has worked yet)")))
            }
            other => other,
        }
    }

    async fn run<T>(&self, fut: impl Future<Output = RedisResult<T>>) -> Result<T, BrokerError> {
        self.answer(fut).await.map_err(|e| match e {
            Some(e) => broker_error(&e),
            None => BrokerError::Unavailable(self.late()),
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

    fn late(&self) -> String {
        format!("redis did not answer within {:?}", self.timeout)
    }

    /// Runs a script (EVALSHA, loading it on NOSCRIPT).
    pub(crate) async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, BrokerError> {
        let mut con = self.con()?;
        self.run(invocation.invoke_async::<Value>(&mut con)).await
    }

    /// Runs a plain command.
    pub(crate) async fn query(&self, cmd: &redis::Cmd) -> Result<Value, BrokerError> {
        let mut con = self.con()?;
        self.run(cmd.query_async::<Value>(&mut con)).await
    }

    /// Whether commands go to a Redis Cluster (a multi-key script must then keep its keys in
    /// one slot).
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.manager.read().unwrap_or_else(|e| e.into_inner()).as_ref(), Some((Con::Cluster(_), _)))
    }
}

/// Awaits `fut` for at most `timeout`; a late answer is `Unavailable`.
pub(crate) async fn bounded<T>(timeout: Duration, fut: impl Future<Output = RedisResult<T>>) -> Result<T, BrokerError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(broker_error(&e)),
        Err(_) => Err(BrokerError::Unavailable(format!("redis did not answer within {timeout:?}"))),
    }
}

/// Maps the error of a call that writes: an I/O error that can come after the call was sent
/// (a reset or aborted connection, an early end of the stream, the client library's own
/// timeout) means it may have been applied (`OutcomeUnknown`). A refused connection, and the
/// broken pipe the client library reports for a connection already known to be gone, are
/// `Unavailable` (nothing was sent; the library reports a connection that breaks while a call
/// is out the same way, a narrow race documented in docs/protocol.md). The rest as
/// [`broker_error`].
pub(crate) fn write_error(e: &RedisError) -> BrokerError {
    if e.is_io_error() && !e.is_connection_refusal() {
        // redis-rs keeps the I/O error's kind to itself: its text says which.
        let text = e.to_string().to_ascii_lowercase();
        let not_sent = text.contains("broken pipe") || text.contains("not connected");
        if e.is_timeout() || !not_sent {
            return BrokerError::OutcomeUnknown(format!("redis: {e}"));
        }
    }
    broker_error(e)
}

/// Maps the error of one message of a batched script call (`"<CODE> <text>"`, caught in the
/// script): what means "Redis cannot serve this right now" is `Unavailable`, the rest (a key of
/// the wrong type, a bug) `Internal`, as [`broker_error`] does for a whole call.
pub(crate) fn script_error(message: &str) -> BrokerError {
    let code = message.split_whitespace().next().unwrap_or("");
    let transient = matches!(
        code,
        "OOM" | "BUSY" | "READONLY" | "LOADING" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "NOREPLICAS" | "MISCONF"
    );
    if transient {
        BrokerError::Unavailable(format!("redis: {message}"))
    } else {
        BrokerError::Internal(format!("redis: {message}"))
    }
}

/// Maps a Redis error: logic errors (a bad script, a wrong type) are `Internal`, everything
/// else (I/O, loading, read-only replica, out of memory, busy script, ...) is `Unavailable`.
pub(crate) fn broker_error(e: &RedisError) -> BrokerError {
    let logic = match e.kind() {
        ErrorKind::Server(ServerErrorKind::ResponseError) => !matches!(e.code(), Some("OOM" | "BUSY")),
        ErrorKind::Server(
            ServerErrorKind::NoScript
            | ServerErrorKind::CrossSlot
            | ServerErrorKind::ExecAbort
            | ServerErrorKind::NoSub,
        )
        | ErrorKind::Parse
        | ErrorKind::UnexpectedReturnType
        | ErrorKind::InvalidClientConfig => true,
        _ => false,
    };
    if logic { BrokerError::Internal(format!("redis: {e}")) } else { BrokerError::Unavailable(format!("redis: {e}")) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_errors_say_whether_the_call_may_have_been_applied() {
        let io = |k: std::io::ErrorKind| write_error(&RedisError::from(std::io::Error::from(k)));
        use std::io::ErrorKind as K;
        for k in [K::ConnectionReset, K::ConnectionAborted, K::UnexpectedEof, K::TimedOut] {
            assert!(matches!(io(k), BrokerError::OutcomeUnknown(_)), "{k:?}");
        }
        for k in [K::BrokenPipe, K::NotConnected, K::ConnectionRefused] {
            assert!(matches!(io(k), BrokerError::Unavailable(_)), "{k:?}");
        }
    }
}
