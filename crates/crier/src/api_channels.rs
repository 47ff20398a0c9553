//! The cluster's channels (issue 19, part D): `GET /api/v1/channels` (active channels
//! cluster-wide with their subscriber counts, by prefix, paged) and
//! `DELETE /api/v1/channels/{channel}/history`, plus the task that mirrors this node's
//! subscriber counts into the broker.
//!
//! Each node knows its own counts (the hub). The hub marks a channel whose count changed (a
//! set insert on subscribe and unsubscribe, never on the fan-out path); once per
//! [`MIRROR_PERIOD`] [`mirror`] writes the changed counts to the broker in one call per 1,000
//! channels (`Broker::report_channels`). A count shown by the listing is therefore at most about
//! one period old (plus the broker call); a dead node's channels leave the listing when its
//! registry entry expires (`presence_ttl`), as it leaves `/api/v1/info`.

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use crier_protocol::validate_channel;
use serde::Deserialize;
use serde_json::json;

use crate::error::ApiError;
use crate::state::AppState;

/// How often a node mirrors its changed subscriber counts into the broker.
pub const MIRROR_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// `limit` when none is given.
pub const DEFAULT_CHANNELS_LIMIT: usize = 100;
/// The largest `limit`.
pub const MAX_CHANNELS_LIMIT: usize = 1000;

/// Mirrors this node's subscriber counts into the broker until the task is aborted: the whole
/// set first (and after a broker reconnect, a failed report, or a report that found the
/// broker held nothing for this node while it has channels: Redis lost its data), then what
/// changed, every [`MIRROR_PERIOD`] (an empty report still pushes the entries' expiry out).
pub async fn mirror(st: AppState) {
    let mut tick = tokio::time::interval(MIRROR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut full = true;
    let mut reconnects = st.broker().reconnects();
    loop {
        tick.tick().await;
        let now = st.broker().reconnects();
        if now != reconnects {
            reconnects = now;
            full = true;
        }
        let counts = st.hub().take_counts(full);
        match st.broker().report_channels(&st.config.node_id, &counts, full).await {
            Ok(held) => {
                // Lost: everything again next time (what changed now is in the hub's counts).
                full = !full && !held && st.hub().channel_count() > 0;
                if full {
                    tracing::info!("the broker lost this node's channel counts; reporting them all again");
                }
            }
            Err(e) => {
                // The changes taken are lost for this report: the next one sends everything.
                tracing::debug!(error = %e, "channel counts report failed; the next one is full");
                full = true;
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelsQuery {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

/// `GET /api/v1/channels?prefix=&limit=&cursor=` → `{"channels":[{"channel","subscribers"}],
/// "cursor": <the next page's cursor> | null}`, in name order.
pub async fn list(
    State(st): State<AppState>,
    query: Result<Query<ChannelsQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))?;
    let limit = match q.limit.as_deref() {
        None | Some("") => DEFAULT_CHANNELS_LIMIT,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=MAX_CHANNELS_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`limit` must be a whole number from 1 to {MAX_CHANNELS_LIMIT}"
                )));
            }
        },
    };
    let prefix = q.prefix.unwrap_or_default();
    if !prefix.is_empty() {
        validate_channel(&prefix)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_channel", format!("`prefix`: {e}")))?;
    }
    let cursor = q.cursor.filter(|c| !c.is_empty());
    if let Some(c) = &cursor {
        validate_channel(c).map_err(|_| ApiError::bad_request("`cursor` is not one this API returned"))?;
    }
    // One more than asked: whether there is a next page.
    let mut page = st.broker().channels(&prefix, cursor.as_deref(), limit + 1).await.map_err(ApiError::broker)?;
    let next = if page.len() > limit {
        page.truncate(limit);
        page.last().map(|c| c.channel.clone())
    } else {
        None
    };
    Ok(Json(json!({ "channels": page, "cursor": next })).into_response())
}

/// `DELETE /api/v1/channels/{channel}/history` → `{"removed": true}`: the channel's history and
/// position are dropped (a new epoch begins). Its subscribers stay subscribed; each node with
/// subscribers tells them with a `gap` frame in the new epoch (the memory broker at once, Redis
/// before the channel's next message).
pub async fn delete_history(
    State(st): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(channel) = channel
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_channel", "the channel is not valid UTF-8"))?;
    validate_channel(&channel).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_channel", e.to_string()))?;
    st.broker().delete_history(&channel).await.map_err(ApiError::broker)?;
    tracing::info!(channel, "history deleted through the API");
    Ok(Json(json!({ "removed": true })).into_response())
}
