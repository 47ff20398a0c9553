//! The node's live connections, by id and by user: what a cluster-wide disconnect, the drain on
//! shutdown and the connection gauge need.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crier_protocol::CloseCode;

use crate::ConnId;
use crate::outbox::Outbox;

struct Entry {
    user: Arc<str>,
    outbox: Arc<Outbox>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<ConnId, Entry>,
    by_user: HashMap<Arc<str>, HashSet<ConnId>>,
}

/// See the module docs.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
}

impl Registry {
    pub fn new() -> Registry {
        Registry::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh connection id (never reused by this node).
    pub fn next_id(&self) -> ConnId {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn register(&self, id: ConnId, user: &str, outbox: Arc<Outbox>) {
        let user: Arc<str> = user.into();
        let mut inner = self.lock();
        inner.by_user.entry(user.clone()).or_default().insert(id);
        inner.by_id.insert(id, Entry { user, outbox });
    }

    pub fn unregister(&self, id: ConnId) {
        let mut inner = self.lock();
        if let Some(e) = inner.by_id.remove(&id)
            && let Some(set) = inner.by_user.get_mut(&e.user)
        {
            set.remove(&id);
            if set.is_empty() {
                inner.by_user.remove(&e.user);
            }
        }
    }

    /// Closes every connection of `user` on this node; returns how many.
    pub fn close_user(&self, user: &str, code: CloseCode, reason: &str) -> usize {
        let outboxes: Vec<Arc<Outbox>> = {
            let inner = self.lock();
            inner
                .by_user
                .get(user)
                .into_iter()
                .flatten()
                .filter_map(|id| inner.by_id.get(id))
                .map(|e| e.outbox.clone())
                .collect()
        };
        outboxes.iter().filter(|o| o.close(code, reason, true)).count()
    }

    /// Every live connection's outbox (for the drain).
    pub fn outboxes(&self) -> Vec<Arc<Outbox>> {
        self.lock().by_id.values().map(|e| e.outbox.clone()).collect()
    }

    /// Calls `f` with every live connection's outbox, under the registry's lock (keep `f` short:
    /// registering and unregistering wait for it).
    pub fn for_each(&self, mut f: impl FnMut(&Outbox)) {
        for e in self.lock().by_id.values() {
            f(&e.outbox);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().by_id.len()
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
        r.register(1, "u1", a.clone());
        r.register(2, "u1", b.clone());
        r.register(3, "u2", c.clone());
        assert_eq!(r.close_user("u1", CloseCode::DISCONNECTED, "bye"), 2);
        assert!(a.is_closing() && b.is_closing() && !c.is_closing());
        r.unregister(1);
        r.unregister(2);
        assert_eq!(r.len(), 1);
        assert_eq!(r.close_user("u1", CloseCode::DISCONNECTED, "bye"), 0);
    }
}
