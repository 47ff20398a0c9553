//! Following contended channels. A publish needs the channel's tail (last stream sequence,
//! offset, epoch); a node keeps the tail of its own last publish, and a node subscribed to the
//! channel sees every later one on the live subject. When another node publishes to the
//! channel too (a backend publishing through a load balancer reaches any node), a node that is
//! not subscribed holds a stale tail: its publish loses the race for the next offset and costs
//! a re-read and a second store. So a node that loses that race follows the channel: it
//! subscribes to the live subject as if it had a subscriber (deliveries reach no one), its
//! tail stays current and its next publishes are one JetStream operation again. It stops
//! following `follow_for` (30 s) after the channel was last contended — a lost race, or a
//! publish of this node that the following saved from one (another node had published since
//! this node's last publish) — unless clients subscribe to the channel. (Timed from the lost
//! race only, a channel published through both nodes went on losing a race, re-subscribing and
//! re-reading its tail every `follow_for`, per node: at the rig's 10,000 channels, hundreds of
//! refused stores a second.)
//!
//! Correctness never depends on it: every publish is stored with the expected last sequence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::Inner;

/// At most this many channels followed at once (past it, a contended channel is not followed:
/// its publishes only cost more).
const MAX_FOLLOWED: usize = 65_536;

/// The channels this node follows: name → its last lost race.
#[derive(Default)]
pub(crate) struct Followed(Mutex<HashMap<String, Instant>>);

impl Followed {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn channels(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// The channel is still contended: followed `follow_for` longer (if followed).
    pub(crate) fn touch(&self, channel: &str) {
        if let Some(at) = self.lock().get_mut(channel) {
            *at = Instant::now();
        }
    }

    /// Is the channel followed (its live subscription kept though no client subscribes)?
    pub(crate) fn contains(&self, channel: &str) -> bool {
        self.lock().contains_key(channel)
    }
}

impl Inner {
    /// This node lost the race for the channel's next offset: it follows the channel (its live
    /// subscription is started unless it exists).
    pub(crate) fn lost_race(&self, channel: &str) {
        {
            let mut f = self.followed.lock();
            let n = f.len();
            match f.get_mut(channel) {
                Some(at) => *at = Instant::now(),
                None if n < MAX_FOLLOWED => {
                    f.insert(channel.to_owned(), Instant::now());
                }
                None => return,
            }
        }
        if !self.live.has(channel) {
            self.live.spawn_subscribe(channel);
        }
    }

    /// Is the channel's live subscription still needed (a client subscribed here, or followed)?
    pub(crate) fn keeps_live(&self, channel: &str) -> bool {
        self.handler().is_some_and(|h| h.has_subscribers(channel)) || self.followed.contains(channel)
    }

    /// Stops following the channels not contended for `follow_for` (their live subscription
    /// is dropped unless clients subscribe to them meanwhile).
    pub(crate) async fn unfollow_idle(self: &Arc<Self>) {
        let idle: Vec<String> = {
            let mut f = self.followed.lock();
            let idle: Vec<String> =
                f.iter().filter(|(_, at)| at.elapsed() >= self.opts.follow_for).map(|(c, _)| c.clone()).collect();
            for c in &idle {
                f.remove(c);
            }
            idle
        };
        for channel in idle {
            self.live.unsubscribe_unless(self, &channel, || self.keeps_live(&channel)).await;
        }
    }
}
