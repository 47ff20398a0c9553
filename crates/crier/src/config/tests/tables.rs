//! The TOML-only tables: `[namespaces.<name>]`, `[proxy]`, `[webhooks]`.

#[allow(clippy::wildcard_imports)]
use super::*;

#[test]
fn namespaces_from_the_toml_file() -> TestResult {
    use crier_core::ChannelPolicy;
    let dir = TempDir::new()?;
    let file = dir.file(
        "crier.toml",
        "history_size = 50\nhistory_ttl = \"2m\"\n\
         [namespaces.chat]\nhistory_size = 500\nhistory_ttl = \"1h\"\njoin_leave = true\nmax_subscribers = 3\n\
         [namespaces.ticker]\nhistory_size = 0\nrecovery = false\npresence = false\nclient_publish = false\n\
         [namespaces.user]\nhistory_ttl = \"10m\"\n\
         [namespaces.\"a.b-c_d@e/f=g\"]\n",
    )?;
    let c = load_with(&["--config", &file], &[])?;
    let ns = &c.namespaces;
    let default = ChannelPolicy { history_size: 50, history_ttl: Duration::from_secs(120), ..ChannelPolicy::default() };
    assert_eq!(ns.default_policy(), &default);
    assert_eq!(ns.policy("lobby"), &default, "no `:`, no namespace");
    assert_eq!(ns.policy("news:x"), &default, "undeclared namespace");
    assert_eq!(
        ns.policy("chat:lobby"),
        &ChannelPolicy {
            history_size: 500,
            history_ttl: Duration::from_secs(3600),
            join_leave: true,
            max_subscribers: 3,
            ..default.clone()
        }
    );
    assert_eq!(
        ns.policy("ticker:eurusd"),
        &ChannelPolicy { history_size: 0, recovery: false, presence: false, client_publish: false, ..default.clone() },
        "history_ttl inherited even with history_size 0"
    );
    assert_eq!(
        ns.policy("user:alice"),
        &ChannelPolicy { history_ttl: Duration::from_secs(600), ..default.clone() },
        "personal channels are the `user` namespace"
    );
    assert_eq!(ns.policy("a.b-c_d@e/f=g:x"), &default, "an empty table declares the namespace with the defaults");
    assert_eq!(ns.max_history_ttl(), Duration::from_secs(3600));
    // Without namespaces: today's behaviour, the top-level history options.
    let c = load_with(&[], &[])?;
    assert_eq!(c.namespaces.named().count(), 0);
    assert_eq!(c.namespaces.default_policy(), &ChannelPolicy::default());
    Ok(())
}

#[test]
fn bad_namespaces_are_reported_with_every_other_problem() -> TestResult {
    let dir = TempDir::new()?;
    let file = dir.file(
        "crier.toml",
        "user_rate = 0\n\
         [namespaces.chat]\nhistory_sise = 5\nrecovery = \"maybe\"\nhistory_size = -1\nmax_subscribers = \"x\"\n\
         [namespaces.\"bad name\"]\n\
         [namespaces.\"a:b\"]\n\
         [namespaces.\"\"]\n\
         [namespaces.live]\nhistory_size = 10\nhistory_ttl = \"0s\"\n\
         [namespaces.full]\npresence = false\nmax_subscribers = 2\n\
         [namespaces.mute]\npresence = false\njoin_leave = true\n\
         [namespaces.nested]\nhistory_size = [1]\n",
    )?;
    let p = problems(&["--config", &file], &[]);
    let all = p.join("\n");
    let has = |needle: &str| p.iter().any(|l| l.contains(needle));
    assert!(has("user_rate:"), "{all}");
    assert!(
        has("namespaces.chat.history_sise: unknown namespace option") && has("did you mean `history_size`"),
        "{all}"
    );
    assert!(has("namespaces.chat.recovery: `maybe`"), "{all}");
    assert!(has("namespaces.chat.history_size: `-1`"), "{all}");
    assert!(has("namespaces.chat.max_subscribers: `x`"), "{all}");
    assert!(has("namespaces.bad name: `bad name`") && has("0x20"), "{all}");
    assert!(has("namespaces.a:b: `a:b`") && has("no `:`"), "{all}");
    assert!(has("namespaces.: ``") && has("needs a name"), "{all}");
    assert!(has("namespaces.live.history_ttl: `0s`"), "{all}");
    assert!(has("namespaces.full.max_subscribers: `2`") && has("needs presence = true"), "{all}");
    assert!(has("namespaces.mute.join_leave: `true`") && has("needs presence = true"), "{all}");
    assert!(has("namespaces.nested.history_size"), "{all}");
    assert_eq!(p.len(), 12, "{all}");

    // A namespace declared twice is refused by the TOML parser itself (with the line).
    let twice = dir.file("twice.toml", "[namespaces.chat]\nhistory_size = 1\n[namespaces.chat]\nhistory_size = 2\n")?;
    let p = problems(&["--config", &twice], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].contains("invalid TOML at line 3"), "{p:#?}");
    // `namespaces` must be tables.
    let flat = dir.file("flat.toml", "namespaces = \"chat\"\n")?;
    let p = problems(&["--config", &flat], &[]);
    assert!(p.len() == 1 && p[0].starts_with("namespaces: expected tables like [namespaces.chat]"), "{p:#?}");
    let Err(e) = load_with(&["--config", &flat], &[]) else { panic!("must fail") };
    assert_eq!(e.exit_code(), 64);
    Ok(())
}

#[test]
fn the_proxy_table_and_the_namespace_switches() -> TestResult {
    let dir = TempDir::new()?;
    let file = dir.file(
        "crier.toml",
        "[proxy]\nconnect_url = \"http://127.0.0.1:9000/connect\"\nconnect_headers = [\"Cookie\", \"X-Request-Id\"]\n\
         subscribe_url = \"http://127.0.0.1:9000/subscribe\"\ntimeout = \"250ms\"\nmax_concurrency = 8\n\
         refresh_before = \"30s\"\n[namespaces.room]\nsubscribe_proxy = true\n",
    )?;
    let c = load_with(&["--config", &file], &[])?;
    let p = c.proxy.ok_or("the [proxy] table")?;
    assert_eq!(p.connect_url.as_deref(), Some("http://127.0.0.1:9000/connect"));
    assert_eq!(p.connect_headers, ["cookie", "x-request-id"], "header names lower-cased");
    assert_eq!(p.subscribe_url.as_deref(), Some("http://127.0.0.1:9000/subscribe"));
    assert_eq!((p.publish_url, p.refresh_url), (None, None));
    assert_eq!((p.timeout, p.max_concurrency), (Duration::from_millis(250), 8));
    assert_eq!((p.connect_always, p.breaker_failures, p.breaker_cooldown), (false, 5, Duration::from_secs(5)));
    assert_eq!(p.refresh_before, Duration::from_secs(30));
    // `refresh_before`: 10 s unless set; more than an hour is a problem.
    let dflt = dir.file("dflt.toml", "[proxy]\nconnect_url = \"http://127.0.0.1:9000/connect\"\n")?;
    assert_eq!(load_with(&["--config", &dflt], &[])?.proxy.ok_or("proxy")?.refresh_before, Duration::from_secs(10));
    let long =
        dir.file("long.toml", "[proxy]\nconnect_url = \"http://127.0.0.1:9000/connect\"\nrefresh_before = \"2h\"\n")?;
    let p2 = problems(&["--config", &long], &[]);
    assert!(p2.len() == 1 && p2[0].starts_with("proxy.refresh_before: `2h`"), "{p2:#?}");
    assert!(c.namespaces.policy("room:1").subscribe_proxy);
    assert!(!c.namespaces.policy("room:1").publish_proxy);
    assert!(!c.namespaces.policy("news:1").subscribe_proxy, "off unless the namespace says so");
    // No table: no proxies.
    assert_eq!(load_with(&[], &[])?.proxy, None);
    Ok(())
}

#[test]
fn the_webhooks_table() -> TestResult {
    let dir = TempDir::new()?;
    let secret = "s".repeat(32);
    let file = dir.file(
        "crier.toml",
        &format!(
            "[webhooks]\nurl = \"http://127.0.0.1:9000/events\"\nsecret = \"{secret}\"\n\
             events = [\"channel_vacated\", \"member_added\"]\ntimeout = \"2s\"\nmax_queue = 10\nbatch = 5\n"
        ),
    )?;
    let c = load_with(&["--config", &file], &[])?;
    let w = c.webhooks.ok_or("the [webhooks] table")?;
    assert_eq!((w.url.as_str(), w.secret.as_str()), ("http://127.0.0.1:9000/events", secret.as_str()));
    assert_eq!(w.events, ["channel_vacated", "member_added"]);
    assert_eq!((w.timeout, w.max_queue, w.batch), (Duration::from_secs(2), 10, 5));
    assert_eq!((w.retry_min, w.retry_max), (Duration::from_millis(100), Duration::from_secs(30)));
    assert!(!format!("{w:?}").contains(&secret), "the secret is not in the Debug output");
    assert_eq!(load_with(&[], &[])?.webhooks, None);

    // Every problem at once, the short secret not echoed; exit 64.
    let bad = dir.file(
        "bad.toml",
        "[webhooks]\nurl = \"https://x\"\nsecret = \"short-secret\"\nevents = [\"channel_vacatd\"]\nbatch = 0\nretyr_max = \"1s\"\n",
    )?;
    let p = problems(&["--config", &bad], &[]);
    assert_eq!(p.len(), 5, "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.url: `https://x`")), "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.secret:") && l.contains("12 bytes")), "{p:#?}");
    assert!(!p.iter().any(|l| l.contains("short-secret")), "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.events: `\"channel_vacatd\"`")), "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.batch: `0`")), "{p:#?}");
    assert!(p.iter().any(|l| l.starts_with("webhooks.retyr_max: unknown") && l.contains("retry_max")), "{p:#?}");
    let Err(e) = load_with(&["--config", &bad], &[]) else { panic!("must fail") };
    assert_eq!(e.exit_code(), 64);
    let missing = dir.file("missing.toml", "[webhooks]\nurl = \"http://127.0.0.1:9/e\"\n")?;
    let p = problems(&["--config", &missing], &[]);
    assert!(p.len() == 1 && p[0].starts_with("webhooks.secret:") && p[0].contains("required"), "{p:#?}");
    Ok(())
}
