//! The REST publisher: `POST /api/v1/publish` at a target rate, each message's `data` carrying
//! the send timestamp (`{"ts":<µs since the epoch>,"pad":"..."}`) so subscribers can time it.
//!
//! Sends are scheduled on a fixed timetable (message k at start + k/rate) and run concurrently,
//! at most `concurrency` in flight; when the gateway answers too slowly for that, the send waits
//! and is counted as `behind` (the rate was not held).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until};

use crate::stats::now_us;

pub struct Publisher {
    client: reqwest::Client,
    endpoints: Vec<String>,
    auth: String,
    pad: Arc<str>,
    concurrency: usize,
    /// A channel's consecutive publishes go through the nodes in turn (else a channel is
    /// always published through the same node).
    spread: bool,
}

/// What one publishing step did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Published {
    pub target_rate: f64,
    pub attempted: u64,
    pub ok: u64,
    pub failed: u64,
    /// Sends that had to wait for a free slot (the gateway answered slower than the rate).
    pub behind: u64,
    pub achieved_rate: f64,
    pub elapsed_s: f64,
    pub first_error: Option<String>,
    /// Accepted publishes per channel index.
    #[serde(skip)]
    pub ok_per_channel: Vec<u64>,
}

impl Publisher {
    /// `data` after the timestamp: `"pad":"xxx…"`, or a realistic ~1 KiB order event.
    fn body_rest(payload_bytes: usize, realistic: bool) -> String {
        if !realistic {
            return format!(r#""pad":"{}""#, "x".repeat(payload_bytes));
        }
        let names = ["Ada Lovelace", "Grace Hopper", "Alan Turing", "Edsger Dijkstra", "Barbara Liskov"];
        let products = ["espresso beans 1kg", "ceramic pour-over", "burr grinder", "milk frother", "travel mug"];
        let items: Vec<serde_json::Value> = (0..6)
            .map(|i| {
                serde_json::json!({
                    "sku": format!("SKU-{:05}", 7919 * (i + 3) % 100_000),
                    "name": products[i % products.len()],
                    "qty": 1 + i % 3,
                    "unit_price": 4.5 + 3.25 * i as f64,
                    "tags": ["coffee", if i % 2 == 0 { "gift" } else { "subscription" }],
                })
            })
            .collect();
        let event = serde_json::json!({
            "type": "order.updated",
            "order_id": "ord_2fQ9xT7kLm3Vb8Rz",
            "status": "shipped",
            "customer": {"id": 48213, "name": names[2], "email": "alan@example.com", "tier": "gold"},
            "shipping": {"carrier": "DHL", "tracking": "JD014600006281230071", "eta": "2026-12-03T17:00:00Z",
                         "address": {"city": "Manchester", "postcode": "M1 1AE", "country": "GB"}},
            "items": items,
            "totals": {"subtotal": 93.0, "shipping": 4.99, "tax": 18.6, "currency": "GBP"},
            "updated_at": "2026-12-01T10:31:07.123Z",
        });
        let text = event.to_string();
        // Drop the braces: the fields go after "ts".
        format!(r#""event":{text}"#)
    }

    pub fn with_payload(
        nodes: &[SocketAddr],
        api_key: &str,
        payload_bytes: usize,
        realistic: bool,
        concurrency: usize,
    ) -> Publisher {
        // crier closes a keep-alive connection idle for 10 s (its header read timeout); a pooled
        // connection reused at that moment fails the request (the keep-alive race). So, as a
        // backend should, the pool drops idle connections first.
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .pool_idle_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .timeout(Duration::from_secs(15))
            .build()
            .unwrap_or_default();
        Publisher {
            client,
            endpoints: nodes.iter().map(|a| format!("http://{a}/api/v1/publish")).collect(),
            auth: format!("Bearer {api_key}"),
            pad: Publisher::body_rest(payload_bytes, realistic).into(),
            concurrency: concurrency.max(1),
            spread: false,
        }
    }

    /// A channel's consecutive publishes through the nodes in turn (a backend publishing
    /// through a load balancer), instead of each channel through one node.
    pub fn spread(mut self, spread: bool) -> Publisher {
        self.spread = spread;
        self
    }

    /// A `message` frame as the gateway builds it for one of this publisher's messages.
    pub fn sample_frame(&self, channel: &str) -> bytes::Bytes {
        let data = format!(r#"{{"ts":{},{}}}"#, now_us(), self.pad);
        crier_protocol::frames::encode_message(channel, "Xk2c9aQe", 12345, &data)
    }

    /// Publishes `rate`×`duration` messages, message k to `channels[k % len]` through node
    /// `k % nodes`, and waits for every answer.
    pub async fn run(&self, channels: &[String], rate: f64, duration: Duration) -> Published {
        let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
        let sem = Arc::new(Semaphore::new(self.concurrency));
        let mut tasks = JoinSet::new();
        let mut out = Published { target_rate: rate, ok_per_channel: vec![0; channels.len()], ..Default::default() };
        let start = Instant::now();
        for k in 0..total {
            sleep_until(start + Duration::from_secs_f64(k as f64 / rate)).await;
            let permit = match sem.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    out.behind += 1;
                    match sem.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => break,
                    }
                }
            };
            let ci = (k as usize) % channels.len();
            let channel = channels[ci].clone();
            let via = if self.spread { k as usize + k as usize / channels.len() } else { k as usize };
            let url = self.endpoints[via % self.endpoints.len()].clone();
            let (client, auth, pad) = (self.client.clone(), self.auth.clone(), self.pad.clone());
            tasks.spawn(async move {
                let body = format!(r#"{{"channel":"{channel}","data":{{"ts":{},{pad}}}}}"#, now_us());
                let r = client
                    .post(url)
                    .header("authorization", auth)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                drop(permit);
                let result = match r {
                    Ok(resp) if resp.status().is_success() => Ok(()),
                    Ok(resp) => Err(format!("http {}", resp.status().as_u16())),
                    Err(e) => Err(format!("{e}")),
                };
                (ci, result)
            });
            out.attempted += 1;
        }
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok((ci, Ok(()))) => {
                    out.ok += 1;
                    out.ok_per_channel[ci] += 1;
                }
                Ok((_, Err(e))) => {
                    out.failed += 1;
                    out.first_error.get_or_insert(e);
                }
                Err(e) => {
                    out.failed += 1;
                    out.first_error.get_or_insert(e.to_string());
                }
            }
        }
        out.elapsed_s = start.elapsed().as_secs_f64();
        out.achieved_rate = out.ok as f64 / out.elapsed_s.max(1e-9);
        out
    }
}
