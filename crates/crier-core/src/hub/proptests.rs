use super::*;
use crate::outbox::{Next, Out};
use proptest::prelude::*;

const CH: &str = "c";

/// A channel as the broker keeps it: epoch, last offset, bounded history. `publish` delivers
/// to the hub in offset order, as the brokers do.
struct Channel {
    epoch: &'static str,
    top: u64,
    history: Vec<Publication>,
    history_size: usize,
}

impl Channel {
    fn publish(&mut self, hub: &Hub) {
        self.top += 1;
        let p = Publication {
            offset: self.top,
            epoch: self.epoch.into(),
            frame: Bytes::from(format!("{}:{}", self.epoch, self.top)),
            published_at_us: 0,
        };
        hub.deliver(CH, &p);
        self.history.push(p);
        if self.history.len() > self.history_size {
            self.history.remove(0);
        }
    }

    /// The broker's history read: (last offset, replayed frames, recovered) for a subscribe
    /// recovering from `since` (None = no recovery asked).
    fn read(&self, since: Option<u64>) -> (u64, Vec<Bytes>, Option<bool>) {
        let Some(since) = since else { return (self.top, Vec::new(), None) };
        let first = self.history.first().map_or(self.top + 1, |p| p.offset);
        if since > self.top || first > since + 1 {
            return (self.top, Vec::new(), Some(false));
        }
        let frames = self.history.iter().filter(|p| p.offset > since).map(|p| p.frame.clone()).collect();
        (self.top, frames, Some(true))
    }
}

fn drain(rt: &tokio::runtime::Runtime, o: &Outbox, into: &mut Vec<String>) {
    if o.queued_bytes() == 0 {
        return;
    }
    let mut batch = Vec::new();
    assert_eq!(rt.block_on(o.next(&mut batch)), Next::Batch);
    into.extend(batch.into_iter().filter_map(|b| match b {
        Out::Frame(f) => Some(String::from_utf8_lossy(&f).into_owned()),
        Out::Ping | Out::Deflated(_) => None,
    }));
}

fn labels(epoch: &str, offsets: impl IntoIterator<Item = u64>) -> Vec<String> {
    offsets.into_iter().map(|o| format!("{epoch}:{o}")).collect()
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Publish,
    /// The subscriber's writer takes what is queued.
    Drain,
}

prop_compose! {
    fn scenario()(
        before in 0u64..30,
        buffered_before_read in 0u64..10,
        buffered_after_read in 0u64..10,
        recover_back in prop::option::of(0u64..40),
        history_size in 1usize..40,
        epoch_reset in any::<bool>(),
        after in prop::collection::vec(prop_oneof![3 => Just(Step::Publish), 1 => Just(Step::Drain)], 0..40),
    ) -> (u64, u64, u64, Option<u64>, usize, bool, Vec<Step>) {
        (before, buffered_before_read, buffered_after_read, recover_back, history_size, epoch_reset, after)
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn recovery_merge_has_each_offset_once_in_order_without_gaps(
        (before, buffered_before_read, buffered_after_read, recover_back, history_size, epoch_reset, after)
            in scenario()
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let hub = Hub::new();
        let mut ch = Channel { epoch: "e", top: 0, history: Vec::new(), history_size };
        // A subscriber that was live all along: it must see everything, whatever happens to
        // the newcomer.
        let witness = Arc::new(Outbox::new(1 << 24));
        prop_assert!(hub.add(CH, 1, witness.clone()).is_ok());
        prop_assert!(hub.activate(CH, 1, vec![], ("e", 0)));
        let mut witnessed = Vec::new();

        for _ in 0..before {
            ch.publish(&hub);
        }
        // The newcomer joins (buffering), recovering from `recover_back` messages ago.
        let since = recover_back.map(|back| ch.top.saturating_sub(back));
        let o = Arc::new(Outbox::new(1 << 24));
        prop_assert!(hub.add(CH, 2, o.clone()).is_ok());
        for _ in 0..buffered_before_read {
            ch.publish(&hub);
        }
        let (t, replay, recovered) = ch.read(since);
        let mut frames = vec![Bytes::from_static(b"ack")];
        if recovered == Some(true) {
            frames.extend(replay);
        }
        if epoch_reset {
            // The channel's history is lost right after the read (e.g. Redis flushed): a new
            // epoch, offsets from 1 again.
            ch = Channel { epoch: "f", top: 0, history: Vec::new(), history_size };
            drain(&rt, &witness, &mut witnessed);
        }
        for _ in 0..buffered_after_read {
            ch.publish(&hub);
        }
        prop_assert!(hub.activate(CH, 2, frames, ("e", t)));
        let mut got = Vec::new();
        for step in &after {
            match step {
                Step::Publish => ch.publish(&hub),
                Step::Drain => drain(&rt, &o, &mut got),
            }
        }
        drain(&rt, &o, &mut got);
        drain(&rt, &witness, &mut witnessed);

        // What the newcomer must have: ack, replay (if recovered), then every later message.
        let mut want = vec!["ack".to_owned()];
        let first_live = match (since, recovered) {
            (Some(s), Some(true)) => s + 1,
            _ => t + 1,
        };
        if epoch_reset {
            want.extend(labels("e", first_live..=t));
            want.extend(labels("f", 1..=ch.top));
        } else {
            want.extend(labels("e", first_live..=ch.top));
        }
        prop_assert_eq!(&got, &want);
        // The witness saw every message of both epochs, in order.
        let mut all = if epoch_reset { labels("e", 1..=t) } else { Vec::new() };
        all.extend(labels(ch.epoch, 1..=ch.top));
        prop_assert_eq!(witnessed, all);
        prop_assert_eq!((hub.channel_count(), hub.subscription_count()), (1, 2));
        prop_assert!(!hub.remove(CH, 2));
        prop_assert!(hub.remove(CH, 1));
        prop_assert_eq!((hub.channel_count(), hub.subscription_count()), (0, 0));
    }
}

/// The same merge with real threads: a publisher delivering under the "broker lock" (as the
/// memory broker's shard lock and the Redis pub/sub task serialise a channel), racing a
/// subscriber that joins, reads the position under that lock and activates. Bounded: a fixed
/// number of rounds and publications.
#[test]
fn recovery_merge_under_a_concurrent_publisher() {
    use std::sync::Mutex as StdMutex;
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for round in 0..100u64 {
        let hub = Arc::new(Hub::new());
        let broker = Arc::new(StdMutex::new(Channel { epoch: "e", top: 0, history: Vec::new(), history_size: 1000 }));
        let total = 300;
        let publisher = {
            let (hub, broker) = (hub.clone(), broker.clone());
            std::thread::spawn(move || {
                for i in 0..total {
                    broker.lock().unwrap().publish(&hub);
                    if i % 16 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        // Join at a varying moment, recovering from a varying point.
        for _ in 0..(round % 7) * 20 {
            std::thread::yield_now();
        }
        let o = Arc::new(Outbox::new(1 << 24));
        assert!(hub.add(CH, 1, o.clone()).is_ok());
        let (since, t, frames) = {
            let b = broker.lock().unwrap();
            let since = b.top.saturating_sub(round % 5);
            let (t, replay, recovered) = b.read(Some(since));
            assert_eq!(recovered, Some(true));
            let mut frames = vec![Bytes::from_static(b"ack")];
            frames.extend(replay);
            (since, t, frames)
        };
        // (The broker lock is released: live publications keep coming while we activate.)
        assert!(hub.activate(CH, 1, frames, ("e", t)));
        publisher.join().unwrap();
        let mut got = Vec::new();
        drain(&rt, &o, &mut got);
        let mut want = vec!["ack".to_owned()];
        want.extend(labels("e", since + 1..=total));
        assert_eq!(got, want, "round {round}: joined at {t}");
    }
}
