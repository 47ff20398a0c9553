use super::*;
use crate::outbox::{Next, Out};

fn publication(offset: u64) -> Publication {
    Publication { offset, epoch: "e".into(), frame: Bytes::from(offset.to_string()), published_at_us: 0 }
}

async fn drain(o: &Outbox) -> Vec<String> {
    let mut batch = Vec::new();
    if o.queued_bytes() > 0 {
        assert_eq!(o.next(&mut batch).await, Next::Batch);
    }
    batch
        .into_iter()
        .filter_map(|b| match b {
            Out::Frame(f) => Some(String::from_utf8_lossy(&f).into_owned()),
            Out::Ping | Out::Deflated(_) => None,
        })
        .collect()
}

#[test]
fn counts_changed_since_the_last_look_are_taken_once() {
    let hub = Hub::new();
    let o = Arc::new(Outbox::new(1 << 20));
    assert!(hub.add("a", 1, o.clone()).is_ok());
    assert!(hub.add("a", 2, o.clone()).is_ok());
    assert!(hub.add("b", 1, o.clone()).is_ok());
    let mut c = hub.take_counts(false);
    c.sort();
    assert_eq!(c, [("a".to_owned(), 2), ("b".to_owned(), 1)]);
    assert!(hub.take_counts(false).is_empty(), "nothing changed since");
    hub.remove("b", 1);
    hub.remove("a", 2);
    let mut c = hub.take_counts(false);
    c.sort();
    assert_eq!(c, [("a".to_owned(), 1), ("b".to_owned(), 0)], "a channel left by its last subscriber counts 0");
    assert!(hub.add("c", 1, o.clone()).is_ok());
    hub.remove("c", 1);
    let mut c = hub.take_counts(true);
    c.sort();
    assert_eq!(c, [("a".to_owned(), 1), ("c".to_owned(), 0)], "all: every channel, and the changed ones gone");
}

#[tokio::test]
async fn buffering_merge_has_no_gap_and_no_duplicate() {
    let hub = Hub::new();
    let o = Arc::new(Outbox::new(1 << 20));
    assert!(hub.add("c", 1, o.clone()).is_ok());
    assert_eq!(hub.add("c", 1, o.clone()).err(), Some(AlreadySubscribed));
    // Live messages 5 and 6 arrive while history (up to 5) is being read.
    hub.deliver("c", &publication(5));
    hub.deliver("c", &publication(6));
    assert!(drain(&o).await.is_empty(), "nothing reaches a buffering subscriber");
    assert!(hub.activate("c", 1, vec![Bytes::from("ack"), Bytes::from("4"), Bytes::from("5")], ("e", 5)));
    hub.deliver("c", &publication(7));
    assert_eq!(drain(&o).await, ["ack", "4", "5", "6", "7"]);
}

#[tokio::test]
async fn an_overflowing_buffer_keeps_the_newest_and_asks_for_more_history() {
    let hub = Hub::new();
    // Frames are 1-2 bytes ("7", "10"): a 4-byte bound keeps the last two or three.
    let o = Arc::new(Outbox::new(4));
    assert!(hub.add("c", 1, o.clone()).is_ok());
    for i in 5..=11 {
        hub.deliver("c", &publication(i));
    }
    // The buffer now starts at 10: it does not continue a replay that stopped at 5...
    assert_eq!(hub.try_activate("c", 1, ("e", 5), true), Activation::Behind);
    assert!(!hub.activate("c", 1, vec![], ("e", 5)), "activate refuses to leave a gap");
    // ...but does once the replay reached 9 (or 10: no duplicate).
    assert_eq!(hub.try_activate("c", 1, ("e", 10), false), Activation::Live);
    assert_eq!(drain(&o).await, ["11"]);
    hub.deliver("c", &publication(12));
    assert_eq!(drain(&o).await, ["12"]);

    // Going live never overflows the queue for the buffer's sake: it asks for room.
    let p = Arc::new(Outbox::new(4));
    assert!(hub.add("d", 2, p.clone()).is_ok());
    hub.deliver("d", &publication(10));
    assert_eq!(p.push(Bytes::from_static(b"abc")), Push::Queued);
    assert_eq!(hub.try_activate("d", 2, ("e", 9), true), Activation::Room(2));
    assert_eq!(drain(&p).await, ["abc"]);
    assert_eq!(hub.try_activate("d", 2, ("e", 9), true), Activation::Live);
    assert_eq!(drain(&p).await, ["10"]);
}

#[tokio::test]
async fn readiness_cell_goes_once_the_broker_subscription_exists() {
    let hub = Hub::new();
    let o = Arc::new(Outbox::new(100));
    let Ok(Some(first)) = hub.add("c", 1, o.clone()) else { panic!("a new channel has a cell") };
    // A newcomer while the broker subscription is being made shares the cell.
    let Ok(Some(second)) = hub.add("c", 2, o.clone()) else { panic!("still being made") };
    assert!(Arc::ptr_eq(&first, &second));
    hub.broker_ready("c", &first);
    assert!(hub.add("c", 3, o.clone()).is_ok_and(|r| r.is_some()), "not initialised: kept");
    assert!(first.set(()).is_ok());
    hub.broker_ready("c", &first);
    assert!(hub.add("c", 4, o.clone()).is_ok_and(|r| r.is_none()), "in place: no cell, no wait");
    for c in 1..=4 {
        hub.remove("c", c);
    }
    // A newer entry has its own cell; the old one does not mark it ready.
    let Ok(Some(newer)) = hub.add("c", 5, o.clone()) else { panic!("a new entry has a new cell") };
    assert!(!Arc::ptr_eq(&first, &newer));
    hub.broker_ready("c", &first);
    assert!(hub.add("c", 6, o).is_ok_and(|r| r.is_some()));
}

#[tokio::test]
async fn entries_go_away_and_counts_follow() {
    let hub = Hub::new();
    let (a, b) = (Arc::new(Outbox::new(100)), Arc::new(Outbox::new(100)));
    assert!(hub.add("c", 1, a).is_ok());
    assert!(hub.add("c", 2, b).is_ok());
    assert_eq!((hub.channel_count(), hub.subscription_count()), (1, 2));
    assert!(!hub.remove("c", 1));
    assert!(hub.remove("c", 2), "last one out");
    assert!(!hub.has_channel("c"));
    assert_eq!((hub.channel_count(), hub.subscription_count()), (0, 0));
    assert!(!hub.remove("c", 2));
}

#[tokio::test]
async fn slow_subscriber_does_not_affect_others() {
    let hub = Hub::new();
    let (slow, fast) = (Arc::new(Outbox::new(3)), Arc::new(Outbox::new(1000)));
    for (id, o) in [(1, &slow), (2, &fast)] {
        assert!(hub.add("c", id, o.clone()).is_ok());
        assert!(hub.activate("c", id, vec![], ("e", 0)));
    }
    let mut slow_count = 0;
    for i in 10..20 {
        slow_count += hub.deliver("c", &publication(i)).slow;
    }
    assert_eq!(slow_count, 1, "closed once");
    assert!(slow.is_closing());
    assert_eq!(drain(&fast).await.len(), 10);
}
