//! The handshake checks every transport runs before a connection opens, in the contract's
//! order: per-IP handshake rate, the node's handshake admission (`node_handshake_rate`: 503 +
//! `Retry-After` when a storm arrives faster than the node admits), the node's connection cap,
//! `Origin`, the token, the user's cluster-wide connection count — then the transport's own
//! checks (the WebSocket upgrade's, SSE's) — then the drain. A rejection is an HTTP response with the contract's JSON body, counted in
//! `crier_handshakes_total{result=CODE}`.
//!
//! A transport calls [`admit`], runs its own checks (refusing with [`refuse`]), then
//! [`accept`], and builds a [`crate::session::Session`] from the [`Admitted`] handshake.

use std::net::SocketAddr;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use crier_core::ConnId;

use crate::auth::{self, Claims};
use crate::error::ApiError;
use crate::limits::retry_after_secs;
use crate::metrics as m;
use crate::refusal::{self, Surface};
use crate::state::AppState;

/// A handshake that passed the checks: the connection's id, the token's claims, and its place
/// in the user's connection count (when `max_connections_per_user` is set).
pub struct Admitted {
    pub conn: ConnId,
    pub claims: Claims,
    pub slot: Option<ConnSlot>,
    /// Admitted by the connect proxy (its expiry is extended by the refresh proxy).
    pub proxied: bool,
}

/// Counts, logs (rate limited, see [`crate::refusal`]) and answers a refusal; the reason is the
/// error code and the advice [`advice`]'s.
fn reject(err: ApiError) -> Response {
    reject_as(err.code, advice(err.code), err)
}

/// [`reject`] with a finer reason (a metric label) and what to change.
fn reject_as(reason: &'static str, fix: &str, err: ApiError) -> Response {
    metrics::counter!(m::HANDSHAKES, "result" => err.code).increment(1);
    refusal::record(Surface::Handshake, reason, &format!("{}: {}", err.code, err.message), fix);
    err.into_response()
}

/// What to change, for a refusal by error code (the operator reads it in the log).
fn advice(code: &str) -> &'static str {
    match code {
        "rate_limited" => {
            "this address opens connections faster than handshake_rate allows (behind a proxy, \
             list it in trusted_proxies so each client is counted by its own address)"
        }
        "token_missing" => {
            "send a token (Authorization: Bearer, the crier.bearer.<token> subprotocol or ?token=) \
             or set allow_anonymous = true"
        }
        "too_many_connections" => "raise max_connections_per_user, or the client must close connections it left open",
        _ => "",
    }
}

/// The checks before the transport's own, in the contract's order.
pub async fn admit(
    st: &AppState,
    peer: SocketAddr,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Result<Admitted, Response> {
    let ip = st.limits.client_ip(peer.ip(), headers);
    if let Err(wait) = st.limits.check_handshake(ip) {
        metrics::counter!(m::RATE_LIMITED, "kind" => "handshake").increment(1);
        return Err(reject(
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many handshakes from this address")
                .with_retry_after(retry_after_secs(wait)),
        ));
    }
    if let Err(wait) = st.limits.check_admission() {
        metrics::counter!(m::RATE_LIMITED, "kind" => "admission").increment(1);
        return Err(reject(
            ApiError::unavailable("this node is admitting handshakes as fast as it can; retry after the delay")
                .with_retry_after(retry_after_secs(wait)),
        ));
    }
    let max_conns = st.config.max_connections;
    if max_conns > 0 && st.registry.len() >= max_conns {
        return Err(reject_as(
            "node_full",
            "raise max_connections or add nodes",
            ApiError::unavailable("this node is at max_connections; connect to another node"),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|o| st.origins.allows(o));
        if !allowed {
            // The body names the origin and the setting: the browser's developer tools show it.
            let shown = refusal::quote(&String::from_utf8_lossy(origin.as_bytes()));
            return Err(reject_as(
                "origin_not_allowed",
                "",
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "origin_not_allowed",
                    format!(
                        "origin {shown} not in allowed_origins; add it to allowed_origins \
                         (--allowed-origins, CRIER_ALLOWED_ORIGINS) to let pages from it connect"
                    ),
                ),
            ));
        }
    }
    let token = auth::extract_token(headers, query);
    let conn = st.registry.next_id();
    // The connect proxy decides (docs/hooks.md): a cookie-session app's clients carry no token.
    let proxy = st.proxies.as_deref().filter(|p| p.connects(token.is_some()));
    let proxied = proxy.is_some();
    let claims = match (proxy, token) {
        (Some(proxies), _) => crate::proxy::connect_claims(proxies, &st.client_id(conn), ip, headers)
            .await
            .map_err(|(reason, fix, e)| reject_as(reason, fix, e))?,
        (None, Some((token, _source))) => match st.verifier.verify(&token) {
            Ok(c) => c,
            Err(e) => {
                let reason = refusal::token_reason(&e.0);
                let fix = refusal::token_fix(reason);
                return Err(reject_as(reason, fix, ApiError::new(StatusCode::UNAUTHORIZED, "token_invalid", e.0)));
            }
        },
        (None, None) if st.config.allow_anonymous => Claims::anonymous(),
        (None, None) => return Err(reject(ApiError::new(StatusCode::UNAUTHORIZED, "token_missing", "no token given"))),
    };
    // Token invalidation: checked in memory (see `revocations::Revocations`), no broker round trip.
    // A connection the connect proxy admitted has no token to revoke: the backend decides.
    if !proxied && !claims.sub.is_empty() && st.revocations.is_revoked(&claims.sub, claims.iat) {
        return Err(reject_as(
            "token_revoked",
            "the user's tokens were invalidated (POST /api/v1/users/{user}/invalidate): the client must get a token issued after that",
            ApiError::new(StatusCode::UNAUTHORIZED, "token_revoked", "the token was invalidated; get a new one"),
        ));
    }
    let max = st.config.max_connections_per_user as u64;
    let mut slot = None;
    // Anonymous connections have no user to count.
    if max > 0 && !claims.sub.is_empty() {
        // The slot is held from before the broker is asked: a handshake that dies while its
        // count is being taken (the client resets the connection and hyper drops this future)
        // releases it on drop, and so does a failed call (it may have counted the connection).
        let held = ConnSlot { st: st.clone(), user: claims.sub.clone(), client: st.client_id(conn), held: true };
        match st.broker().connection_opened(&held.user, &held.client).await {
            Ok(n) => {
                if n > max {
                    held.release().await;
                    return Err(reject(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_connections",
                        format!("user already has {max} connections"),
                    )));
                }
                slot = Some(held);
            }
            Err(e) => {
                drop(held);
                return Err(reject(ApiError::broker(e)));
            }
        }
    }
    Ok(Admitted { conn, claims, slot, proxied })
}

/// A transport's own check refused an admitted handshake: the slot is released and the
/// rejection counted.
pub async fn refuse(admitted: Admitted, err: ApiError) -> Response {
    if let Some(slot) = admitted.slot {
        slot.release().await;
    }
    reject(err)
}

/// The last check, after the transport's own: the node is not draining. Counts the handshake
/// as `ok`.
pub async fn accept(st: &AppState, admitted: Admitted) -> Result<Admitted, Response> {
    if st.is_draining() {
        // Retry-After: a client without a load balancer to send it elsewhere waits a moment
        // (plus its jitter) instead of hammering a node that is going away.
        return Err(refuse(
            admitted,
            ApiError::unavailable("node is draining; connect to another node").with_retry_after(1),
        )
        .await);
    }
    metrics::counter!(m::HANDSHAKES, "result" => "ok").increment(1);
    Ok(admitted)
}

/// A connection's place in the user's cluster-wide connection count, held from before the
/// broker counts it. Released exactly once, on every path: by the session's close, by a later
/// handshake check, or — when the handshake or the connection dies first (a reset, a dropped
/// future, a failed upgrade) — on drop. The release itself runs in its own task, so a caller
/// cancelled while awaiting [`ConnSlot::release`] still releases.
pub struct ConnSlot {
    st: AppState,
    user: String,
    client: String,
    held: bool,
}

impl ConnSlot {
    /// Releases the slot and waits for the broker's answer (bounded by the broker's deadline).
    pub async fn release(mut self) {
        if let Some(task) = self.spawn_release() {
            let _ = task.await;
        }
    }

    fn spawn_release(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        if !std::mem::take(&mut self.held) {
            return None;
        }
        let (st, user, client) = (self.st.clone(), std::mem::take(&mut self.user), std::mem::take(&mut self.client));
        Some(tokio::spawn(async move {
            if let Err(e) = st.broker().connection_closed(&user, &client).await {
                tracing::warn!(error = %e, "could not release a connection count");
            }
        }))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        drop(self.spawn_release());
    }
}
