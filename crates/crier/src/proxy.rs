//! Backend proxies: HTTP + JSON calls crier makes to the application on a connection's behalf
//! (docs/hooks.md).
//!
//! - connect: a handshake without a token (or every handshake, `connect_always`) is admitted,
//!   refused or failed by the backend ([`Proxies::connect`], called from
//!   [`crate::handshake::admit`]);
//! - subscribe / publish: in namespaces with `subscribe_proxy` / `publish_proxy`, the backend
//!   decides instead of the token's patterns (the publish proxy may rewrite the data);
//! - refresh: connections the connect proxy admitted with an `expire_at` are extended by the
//!   backend before they expire ([`run_refresher`], one task per node).
//!
//! Every call has a deadline (`timeout`), waits at most `timeout` for one of the proxy's
//! `max_concurrency` call slots on this node, goes through the proxy's circuit breaker (after
//! `breaker_failures` consecutive failures, calls fail at once for `breaker_cooldown`, then one
//! probe decides) and is counted in `crier_proxy_calls_total{proxy,result}` and timed in
//! `crier_proxy_duration_seconds{proxy}`. A call runs in the task of whoever needs it (the
//! handshake's connection task, the session's request): a slow backend delays only that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crier_core::{ConnId, Outbox, clock_ms};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::sync::Semaphore;

use axum::http::{HeaderMap, StatusCode, header};

use crate::auth::Claims;
use crate::config::ProxySettings;
use crate::error::ApiError;
use crate::metrics as m;
use crate::revocations::unix_now;

/// Largest answer body read from a backend.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Which proxy (the `proxy` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Subscribe,
    Publish,
    Refresh,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Subscribe => "subscribe",
            Kind::Publish => "publish",
            Kind::Refresh => "refresh",
        }
    }
}

/// Why a call gave no answer (the `result` label and the message the client sees).
#[derive(Debug)]
pub enum Failure {
    /// The proxy's breaker is open: not called.
    BreakerOpen,
    /// No call slot came free within `timeout`.
    Busy,
    /// No answer within `timeout`.
    Timeout,
    /// Could not connect, or the connection broke.
    Connection(String),
    /// An HTTP status other than 200 and 403.
    Status(u16),
    /// A 200 whose body is not the documented answer.
    Malformed(String),
}

impl Failure {
    fn label(&self) -> &'static str {
        match self {
            Failure::BreakerOpen => "breaker_open",
            Failure::Busy => "busy",
            Failure::Timeout => "timeout",
            Failure::Connection(_) => "error",
            Failure::Status(_) => "bad_status",
            Failure::Malformed(_) => "malformed",
        }
    }

    /// What the client is told (never the backend's address).
    pub fn message(&self, kind: Kind) -> String {
        let what = kind.as_str();
        match self {
            Failure::BreakerOpen => format!("the {what} backend is failing (circuit open); retry later"),
            Failure::Busy => format!("too many {what} calls to the backend in flight on this node; retry later"),
            Failure::Timeout => format!("the {what} backend did not answer in time; retry later"),
            Failure::Connection(_) => format!("the {what} backend is unreachable; retry later"),
            Failure::Status(s) => format!("the {what} backend answered HTTP {s}; retry later"),
            Failure::Malformed(why) => format!("the {what} backend's answer is malformed ({why}); retry later"),
        }
    }
}

/// A backend's answer: 200 with the proxy's answer, or 403 with a reason.
#[derive(Debug)]
pub enum Answer<T> {
    Allowed(T),
    Refused { reason: String },
}

/// A 403's body (`code` is accepted and not used: the status says it all).
#[derive(Deserialize)]
struct RefusalBody {
    reason: Option<String>,
}

/// The connect proxy's 200 answer.
#[derive(Debug, Deserialize)]
pub struct ConnectAnswer {
    pub user: String,
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
    /// Channels the server subscribes the connection to at connect (as a token's `subs` claim).
    #[allow(dead_code)]
    #[serde(default)]
    pub subs: Option<Vec<String>>,
    /// Unix seconds; absent: never expires.
    #[serde(default)]
    pub expire_at: Option<u64>,
    /// Accepted; not shown anywhere yet.
    #[allow(dead_code)]
    #[serde(default)]
    pub info: Option<Value>,
}

/// The subscribe proxy's 200 answer (`info` accepted, not shown yet).
#[derive(Debug, Deserialize)]
pub struct SubscribeAnswer {
    #[allow(dead_code)]
    #[serde(default)]
    pub info: Option<Value>,
}

/// The publish proxy's 200 answer: `data` replaces what the client sent.
#[derive(Debug, Deserialize)]
pub struct PublishAnswer {
    #[serde(default)]
    pub data: Option<Box<RawValue>>,
}

/// The refresh proxy's 200 answer.
#[derive(Debug, Deserialize)]
pub struct RefreshAnswer {
    pub expire_at: u64,
}

/// A circuit breaker: closed while calls succeed; open for `cooldown` after `threshold`
/// consecutive failures; then half-open: one probe at a time decides.
struct Breaker {
    threshold: u32,
    cooldown_ms: u64,
    failures: AtomicU32,
    /// [`clock_ms`] until which calls fail at once; 0: closed.
    open_until: AtomicU64,
    probing: AtomicBool,
}

/// The one probe of a half-open breaker; lets the next caller probe if dropped unfinished.
struct Probe<'a>(&'a AtomicBool);

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            threshold,
            cooldown_ms: cooldown.as_millis() as u64,
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
        }
    }

    /// `Err` while open; `Ok(Some)` for the half-open probe.
    fn admit(&self, now: u64) -> Result<Option<Probe<'_>>, ()> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Ok(None);
        }
        if now < until {
            return Err(());
        }
        match self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => Ok(Some(Probe(&self.probing))),
            Err(_) => Err(()),
        }
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        self.open_until.store(0, Ordering::Release);
    }

    fn failure(&self, now: u64) {
        if self.threshold == 0 {
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        if n >= self.threshold {
            self.open_until.store(now + self.cooldown_ms.max(1), Ordering::Release);
        }
    }
}

/// One configured proxy: its URL, call slots and breaker.
struct Endpoint {
    kind: Kind,
    /// Parsed once: parsing per call (IDNA included) showed in the connect proxy's profile.
    url: reqwest::Url,
    slots: Semaphore,
    breaker: Breaker,
}

/// The node's proxies (those configured).
pub struct Proxies {
    http: reqwest::Client,
    timeout: Duration,
    pub connect_headers: Vec<String>,
    pub connect_always: bool,
    connect: Option<Endpoint>,
    subscribe: Option<Endpoint>,
    publish: Option<Endpoint>,
    refresh: Option<Endpoint>,
    /// How long before its expiry a watched connection is refreshed (`refresh_before`).
    refresh_before: Duration,
    /// Connections the connect proxy admitted with an expiry, while `refresh_url` is set.
    refreshable: Mutex<HashMap<ConnId, Refreshable>>,
}

/// A connection the refresher watches.
struct Refreshable {
    user: Arc<str>,
    client: String,
    outbox: Weak<Outbox>,
    /// Unix seconds.
    expire_at: u64,
    /// A call is out, or the backend refused: not asked again.
    busy: bool,
}

impl Proxies {
    /// The proxies of the settings (`None` without a `[proxy]` table).
    pub fn new(settings: Option<&ProxySettings>) -> anyhow::Result<Option<Proxies>> {
        let Some(s) = settings else {
            return Ok(None);
        };
        // A pool of keep-alive connections per backend, no proxy from the environment (the
        // backend is the application, not the internet), plain HTTP only.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(s.max_concurrency)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .connect_timeout(s.timeout)
            .timeout(s.timeout)
            .build()?;
        let endpoint = |kind: Kind, url: &Option<String>| -> anyhow::Result<Option<Endpoint>> {
            let Some(url) = url else {
                return Ok(None);
            };
            Ok(Some(Endpoint {
                kind,
                url: reqwest::Url::parse(url).map_err(|e| anyhow::anyhow!("proxy: {url}: {e}"))?,
                slots: Semaphore::new(s.max_concurrency),
                breaker: Breaker::new(s.breaker_failures, s.breaker_cooldown),
            }))
        };
        Ok(Some(Proxies {
            http,
            timeout: s.timeout,
            connect_headers: s.connect_headers.clone(),
            connect_always: s.connect_always,
            connect: endpoint(Kind::Connect, &s.connect_url)?,
            subscribe: endpoint(Kind::Subscribe, &s.subscribe_url)?,
            publish: endpoint(Kind::Publish, &s.publish_url)?,
            refresh: endpoint(Kind::Refresh, &s.refresh_url)?,
            refresh_before: s.refresh_before,
            refreshable: Mutex::new(HashMap::new()),
        }))
    }

    /// Whether a handshake with (`has_token`) or without a token goes to the connect proxy.
    pub fn connects(&self, has_token: bool) -> bool {
        self.connect.is_some() && (self.connect_always || !has_token)
    }

    pub async fn connect(&self, body: &Value) -> Result<Answer<ConnectAnswer>, Failure> {
        self.call(self.connect.as_ref(), body).await
    }

    pub async fn subscribe(&self, body: &Value) -> Result<Answer<SubscribeAnswer>, Failure> {
        self.call(self.subscribe.as_ref(), body).await
    }

    pub async fn publish(&self, body: &Value) -> Result<Answer<PublishAnswer>, Failure> {
        self.call(self.publish.as_ref(), body).await
    }

    async fn call<T: DeserializeOwned>(&self, ep: Option<&Endpoint>, body: &Value) -> Result<Answer<T>, Failure> {
        let Some(ep) = ep else {
            // Config checks make this unreachable (a namespace's proxy needs its URL).
            return Err(Failure::Connection("not configured".into()));
        };
        let started = Instant::now();
        let result = self.call_inner(ep, body).await;
        let label = match &result {
            Ok(Answer::Allowed(_)) => "ok",
            Ok(Answer::Refused { .. }) => "refused",
            Err(f) => f.label(),
        };
        metrics::counter!(m::PROXY_CALLS, "proxy" => ep.kind.as_str(), "result" => label).increment(1);
        if !matches!(result, Err(Failure::BreakerOpen | Failure::Busy)) {
            metrics::histogram!(m::PROXY_DURATION, "proxy" => ep.kind.as_str()).record(started.elapsed().as_secs_f64());
        }
        if let Err(f) = &result {
            let detail = match f {
                Failure::Connection(e) => e.as_str(),
                _ => "",
            };
            tracing::debug!(proxy = ep.kind.as_str(), result = f.label(), detail, "proxy call failed");
        }
        result
    }

    async fn call_inner<T: DeserializeOwned>(&self, ep: &Endpoint, body: &Value) -> Result<Answer<T>, Failure> {
        let _probe = ep.breaker.admit(clock_ms()).map_err(|()| Failure::BreakerOpen)?;
        let _slot = match tokio::time::timeout(self.timeout, ep.slots.acquire()).await {
            Ok(Ok(slot)) => slot,
            _ => return Err(Failure::Busy),
        };
        let result = self.post(ep, body).await;
        match &result {
            Ok(_) => ep.breaker.success(),
            Err(_) => ep.breaker.failure(clock_ms()),
        }
        result
    }

    async fn post<T: DeserializeOwned>(&self, ep: &Endpoint, body: &Value) -> Result<Answer<T>, Failure> {
        let body = serde_json::to_vec(body).map_err(|e| Failure::Malformed(e.to_string()))?;
        let sent = self
            .http
            .post(ep.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(Failure::Timeout),
            Err(e) => return Err(Failure::Connection(e.to_string())),
        };
        let status = resp.status().as_u16();
        if status != 200 && status != 403 {
            return Err(Failure::Status(status));
        }
        let mut bytes = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
                        return Err(Failure::Malformed(format!("larger than {MAX_ANSWER_BYTES} bytes")));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(Failure::Timeout),
                Err(e) => return Err(Failure::Connection(e.to_string())),
            }
        }
        if status == 403 {
            // The reason is optional; a body that is not the documented shape still refuses.
            let refusal = serde_json::from_slice::<RefusalBody>(&bytes).ok();
            let reason = refusal.and_then(|r| r.reason).unwrap_or_else(|| "refused by the backend".to_owned());
            return Ok(Answer::Refused { reason: clean_reason(&reason) });
        }
        serde_json::from_slice::<T>(&bytes).map(Answer::Allowed).map_err(|e| Failure::Malformed(e.to_string()))
    }

    /// Watches a proxy-admitted connection with an expiry (when `refresh_url` is set).
    pub fn watch(&self, conn: ConnId, user: Arc<str>, client: String, outbox: &Arc<Outbox>, expire_at: u64) {
        if self.refresh.is_none() {
            return;
        }
        let entry = Refreshable { user, client, outbox: Arc::downgrade(outbox), expire_at, busy: false };
        self.refreshable.lock().unwrap_or_else(|p| p.into_inner()).insert(conn, entry);
    }

    /// Stops watching a connection (it closed).
    pub fn unwatch(&self, conn: ConnId) {
        if self.refresh.is_none() {
            return;
        }
        self.refreshable.lock().unwrap_or_else(|p| p.into_inner()).remove(&conn);
    }
}

/// The connect proxy's verdict on the handshake of connection `client` (its client id): the claims it grants, or the refusal (the
/// refusal-log reason, what to change, the HTTP answer).
pub async fn connect_claims(
    proxies: &Proxies,
    client: &str,
    ip: std::net::IpAddr,
    headers: &HeaderMap,
) -> Result<Claims, (&'static str, &'static str, ApiError)> {
    let mut forwarded = serde_json::Map::new();
    for name in &proxies.connect_headers {
        let values: Vec<String> =
            headers.get_all(name.as_str()).iter().map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()).collect();
        if !values.is_empty() {
            forwarded.insert(name.clone(), Value::String(values.join(", ")));
        }
    }
    // A WebSocket handshake asks for the upgrade; the other transport is SSE.
    let websocket = headers.get(header::UPGRADE).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    let body = serde_json::json!({
        "client": client,
        "transport": if websocket { "websocket" } else { "sse" },
        "remote_addr": ip.to_string(),
        "headers": forwarded,
    });
    let failed = |f: Failure| {
        (
            "proxy_unavailable",
            "check the connect backend (proxy.connect_url): its log, its latency against proxy.timeout, crier_proxy_calls_total{proxy=\"connect\"}",
            ApiError::unavailable(f.message(Kind::Connect)),
        )
    };
    match proxies.connect(&body).await {
        Ok(Answer::Allowed(a)) => {
            let exp = match a.expire_at {
                Some(at) if at <= unix_now() => {
                    return Err(failed(Failure::Malformed("expire_at is not in the future".into())));
                }
                Some(at) => at,
                None => u64::MAX,
            };
            // `subs`: subscribed by the server at connect, like a token's `subs` claim.
            let subs = a.subs.unwrap_or_default();
            if let Some(bad) = subs.iter().find(|c| crier_protocol::channel::validate_channel(c).is_err()) {
                let shown = crate::refusal::quote(bad);
                return Err(failed(Failure::Malformed(format!("subs holds {shown}, not a valid channel name"))));
            }
            Ok(Claims { sub: a.user, exp, channels: a.channels, publish: a.publish, iat: None, subs })
        }
        Ok(Answer::Refused { reason, .. }) => {
            Err(("proxy_refused", "", ApiError::new(StatusCode::FORBIDDEN, "forbidden", reason)))
        }
        Err(f) => Err(failed(f)),
    }
}

/// A backend's reason as the client sees it: printable, at most 200 characters.
fn clean_reason(reason: &str) -> String {
    reason.chars().filter(|c| !c.is_control()).take(200).collect()
}

/// The refresh proxy's task: once a second, asks the backend to extend each watched connection
/// that expires within `refresh_before`; a 200 moves its expiry, a 403 leaves it to close with
/// 4001 at expiry, a failure is retried on the next tick until the expiry.
pub async fn run_refresher(proxies: Arc<Proxies>) {
    if proxies.refresh.is_none() {
        return;
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now = unix_now();
        let ahead = proxies.refresh_before.as_secs_f64().ceil() as u64;
        let due: Vec<(ConnId, Arc<str>, String)> = {
            let mut map = proxies.refreshable.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|_, r| r.outbox.strong_count() > 0);
            map.iter_mut()
                .filter(|(_, r)| !r.busy && r.expire_at <= now + ahead)
                .map(|(conn, r)| {
                    r.busy = true;
                    (*conn, r.user.clone(), r.client.clone())
                })
                .collect()
        };
        for (conn, user, client) in due {
            let proxies = proxies.clone();
            tokio::spawn(async move { refresh_one(&proxies, conn, &user, client).await });
        }
    }
}

async fn refresh_one(proxies: &Proxies, conn: ConnId, user: &str, client: String) {
    let body = serde_json::json!({"client": client, "user": user});
    let result = proxies.call::<RefreshAnswer>(proxies.refresh.as_ref(), &body).await;
    let mut map = proxies.refreshable.lock().unwrap_or_else(|p| p.into_inner());
    let Some(entry) = map.get_mut(&conn) else {
        return;
    };
    match result {
        Ok(Answer::Allowed(a)) if a.expire_at > unix_now() => {
            if let Some(outbox) = entry.outbox.upgrade() {
                outbox.set_expiry(crate::auth::expiry_ms(a.expire_at));
            }
            entry.expire_at = a.expire_at;
            entry.busy = false;
        }
        // Refused, or extended into the past: the connection closes with 4001 at its expiry.
        Ok(_) => {}
        // Retried on the next tick, until the expiry closes it.
        Err(_) => entry.busy = false,
    }
}

#[cfg(test)]
mod tests;
