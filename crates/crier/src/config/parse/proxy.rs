//! The `[proxy]` table (TOML only), typed.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The options of the `[proxy]` table.
const PROXY_OPTIONS: [&str; 11] = [
    "connect_url",
    "connect_headers",
    "connect_always",
    "subscribe_url",
    "publish_url",
    "refresh_url",
    "timeout",
    "max_concurrency",
    "breaker_failures",
    "breaker_cooldown",
    "refresh_before",
];

/// Longest proxy `refresh_before`.
const MAX_REFRESH_BEFORE: Duration = Duration::from_secs(3600);

/// The `[proxy]` table, typed; every problem reported (`None` when there was one).
pub(super) fn proxy(p: &mut Parser<'_>, raw: &RawNamespace) -> Option<ProxySettings> {
    let source = &raw.source;
    let toml::Value::Table(options) = &raw.options else {
        p.problems.push(format!(
            "proxy: `{}` ({source}): expected a table, like [proxy] connect_url = \"http://127.0.0.1:9000/connect\"",
            raw.options.to_string().replace('\n', " ").trim()
        ));
        return None;
    };
    let mut out = ProxySettings {
        connect_url: None,
        connect_headers: Vec::new(),
        connect_always: false,
        subscribe_url: None,
        publish_url: None,
        refresh_url: None,
        timeout: Duration::from_secs(1),
        max_concurrency: 64,
        breaker_failures: 5,
        breaker_cooldown: Duration::from_secs(5),
        refresh_before: Duration::from_secs(10),
    };
    let mut ok = true;
    for (key, value) in options {
        let at = format!("proxy.{key}");
        if !PROXY_OPTIONS.contains(&key.as_str()) {
            p.problems.push(format!(
                "{at}: unknown proxy option ({source}){}; the options: {}",
                suggest(key, PROXY_OPTIONS.iter().map(|o| (*o).to_owned())),
                PROXY_OPTIONS.join(", ")
            ));
            ok = false;
            continue;
        }
        if key == "connect_headers" {
            let items: Vec<String> = match value {
                toml::Value::Array(items) => {
                    items.iter().map(|i| i.as_str().map(str::to_owned).unwrap_or_default()).collect()
                }
                toml::Value::String(s) => s.split(',').map(|i| i.trim().to_owned()).filter(|i| !i.is_empty()).collect(),
                other => {
                    p.problems.push(format!(
                        "{at}: `{other}` ({source}): expected a list of header names, like [\"Cookie\"]"
                    ));
                    ok = false;
                    continue;
                }
            };
            for item in items {
                match axum::http::HeaderName::from_bytes(item.as_bytes()) {
                    Ok(name) => out.connect_headers.push(name.as_str().to_owned()),
                    Err(_) => {
                        p.problems.push(format!("{at}: `{item}` ({source}): not a header name"));
                        ok = false;
                    }
                }
            }
            continue;
        }
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Table(_) | toml::Value::Array(_) => {
                let shown = value.to_string().replace('\n', " ");
                p.problems.push(format!("{at}: `{}` ({source}): expected a single value", shown.trim()));
                ok = false;
                continue;
            }
            other => other.to_string(),
        };
        let typed = match key.as_str() {
            "connect_url" => proxy_url(&text).map(|u| out.connect_url = Some(u)),
            "subscribe_url" => proxy_url(&text).map(|u| out.subscribe_url = Some(u)),
            "publish_url" => proxy_url(&text).map(|u| out.publish_url = Some(u)),
            "refresh_url" => proxy_url(&text).map(|u| out.refresh_url = Some(u)),
            "connect_always" => boolean(&text).map(|b| out.connect_always = b),
            "timeout" => duration_within(&text, false, MAX_BACKEND_TIMEOUT).map(|d| out.timeout = d),
            "max_concurrency" => at_least_one::<usize>(&text).map(|n| out.max_concurrency = n),
            "breaker_failures" => number::<u32>(&text).map(|n| out.breaker_failures = n),
            "breaker_cooldown" => duration_within(&text, false, MAX_DURATION).map(|d| out.breaker_cooldown = d),
            "refresh_before" => duration_within(&text, false, MAX_REFRESH_BEFORE).map(|d| out.refresh_before = d),
            _ => continue,
        };
        if let Err(problem) = typed {
            p.problems.push(format!("{at}: `{text}` ({source}): {problem}"));
            ok = false;
        }
    }
    if out.connect_always && out.connect_url.is_none() {
        p.problems.push(format!("proxy.connect_always: `true` ({source}): needs proxy.connect_url"));
        ok = false;
    }
    ok.then_some(out)
}
