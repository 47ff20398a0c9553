//! A channel's local subscribers, by connection: inline while there is one (most channels
//! have one subscriber on a node: a private channel then costs no allocation at all), a short
//! vector while there are few (a hash table is a 192-byte allocation), a hash map once there
//! are many (a fan-out channel with 10,000 subscribers keeps O(1) add and remove).

use std::collections::HashMap;

use crate::ConnId;

/// Up to this many subscribers live in the vector.
const FEW: usize = 8;

pub(super) enum Subscribers<V> {
    /// Exactly one subscriber.
    One((ConnId, V)),
    /// None (a new channel, no allocation) or a few.
    Few(Vec<(ConnId, V)>),
    /// Boxed: keeps the enum (and so every channel's entry) as small as the vector.
    #[allow(clippy::box_collection)]
    Many(Box<HashMap<ConnId, V>>),
}

impl<V> Subscribers<V> {
    pub(super) fn new() -> Self {
        Subscribers::Few(Vec::new())
    }

    /// Inserts unless `conn` is already there; returns whether it was inserted.
    pub(super) fn insert_new(&mut self, conn: ConnId, value: V) -> bool {
        match self {
            Subscribers::One((c, _)) if *c == conn => false,
            Subscribers::One(_) => {
                let Subscribers::One(first) = std::mem::replace(self, Subscribers::Few(Vec::new())) else {
                    return false;
                };
                // Grown one at a time: most channels that have two stay at two.
                *self = Subscribers::Few(vec![first, (conn, value)]);
                true
            }
            Subscribers::Few(v) => {
                if v.iter().any(|(c, _)| *c == conn) {
                    return false;
                }
                if v.is_empty() {
                    *self = Subscribers::One((conn, value));
                    return true;
                }
                if v.len() < FEW {
                    v.reserve_exact(1);
                    v.push((conn, value));
                    return true;
                }
                let mut map: HashMap<ConnId, V> = v.drain(..).collect();
                map.insert(conn, value);
                *self = Subscribers::Many(Box::new(map));
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

    pub(super) fn contains(&self, conn: &ConnId) -> bool {
        match self {
            Subscribers::One((c, _)) => c == conn,
            Subscribers::Few(v) => v.iter().any(|(c, _)| c == conn),
            Subscribers::Many(m) => m.contains_key(conn),
        }
    }

    pub(super) fn get_mut(&mut self, conn: &ConnId) -> Option<&mut V> {
        match self {
            Subscribers::One((c, s)) => (c == conn).then_some(s),
            Subscribers::Few(v) => v.iter_mut().find(|(c, _)| c == conn).map(|(_, s)| s),
            Subscribers::Many(m) => m.get_mut(conn),
        }
    }

    pub(super) fn remove(&mut self, conn: &ConnId) -> Option<V> {
        match self {
            Subscribers::One((c, _)) => {
                if c != conn {
                    return None;
                }
                match std::mem::replace(self, Subscribers::Few(Vec::new())) {
                    Subscribers::One((_, s)) => Some(s),
                    _ => None,
                }
            }
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

    pub(super) fn len(&self) -> usize {
        match self {
            Subscribers::One(_) => 1,
            Subscribers::Few(v) => v.len(),
            Subscribers::Many(m) => m.len(),
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        match self {
            Subscribers::One(_) => false,
            Subscribers::Few(v) => v.is_empty(),
            Subscribers::Many(m) => m.is_empty(),
        }
    }

    /// (No boxed iterator: this is the fan-out's hot path.)
    pub(super) fn values_mut(&mut self) -> Either<impl Iterator<Item = &mut V>, impl Iterator<Item = &mut V>> {
        let few: &mut [(ConnId, V)] = match self {
            Subscribers::One(one) => std::slice::from_mut(one),
            Subscribers::Few(v) => v,
            Subscribers::Many(m) => return Either::B(m.values_mut()),
        };
        Either::A(few.iter_mut().map(|(_, s)| s))
    }

    pub(super) fn iter(&self) -> Either<impl Iterator<Item = (&ConnId, &V)>, impl Iterator<Item = (&ConnId, &V)>> {
        let few: &[(ConnId, V)] = match self {
            Subscribers::One(one) => std::slice::from_ref(one),
            Subscribers::Few(v) => v,
            Subscribers::Many(m) => return Either::B(m.iter()),
        };
        Either::A(few.iter().map(|(c, s)| (c, s)))
    }

    #[cfg(test)]
    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
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
    fn one_inline_then_empty() {
        let mut s = Subscribers::new();
        assert!(s.is_empty());
        assert!(s.insert_new(5, 50));
        assert!(matches!(s, Subscribers::One(_)));
        assert!(!s.insert_new(5, 0), "no duplicate");
        assert_eq!(s.get_mut(&4), None);
        assert_eq!(s.remove(&4), None);
        assert_eq!(s.values().copied().collect::<Vec<_>>(), [50]);
        for v in s.values_mut() {
            *v += 1;
        }
        assert_eq!(s.remove(&5), Some(51));
        assert!(s.is_empty());
        assert!(s.insert_new(6, 60) && s.insert_new(7, 70));
        assert!(matches!(s, Subscribers::Few(_)));
        assert_eq!(s.remove(&6), Some(60));
        assert_eq!(s.get_mut(&7).map(|v| *v), Some(70));
    }

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
