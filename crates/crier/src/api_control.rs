//! The REST routes of server-side control (issue 19, part C): operations on every live
//! connection of a user, cluster-wide, through `Broker::user_op` (see [`crate::control`] for what
//! each node does). Every answer counts the whole cluster: each node that received the operation
//! replies with what it did, within the broker's deadline (see docs/protocol.md).
//!
//! ```text
//! POST /api/v1/disconnect   {"user","code"?,"reason"?}      -> {"disconnected":N}
//! POST /api/v1/subscribe    {"user","channel","recover"?}   -> {"subscribed":N}
//! POST /api/v1/unsubscribe  {"user","channel"}              -> {"unsubscribed":N}
//! POST /api/v1/users/{user}/invalidate {"before"?}          -> {"disconnected":N}
//! GET  /api/v1/users/{user}/connections                     -> {"connections":[..]}
//! ```

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use crier_core::UserOp;
use crier_protocol::{CloseCode, StreamPosition};
use serde::Deserialize;
use serde_json::json;

use crate::api::{check_channel, read_json};
use crate::error::ApiError;
use crate::revocations::unix_now;
use crate::state::AppState;

/// Largest request body of these routes.
const BODY_LIMIT: usize = 4096;
/// Longest user id accepted (a token's `sub` of any sane issuer is far shorter).
const MAX_USER_BYTES: usize = 1024;
/// Longest close reason: what a WebSocket close frame holds after its code.
const MAX_REASON_BYTES: usize = 123;
/// How far in the future an invalidation's `before` may be (clock skew with the backend).
const BEFORE_SLACK_S: u64 = 60;

/// The close codes `disconnect` accepts: stop (the default), reconnect, get a new token.
const DISCONNECT_CODES: [CloseCode; 3] = [CloseCode::DISCONNECTED, CloseCode::RESTART, CloseCode::TOKEN_EXPIRED];

fn check_user(user: &str) -> Result<(), ApiError> {
    if user.is_empty() {
        return Err(ApiError::bad_request("`user` must not be empty"));
    }
    if user.len() > MAX_USER_BYTES {
        return Err(ApiError::bad_request(format!("`user` is over {MAX_USER_BYTES} bytes")));
    }
    Ok(())
}

fn path_user(user: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(user) = user.map_err(|_| ApiError::bad_request("the user in the path is not valid UTF-8"))?;
    check_user(&user)?;
    Ok(user)
}

async fn run(st: &AppState, user: &str, op: UserOp) -> Result<crier_core::UserOpReply, ApiError> {
    st.broker().user_op(user, &op).await.map_err(ApiError::broker)
}

#[derive(Deserialize)]
struct DisconnectBody {
    user: String,
    #[serde(default)]
    code: Option<u16>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/v1/disconnect`: closes every connection of the user, with 4003 (stop) unless
/// `code` says 1012 (reconnect) or 4001 (get a new token); `reason` replaces the table's.
pub async fn disconnect(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let mut buf = Vec::new();
    let req: DisconnectBody = read_json(body, BODY_LIMIT, &mut buf).await?;
    check_user(&req.user)?;
    let code = match req.code {
        None => CloseCode::DISCONNECTED,
        Some(c) if DISCONNECT_CODES.contains(&CloseCode(c)) => CloseCode(c),
        Some(c) => {
            return Err(ApiError::bad_request(format!(
                "`code` {c} is not one disconnect may send: 4003 (stop), 1012 (reconnect) or 4001 (get a new token)"
            )));
        }
    };
    let reason = match req.reason {
        Some(r) if r.len() > MAX_REASON_BYTES => {
            return Err(ApiError::bad_request(format!("`reason` is over {MAX_REASON_BYTES} bytes")));
        }
        Some(r) => r,
        None => code.reason().to_owned(),
    };
    let done = run(&st, &req.user, UserOp::Disconnect { code: code.0, reason }).await?;
    Ok(Json(json!({ "disconnected": done.count })).into_response())
}

#[derive(Deserialize)]
struct SubscribeBody {
    user: String,
    channel: String,
    #[serde(default)]
    recover: Option<StreamPosition>,
}

/// `POST /api/v1/subscribe`: every live connection of the user is asked to subscribe.
pub async fn subscribe(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let mut buf = Vec::new();
    let req: SubscribeBody = read_json(body, BODY_LIMIT, &mut buf).await?;
    check_user(&req.user)?;
    check_channel(&req.channel)?;
    let done = run(&st, &req.user, UserOp::Subscribe { channel: req.channel, recover: req.recover }).await?;
    Ok(Json(json!({ "subscribed": done.count })).into_response())
}

#[derive(Deserialize)]
struct UnsubscribeBody {
    user: String,
    channel: String,
}

/// `POST /api/v1/unsubscribe`: every live connection of the user leaves the channel.
pub async fn unsubscribe(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let mut buf = Vec::new();
    let req: UnsubscribeBody = read_json(body, BODY_LIMIT, &mut buf).await?;
    check_user(&req.user)?;
    check_channel(&req.channel)?;
    let done = run(&st, &req.user, UserOp::Unsubscribe { channel: req.channel }).await?;
    Ok(Json(json!({ "unsubscribed": done.count })).into_response())
}

#[derive(Deserialize, Default)]
struct InvalidateBody {
    #[serde(default)]
    before: Option<u64>,
}

/// `POST /api/v1/users/{user}/invalidate`: the user's tokens issued before `before` (default:
/// now) are refused from now on, and live connections using them are closed with 4001. The
/// body may be empty.
pub async fn invalidate(
    State(st): State<AppState>,
    user: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let user = path_user(user)?;
    let bytes = to_bytes(body, BODY_LIMIT).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            format!("request body over {BODY_LIMIT} bytes"),
        )
    })?;
    let req: InvalidateBody = if bytes.iter().all(u8::is_ascii_whitespace) {
        InvalidateBody::default()
    } else {
        serde_json::from_slice(&bytes).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    let now = unix_now();
    let before = req.before.unwrap_or(now);
    if before > now + BEFORE_SLACK_S {
        return Err(ApiError::bad_request("`before` is in the future (Unix seconds, at most now + 60)"));
    }
    let done = run(&st, &user, UserOp::Invalidate { before }).await?;
    Ok(Json(json!({ "disconnected": done.count })).into_response())
}

/// `GET /api/v1/users/{user}/connections`: the user's live connections on every node.
pub async fn connections(
    State(st): State<AppState>,
    user: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let user = path_user(user)?;
    let done = run(&st, &user, UserOp::Connections).await?;
    Ok(Json(json!({ "connections": done.connections })).into_response())
}
