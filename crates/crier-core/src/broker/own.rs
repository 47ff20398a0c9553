//! What a distributed broker remembers of its node's own presence entries and connections, to
//! refresh them before they expire (and to re-create them after the store lost them).
//!
//! Kept compact, because there is one entry per subscription and one per connection: a presence
//! entry is one map key holding the channel and the client (`channel NUL client`: a channel name
//! has no NUL, so the first one separates them) and the user, with the node name shared by every
//! entry that carries it; the stored form (JSON, a member name) is rebuilt when refreshing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crier_protocol::frames::PresenceEntry;

/// One of the node's presence entries, borrowed from [`OwnEntries`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnPresence<'a> {
    pub channel: &'a str,
    pub client: &'a str,
    pub user: &'a str,
    pub node: &'a str,
}

impl OwnPresence<'_> {
    pub fn entry(&self) -> PresenceEntry {
        PresenceEntry { client: self.client.to_owned(), user: self.user.to_owned(), node: self.node.to_owned() }
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct OwnEntries {
    /// `channel NUL client` → (user, node).
    presence: HashMap<Box<str>, (Box<str>, Arc<str>)>,
    /// (user, client).
    connections: HashSet<(Box<str>, Box<str>)>,
    /// The last node name seen in a presence entry, shared by the entries that carry it.
    node_name: Option<Arc<str>>,
}

fn presence_key(channel: &str, client: &str) -> Box<str> {
    let mut key = String::with_capacity(channel.len() + 1 + client.len());
    key.push_str(channel);
    key.push('\0');
    key.push_str(client);
    key.into_boxed_str()
}

fn split_presence_key(key: &str) -> (&str, &str) {
    key.split_once('\0').unwrap_or((key, ""))
}

impl OwnEntries {
    fn node_name(&mut self, node: &str) -> Arc<str> {
        match &self.node_name {
            Some(n) if **n == *node => n.clone(),
            _ => {
                let n: Arc<str> = Arc::from(node);
                self.node_name = Some(n.clone());
                n
            }
        }
    }

    /// Remembers `entry` as a member of `channel` (replacing the client's previous one).
    pub fn add_presence(&mut self, channel: &str, entry: &PresenceEntry) {
        let node = self.node_name(&entry.node);
        self.presence.insert(presence_key(channel, &entry.client), (entry.user.as_str().into(), node));
    }

    pub fn remove_presence(&mut self, channel: &str, client: &str) {
        self.presence.remove(&presence_key(channel, client));
        if self.presence.is_empty() {
            self.presence.shrink_to_fit();
        }
    }

    /// The node's presence entries, in no particular order (the same order between two calls
    /// that nothing changed in between: a caller may walk it in batches with `skip`/`take`).
    pub fn presence(&self) -> impl Iterator<Item = OwnPresence<'_>> {
        self.presence.iter().map(|(key, (user, node))| {
            let (channel, client) = split_presence_key(key);
            OwnPresence { channel, client, user, node }
        })
    }

    pub fn add_connection(&mut self, user: &str, client: &str) {
        self.connections.insert((user.into(), client.into()));
    }

    pub fn remove_connection(&mut self, user: &str, client: &str) {
        self.connections.remove(&(Box::from(user), Box::from(client)));
        if self.connections.is_empty() {
            self.connections.shrink_to_fit();
        }
    }

    /// The node's connections as (user, client), in no particular order (as [`Self::presence`]).
    pub fn connections(&self) -> impl Iterator<Item = (&str, &str)> {
        self.connections.iter().map(|(u, c)| (&**u, &**c))
    }

    pub fn is_empty(&self) -> bool {
        self.presence.is_empty() && self.connections.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(client: &str, user: &str) -> PresenceEntry {
        PresenceEntry { client: client.into(), user: user.into(), node: "node-a".into() }
    }

    #[test]
    fn presence_keys_split_back() {
        let key = presence_key("chat:room-1", "node-a-x1y2-17");
        assert_eq!(split_presence_key(&key), ("chat:room-1", "node-a-x1y2-17"));
        // Only the first NUL separates (a channel name has none; a client id could).
        assert_eq!(split_presence_key(&presence_key("c", "a\0b")), ("c", "a\0b"));
        assert_ne!(presence_key("a", "bc"), presence_key("ab", "c"));
    }

    #[test]
    fn entries_come_back_as_added_and_go_when_removed() {
        let mut own = OwnEntries::default();
        own.add_presence("room", &entry("c1", "alice"));
        own.add_presence("room", &entry("c2", "bob"));
        own.add_presence("other", &entry("c1", "alice"));
        own.add_presence("room", &entry("c1", "carol"));
        let mut all: Vec<(String, String, String)> =
            own.presence().map(|p| (p.channel.into(), p.client.into(), p.user.into())).collect();
        all.sort();
        assert_eq!(
            all,
            [("other", "c1", "alice"), ("room", "c1", "carol"), ("room", "c2", "bob")].map(|(a, b, c)| (
                a.to_owned(),
                b.to_owned(),
                c.to_owned()
            ))
        );
        assert!(own.presence().all(|p| p.node == "node-a" && p.entry().node == "node-a"));
        own.remove_presence("room", "c1");
        own.remove_presence("room", "c2");
        own.remove_presence("other", "c1");
        assert_eq!(own.presence().count(), 0);
        own.add_connection("alice", "c1");
        own.add_connection("alice", "c1");
        own.add_connection("bob", "c2");
        assert_eq!(own.connections().count(), 2);
        assert!(!own.is_empty());
        own.remove_connection("alice", "c1");
        own.remove_connection("bob", "c2");
        assert!(own.is_empty());
    }
}
