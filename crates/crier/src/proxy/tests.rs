use super::*;

#[test]
fn breaker_opens_after_consecutive_failures_then_lets_one_probe_through() {
    let b = Breaker::new(3, Duration::from_millis(100));
    assert!(matches!(b.admit(0), Ok(None)));
    b.failure(0);
    b.failure(0);
    b.success();
    b.failure(0);
    b.failure(0);
    assert!(matches!(b.admit(0), Ok(None)), "a success resets the count");
    b.failure(10);
    assert!(b.admit(50).is_err(), "open during the cool-down");
    let probe = b.admit(110);
    assert!(matches!(probe, Ok(Some(_))), "one probe after the cool-down");
    assert!(b.admit(110).is_err(), "only one probe at a time");
    drop(probe);
    let probe = b.admit(111);
    assert!(matches!(probe, Ok(Some(_))), "an abandoned probe lets the next caller probe");
    b.failure(111);
    drop(probe);
    assert!(b.admit(150).is_err(), "a failed probe opens it again");
    let probe = b.admit(220);
    b.success();
    drop(probe);
    assert!(matches!(b.admit(220), Ok(None)), "a successful probe closes it");
}

#[test]
fn no_breaker_with_threshold_zero() {
    let b = Breaker::new(0, Duration::from_secs(1));
    for _ in 0..100 {
        b.failure(0);
    }
    assert!(matches!(b.admit(0), Ok(None)));
}

#[tokio::test]
async fn a_call_waits_for_a_slot_at_most_the_timeout_then_is_busy() -> Result<(), Box<dyn std::error::Error>> {
    let settings = ProxySettings {
        // Never called: the only slot is held below.
        connect_url: Some("http://127.0.0.1:9/connect".into()),
        connect_headers: Vec::new(),
        connect_always: false,
        subscribe_url: None,
        publish_url: None,
        refresh_url: None,
        timeout: Duration::from_millis(50),
        max_concurrency: 1,
        breaker_failures: 1,
        breaker_cooldown: Duration::from_secs(60),
        refresh_before: Duration::from_secs(10),
    };
    let proxies = Proxies::new(Some(&settings))?.ok_or("proxies")?;
    let held = proxies.connect.as_ref().ok_or("the connect proxy")?.slots.acquire().await?;
    let r = proxies.connect(&serde_json::json!({})).await;
    assert!(matches!(r, Err(Failure::Busy)), "{r:?}");
    let r = proxies.connect(&serde_json::json!({})).await;
    assert!(matches!(r, Err(Failure::Busy)), "busy is not a backend failure: the breaker stays closed ({r:?})");
    drop(held);
    Ok(())
}

#[test]
fn reasons_are_cleaned() {
    assert_eq!(clean_reason("no\nsession\u{7}"), "nosession");
    assert_eq!(clean_reason(&"x".repeat(500)).len(), 200);
}
