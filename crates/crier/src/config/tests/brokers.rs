//! The broker settings: one NATS or Redis topology, and URLs shown without their passwords.

#[allow(clippy::wildcard_imports)]
use super::*;

#[test]
fn nats_url_is_one_broker_among_the_redis_topologies_and_takes_one_credential() -> TestResult {
    let c = load_with(&["--nats-url", "nats://a:4222, tls://b:4222", "--nats-replicas", "3"], &[])?;
    assert_eq!(c.nats.urls.iter().map(|u| u.as_str()).collect::<Vec<_>>(), ["nats://a:4222", "tls://b:4222"]);
    assert_eq!((c.nats.replicas, c.broker_kind()), (3, "nats"));
    let p = problems(&["--nats-url", "nats://a:4222", "--redis-url", "redis://r:6379"], &[]);
    assert!(p.len() == 1 && p[0].contains("set one broker"), "{p:#?}");
    let p = problems(&["--nats-url", "redis://a:4222"], &[]);
    assert!(p.len() == 1 && p[0].starts_with("nats_url: `redis://a:4222`"), "{p:#?}");
    let p = problems(&["--nats-url", "nats://a:4222", "--nats-token-file", "/t", "--nats-nkey-file", "/n"], &[]);
    assert!(p.len() == 1 && p[0].contains("at most one NATS credential"), "{p:#?}");
    // A password in the URL is not echoed in a problem.
    let p = problems(&["--nats-url", "nats://u:hunter2@a:4222", "--redis-url", "redis://r:6379"], &[]);
    assert!(p.iter().all(|p| !p.contains("hunter2")), "{p:#?}");
    assert_eq!(load_with(&[], &[])?.broker_kind(), "memory");
    Ok(())
}

#[test]
fn exactly_one_redis_topology() -> TestResult {
    let p = problems(&["--redis-url", "redis://r:6379", "--redis-sentinel-urls", "redis://s:26379"], &[]);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(p[0].contains("set exactly one Redis topology"), "{p:#?}");
    let p = problems(&["--redis-cluster-urls", "redis://c:6379", "--redis-url", "redis://r:6379"], &[]);
    assert!(p.len() == 1 && p[0].contains("set exactly one Redis topology"), "{p:#?}");
    let c = load_with(&["--redis-cluster-urls", "redis://c1:6379,redis://c2:6379"], &[])?;
    assert_eq!(c.redis_cluster_urls.len(), 2);
    let p = problems(&["--redis-sentinel-urls", "redis://s:26379"], &[]);
    assert!(p.len() == 1 && p[0].contains("needs redis_sentinel_master"), "{p:#?}");
    let p = problems(&[], &[("CRIER_REDIS_SENTINEL_MASTER", "m")]);
    assert!(p.len() == 1 && p[0].contains("needs redis_sentinel_urls"), "{p:#?}");
    let p = problems(&["--redis-sentinel-urls", "http://s:26379", "--redis-sentinel-master", "m"], &[]);
    assert!(p.len() == 1 && p[0].contains("Sentinel address"), "{p:#?}");
    let p = problems(&["--redis-sentinel-urls", "redis://:hunter3@s:26379,x", "--redis-sentinel-master", "m"], &[]);
    assert!(p.iter().all(|l| !l.contains("hunter3")), "{p:#?}");
    let c = load_with(
        &["--redis-sentinel-urls", "redis://a:26379, rediss://b:26379", "--redis-sentinel-master", "m"],
        &[],
    )?;
    assert_eq!(c.redis_sentinel_urls.len(), 2);
    assert_eq!(c.redis_sentinel_master.as_deref(), Some("m"));
    Ok(())
}

#[test]
fn redact_url_hides_user_info() {
    use super::parse::redact_url;
    assert_eq!(redact_url("redis://:pw@host:6379/0"), "redis://***@host:6379/0");
    assert_eq!(redact_url("redis://u:p@ss@host"), "redis://***@host");
    assert_eq!(redact_url("redis://host/0?x=a@b"), "redis://host/0?x=a@b");
    assert_eq!(redact_url("user:pw@host"), "***@host");
    assert_eq!(redact_url("unix:///tmp/r.sock"), "unix:///tmp/r.sock");
}
