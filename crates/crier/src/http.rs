//! The whole HTTP surface in one [`app`]: WebSocket handshake, SSE stream, REST API, health,
//! readiness, metrics, the JavaScript client (`/crier.js`), the OpenAPI description and (in
//! `--dev`) the demo page. Access logs record method and path only: the query
//! string may carry a token and is never logged.

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use tower_http::trace::TraceLayer;

use crate::metrics as m;
use crate::state::AppState;
use crate::transport::{sse, ws};
use crate::{admin, api, api_channels, api_control, api_presence};

/// Builds the router.
pub fn app(st: AppState) -> Router {
    let api = Router::new()
        .route("/api/v1/publish", post(api::publish))
        .route("/api/v1/broadcast", post(api::broadcast))
        .route("/api/v1/channels/{channel}/history", get(api::history))
        .route("/api/v1/channels/{channel}/presence", get(api::presence))
        .route("/api/v1/info", get(api::info))
        // Issue 19, part D: the cluster's channels and history deletion.
        .route("/api/v1/channels", get(api_channels::list))
        .route("/api/v1/channels/{channel}/history", delete(api_channels::delete_history))
        // Presence that pushes (issue 19 B).
        .route("/api/v1/channels/{channel}/presence_stats", get(api_presence::presence_stats))
        // Server-side control (issue 19, part C).
        .route("/api/v1/disconnect", post(api_control::disconnect))
        .route("/api/v1/subscribe", post(api_control::subscribe))
        .route("/api/v1/unsubscribe", post(api_control::unsubscribe))
        .route("/api/v1/users/{user}/invalidate", post(api_control::invalidate))
        .route("/api/v1/users/{user}/connections", get(api_control::connections))
        .route_layer(middleware::from_fn_with_state(st.clone(), api::require_api_key))
        // Browsers only from the node's own pages (the admin page) or `allowed_origins`; see `admin`.
        .route_layer(middleware::from_fn_with_state(st.clone(), admin::same_origin_only))
        .layer(middleware::from_fn(api::time_limit));
    // The probes are routed outside the access log: a 503 from `/readyz` every few seconds
    // during a broker outage would otherwise be one ERROR line per probe (tower_http logs every
    // 5xx). `/readyz` logs its state changes itself.
    let probes = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text));
    Router::new()
        .route("/ws", get(ws::handler))
        .route("/sse", get(sse::handler))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/", get(demo_page))
        .route("/crier.js", get(client_js))
        .route("/admin", get(admin::page))
        .route("/admin/admin.js", get(admin::script))
        .merge(api)
        .fallback(api::not_found)
        .layer(middleware::from_fn(json_errors))
        .layer(TraceLayer::new_for_http().make_span_with(
            |req: &Request| tracing::info_span!("http", method = %req.method(), path = %req.uri().path()),
        ))
        .merge(probes)
        .with_state(st)
}

/// Middleware: every rejection is the JSON error shape, including the ones axum and tower
/// answer themselves (405 with its `Allow` header, a 413 from a body limit, …). Responses that
/// are already JSON pass untouched; the probes (`/healthz`, `/readyz`, `/metrics`) keep their
/// plain text, which probes and scrapers read by status alone.
async fn json_errors(req: Request, next: middleware::Next) -> Response {
    let probe = matches!(req.uri().path(), "/healthz" | "/readyz" | "/metrics");
    let resp = next.run(req).await;
    let status = resp.status();
    let json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if probe || json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    // What axum wrote (a short text such as "Failed to buffer the request body") becomes the
    // message; bounded, the body is never large here.
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let (code, fallback) = crate::error::code_for_status(status);
    let message = if text.trim().is_empty() { fallback } else { text.trim() };
    metrics::counter!(m::HTTP_REJECTIONS, "code" => code).increment(1);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    let body = serde_json::json!({"error": code, "message": message}).to_string();
    Response::from_parts(parts, axum::body::Body::from(body))
}

async fn healthz() -> &'static str {
    "ok"
}

/// What `/readyz` answered last (0: not asked yet, 1: ready, 2: draining, 3: broker
/// unreachable), so a change is logged once rather than every probe. One per process, like the
/// metrics recorder.
static READY_STATE: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

async fn readyz(State(st): State<AppState>) -> Response {
    let (state, status, text) = if st.is_draining() {
        (2, StatusCode::SERVICE_UNAVAILABLE, "draining")
    } else if !st.broker().is_up() {
        (3, StatusCode::SERVICE_UNAVAILABLE, "broker unreachable")
    } else {
        (1, StatusCode::OK, "ready")
    };
    let before = READY_STATE.swap(state, std::sync::atomic::Ordering::Relaxed);
    if before != state {
        match state {
            1 if before != 0 => tracing::info!("ready again: /readyz answers 200"),
            1 => {}
            2 => tracing::info!("not ready: draining; /readyz answers 503 until the node stops"),
            _ => tracing::warn!(
                "not ready: the broker is unreachable; /readyz answers 503 until it is back \
                 (crier_broker_up is 0 meanwhile)"
            ),
        }
    }
    (status, text).into_response()
}

/// Updates the gauges from their sources of truth, then renders.
async fn metrics_text(State(st): State<AppState>) -> Response {
    metrics::gauge!(m::CONNECTIONS).set(st.registry.len() as f64);
    metrics::gauge!(m::SUBSCRIPTIONS).set(st.hub().subscription_count() as f64);
    metrics::gauge!(m::CHANNELS).set(st.hub().channel_count() as f64);
    metrics::gauge!(m::BROKER_UP).set(if st.broker().is_up() { 1.0 } else { 0.0 });
    metrics::gauge!(m::BROKER_INFO, "broker" => st.config.broker_kind()).set(1.0);
    metrics::counter!(m::BROKER_RECONNECTS).absolute(st.broker().reconnects());
    metrics::counter!(m::BROKER_PUBLISH_CALLS).absolute(st.broker().publish_calls());
    m::collect_process();
    match &st.metrics {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, "metrics recorder not installed").into_response(),
    }
}

/// The REST API's OpenAPI 3.1 description: the one copy is docs/openapi.json.
pub const OPENAPI: &str = include_str!("../../../docs/openapi.json");

/// Served without an API key: it describes the API and holds nothing secret.
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

const DEMO_PAGE: &str = include_str!("../assets/demo.html");

/// The JavaScript client (the npm package `crier-client`, one copy in `clients/js`).
const CLIENT_JS: &str = include_str!("../../../clients/js/src/index.js");

/// `GET /crier.js`: the JavaScript client as an ES module, always served (it holds no secret),
/// so a page can `import { Crier } from "https://<crier>/crier.js"` without a build step. Any
/// origin may load it (module scripts are fetched with CORS); which origins may *connect* is
/// still `allowed_origins`.
async fn client_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        CLIENT_JS,
    )
        .into_response()
}

/// The demo page, `--dev` only (it embeds the dev token).
async fn demo_page(State(st): State<AppState>) -> Response {
    match &st.dev_token {
        Some(token) => Html(DEMO_PAGE.replace("__CRIER_DEV_TOKEN__", token)).into_response(),
        None => api::not_found().await.into_response(),
    }
}
