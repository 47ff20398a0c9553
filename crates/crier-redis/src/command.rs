//! The command connection: every request/response call (publish, history, presence, ...) goes
//! through one multiplexed, auto-reconnecting connection with a hard deadline per call, and
//! Redis errors become [`BrokerError`]s (`Unavailable` for anything that means "Redis cannot
//! serve this right now").

use std::future::Future;
use std::time::Duration;

use crier_core::BrokerError;
use redis::aio::ConnectionManager;
use redis::{ErrorKind, RedisError, RedisResult, ScriptInvocation, ServerErrorKind, Value};

/// A cheap handle to the command connection.
#[derive(Clone)]
pub(crate) struct Commands {
    manager: ConnectionManager,
    timeout: Duration,
}

impl Commands {
    pub(crate) fn new(manager: ConnectionManager, timeout: Duration) -> Commands {
        Commands { manager, timeout }
    }

    /// Runs a script (EVALSHA, loading it on NOSCRIPT).
    pub(crate) async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, BrokerError> {
        let mut con = self.manager.clone();
        bounded(self.timeout, invocation.invoke_async::<Value>(&mut con)).await
    }

    /// Runs a plain command.
    pub(crate) async fn query(&self, cmd: &redis::Cmd) -> Result<Value, BrokerError> {
        let mut con = self.manager.clone();
        bounded(self.timeout, cmd.query_async::<Value>(&mut con)).await
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
