//! The REST API (server-to-server), `Authorization: Bearer <api key>`.
//!
//! Bodies are read with a size bound and parsed here (not by an extractor) so every rejection is
//! the contract's JSON error: 400 `bad_request` / `invalid_channel`, 401 `unauthorized`,
//! 413 `message_too_large`, 503 `unavailable`.

use axum::Json;
use axum::body::{Body, to_bytes};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use crier_core::BrokerError;
use crier_core::broker::PublishOptions;
use crier_protocol::frames;
use crier_protocol::{StreamPosition, validate_channel};
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;

use crate::auth::api_key_index;
use crate::error::ApiError;
use crate::limits::retry_after_secs;
use crate::metrics as m;
use crate::refusal::{self, Surface};
use crate::state::AppState;

/// Time limit of one REST request.
pub const API_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Middleware: a request that takes over [`API_TIMEOUT`] is answered 503 `unavailable` in the
/// contract's JSON shape (what it started may still complete: retry a publish with the same
/// `idempotency_key`).
pub async fn time_limit(req: Request, next: Next) -> Response {
    match tokio::time::timeout(API_TIMEOUT, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::unavailable("the request took over 10 seconds; retry later").into_response(),
    }
}

/// Largest number of channels in one broadcast.
pub const MAX_BROADCAST_CHANNELS: usize = 1000;
/// Largest `limit` of a history request.
const MAX_HISTORY_LIMIT: usize = 1000;

/// Middleware: checks the API key and counts requests.
pub async fn require_api_key(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::auth::bearer_credentials);
    let endpoint = endpoint_label(req.uri().path());
    // For the refusal log: a `Uri` clone shares its bytes (no allocation per request).
    let method = req.method().clone();
    let uri = req.uri().clone();
    let was_presented = presented.is_some();
    let resp = match presented.and_then(|key| api_key_index(&st.config.api_keys, key)) {
        Some(index) => match st.limits.check_api(index) {
            Ok(()) => next.run(req).await,
            Err(wait) => {
                metrics::counter!(m::RATE_LIMITED, "kind" => "api").increment(1);
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests for this API key")
                    .with_retry_after(retry_after_secs(wait))
                    .into_response()
            }
        },
        None if was_presented => {
            ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "unknown API key").into_response()
        }
        None => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "missing `Authorization: Bearer <api key>`")
            .into_response(),
    };
    log_refusal(&method, uri.path(), was_presented, &resp);
    metrics::counter!(m::API_REQUESTS, "endpoint" => endpoint, "status" => resp.status().as_str().to_owned())
        .increment(1);
    resp
}

/// Counts and logs (rate limited) a refused REST call: what [`ApiError`] answered (it leaves its
/// code and message in the response's extensions) plus what to change. Never the key.
fn log_refusal(method: &axum::http::Method, path: &str, presented: bool, resp: &Response) {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return;
    }
    let Some(err) = resp.extensions().get::<crate::error::Refused>() else {
        return;
    };
    let (reason, fix) = match (err.code, status) {
        ("unauthorized", _) if presented => (
            "unknown_api_key",
            "the Bearer key is none of api_keys (--api-keys, CRIER_API_KEYS); compare the key's value, not its name",
        ),
        ("unauthorized", _) => ("missing_api_key", "send `Authorization: Bearer <one of api_keys>`"),
        ("rate_limited", _) => {
            ("rate_limited", "this API key sends more than api_rate allows; slow down or raise api_rate")
        }
        (code, _) => (code, ""),
    };
    let detail = format!("{method} {path} -> {} {}: {}", status.as_u16(), err.code, err.message);
    refusal::record(Surface::Api, reason, &detail, fix);
}

fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/api/v1/publish" => "publish",
        "/api/v1/broadcast" => "broadcast",
        "/api/v1/disconnect" => "disconnect",
        "/api/v1/subscribe" => "subscribe",
        "/api/v1/unsubscribe" => "unsubscribe",
        p if p.starts_with("/api/v1/users/") && p.ends_with("/invalidate") => "invalidate",
        p if p.starts_with("/api/v1/users/") && p.ends_with("/connections") => "connections",
        "/api/v1/info" => "info",
        "/api/v1/channels" => "channels",
        p if p.ends_with("/history") => "history",
        p if p.ends_with("/presence") => "presence",
        p if p.ends_with("/presence_stats") => "presence_stats",
        _ => "other",
    }
}

/// Reads and parses a JSON body of at most `limit` bytes.
pub(crate) async fn read_json<'de, T: Deserialize<'de>>(
    body: Body,
    limit: usize,
    buf: &'de mut Vec<u8>,
) -> Result<T, ApiError> {
    let bytes = to_bytes(body, limit).await.map_err(|e| {
        if e.into_inner().is::<http_body_util::LengthLimitError>() {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "message_too_large",
                format!("request body over {limit} bytes"),
            )
        } else {
            ApiError::bad_request("could not read the request body")
        }
    })?;
    *buf = bytes.to_vec();
    serde_json::from_slice(buf).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

pub(crate) fn check_channel(channel: &str) -> Result<(), ApiError> {
    validate_channel(channel).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string()))
}

/// The `{channel}` path segment, checked; a segment that is not UTF-8 once percent-decoded is
/// `invalid_channel` too (in the contract's JSON shape, not axum's plain-text rejection).
pub(crate) fn path_channel(channel: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    let Path(channel) = channel
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_channel", "the channel is not valid UTF-8"))?;
    check_channel(&channel)?;
    Ok(channel)
}

fn check_data(st: &AppState, data: &RawValue) -> Result<(), ApiError> {
    if data.get().len() > st.config.max_message_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_large",
            format!("`data` is over max_message_bytes ({})", st.config.max_message_bytes),
        ));
    }
    frames::check_data(data.get()).map_err(ApiError::bad_request)
}

/// Body limit: the payload bound plus room for the envelope.
fn body_limit(st: &AppState, channels: usize) -> usize {
    st.config.max_message_bytes + 1024 + channels * 260
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    idempotency_key: Option<String>,
}

pub async fn publish(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let mut buf = Vec::new();
    let req: PublishBody<'_> = read_json(body, body_limit(&st, 1), &mut buf).await?;
    check_channel(&req.channel)?;
    check_data(&st, req.data)?;
    let max_key = crier_protocol::frames::MAX_IDEMPOTENCY_KEY_BYTES;
    if req.idempotency_key.as_ref().is_some_and(|k| k.is_empty() || k.len() > max_key) {
        return Err(ApiError::bad_request(format!("idempotency_key must be 1-{max_key} bytes")));
    }
    let opts = PublishOptions { idempotency_key: req.idempotency_key.as_deref() };
    let r = st.broker().publish(&req.channel, req.data.get(), opts).await.map_err(ApiError::publish)?;
    metrics::counter!(m::PUBLISHED, "source" => "api").increment(1);
    Ok(Json(json!({"channel": req.channel, "epoch": r.epoch, "offset": r.offset})).into_response())
}

#[derive(Deserialize)]
struct BroadcastBody<'a> {
    channels: Vec<String>,
    #[serde(borrow)]
    data: &'a RawValue,
}

pub async fn broadcast(State(st): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let mut buf = Vec::new();
    let req: BroadcastBody<'_> = read_json(body, body_limit(&st, MAX_BROADCAST_CHANNELS), &mut buf).await?;
    if req.channels.is_empty() || req.channels.len() > MAX_BROADCAST_CHANNELS {
        return Err(ApiError::bad_request(format!("`channels` must hold 1-{MAX_BROADCAST_CHANNELS} channels")));
    }
    check_data(&st, req.data)?;
    // Every channel's publish at once: the Redis broker batches what arrives together, so a
    // broadcast is a few script calls, not one round trip per channel. Results keep the
    // request's order.
    let data = req.data.get();
    let results = futures_util::future::join_all(req.channels.iter().map(|channel| {
        let st = &st;
        async move {
            if let Err(e) = validate_channel(channel) {
                return json!({"channel": channel, "error": "invalid_channel", "message": e.to_string()});
            }
            match st.broker().publish(channel, data, PublishOptions::default()).await {
                Ok(r) => {
                    metrics::counter!(m::PUBLISHED, "source" => "api").increment(1);
                    json!({"channel": channel, "epoch": r.epoch, "offset": r.offset})
                }
                Err(BrokerError::OutcomeUnknown(e)) => {
                    tracing::warn!(error = %e, "broadcast publish: outcome unknown");
                    let message = "the broker did not confirm the publish; it may have been published";
                    json!({"channel": channel, "error": "outcome_unknown", "message": message})
                }
                Err(e) => {
                    tracing::warn!(error = %e, "broadcast publish failed");
                    json!({"channel": channel, "error": "unavailable", "message": "the message broker is unavailable"})
                }
            }
        }
    }))
    .await;
    Ok(Json(json!({ "results": results })).into_response())
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    since_offset: Option<u64>,
    epoch: Option<String>,
    limit: Option<usize>,
}

pub async fn history(
    State(st): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let channel = path_channel(channel)?;
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let since = match (q.since_offset, q.epoch) {
        (Some(offset), Some(epoch)) => Some(StreamPosition { epoch, offset }),
        (None, None) => None,
        _ => return Err(ApiError::bad_request("give both `since_offset` and `epoch`, or neither")),
    };
    let limit = q.limit.unwrap_or(st.policy(&channel).history_size).min(MAX_HISTORY_LIMIT);
    let h = st.broker().history(&channel, since.as_ref(), limit).await.map_err(ApiError::broker)?;
    let messages: Vec<&RawValue> = h
        .publications
        .iter()
        .filter_map(|p| std::str::from_utf8(&p.frame).ok())
        .filter_map(|s| serde_json::from_str::<&RawValue>(s).ok())
        .collect();
    let body = json!({"epoch": h.epoch, "offset": h.offset, "recovered": since.as_ref().map(|_| !h.gap), "messages": messages});
    Ok(Json(body).into_response())
}

/// The path's channel, when its namespace keeps presence (403 `forbidden` otherwise).
pub(crate) fn presence_channel(
    st: &AppState,
    channel: Result<Path<String>, PathRejection>,
) -> Result<String, ApiError> {
    let channel = path_channel(channel)?;
    if !st.policy(&channel).presence {
        return Err(ApiError::new(StatusCode::FORBIDDEN, "forbidden", "presence is off in this channel's namespace"));
    }
    Ok(channel)
}

pub async fn presence(
    State(st): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let channel = presence_channel(&st, channel)?;
    let clients = st.broker().presence(&channel).await.map_err(ApiError::broker)?;
    Ok(Json(json!({ "clients": clients })).into_response())
}

pub async fn info(State(st): State<AppState>) -> Result<Response, ApiError> {
    st.report_node().await;
    let nodes = st.broker().nodes().await.map_err(ApiError::broker)?;
    Ok(Json(json!({ "nodes": nodes })).into_response())
}

/// 404 for unknown API routes, in the contract's shape.
pub async fn not_found() -> ApiError {
    metrics::counter!(m::HTTP_REJECTIONS, "code" => "not_found").increment(1);
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}
