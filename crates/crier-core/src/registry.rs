//! The node's live connections, by id: what a cluster-wide disconnect, the drain on shutdown, the
//! heartbeat sweep and the connection gauge need. No index by user: a disconnect (rare) scans,
//! so each connection costs one map entry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crier_protocol::CloseCode;

use crate::ConnId;
use crate::outbox::Outbox;

struct Entry {
    user: Arc<str>,
    outbox: Arc<Outbox>,
}

/// See the module docs.
#[derive(Default)]
pub struct Registry {
    by_id: Mutex<HashMap<ConnId, Entry>>,
    next_id: AtomicU64,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<ConnId, Entry>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh connection id (never reused by this node).
    pub fn next_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn register(&self, id: ConnId, user: Arc<str>, outbox: Arc<Outbox>) {
        self.lock().insert(id, Entry { user, outbox });
    }

    pub fn unregister(&self, id: ConnId) {
        let mut by_id = self.lock();
        by_id.remove(&id);
        // Give memory back after a wave of disconnects (never below a quarter full).
        let (len, capacity) = (by_id.len(), by_id.capacity());
        if capacity > 64 && len < capacity / 4 {
            by_id.shrink_to(len * 2);
        }
    }

    /// Closes every connection of `user` on this node; returns how many.
    pub fn close_user(&self, user: &str, code: CloseCode) -> usize {
        let outboxes: Vec<Arc<Outbox>> =
            self.lock().values().filter(|e| &*e.user == user).map(|e| e.outbox.clone()).collect();
        outboxes.iter().filter(|o| o.close(code)).count()
    }

    /// Every live connection's outbox (for the drain).
    pub fn outboxes(&self) -> Vec<Arc<Outbox>> {
        self.lock().values().map(|e| e.outbox.clone()).collect()
    }

    /// The `n` oldest connections not already closing (ids only grow: the smallest are the
    /// oldest), for rebalancing. One pass and a partial sort, outside the lock.
    pub fn oldest_open(&self, n: usize) -> Vec<Arc<Outbox>> {
        let mut open: Vec<(ConnId, Arc<Outbox>)> =
            self.lock().iter().filter(|(_, e)| !e.outbox.is_closing()).map(|(id, e)| (*id, e.outbox.clone())).collect();
        if n < open.len() {
            open.select_nth_unstable_by_key(n, |(id, _)| *id);
            open.truncate(n);
        }
        open.sort_unstable_by_key(|(id, _)| *id);
        open.into_iter().map(|(_, o)| o).collect()
    }

    /// Calls `f` with every live connection's outbox, under the registry's lock (keep `f` short:
    /// registering and unregistering wait for it). The heartbeat sweep walks every connection
    /// this way, on purpose: a few atomic loads per connection under one lock, once per tick,
    /// instead of a timer per connection (measured in BENCHMARKS.md).
    pub fn for_each(&self, mut f: impl FnMut(&Outbox)) {
        for e in self.lock().values() {
            f(&e.outbox);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_user_closes_only_that_user() {
        let r = Registry::new();
        let (a, b, c) = (Arc::new(Outbox::new(10)), Arc::new(Outbox::new(10)), Arc::new(Outbox::new(10)));
        r.register(1, "u1".into(), a.clone());
        r.register(2, "u1".into(), b.clone());
        r.register(3, "u2".into(), c.clone());
        assert_eq!(r.close_user("u1", CloseCode::DISCONNECTED), 2);
        assert!(a.is_closing() && b.is_closing() && !c.is_closing());
        r.unregister(1);
        r.unregister(2);
        assert_eq!(r.len(), 1);
        assert_eq!(r.close_user("u1", CloseCode::DISCONNECTED), 0);
    }

    #[test]
    fn oldest_open_skips_closing_connections_and_takes_the_smallest_ids() {
        let r = Registry::new();
        let boxes: Vec<Arc<Outbox>> = (0..6).map(|_| Arc::new(Outbox::new(10))).collect();
        for (i, b) in boxes.iter().enumerate() {
            r.register(10 - i as ConnId, "u".into(), b.clone());
        }
        // Ids 10 (boxes[0]) .. 5 (boxes[5]); id 5 is closing already.
        boxes[5].close(CloseCode::DISCONNECTED);
        let oldest = r.oldest_open(2);
        assert_eq!(oldest.len(), 2);
        assert!(Arc::ptr_eq(&oldest[0], &boxes[4]) && Arc::ptr_eq(&oldest[1], &boxes[3]));
        assert_eq!(r.oldest_open(100).len(), 5);
        assert!(r.oldest_open(0).is_empty());
    }
}
