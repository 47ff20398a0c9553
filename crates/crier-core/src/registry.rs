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
    /// The token's `iat` (Unix seconds; 0: none), for token invalidation.
    iat: u32,
    transport: Transport,
}

/// How a connection is carried (`GET /api/v1/users/{user}/connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    Sse,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
        }
    }
}

/// One live connection of a user, as [`Registry::user_connections`] lists it.
#[derive(Clone)]
pub struct UserConnection {
    pub id: ConnId,
    pub outbox: Arc<Outbox>,
    pub transport: Transport,
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

    /// Registers a connection; `iat`: its token's `iat` (Unix seconds, 0 for none).
    pub fn register(&self, id: ConnId, user: Arc<str>, outbox: Arc<Outbox>, iat: u64, transport: Transport) {
        self.lock().insert(id, Entry { user, outbox, iat: clamp_iat(iat), transport });
    }

    /// The connection refreshed its token: its new `iat`.
    pub fn set_iat(&self, id: ConnId, iat: u64) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.iat = clamp_iat(iat);
        }
    }

    /// The live connections of `user` on this node (a scan: rare, server API only).
    pub fn user_connections(&self, user: &str) -> Vec<UserConnection> {
        let mut list: Vec<UserConnection> = self
            .lock()
            .iter()
            .filter(|(_, e)| &*e.user == user && !e.outbox.is_closing())
            .map(|(id, e)| UserConnection { id: *id, outbox: e.outbox.clone(), transport: e.transport })
            .collect();
        list.sort_unstable_by_key(|c| c.id);
        list
    }

    /// Closes every connection of `user` with `code` and `reason`; returns how many.
    pub fn close_user_with(&self, user: &str, code: CloseCode, reason: &str) -> usize {
        let outboxes: Vec<Arc<Outbox>> =
            self.lock().values().filter(|e| &*e.user == user).map(|e| e.outbox.clone()).collect();
        outboxes.iter().filter(|o| o.close_with(code, std::borrow::Cow::Owned(reason.to_owned()))).count()
    }

    /// Closes (4001) every connection of `user` whose token was issued before `before` (Unix
    /// seconds; a token without `iat` counts as issued before); returns how many.
    pub fn close_revoked(&self, user: &str, before: u64) -> usize {
        let outboxes: Vec<Arc<Outbox>> = self
            .lock()
            .values()
            .filter(|e| &*e.user == user && u64::from(e.iat) < before)
            .map(|e| e.outbox.clone())
            .collect();
        let reason = std::borrow::Cow::Borrowed("token revoked");
        outboxes.iter().filter(|o| o.close_with(CloseCode::TOKEN_EXPIRED, reason.clone())).count()
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

/// An `iat` as kept (Unix seconds fit 32 bits until 2106; later ones are kept as the largest).
fn clamp_iat(iat: u64) -> u32 {
    u32::try_from(iat).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_user_closes_only_that_user() {
        let r = Registry::new();
        let (a, b, c) = (Arc::new(Outbox::new(10)), Arc::new(Outbox::new(10)), Arc::new(Outbox::new(10)));
        r.register(1, "u1".into(), a.clone(), 0, Transport::WebSocket);
        r.register(2, "u1".into(), b.clone(), 0, Transport::WebSocket);
        r.register(3, "u2".into(), c.clone(), 0, Transport::WebSocket);
        assert_eq!(r.close_user("u1", CloseCode::DISCONNECTED), 2);
        assert!(a.is_closing() && b.is_closing() && !c.is_closing());
        r.unregister(1);
        r.unregister(2);
        assert_eq!(r.len(), 1);
        assert_eq!(r.close_user("u1", CloseCode::DISCONNECTED), 0);
    }

    #[test]
    fn close_revoked_closes_tokens_issued_before() {
        let r = Registry::new();
        let (old, new, none) = (Arc::new(Outbox::new(10)), Arc::new(Outbox::new(10)), Arc::new(Outbox::new(10)));
        r.register(1, "u".into(), old.clone(), 100, Transport::WebSocket);
        r.register(2, "u".into(), new.clone(), 200, Transport::Sse);
        r.register(3, "u".into(), none.clone(), 0, Transport::WebSocket);
        assert_eq!(r.user_connections("u").len(), 3);
        assert_eq!(r.close_revoked("u", 150), 2);
        assert!(old.is_closing() && none.is_closing() && !new.is_closing());
        let left = r.user_connections("u");
        assert_eq!((left.len(), left[0].id, left[0].transport), (1, 2, Transport::Sse));
        r.set_iat(2, 300);
        assert_eq!(r.close_revoked("u", 250), 0);
    }

    #[test]
    fn oldest_open_skips_closing_connections_and_takes_the_smallest_ids() {
        let r = Registry::new();
        let boxes: Vec<Arc<Outbox>> = (0..6).map(|_| Arc::new(Outbox::new(10))).collect();
        for (i, b) in boxes.iter().enumerate() {
            r.register(10 - i as ConnId, "u".into(), b.clone(), 0, Transport::WebSocket);
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
