//! REST for presence that pushes: `GET /api/v1/channels/{channel}/presence_stats`.

use axum::Json;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};

use crate::api::presence_channel;
use crate::error::ApiError;
use crate::state::AppState;

/// `200 {"clients":N,"users":M}`: the channel's presence counted (one broker round trip, no
/// listing); 403 `forbidden` when the channel's namespace has presence off.
pub async fn presence_stats(
    State(st): State<AppState>,
    channel: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let channel = presence_channel(&st, channel)?;
    let stats = st.broker().presence_stats(&channel).await.map_err(ApiError::broker)?;
    Ok(Json(stats).into_response())
}
