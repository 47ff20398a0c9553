//! Webhooks (docs/hooks.md, *Webhooks*): the broker produces events once per cluster and queues
//! them; one task per node reads batches from that queue ([`Broker::hook_read`]), POSTs each
//! signed batch to the backend, retries a failed batch (same events, same ids) with a doubling
//! backoff until a 2xx, then acknowledges it ([`Broker::hook_ack`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crier_core::{Broker, HookConfig, HookEvent};
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;

use crate::config::WebhookSettings;
use crate::metrics as m;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-crier-signature";

/// How long a read waits for events before the gauges are refreshed.
const READ_WAIT: Duration = Duration::from_secs(1);
/// While a batch waits to be retried, the node renews its hold on it (and its delivery turn)
/// this often.
const HOLD_EVERY: Duration = Duration::from_secs(1);

/// Starts the broker's production of the configured events.
pub fn enable(broker: &dyn Broker, s: &WebhookSettings) -> Result<(), crier_core::BrokerError> {
    // Held longer than a POST plus the longest backoff without a word: the holder is dead.
    let claim_idle = (s.timeout + s.retry_max) * 2 + Duration::from_secs(1);
    // The delivering node renews its turn around every request (which lasts at most `timeout`)
    // and at least every `HOLD_EVERY` while it waits to retry one.
    let lease = s.timeout + HOLD_EVERY * 2;
    broker.enable_hooks(HookConfig { events: s.events.clone(), max_queue: s.max_queue, claim_idle, lease })
}

/// `t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return format!("t={t},v1="),
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push_str(&format!("{b:02x}"));
    }
    format!("t={t},v1={hex}")
}

#[derive(serde::Serialize)]
struct Body<'a> {
    events: &'a [HookEvent],
}

/// Why a POST did not deliver.
enum Failure {
    Timeout,
    Connection(String),
    Status(u16),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Timeout => f.write_str("no answer within the timeout"),
            Failure::Connection(e) => write!(f, "connection failed: {e}"),
            Failure::Status(s) => write!(f, "HTTP {s}"),
        }
    }
}

/// Delivers the broker's events to the backend until aborted.
pub async fn run(broker: Arc<dyn Broker>, s: WebhookSettings) {
    let http = match reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .connect_timeout(s.timeout)
        .timeout(s.timeout)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: cannot build the HTTP client; no webhook is delivered");
            return;
        }
    };
    let mut last_warn: Option<tokio::time::Instant> = None;
    loop {
        let batch = match broker.hook_read(s.batch, READ_WAIT).await {
            Ok(b) => b,
            Err(e) => {
                let now = tokio::time::Instant::now();
                if last_warn.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10)) {
                    last_warn = Some(now);
                    tracing::warn!(error = %e, "webhooks: cannot read the event queue (broker down?); retrying");
                }
                tokio::time::sleep(s.retry_min.max(Duration::from_millis(100))).await;
                continue;
            }
        };
        gauges(&*broker, batch.len());
        if batch.is_empty() {
            continue;
        }
        let mut delay = s.retry_min;
        loop {
            match post(&http, &s, &batch).await {
                Ok(()) => {
                    count(&batch, "delivered");
                    let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
                    // An ack that fails leaves the events pending: delivered again (same ids).
                    if let Err(e) = broker.hook_ack(&ids).await {
                        tracing::warn!(error = %e, "webhooks: could not acknowledge a delivered batch");
                    }
                    break;
                }
                Err(why) => {
                    count(&batch, "failed");
                    let now = tokio::time::Instant::now();
                    if last_warn.is_none_or(|at| now.duration_since(at) >= Duration::from_secs(10)) {
                        last_warn = Some(now);
                        tracing::warn!(failure = %why, events = batch.len(), retry_in = ?delay, "webhooks: the backend did not take a batch; retrying");
                    }
                    let jitter = rand::rng().random_range(0.8..1.2);
                    let retry_at = tokio::time::Instant::now() + delay.mul_f64(jitter);
                    delay = (delay * 2).min(s.retry_max);
                    let ids: Vec<String> = batch.iter().map(|e| e.id.clone()).collect();
                    loop {
                        let now = tokio::time::Instant::now();
                        if now >= retry_at {
                            break;
                        }
                        tokio::time::sleep((retry_at - now).min(HOLD_EVERY)).await;
                        gauges(&*broker, batch.len());
                        if let Err(e) = broker.hook_hold(&ids).await {
                            tracing::debug!(error = %e, "webhooks: could not renew the hold on a batch being retried");
                        }
                    }
                }
            }
        }
    }
}

async fn post(http: &reqwest::Client, s: &WebhookSettings, batch: &[HookEvent]) -> Result<(), Failure> {
    let body = serde_json::to_vec(&Body { events: batch }).map_err(|e| Failure::Connection(e.to_string()))?;
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let sig = signature(s.secret.as_bytes(), t, &body);
    let started = std::time::Instant::now();
    let sent = http
        .post(&s.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, sig)
        .body(body)
        .send()
        .await;
    metrics::histogram!(m::WEBHOOK_DURATION).record(started.elapsed().as_secs_f64());
    match sent {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(Failure::Status(r.status().as_u16())),
        Err(e) if e.is_timeout() => Err(Failure::Timeout),
        Err(e) => Err(Failure::Connection(e.to_string())),
    }
}

fn count(batch: &[HookEvent], result: &'static str) {
    for e in batch {
        let name: &'static str = match e.name.as_str() {
            "channel_occupied" => "channel_occupied",
            "channel_vacated" => "channel_vacated",
            "member_added" => "member_added",
            "member_removed" => "member_removed",
            "client_publish" => "client_publish",
            _ => "other",
        };
        metrics::counter!(m::WEBHOOK_EVENTS, "name" => name, "result" => result).increment(1);
    }
}

fn gauges(broker: &dyn Broker, in_flight: usize) {
    let stats = broker.hook_stats();
    metrics::gauge!(m::WEBHOOK_QUEUE).set((stats.queued + in_flight as u64) as f64);
    metrics::counter!(m::WEBHOOK_DROPPED).absolute(stats.dropped);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_rfc4231_hmac_sha256_of_t_dot_body() {
        // Against a value computed independently (python3: hmac.new(b"k"*32, b"1700000000.{}", hashlib.sha256).hexdigest()).
        let sig = signature(&[b'k'; 32], 1_700_000_000, b"{}");
        assert_eq!(sig, "t=1700000000,v1=0b3b35525c10b3757ffa78df69037021fc3168d8390a51a4fcb4a8d56a25b557");
    }
}
