//! What can go wrong talking to Redis, decided once where it happens ([`Fault`]), and what each
//! kind means to a caller of the `Broker` trait (`From<Fault> for BrokerError`):
//!
//! | [`Fault`] | `BrokerError` | meaning |
//! |---|---|---|
//! | `Setting` | `Internal` | a setting is wrong; retrying cannot help |
//! | `Timeout`, `Connection`, `ReadOnly`, `Busy` | `Unavailable` | Redis cannot serve this right now |
//! | `Script`, `Reply` | `Internal` | an error reply retrying will not fix, or a reply of the wrong shape |
//! | `MaybeApplied` | `OutcomeUnknown` | a write that may have reached Redis got no answer |
//!
//! The texts are those the broker always gave (they reach logs and error bodies).

use std::time::Duration;

use crier_core::BrokerError;
use redis::{ErrorKind, RedisError, ServerErrorKind};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Fault {
    /// A setting is wrong (a malformed URL, an unreadable CA file, a certificate that does not
    /// verify, a master name no Sentinel knows, a seed that is no cluster node).
    #[error("{0}")]
    Setting(String),
    /// No answer within the deadline (`what`: "redis did not answer", "no connection", ...).
    #[error("{what} within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// No connection, or the connection was lost (I/O).
    #[error("{0}")]
    Connection(String),
    /// The server is a read-only replica (`READONLY`): the master moved.
    #[error("{0}")]
    ReadOnly(String),
    /// The server cannot serve this now: out of memory, a busy script, loading, a cluster that
    /// is down, ...
    #[error("{0}")]
    Busy(String),
    /// An error reply that retrying will not fix (a key of the wrong type, a script bug).
    #[error("{0}")]
    Script(String),
    /// A reply of an unexpected shape.
    #[error("{0}")]
    Reply(String),
    /// A write that may have been applied: no answer within the deadline, or the connection
    /// lost after the call was sent.
    #[error("{0}")]
    MaybeApplied(String),
}

impl Fault {
    /// Whether retrying cannot help.
    pub(crate) fn is_setting(&self) -> bool {
        matches!(self, Fault::Setting(_))
    }

    /// A reply of an unexpected shape: "unexpected reply from redis: `what`".
    pub(crate) fn reply(what: &str) -> Fault {
        Fault::Reply(format!("unexpected reply from redis: {what}"))
    }

    /// "redis did not answer within `after`".
    pub(crate) fn late(after: Duration) -> Fault {
        Fault::Timeout { what: "redis did not answer", after }
    }

    /// Classifies a Redis error: logic errors (a bad script, a wrong type) are `Script`, a
    /// read-only replica `ReadOnly`, I/O `Connection`, the rest (loading, out of memory, busy
    /// script, ...) `Busy`.
    pub(crate) fn from_redis(e: &RedisError) -> Fault {
        let text = format!("redis: {e}");
        if e.code() == Some("READONLY") {
            return Fault::ReadOnly(text);
        }
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
        if logic {
            Fault::Script(text)
        } else if e.is_io_error() || e.is_connection_refusal() || e.is_connection_dropped() {
            Fault::Connection(text)
        } else {
            Fault::Busy(text)
        }
    }

    /// Classifies the error of a call that writes: an I/O error that can come after the call was
    /// sent (a reset or aborted connection, an early end of the stream, the client library's own
    /// timeout) means it may have been applied (`MaybeApplied`). A refused connection, and the
    /// broken pipe the client library reports for a connection already known to be gone, mean
    /// nothing was sent (the library reports a connection that breaks while a call is out the
    /// same way, a narrow race documented in docs/protocol.md). The rest as [`Fault::from_redis`].
    pub(crate) fn from_write(e: &RedisError) -> Fault {
        if e.is_io_error() && !e.is_connection_refusal() {
            // redis-rs keeps the I/O error's kind to itself: its text says which.
            let text = e.to_string().to_ascii_lowercase();
            let not_sent = text.contains("broken pipe") || text.contains("not connected");
            if e.is_timeout() || !not_sent {
                return Fault::MaybeApplied(format!("redis: {e}"));
            }
        }
        Fault::from_redis(e)
    }

    /// Classifies the error of one message of a batched script call (`"<CODE> <text>"`, caught
    /// in the script), as [`Fault::from_redis`] does for a whole call.
    pub(crate) fn from_script_message(message: &str) -> Fault {
        let text = format!("redis: {message}");
        match message.split_whitespace().next().unwrap_or("") {
            "READONLY" => Fault::ReadOnly(text),
            "OOM" | "BUSY" | "LOADING" | "MASTERDOWN" | "TRYAGAIN" | "CLUSTERDOWN" | "NOREPLICAS" | "MISCONF" => {
                Fault::Busy(text)
            }
            _ => Fault::Script(text),
        }
    }
}

impl From<Fault> for BrokerError {
    fn from(f: Fault) -> BrokerError {
        let text = f.to_string();
        match f {
            Fault::Setting(_) | Fault::Script(_) | Fault::Reply(_) => BrokerError::Internal(text),
            Fault::Timeout { .. } | Fault::Connection(_) | Fault::ReadOnly(_) | Fault::Busy(_) => {
                BrokerError::Unavailable(text)
            }
            Fault::MaybeApplied(_) => BrokerError::OutcomeUnknown(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_errors_say_whether_the_call_may_have_been_applied() {
        let io = |k: std::io::ErrorKind| Fault::from_write(&RedisError::from(std::io::Error::from(k)));
        use std::io::ErrorKind as K;
        for k in [K::ConnectionReset, K::ConnectionAborted, K::UnexpectedEof, K::TimedOut] {
            assert!(matches!(io(k), Fault::MaybeApplied(_)), "{k:?}");
        }
        for k in [K::BrokenPipe, K::NotConnected, K::ConnectionRefused] {
            assert!(matches!(BrokerError::from(io(k)), BrokerError::Unavailable(_)), "{k:?}");
        }
    }

    #[test]
    fn script_messages_are_typed_by_their_code() {
        let f = Fault::from_script_message("READONLY You can't write against a read only replica.");
        assert!(matches!(f, Fault::ReadOnly(_)));
        assert_eq!(f.to_string(), "redis: READONLY You can't write against a read only replica.");
        assert!(matches!(BrokerError::from(f), BrokerError::Unavailable(_)));
        assert!(matches!(Fault::from_script_message("OOM command not allowed"), Fault::Busy(_)));
        let f = Fault::from_script_message("WRONGTYPE Operation against a key");
        assert!(matches!(BrokerError::from(f), BrokerError::Internal(_)));
        assert_eq!(Fault::late(Duration::from_secs(2)).to_string(), "redis did not answer within 2s");
    }
}
