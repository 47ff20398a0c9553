//! `GET /ws`: every check of the contract's handshake table, in its order, before the upgrade.
//! A rejection is an HTTP response with the contract's JSON body, counted in
//! `crier_handshakes_total{result=CODE}`.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use hyper::upgrade::OnUpgrade;

use crate::auth::{self, Claims};
use crate::error::ApiError;
use crate::limits::retry_after_secs;
use crate::metrics as m;
use crate::session::{self, Session};
use crate::state::AppState;

/// The subprotocol crier speaks; selected whenever the client offers it.
pub const SUBPROTOCOL: &str = "crier.v1";

fn reject(err: ApiError) -> Response {
    metrics::counter!(m::HANDSHAKES, "result" => err.code).increment(1);
    err.into_response()
}

pub async fn ws_handler(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut req: Request,
) -> Response {
    let upgrade = check_upgrade(&mut req);
    let (headers, uri) = (req.headers(), req.uri());
    let ip = st.limits.client_ip(peer.ip(), headers);
    if let Err(wait) = st.limits.check_handshake(ip) {
        metrics::counter!(m::RATE_LIMITED, "kind" => "handshake").increment(1);
        return reject(
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many handshakes from this address")
                .with_retry_after(retry_after_secs(wait)),
        );
    }
    let max_conns = st.config.max_connections;
    if max_conns > 0 && st.registry.len() >= max_conns {
        return reject(ApiError::unavailable("this node is at max_connections; connect to another node"));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let allowed = origin.to_str().is_ok_and(|o| st.origins.allows(o));
        if !allowed {
            return reject(ApiError::new(StatusCode::FORBIDDEN, "origin_not_allowed", "this Origin is not allowed"));
        }
    }
    let claims = match auth::extract_token(headers, uri.query()) {
        Some((token, _source)) => match st.verifier.verify(&token) {
            Ok(c) => c,
            Err(e) => return reject(ApiError::new(StatusCode::UNAUTHORIZED, "token_invalid", e.0)),
        },
        None if st.config.allow_anonymous => anonymous(),
        None => return reject(ApiError::new(StatusCode::UNAUTHORIZED, "token_missing", "no token given")),
    };
    let conn_id = st.registry.next_id();
    let client_id = session::client_id(&st.config.node_id, conn_id);
    let max = st.config.max_connections_per_user as u64;
    let mut slot = None;
    // Anonymous connections have no user to count.
    if max > 0 && !claims.sub.is_empty() {
        match st.broker().connection_opened(&claims.sub, &client_id).await {
            Ok(n) => {
                let held = ConnSlot { st: st.clone(), user: claims.sub.clone(), client: client_id.clone(), held: true };
                if n > max {
                    held.release().await;
                    return reject(ApiError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_connections",
                        format!("user already has {max} connections"),
                    ));
                }
                slot = Some(held);
            }
            Err(e) => return reject(ApiError::broker(e)),
        }
    }
    let protocol = offers_subprotocol(headers).then_some(SUBPROTOCOL);
    let (accept, on_upgrade) = match upgrade {
        Ok(u) => u,
        Err((status, message)) => {
            if let Some(slot) = slot {
                slot.release().await;
            }
            let mut response = reject(ApiError::new(status, "bad_upgrade", message));
            if status == StatusCode::UPGRADE_REQUIRED {
                // RFC 6455 §4.4: say which version this server speaks.
                response.headers_mut().insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
            }
            return response;
        }
    };
    if st.is_draining() {
        if let Some(slot) = slot {
            slot.release().await;
        }
        return reject(ApiError::unavailable("node is draining; connect to another node"));
    }
    metrics::counter!(m::HANDSHAKES, "result" => "ok").increment(1);
    let session = Session::new(st.clone(), conn_id, claims, slot);
    tokio::spawn(session::run(session, on_upgrade));
    let mut response = Response::new(Body::empty());
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = response.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    if let Some(p) = protocol {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static(p));
    }
    response
}

/// The WebSocket upgrade's own checks (RFC 6455 §4.2.1): the `Sec-WebSocket-Accept` value and
/// the connection's upgrade handle, or the status and message of a `bad_upgrade` rejection.
fn check_upgrade(req: &mut Request) -> Result<(HeaderValue, OnUpgrade), (StatusCode, &'static str)> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::CONNECTION, "upgrade") {
        return Err((StatusCode::BAD_REQUEST, "Connection header did not include 'upgrade'"));
    }
    if !has_token(header::UPGRADE, "websocket") {
        return Err((StatusCode::BAD_REQUEST, "Upgrade header did not include 'websocket'"));
    }
    if headers.get(header::SEC_WEBSOCKET_VERSION).is_none_or(|v| v.as_bytes() != b"13") {
        return Err((StatusCode::UPGRADE_REQUIRED, "Sec-WebSocket-Version must be 13"));
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return Err((StatusCode::BAD_REQUEST, "Sec-WebSocket-Key header missing"));
    };
    let accept = HeaderValue::from_str(&crate::ws::accept_key(key.as_bytes()))
        .map_err(|_| (StatusCode::BAD_REQUEST, "invalid Sec-WebSocket-Key"))?;
    match req.extensions_mut().remove::<OnUpgrade>() {
        Some(on_upgrade) => Ok((accept, on_upgrade)),
        None => Err((StatusCode::UPGRADE_REQUIRED, "the connection cannot be upgraded")),
    }
}

/// Whether the client offers crier's subprotocol (the token subprotocol is never echoed).
fn offers_subprotocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == SUBPROTOCOL)
}

/// An anonymous connection (`allow_anonymous`): may subscribe to any channel, never publish,
/// has no personal channel, never expires.
fn anonymous() -> Claims {
    Claims { sub: String::new(), exp: u64::MAX, channels: vec!["*".into()], publish: Vec::new() }
}

/// A connection's place in the user's cluster-wide connection count. Released exactly once: by
/// the session's cleanup, by a later handshake check, or — when the upgrade never completes —
/// on drop.
pub struct ConnSlot {
    st: AppState,
    user: String,
    client: String,
    held: bool,
}

impl ConnSlot {
    pub async fn release(mut self) {
        self.held = false;
        if let Err(e) = self.st.broker().connection_closed(&self.user, &self.client).await {
            tracing::warn!(error = %e, "could not release a connection count");
        }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        if self.held {
            let (st, user, client) =
                (self.st.clone(), std::mem::take(&mut self.user), std::mem::take(&mut self.client));
            let release = ConnSlot { st, user, client, held: false };
            tokio::spawn(release.release());
        }
    }
}
