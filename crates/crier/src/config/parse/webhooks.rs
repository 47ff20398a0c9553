//! The `[webhooks]` table (TOML only), typed.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The options of the `[webhooks]` table.
const WEBHOOK_OPTIONS: [&str; 8] =
    ["url", "secret", "events", "timeout", "max_queue", "batch", "retry_min", "retry_max"];

/// Shortest webhook `secret`, in bytes.
const MIN_WEBHOOK_SECRET: usize = 32;

/// The `[webhooks]` table, typed; every problem reported (`None` when there was one).
pub(super) fn webhooks(p: &mut Parser<'_>, raw: &RawNamespace) -> Option<WebhookSettings> {
    let source = &raw.source;
    let toml::Value::Table(options) = &raw.options else {
        p.problems.push(format!(
            "webhooks: expected a table ({source}), like [webhooks] url = \"http://127.0.0.1:9000/crier/events\""
        ));
        return None;
    };
    let mut out = WebhookSettings {
        url: String::new(),
        secret: String::new(),
        events: ["channel_occupied", "channel_vacated", "member_added", "member_removed"].map(str::to_owned).to_vec(),
        timeout: Duration::from_secs(5),
        max_queue: 100_000,
        batch: 100,
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(30),
    };
    let mut ok = true;
    for (key, value) in options {
        let at = format!("webhooks.{key}");
        if !WEBHOOK_OPTIONS.contains(&key.as_str()) {
            p.problems.push(format!(
                "{at}: unknown webhooks option ({source}){}; the options: {}",
                suggest(key, WEBHOOK_OPTIONS.iter().map(|o| (*o).to_owned())),
                WEBHOOK_OPTIONS.join(", ")
            ));
            ok = false;
            continue;
        }
        if key == "events" {
            let toml::Value::Array(items) = value else {
                p.problems
                    .push(format!("{at}: ({source}): expected a list of event names, like [\"channel_vacated\"]"));
                ok = false;
                continue;
            };
            out.events.clear();
            for item in items {
                match item.as_str() {
                    Some(name) if crate::config::WEBHOOK_EVENTS.contains(&name) => {
                        if !out.events.iter().any(|e| e == name) {
                            out.events.push(name.to_owned());
                        }
                    }
                    _ => {
                        p.problems.push(format!(
                            "{at}: `{item}` ({source}): not an event; the events: {}",
                            crate::config::WEBHOOK_EVENTS.join(", ")
                        ));
                        ok = false;
                    }
                }
            }
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Table(_) | toml::Value::Array(_) => {
                p.problems.push(format!("{at}: ({source}): expected a single value"));
                ok = false;
                continue;
            }
            other => other.to_string(),
        };
        if key == "secret" {
            // Never echoed: the problem names the length only.
            if text.len() < MIN_WEBHOOK_SECRET {
                p.problems.push(format!(
                    "{at}: ({source}): {} bytes; at least {MIN_WEBHOOK_SECRET} bytes are needed",
                    text.len()
                ));
                ok = false;
            } else {
                out.secret = text;
            }
            continue;
        }
        let typed = match key.as_str() {
            "url" => proxy_url(&text).map(|u| out.url = u),
            "timeout" => duration_within(&text, false, MAX_BACKEND_TIMEOUT).map(|d| out.timeout = d),
            "max_queue" => at_least_one::<usize>(&text).map(|n| out.max_queue = n),
            "batch" => at_least_one::<usize>(&text)
                .and_then(|n| if n > 1000 { Err("at most 1000".to_owned()) } else { Ok(n) })
                .map(|n| out.batch = n),
            "retry_min" => duration_within(&text, false, MAX_DURATION).map(|d| out.retry_min = d),
            "retry_max" => duration_within(&text, false, MAX_DURATION).map(|d| out.retry_max = d),
            _ => continue,
        };
        if let Err(problem) = typed {
            p.problems.push(format!("{at}: `{text}` ({source}): {problem}"));
            ok = false;
        }
    }
    for (name, missing) in [("url", out.url.is_empty()), ("secret", out.secret.is_empty())] {
        if missing && !options.contains_key(name) {
            p.problems.push(format!("webhooks.{name}: ({source}): required"));
            ok = false;
        }
    }
    if out.retry_min > out.retry_max {
        p.problems.push(format!("webhooks.retry_min: ({source}): more than retry_max"));
        ok = false;
    }
    ok.then_some(out)
}
