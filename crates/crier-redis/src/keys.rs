//! The Redis key layout, in one place (documented in the crate root).
//!
//! Every key starts with the configured prefix (`crier` by default). Keys of one channel share
//! the hash tag `{<channel>}` so a future Redis Cluster keeps a channel's keys in one slot (the
//! publish script touches several of them atomically). Channel names never contain `{` or `}`
//! (see `crier_protocol::channel`), so the tag is exact.

/// Builds key and pub/sub channel names.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    prefix: String,
    /// `<prefix>:ch:`, the pub/sub channel prefix for channel publications.
    pubsub_prefix: String,
    /// Redis Cluster: pub/sub channels are shard channels named with the hash tag
    /// (`<prefix>:ch:{<channel>}`, in the slot of the channel's keys, so the publish script may
    /// SPUBLISH them), and the node registry's two keys share the tag `{nodes}`.
    cluster: bool,
}

impl Keys {
    pub(crate) fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_owned(), pubsub_prefix: format!("{prefix}:ch:"), cluster: false }
    }

    /// The Redis Cluster layout (see [`Keys::cluster`]'s field).
    pub(crate) fn for_cluster(prefix: &str) -> Keys {
        Keys { cluster: true, ..Keys::new(prefix) }
    }

    /// Whether this is the Redis Cluster layout.
    pub(crate) fn is_redis_cluster(&self) -> bool {
        self.cluster
    }

    /// The command the publish script publishes with: sharded pub/sub on a Cluster.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.cluster { "SPUBLISH" } else { "PUBLISH" }
    }

    /// HASH `epoch`, `top`: the channel's epoch and last offset.
    pub(crate) fn meta(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:meta", self.prefix)
    }

    /// LIST of history entries (`offset:epoch:ts_us:frame`), oldest first.
    pub(crate) fn history(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:hist", self.prefix)
    }

    /// STRING `epoch:offset`: the first result of a publish with this idempotency key.
    pub(crate) fn idempotency(&self, channel: &str, key: &str) -> String {
        format!("{}:{{{channel}}}:idem:{key}", self.prefix)
    }

    /// ZSET member → expiry (ms) and HASH member → entry JSON: a channel's presence.
    pub(crate) fn presence(&self, channel: &str) -> (String, String) {
        (format!("{}:{{{channel}}}:pres", self.prefix), format!("{}:{{{channel}}}:pres:data", self.prefix))
    }

    /// HASH user → how many of the channel's live presence members are that user's
    /// (`presence_stats`: `users` is its `HLEN`).
    pub(crate) fn presence_users(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:pres:users", self.prefix)
    }

    /// ZSET member → expiry (ms): a user's live connections, cluster-wide.
    pub(crate) fn connections(&self, user: &str) -> String {
        format!("{}:user:{{{user}}}:conns", self.prefix)
    }

    /// STRING: the theoretical arrival time (ms) of a cluster-wide rate limit (GCRA).
    pub(crate) fn rate(&self, key: &str) -> String {
        format!("{}:rate:{{{key}}}", self.prefix)
    }

    /// ZSET node → expiry (ms) and HASH node → NodeInfo JSON: the node registry.
    pub(crate) fn nodes(&self) -> (String, String) {
        if self.cluster {
            return (format!("{}:{{nodes}}", self.prefix), format!("{}:{{nodes}}:info", self.prefix));
        }
        (format!("{}:nodes", self.prefix), format!("{}:nodes:info", self.prefix))
    }

    /// ZSET channel → 0 (name order, for `ZRANGEBYLEX`) and HASH channel → subscribers: the
    /// channels a node has local subscribers on, as it last mirrored them. Both under the
    /// node's own hash tag `{node:<node>}`; they expire with the node's registry entry.
    pub(crate) fn node_channels(&self, node: &str) -> (String, String) {
        (format!("{}:{{node:{node}}}:chans", self.prefix), format!("{}:{{node:{node}}}:chans:n", self.prefix))
    }

    /// The pub/sub channel carrying `channel`'s publications.
    pub(crate) fn pubsub(&self, channel: &str) -> String {
        if self.cluster {
            return format!("{}{{{channel}}}", self.pubsub_prefix);
        }
        format!("{}{channel}", self.pubsub_prefix)
    }

    /// The string whose hash slot holds `channel`'s keys and shard channel (its hash tag).
    pub(crate) fn slot_key(channel: &str) -> String {
        format!("{{{channel}}}")
    }

    /// ZSET broker instance → expiry (ms): the instances with subscribers of `channel`
    /// (webhooks: occupied/vacated are this set's 0 → 1 and 1 → 0).
    pub(crate) fn hook_nodes(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:hooknodes", self.prefix)
    }
    /// ZSET channel → earliest expiry of its `hook_nodes` set (what the sweep of dead nodes
    /// reads), and the STREAM of webhook events (consumer group `crier`). Standalone/Sentinel:
    /// the scripts append to the stream from the channel's keys' script; on a Cluster they push
    /// to the channel's outbox and the node moves the events to the stream, whose key there
    /// has a hash tag (`<prefix>:{hooks}`: its drop counter, written by the same script, is in
    /// its slot).
    pub(crate) fn hook_index(&self) -> String {
        format!("{}:hooks:chans", self.prefix)
    }
    pub(crate) fn hook_stream(&self) -> String {
        if self.cluster { format!("{}:{{hooks}}", self.prefix) } else { format!("{}:hooks", self.prefix) }
    }
    /// LIST of a channel's webhook events not yet moved to the stream (Redis Cluster only).
    pub(crate) fn hook_outbox(&self, channel: &str) -> String {
        format!("{}:{{{channel}}}:hookout", self.prefix)
    }
    /// The node-wide control channel (user disconnects).
    pub(crate) fn control(&self) -> String {
        format!("{}:control", self.prefix)
    }

    /// The pub/sub channel on which broker instance `instance` hears the other nodes' replies to
    /// its server-side control operations.
    pub(crate) fn reply(&self, instance: &str) -> String {
        format!("{}:reply:{instance}", self.prefix)
    }

    /// ZSET user → `before` (Unix seconds): token revocations in force.
    pub(crate) fn revoked(&self) -> String {
        format!("{}:revoked", self.prefix)
    }

    /// The crier channel behind a pub/sub channel name, if it is one of ours.
    pub(crate) fn channel_of<'a>(&self, pubsub: &'a [u8]) -> Option<&'a str> {
        let rest = pubsub.strip_prefix(self.pubsub_prefix.as_bytes())?;
        let rest = if self.cluster { rest.strip_prefix(b"{")?.strip_suffix(b"}")? } else { rest };
        std::str::from_utf8(rest).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let k = Keys::new("crier");
        assert_eq!(k.meta("chat:lobby"), "crier:{chat:lobby}:meta");
        assert_eq!(k.history("chat:lobby"), "crier:{chat:lobby}:hist");
        assert_eq!(k.idempotency("c", "k1"), "crier:{c}:idem:k1");
        assert_eq!(k.presence("c"), ("crier:{c}:pres".to_owned(), "crier:{c}:pres:data".to_owned()));
        assert_eq!(k.presence_users("c"), "crier:{c}:pres:users");
        assert_eq!(k.connections("u1"), "crier:user:{u1}:conns");
        assert_eq!(k.nodes(), ("crier:nodes".to_owned(), "crier:nodes:info".to_owned()));
        assert_eq!(k.pubsub("chat:lobby"), "crier:ch:chat:lobby");
        assert_eq!(k.control(), "crier:control");
        assert_eq!(k.reply("i1"), "crier:reply:i1");
        assert_eq!(k.revoked(), "crier:revoked");
        assert_eq!(k.channel_of(b"crier:reply:i1"), None);
        assert_eq!(k.channel_of(b"crier:ch:chat:lobby"), Some("chat:lobby"));
        assert_eq!(k.channel_of(b"crier:control"), None);
        assert_eq!(k.channel_of(b"other:ch:x"), None);
        let k = Keys::for_cluster("crier");
        assert_eq!(k.pubsub("chat:lobby"), "crier:ch:{chat:lobby}");
        assert_eq!(k.channel_of(b"crier:ch:{chat:lobby}"), Some("chat:lobby"));
        assert_eq!(k.nodes(), ("crier:{nodes}".to_owned(), "crier:{nodes}:info".to_owned()));
        assert_eq!(k.meta("c"), "crier:{c}:meta");
        assert_eq!(k.node_channels("n1"), ("crier:{node:n1}:chans".to_owned(), "crier:{node:n1}:chans:n".to_owned()));
    }
}
