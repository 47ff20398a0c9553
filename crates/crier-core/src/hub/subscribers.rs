//! A channel's local subscribers, by connection: a short vector while there are few (most
//! channels have one or two subscribers on a node: a private channel costs one 48-byte
//! allocation instead of a hash table's 192), a hash map once there are many (a fan-out channel
//! with 10,000 subscribers keeps O(1) add and remove).

use std::collections::HashMap;

use crate::ConnId;

/// Up to this many subscribers live in the vector.
const FEW: usize = 8;

pub(super) enum Subscribers<V> {
    Few(Vec<(ConnId, V)>),
    Many(HashMap<ConnId, V>),
}

impl<V> Subscribers<V> {
    pub(super) fn new() -> Self {
        Subscribers::Few(Vec::new())
    }

    /// Inserts unless `conn` is already there; returns whether it was inserted.
    pub(super) fn insert_new(&mut self, conn: ConnId, value: V) -> bool {
        match self {
            Subscribers::Few(v) => {
                if v.iter().any(|(c, _)| *c == conn) {
                    return false;
                }
                if v.len() < FEW {
                    // Grown one at a time: most channels stay at one or two.
                    v.reserve_exact(1);
                    v.push((conn, value));
                    return true;
                }
                let mut map: HashMap<ConnId, V> = v.drain(..).collect();
                map.insert(conn, value);
                *self = Subscribers::Many(map);
                true
            }
            Subscribers::Many(m) => match m.entry(conn) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(value);
                    true
                }
            },
        }
    }

    pub(super) fn get_mut(&mut self, conn: &ConnId) -> Option<&mut V> {
        match self {
            Subscribers::Few(v) => v.iter_mut().find(|(c, _)| c == conn).map(|(_, s)| s),
            Subscribers::Many(m) => m.get_mut(conn),
        }
    }

    pub(super) fn remove(&mut self, conn: &ConnId) -> Option<V> {
        match self {
            Subscribers::Few(v) => {
                let at = v.iter().position(|(c, _)| c == conn)?;
                Some(v.swap_remove(at).1)
            }
            Subscribers::Many(m) => {
                let out = m.remove(conn);
                if m.len() <= FEW / 2 {
                    let few: Vec<(ConnId, V)> = m.drain().collect();
                    *self = Subscribers::Few(few);
                }
                out
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        match self {
            Subscribers::Few(v) => v.is_empty(),
            Subscribers::Many(m) => m.is_empty(),
        }
    }

    /// (No boxed iterator: this is the fan-out's hot path.)
    pub(super) fn values_mut(&mut self) -> Either<impl Iterator<Item = &mut V>, impl Iterator<Item = &mut V>> {
        match self {
            Subscribers::Few(v) => Either::A(v.iter_mut().map(|(_, s)| s)),
            Subscribers::Many(m) => Either::B(m.values_mut()),
        }
    }

    pub(super) fn values(&self) -> Either<impl Iterator<Item = &V>, impl Iterator<Item = &V>> {
        match self {
            Subscribers::Few(v) => Either::A(v.iter().map(|(_, s)| s)),
            Subscribers::Many(m) => Either::B(m.values()),
        }
    }
}

/// One of two iterators.
pub(super) enum Either<A, B> {
    A(A),
    B(B),
}

impl<T, A: Iterator<Item = T>, B: Iterator<Item = T>> Iterator for Either<A, B> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        match self {
            Either::A(a) => a.next(),
            Either::B(b) => b.next(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn few_then_many_then_few() {
        let mut s = Subscribers::new();
        for c in 0..20u64 {
            assert!(s.insert_new(c, c * 10));
            assert!(!s.insert_new(c, 0), "no duplicate");
        }
        assert!(matches!(s, Subscribers::Many(_)));
        assert_eq!(s.get_mut(&7).map(|v| *v), Some(70));
        let mut all: Vec<u64> = s.values().copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..20).map(|c| c * 10).collect::<Vec<_>>());
        for c in 0..17u64 {
            assert_eq!(s.remove(&c), Some(c * 10));
        }
        assert!(matches!(s, Subscribers::Few(_)), "back to the vector");
        assert_eq!(s.remove(&3), None);
        for v in s.values_mut() {
            *v += 1;
        }
        assert_eq!(s.get_mut(&19).map(|v| *v), Some(191));
        for c in 17..20u64 {
            assert!(s.remove(&c).is_some());
        }
        assert!(s.is_empty());
    }
}
