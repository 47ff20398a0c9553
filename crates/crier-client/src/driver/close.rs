//! How a connection (attempt) ends and what comes next: the close-code table's decision
//! ([`close_decision`]), a refused handshake ([`Driver::refused`]), the wait before the next
//! attempt ([`reconnect_delay`]); and the first frame, which must be `welcome` ([`read_welcome`]).

use std::time::Duration;

use crier_protocol::codes::{ClientAction, CloseCode};
use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};

use super::{Driver, Transport};
use crate::error::{CloseReason, ServerError};
use crate::frames::{self, ServerFrame};
use crate::state::Welcome;

/// How a connection (attempt) ended.
#[derive(Debug)]
pub(super) enum Ended {
    Stop(CloseReason),
    /// Reconnect after `wait`; `new_token`: ask the provider for a new token first.
    Reconnect {
        new_token: bool,
        wait: Wait,
    },
}

/// How long to wait before the next attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wait {
    Backoff,
    Jitter,
    Now,
    /// A refused handshake's `Retry-After`: the least wait (plus jitter, see `reconnect_delay`).
    RetryAfter(Duration),
}

impl Ended {
    pub(super) fn reconnect() -> Ended {
        Ended::Reconnect { new_token: false, wait: Wait::Backoff }
    }
    pub(super) fn refresh() -> Ended {
        Ended::Reconnect { new_token: true, wait: Wait::Backoff }
    }
}

/// The decision for a close with `code`, from the server's table (see the module docs).
pub(super) fn close_decision(code: u16, reason: String, has_provider: bool) -> Ended {
    match CloseCode(code).action() {
        ClientAction::Stop => Ended::Stop(CloseReason::Server { code, reason }),
        ClientAction::RefreshToken if has_provider => Ended::refresh(),
        ClientAction::RefreshToken => Ended::Stop(CloseReason::Server { code, reason }),
        ClientAction::ReconnectNow => Ended::Reconnect { new_token: false, wait: Wait::Now },
        ClientAction::ReconnectAfterJitter => Ended::Reconnect { new_token: false, wait: Wait::Jitter },
        ClientAction::ReconnectWithBackoff => Ended::reconnect(),
    }
}

/// The wait before the next attempt: the backoff draw, or — when the server said `Retry-After`
/// — that long plus a uniform jitter of up to as long again, so the clients a node refused
/// together do not all come back in the same second.
pub(super) fn reconnect_delay(backoff: Duration, retry_after: Option<Duration>) -> Duration {
    match retry_after {
        Some(ra) if !ra.is_zero() => {
            let jitter = rand::Rng::random_range(&mut rand::rng(), 0..=ra.as_millis().min(u128::from(u64::MAX)) as u64);
            backoff.max(ra + Duration::from_millis(jitter))
        }
        _ => backoff,
    }
}

impl Driver {
    /// A failed handshake: stop or retry (see the module docs).
    pub(super) fn refused(&mut self, e: WsError) -> Ended {
        match e {
            WsError::Http(resp) => {
                let status = resp.status().as_u16();
                let error = resp
                    .body()
                    .as_deref()
                    .and_then(|b| serde_json::from_slice::<HttpError>(b).ok())
                    .map(|b| ServerError { code: b.error, message: b.message });
                tracing::debug!(status, ?error, "crier client: handshake refused");
                // 429 and 503 may say when to come back (seconds; an HTTP date is not used).
                let retry_after = resp
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|secs| Duration::from_secs(secs.min(3600)));
                match status {
                    401 | 403 if self.opts.token.has_provider() && !self.refreshed_after_refusal => {
                        self.refreshed_after_refusal = true;
                        Ended::refresh()
                    }
                    400 | 401 | 403 | 426 => {
                        tracing::warn!(status, ?error, "crier client: the handshake was refused; giving up (failed)");
                        Ended::Stop(CloseReason::Handshake { status, error })
                    }
                    _ => match retry_after {
                        Some(ra) => Ended::Reconnect { new_token: false, wait: Wait::RetryAfter(ra) },
                        None => Ended::reconnect(),
                    },
                }
            }
            WsError::Url(e) => Ended::Stop(CloseReason::Invalid(e.to_string())),
            e => {
                tracing::debug!(error = %e, "crier client: connection failed");
                Ended::reconnect()
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct HttpError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    message: String,
}

pub(super) fn build_request(
    url: &str,
    token: Option<&str>,
) -> Result<tokio_tungstenite::tungstenite::http::Request<()>, String> {
    let mut req = url.into_client_request().map_err(|e| format!("invalid URL: {e}"))?;
    if let Some(t) = token {
        let value = HeaderValue::from_str(&format!("Bearer {t}"))
            .map_err(|_| "the token holds characters a header cannot carry".to_string())?;
        req.headers_mut().insert(header::AUTHORIZATION, value);
    }
    Ok(req)
}

/// Reads the first frame, which must be `welcome`.
pub(super) async fn read_welcome<S: Transport>(ws: &mut S, has_provider: bool) -> Result<Welcome, Ended> {
    loop {
        match ws.next().await {
            Some(Ok(WsMessage::Text(t))) => {
                return match frames::decode(t.as_str()) {
                    Some(ServerFrame::Welcome { client, user, node, ping_interval_ms }) => Ok(Welcome {
                        client,
                        user,
                        node,
                        ping_interval: ping_interval_ms.filter(|ms| *ms > 0).map(Duration::from_millis),
                    }),
                    _ => {
                        tracing::warn!("crier client: the first frame was not `welcome`");
                        Err(Ended::reconnect())
                    }
                };
            }
            Some(Ok(WsMessage::Close(frame))) => {
                let (code, reason) = frame.map_or((1005, String::new()), |f| (u16::from(f.code), f.reason.to_string()));
                return Err(close_decision(code, reason, has_provider));
            }
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(Ended::reconnect()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_the_least_wait_with_jitter_up_to_twice_it() {
        let ra = Duration::from_secs(2);
        let delays: Vec<Duration> = (0..200).map(|_| reconnect_delay(Duration::from_millis(100), Some(ra))).collect();
        assert!(delays.iter().all(|d| *d >= ra && *d <= ra * 2), "{delays:?}");
        assert!(delays.iter().any(|d| *d != delays[0]), "no jitter: {delays:?}");
        // A longer backoff draw wins; no Retry-After: the backoff alone.
        assert_eq!(reconnect_delay(Duration::from_secs(9), Some(ra)), Duration::from_secs(9));
        assert_eq!(reconnect_delay(Duration::from_millis(300), None), Duration::from_millis(300));
        assert_eq!(reconnect_delay(Duration::from_millis(300), Some(Duration::ZERO)), Duration::from_millis(300));
    }
}
