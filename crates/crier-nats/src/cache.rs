//! The node's read cache: stored messages by stream sequence, so that history reads — which
//! walk a channel back along its chain of stored messages, one message per step — read each
//! message from JetStream once per node, not once per reader. A failover sends hundreds of
//! clients of one channel to a node at once, each recovering what it missed: without the cache
//! every one of them walked the same messages again (one JetStream request each), and the
//! recoveries took seconds, long enough for the history to move past them.
//!
//! Filled by the reads themselves, not by the live stream: nothing is kept for channels nobody
//! recovers, and a channel being recovered costs each later reader only what was stored since
//! the previous one read it. A stored message never changes under its sequence, but an entry
//! can outlive it (expired, purged), which is why a read never starts from the cache — the
//! channel's last message always comes from JetStream — and why an entry past the history TTL
//! is read again instead of served. Bounded in bytes, oldest entries out first; emptied on a
//! reconnect (a server that lost its store reuses sequences), and a walk takes an entry only
//! when it carries the walk's epoch (an entry of a lost store has another one).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::{HistPolicy, Stored};

/// What an entry costs besides its data: its allocation, the decoded headers, the key, its map
/// and queue slots.
const ENTRY_OVERHEAD: usize = 256;

type Key = (HistPolicy, u64);

#[derive(Default)]
struct St {
    map: HashMap<Key, Stored>,
    /// Insertion order, for eviction.
    order: VecDeque<Key>,
    bytes: usize,
}

pub(crate) struct ReadCache {
    st: Mutex<St>,
    cap: usize,
}

fn cost(s: &Stored) -> usize {
    s.data.len() + s.lens.len() * std::mem::size_of::<usize>() + ENTRY_OVERHEAD
}

impl ReadCache {
    /// A cache of at most `cap` bytes (0: nothing is kept).
    pub(crate) fn new(cap: usize) -> ReadCache {
        ReadCache { st: Mutex::default(), cap }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, St> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The message stored at `seq` in the policy's stream, if cached.
    pub(crate) fn get(&self, policy: HistPolicy, seq: u64) -> Option<Stored> {
        self.lock().map.get(&(policy, seq)).cloned()
    }

    /// Keeps `s` (the message at `s.seq` in the policy's stream), evicting the oldest entries
    /// past the bound.
    pub(crate) fn put(&self, policy: HistPolicy, s: &Stored) {
        let c = cost(s);
        if s.seq == 0 || c > self.cap {
            return;
        }
        let mut st = self.lock();
        let key = (policy, s.seq);
        if st.map.contains_key(&key) {
            return;
        }
        while st.bytes + c > self.cap {
            let Some(old) = st.order.pop_front() else { break };
            if let Some(o) = st.map.remove(&old) {
                st.bytes -= cost(&o);
            }
        }
        // The data copied: a message as read shares its allocation with what it was read from
        // (a connection's read buffer), which a cached slice would keep alive.
        let mut kept = s.clone();
        kept.data = bytes::Bytes::copy_from_slice(&s.data);
        st.map.insert(key, kept);
        st.order.push_back(key);
        st.bytes += c;
    }

    /// Forgets everything (after a reconnect).
    pub(crate) fn clear(&self) {
        let mut st = self.lock();
        st.map.clear();
        st.order.clear();
        st.bytes = 0;
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn stored(seq: u64, len: usize) -> Stored {
        Stored {
            seq,
            epoch: "e".into(),
            first: seq,
            offset: seq,
            prev: seq - 1,
            ts: 1,
            lens: Vec::new(),
            data: Bytes::from(vec![b'x'; len]),
        }
    }

    #[test]
    fn the_oldest_entries_leave_past_the_bound() {
        let p = HistPolicy { size: 100, ttl_ms: 1000 };
        let q = HistPolicy { size: 10, ttl_ms: 1000 };
        let each = 100 + ENTRY_OVERHEAD;
        let c = ReadCache::new(each * 3);
        for seq in 1..=3 {
            c.put(p, &stored(seq, 100));
        }
        assert!(c.get(p, 1).is_some() && c.get(q, 1).is_none(), "keyed by stream and sequence");
        c.put(p, &stored(4, 100));
        assert!(c.get(p, 1).is_none(), "the oldest went");
        assert!((2..=4).all(|s| c.get(p, s).is_some_and(|m| m.seq == s)));
        assert_eq!(c.bytes(), each * 3);
        // Again under the same key: nothing changes.
        c.put(p, &stored(4, 100));
        assert_eq!(c.bytes(), each * 3);
        // Larger than the whole cache: not kept, nothing evicted for it.
        c.put(p, &stored(5, each * 3));
        assert!(c.get(p, 5).is_none() && c.get(p, 2).is_some());
        c.clear();
        assert!(c.get(p, 4).is_none());
        assert_eq!(c.bytes(), 0);
        // A cache of 0 bytes keeps nothing.
        let none = ReadCache::new(0);
        none.put(p, &stored(1, 1));
        assert!(none.get(p, 1).is_none());
    }
}
