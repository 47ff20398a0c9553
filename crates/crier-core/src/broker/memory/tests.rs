use super::*;

#[tokio::test]
async fn revocations_past_their_ttl_are_forgotten_on_the_next_write() {
    let b = MemoryBroker::new(10, Duration::from_secs(60));
    b.set_revocation_ttl(Duration::from_secs(3600));
    let now = crate::now_micros() / 1_000_000;
    let invalidate = async |user: &str, before: u64| {
        b.user_op(user, &UserOp::Invalidate { before }).await.expect("user_op");
    };
    invalidate("old", now - 7200).await;
    invalidate("new", now).await;
    assert_eq!(lock(&b.revoked).len(), 1, "the stale one is no longer held");
    let kept = b.revocations(0).await.expect("revocations");
    assert_eq!(kept, [Revocation { user: "new".into(), before: now }]);
}

#[tokio::test]
async fn past_the_byte_cap_the_oldest_history_goes_first_and_recovery_reports_it() {
    // Each entry counts its frame plus its slot; a cap of ~3 entries of 1 KiB.
    let data = format!("\"{}\"", "x".repeat(1000));
    let one = 1000 + 100 + std::mem::size_of::<(Publication, Instant)>();
    let broker = MemoryBroker::with_history_cap(100, Duration::from_secs(60), 3 * one);
    let first = broker.publish("a", &data, PublishOptions::default()).await.unwrap();
    for channel in ["b", "c", "d", "e", "f", "g", "h"] {
        // Each publish in a slice of its own (the cap keeps the newest slice whole); not a
        // synchronisation, a distinct publish time.
        std::thread::sleep(TICK);
        broker.publish(channel, &data, PublishOptions::default()).await.unwrap();
    }
    assert!(broker.history_bytes() <= 3 * one, "{} bytes kept", broker.history_bytes());
    let pos = StreamPosition { epoch: first.epoch, offset: 0 };
    let h = broker.history("a", Some(&pos), 10).await.unwrap();
    assert!(h.gap && h.publications.is_empty(), "the oldest channel's message went, and that is said");
    let h = broker.history("h", None, 10).await.unwrap();
    assert_eq!(h.publications.len(), 1, "the newest is kept");
}
