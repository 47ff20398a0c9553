//! The whole HTTP surface in one [`app`]: WebSocket handshake, SSE stream, REST API, health, readiness,
//! metrics and (in `--dev`) the demo page. Access logs record method and path only: the query
//! string may carry a token and is never logged.

use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::api;
use crate::metrics as m;
use crate::state::AppState;
use crate::transport::{sse, ws};

/// Time limit of one REST request.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds the router.
pub fn app(st: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/publish", post(api::publish))
        .route("/api/v1/broadcast", post(api::broadcast))
        .route("/api/v1/channels/{channel}/history", get(api::history))
        .route("/api/v1/channels/{channel}/presence", get(api::presence))
        .route("/api/v1/disconnect", post(api::disconnect))
        .route("/api/v1/info", get(api::info))
        .route_layer(middleware::from_fn_with_state(st.clone(), api::require_api_key))
        .layer(TimeoutLayer::with_status_code(StatusCode::SERVICE_UNAVAILABLE, API_TIMEOUT));
    Router::new()
        .route("/ws", get(ws::handler))
        .route("/sse", get(sse::handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/", get(demo_page))
        .merge(api)
        .fallback(api::not_found)
        .layer(TraceLayer::new_for_http().make_span_with(
            |req: &Request| tracing::info_span!("http", method = %req.method(), path = %req.uri().path()),
        ))
        .with_state(st)
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(st): State<AppState>) -> Response {
    if st.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
    } else if !st.broker().is_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable").into_response()
    } else {
        (StatusCode::OK, "ready").into_response()
    }
}

/// Updates the gauges from their sources of truth, then renders.
async fn metrics_text(State(st): State<AppState>) -> Response {
    metrics::gauge!(m::CONNECTIONS).set(st.registry.len() as f64);
    metrics::gauge!(m::SUBSCRIPTIONS).set(st.hub().subscription_count() as f64);
    metrics::gauge!(m::CHANNELS).set(st.hub().channel_count() as f64);
    metrics::gauge!(m::BROKER_UP).set(if st.broker().is_up() { 1.0 } else { 0.0 });
    metrics::counter!(m::BROKER_RECONNECTS).absolute(st.broker().reconnects());
    match &st.metrics {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed").into_response(),
    }
}

const DEMO_PAGE: &str = include_str!("../assets/demo.html");

/// The demo page, `--dev` only (it embeds the dev token).
async fn demo_page(State(st): State<AppState>) -> Response {
    match &st.dev_token {
        Some(token) => Html(DEMO_PAGE.replace("__CRIER_DEV_TOKEN__", token)).into_response(),
        None => api::not_found().await.into_response(),
    }
}
