//! Metric names (the contract's; never renamed), their descriptions, and the Prometheus
//! recorder. Labels only ever take a handful of values: a handshake result or error code, a
//! publish source, a limiter kind — never a channel or a user.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "crier_connections";
pub const HANDSHAKES: &str = "crier_handshakes_total";
pub const SUBSCRIPTIONS: &str = "crier_subscriptions";
pub const CHANNELS: &str = "crier_channels";
pub const PUBLISHED: &str = "crier_messages_published_total";
pub const DELIVERED: &str = "crier_messages_delivered_total";
pub const BROADCAST_LATENCY: &str = "crier_broadcast_latency_seconds";
pub const RATE_LIMITED: &str = "crier_rate_limited_total";
pub const SLOW_CONSUMERS: &str = "crier_slow_consumers_total";
pub const HEARTBEAT_TIMEOUTS: &str = "crier_heartbeat_timeouts_total";
pub const CLIENT_ERRORS: &str = "crier_client_errors_total";
pub const BROKER_UP: &str = "crier_broker_up";
pub const BROKER_RECONNECTS: &str = "crier_broker_reconnects_total";
pub const BROKER_PUBLISH_CALLS: &str = "crier_broker_publish_calls_total";
/// Always 1, labelled `broker` = `nats`, `redis` or `memory`: which broker the node runs.
pub const BROKER_INFO: &str = "crier_broker_info";
pub const RECOVERIES: &str = "crier_recoveries_total";
/// crier extension: REST API requests by route group and status class.
pub const API_REQUESTS: &str = "crier_api_requests_total";
/// crier extension: HTTP rejections answered outside the handlers (an unknown path, a method a
/// path does not take, …), by code.
pub const HTTP_REJECTIONS: &str = "crier_http_rejections_total";
pub const PENDING_HANDSHAKES: &str = "crier_pending_handshakes";
pub const INCOMPLETE_HEADS: &str = "crier_incomplete_request_heads_total";
pub const MESSAGE_ASSEMBLY_TIMEOUTS: &str = "crier_message_assembly_timeouts_total";
/// crier extension: refused handshakes and REST calls by surface (handshake, api) and a finer
/// reason than the error code (`token_expired`, `unknown_api_key`, …; see `refusal.rs`).
pub const REFUSALS: &str = "crier_refusals_total";
/// crier extension: connections a node closed with 1012 to rebalance the cluster.
pub const REBALANCED: &str = "crier_rebalanced_total";
pub const PROXY_CALLS: &str = "crier_proxy_calls_total";
pub const PROXY_DURATION: &str = "crier_proxy_duration_seconds";
/// crier extension: `join`/`leave` events this node fanned out to its subscribers, by kind.
pub const PRESENCE_EVENTS: &str = "crier_presence_events_total";
/// crier extension: `join`/`leave` frames queued to local subscribers.
pub const PRESENCE_EVENT_FRAMES: &str = "crier_presence_event_frames_total";

/// Webhook events by name and result (`delivered`, `failed`: an attempt failed, retried).
pub const WEBHOOK_EVENTS: &str = "crier_webhook_events_total";
/// Webhook events waiting to be delivered, as this node sees the queue.
pub const WEBHOOK_QUEUE: &str = "crier_webhook_queue_length";
/// Webhook events dropped because the queue was full.
pub const WEBHOOK_DROPPED: &str = "crier_webhook_dropped_total";
/// Webhook POSTs, timed.
pub const WEBHOOK_DURATION: &str = "crier_webhook_request_duration_seconds";

/// Buckets of the broadcast latency histogram, in seconds (100 µs … 5 s).
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The standard Prometheus process metrics (`process_resident_memory_bytes`,
/// `process_cpu_seconds_total`, `process_open_fds`, `process_max_fds`, `process_threads`,
/// `process_start_time_seconds`, `process_virtual_memory_bytes`), the names Prometheus' own
/// clients export, so existing dashboards and alerts work. Read from `/proc` at each scrape.
static PROCESS: OnceLock<metrics_process::Collector> = OnceLock::new();

/// Updates the process metrics (called by the `/metrics` handler before it renders).
pub fn collect_process() {
    if let Some(c) = PROCESS.get() {
        c.collect();
    }
}

/// Installs the process-wide Prometheus recorder (once; later calls return the same handle).
/// `None` if another recorder was installed first.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(BROADCAST_LATENCY.into()), LATENCY_BUCKETS)
                .ok()?
                .set_buckets_for_metric(Matcher::Full(PROXY_DURATION.into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(WEBHOOK_DURATION.into()), LATENCY_BUCKETS))
                .ok()?;
            let handle = builder.install_recorder().ok()?;
            describe();
            PROCESS.get_or_init(metrics_process::Collector::default).describe();
            zero();
            spawn_upkeep(handle.clone());
            Some(handle)
        })
        .clone()
}

/// How often histogram samples are folded into their buckets.
const UPKEEP_PERIOD: std::time::Duration = std::time::Duration::from_secs(5);

/// `install_recorder` leaves upkeep to the caller: until it runs (or `/metrics` is scraped),
/// every histogram sample is kept raw — 8 bytes per publication per node, ~50 KB/s at 3,000
/// publishes/s, found by `crier-bench soak` as RSS growing ~1.4 MB per 20 s window on a node
/// nobody scraped. Folded every [`UPKEEP_PERIOD`] on the runtime (no runtime: left to scrapes).
fn spawn_upkeep(handle: PrometheusHandle) {
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(CONNECTIONS, "Open connections on this node (WebSocket and SSE)");
    describe_counter!(HANDSHAKES, "WebSocket and SSE handshakes by result (ok or the rejection code)");
    describe_gauge!(SUBSCRIPTIONS, "Channel subscriptions of this node's connections");
    describe_gauge!(CHANNELS, "Channels with at least one subscriber on this node");
    describe_counter!(PUBLISHED, "Messages accepted for publishing, by source (api or client)");
    describe_counter!(DELIVERED, "Message frames queued to local subscribers");
    describe_histogram!(
        BROADCAST_LATENCY,
        metrics::Unit::Seconds,
        "Publish accepted (any node) to frame queued to a local subscriber"
    );
    describe_counter!(RATE_LIMITED, "Refusals by a rate limit, by kind (handshake, user, api, admission)");
    describe_counter!(SLOW_CONSUMERS, "Connections closed with 4009 because their outbound queue overflowed");
    describe_counter!(HEARTBEAT_TIMEOUTS, "Connections closed for not answering pings in time");
    describe_counter!(CLIENT_ERRORS, "Error frames sent to clients, by code");
    describe_gauge!(BROKER_UP, "1 when the broker is reachable, 0 otherwise");
    describe_counter!(BROKER_RECONNECTS, "Reconnections of the broker's connections");
    describe_gauge!(BROKER_INFO, "Always 1; the label `broker` names the node's broker (nats, redis, memory)");
    describe_counter!(
        BROKER_PUBLISH_CALLS,
        "Broker calls that carried publishes (Redis: script calls; messages per call = published / calls)"
    );
    describe_counter!(RECOVERIES, "Subscriptions with recovery, by result (recovered, failed)");
    describe_counter!(API_REQUESTS, "REST API requests by endpoint and status code");
    describe_counter!(HTTP_REJECTIONS, "HTTP rejections answered outside the handlers (404, 405, …), by code");
    describe_gauge!(PENDING_HANDSHAKES, "Connections that have not sent a complete first request head yet");
    describe_counter!(
        INCOMPLETE_HEADS,
        "Connections that ended without a complete first request head, by reason (over_cap: refused beyond max_pending_handshakes; timeout; abandoned)"
    );
    describe_counter!(
        MESSAGE_ASSEMBLY_TIMEOUTS,
        "WebSocket connections closed (1008) for leaving a fragmented message unfinished too long"
    );
    describe_counter!(
        REFUSALS,
        "Refused handshakes and REST calls by surface (handshake, api) and reason (token_expired, origin_not_allowed, unknown_api_key, …)"
    );
    describe_counter!(
        PROXY_CALLS,
        "Backend proxy calls by proxy (connect, subscribe, publish, refresh) and result (ok, refused, timeout, error, bad_status, malformed, busy, breaker_open)"
    );
    describe_histogram!(PROXY_DURATION, metrics::Unit::Seconds, "Backend proxy call latency, by proxy");
    describe_counter!(
        WEBHOOK_EVENTS,
        "Webhook events by name and result (delivered, or failed: an attempt that is retried)"
    );
    describe_gauge!(WEBHOOK_QUEUE, "Webhook events waiting to be delivered, as this node sees the queue");
    describe_counter!(WEBHOOK_DROPPED, "Webhook events dropped because the queue was full (max_queue)");
    describe_histogram!(WEBHOOK_DURATION, metrics::Unit::Seconds, "Webhook POST latency");
    describe_counter!(
        PRESENCE_EVENTS,
        "join/leave events fanned out to this node's subscribers, by kind (join, leave)"
    );
    describe_counter!(PRESENCE_EVENT_FRAMES, "join/leave frames queued to this node's subscribers");
    describe_counter!(
        REBALANCED,
        "Connections closed with 1012 because this node held more than its share of the cluster's"
    );
}

/// Every counter starts at 0 with each of its known label values, so dashboards and alerts see
/// a quiet series instead of none.
fn zero() {
    use metrics::counter;
    let handshake_results = [
        "ok",
        "rate_limited",
        "origin_not_allowed",
        "token_missing",
        "token_invalid",
        "too_many_connections",
        "bad_upgrade",
        "unavailable",
        // SSE's own checks (GET /sse).
        "bad_request",
        "forbidden",
        "invalid_channel",
        "too_many_subscriptions",
    ];
    for result in handshake_results {
        counter!(HANDSHAKES, "result" => result).absolute(0);
    }
    for source in ["api", "client"] {
        counter!(PUBLISHED, "source" => source).absolute(0);
    }
    for kind in ["handshake", "user", "api"] {
        counter!(RATE_LIMITED, "kind" => kind).absolute(0);
    }
    for code in crier_protocol::ErrorCode::ALL {
        counter!(CLIENT_ERRORS, "code" => code.as_str()).absolute(0);
    }
    for code in ["not_found", "method_not_allowed"] {
        counter!(HTTP_REJECTIONS, "code" => code).absolute(0);
    }
    for reason in ["over_cap", "timeout", "abandoned"] {
        counter!(INCOMPLETE_HEADS, "reason" => reason).absolute(0);
    }
    for result in ["recovered", "failed"] {
        counter!(RECOVERIES, "result" => result).absolute(0);
    }
    for kind in ["join", "leave"] {
        counter!(PRESENCE_EVENTS, "kind" => kind).absolute(0);
    }
    counter!(PRESENCE_EVENT_FRAMES).absolute(0);
    for name in [
        DELIVERED,
        SLOW_CONSUMERS,
        HEARTBEAT_TIMEOUTS,
        BROKER_RECONNECTS,
        BROKER_PUBLISH_CALLS,
        MESSAGE_ASSEMBLY_TIMEOUTS,
        REBALANCED,
    ] {
        counter!(name).absolute(0);
    }
}
