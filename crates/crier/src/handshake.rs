//! `GET /ws`: every check of the contract's handshake table, in its order, before the upgrade.
//! A rejection is an HTTP response with the contract's JSON body, counted in
//! `crier_handshakes_total{result=CODE}`.

use std::net::SocketAddr;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};

use crate::auth::{self, Claims};
use crate::error::ApiError;
use crate::limits::retry_after_secs;
use crate::metrics as m;
use crate::session::{self, Session};
use crate::state::AppState;

/// The subprotocol crier speaks; selected whenever the client offers it.
pub const SUBPROTOCOL: &str = "crier.v1";
/// tungstenite allocates its read buffer at the upgrade and keeps it for the connection's life;
/// client frames are small (subscribe, ping...), so a small buffer keeps idle connections lean
/// (a large frame just takes more reads). Measured: 4 KiB → 512 B saves ~3.5 KiB per connection.
const READ_BUFFER_BYTES: usize = 512;
/// Frames are gathered in the socket's write buffer up to this size before a write; the
/// writer flushes once per batch.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

fn reject(err: ApiError) -> Response {
    metrics::counter!(m::HANDSHAKES, "result" => err.code).increment(1);
    err.into_response()
}

pub async fn ws_handler(
    State(st): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    let ip = st.limits.client_ip(peer.ip(), &headers);
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
    let claims = match auth::extract_token(&headers, uri.query()) {
        Some((token, _source)) => match st.verifier.verify(&token) {
            Ok(c) => c,
            Err(e) => return reject(ApiError::new(StatusCode::UNAUTHORIZED, "token_invalid", e.0)),
        },
        None if st.config.allow_anonymous => anonymous(),
        None => return reject(ApiError::new(StatusCode::UNAUTHORIZED, "token_missing", "no token given")),
    };
    let conn_id = st.registry.next_id();
    let client_id = format!("{}-{}", st.config.node_id, conn_id);
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
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(e) => {
            if let Some(slot) = slot {
                slot.release().await;
            }
            let status = e.status();
            let status = if status == StatusCode::UPGRADE_REQUIRED { status } else { StatusCode::BAD_REQUEST };
            return reject(ApiError::new(status, "bad_upgrade", e.body_text()));
        }
    };
    if st.is_draining() {
        if let Some(slot) = slot {
            slot.release().await;
        }
        return reject(ApiError::unavailable("node is draining; connect to another node"));
    }
    metrics::counter!(m::HANDSHAKES, "result" => "ok").increment(1);
    let max_bytes = st.config.max_message_bytes;
    let session = Session::new(st.clone(), conn_id, client_id, claims, slot);
    upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(max_bytes)
        .max_frame_size(max_bytes)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| session::run(session, socket))
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
