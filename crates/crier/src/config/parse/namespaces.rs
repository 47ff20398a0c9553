//! The `[namespaces.<name>]` tables (TOML only), typed, and the proxies they ask for.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The options a `[namespaces.<name>]` table may set.
const NAMESPACE_OPTIONS: [&str; 9] = [
    "history_size",
    "history_ttl",
    "recovery",
    "presence",
    "join_leave",
    "client_publish",
    "max_subscribers",
    "subscribe_proxy",
    "publish_proxy",
];

/// The `[namespaces.<name>]` tables: each name checked (a channel-name prefix: non-empty,
/// channel-name characters, no `:`), each option typed; options not given inherit `default`
/// (the top-level history settings, today's behaviour for the rest). Every problem is reported;
/// `None` when there was one.
pub(super) fn namespaces(p: &mut Parser<'_>, raw: &[RawNamespace], default: ChannelPolicy) -> Option<Namespaces> {
    let mut out = Namespaces::new(default.clone());
    let mut ok = true;
    for ns in raw {
        let name = &ns.name;
        let at = format!("namespaces.{name}");
        let source = &ns.source;
        if let Err(problem) = namespace_name(name) {
            p.problems.push(format!("{at}: `{name}` ({source}): {problem}"));
            ok = false;
        }
        let toml::Value::Table(options) = &ns.options else {
            p.problems.push(format!(
                "{at}: `{}` ({source}): expected a table of options, like [namespaces.{name}] history_size = 10",
                ns.options.to_string().replace('\n', " ").trim()
            ));
            ok = false;
            continue;
        };
        let mut policy = default.clone();
        let mut size_set = false;
        let mut ttl_set = false;
        for (key, value) in options {
            let text = match value {
                toml::Value::String(s) => s.clone(),
                toml::Value::Table(_) | toml::Value::Array(_) => {
                    let shown = value.to_string().replace('\n', " ");
                    p.problems.push(format!("{at}.{key}: `{}` ({source}): expected a single value", shown.trim()));
                    ok = false;
                    continue;
                }
                other => other.to_string(),
            };
            let typed = match key.as_str() {
                "history_size" => number::<usize>(&text)
                    .and_then(|n| {
                        if n <= MAX_HISTORY_SIZE { Ok(n) } else { Err(format!("must be at most {MAX_HISTORY_SIZE}")) }
                    })
                    .map(|n| {
                        policy.history_size = n;
                        size_set = true;
                    }),
                // Judged below, once the namespace's history_size is known.
                "history_ttl" => duration_within(&text, true, MAX_HISTORY_TTL).map(|d| {
                    policy.history_ttl = d;
                    ttl_set = true;
                }),
                "recovery" => boolean(&text).map(|b| policy.recovery = b),
                "presence" => boolean(&text).map(|b| policy.presence = b),
                "join_leave" => boolean(&text).map(|b| policy.join_leave = b),
                "client_publish" => boolean(&text).map(|b| policy.client_publish = b),
                "max_subscribers" => number::<usize>(&text).map(|n| policy.max_subscribers = n),
                "subscribe_proxy" => boolean(&text).map(|b| policy.subscribe_proxy = b),
                "publish_proxy" => boolean(&text).map(|b| policy.publish_proxy = b),
                _ => {
                    p.problems.push(format!(
                        "{at}.{key}: unknown namespace option ({source}){}; the options: {}",
                        suggest(key, NAMESPACE_OPTIONS.iter().map(|o| (*o).to_owned())),
                        NAMESPACE_OPTIONS.join(", ")
                    ));
                    ok = false;
                    continue;
                }
            };
            if let Err(problem) = typed {
                p.problems.push(format!("{at}.{key}: `{text}` ({source}): {problem}"));
                ok = false;
            }
        }
        if policy.history_size > 0 && policy.history_ttl.is_zero() && (size_set || ttl_set) {
            p.problems.push(format!(
                "{at}.history_ttl: `0s` ({source}): must be more than 0s when the namespace keeps history \
                 (history_size {}; set history_size = 0 to keep none)",
                policy.history_size
            ));
            ok = false;
        }
        if policy.max_subscribers > 0 && !policy.presence {
            p.problems.push(format!(
                "{at}.max_subscribers: `{}` ({source}): counts the channel's presence, so it needs presence = true",
                policy.max_subscribers
            ));
            ok = false;
        }
        if policy.join_leave && !policy.presence {
            p.problems.push(format!(
                "{at}.join_leave: `true` ({source}): join/leave frames come from the channel's presence, so it needs presence = true"
            ));
            ok = false;
        }
        out = out.with(name, policy);
    }
    ok.then_some(out)
}

/// A namespace that asks for a proxy needs its URL in `[proxy]`.
pub(super) fn proxied_namespaces(p: &mut Parser<'_>, ns: &Namespaces, proxy: Option<&ProxySettings>) {
    let mut named: Vec<(&str, &ChannelPolicy)> = ns.named().collect();
    named.sort_by_key(|(n, _)| *n);
    for (name, policy) in named {
        if policy.subscribe_proxy && proxy.is_none_or(|p| p.subscribe_url.is_none()) {
            p.problems
                .push(format!("namespaces.{name}.subscribe_proxy: `true`: needs subscribe_url in the [proxy] table"));
        }
        if policy.publish_proxy && proxy.is_none_or(|p| p.publish_url.is_none()) {
            p.problems.push(format!("namespaces.{name}.publish_proxy: `true`: needs publish_url in the [proxy] table"));
        }
    }
}

/// A namespace name: what comes before the first `:` of a channel name.
pub(super) fn namespace_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a namespace needs a name".to_owned());
    }
    if name.contains(':') {
        return Err("a namespace is the part of a channel name before its first `:`, so its name has no `:`".to_owned());
    }
    crier_protocol::validate_channel(name).map_err(|e| e.to_string().replacen("channel name", "a namespace name", 1))
}
