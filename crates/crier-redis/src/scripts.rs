//! The Lua scripts (every multi-step change is one script, so it is atomic) and the parsing of
//! their replies.
//!
//! Timestamps come from Redis `TIME` inside the scripts, so history ages and presence expiries
//! are measured on one clock, whatever the nodes' clocks say. Numbers handed back to Redis go
//! through `string.format('%d', ...)` so large values never turn into floating-point notation.

use std::sync::Arc;

use bytes::Bytes;
use std::time::Duration;

use crier_core::{History, Namespaces, PublishResult};
use redis::{Script, Value};

use crate::clock::millis;
use crate::error::Fault;
use crate::keys::Keys;
use crate::payload;

/// Shared by the scripts: milliseconds and microseconds of Redis `TIME`, and the pruning of a
/// history list's expired head.
const PRELUDE: &str = include_str!("../lua/prelude.lua");

/// Publishes a batch of messages in one call (see `publisher.rs`), each exactly as if it had
/// its own call, in order.
///
/// ARGV: n, new epoch, history size, history expiry ms, meta expiry ms, expiry slack ms,
/// idempotency ttl s, publish command (`PUBLISH`, or `SPUBLISH` on a Cluster), server
/// generation ('' = not tracked; a Sentinel master's run id; `*` = this server's run id, read
/// here: on a Cluster, where only Redis knows which node runs it); then per message: channel,
/// data, pub/sub channel, `1` if it has an idempotency key (else `0`), and the channel's
/// history options when its namespace declares them (`size:expiry ms:slack ms`; '' = the
/// call's: channels outside every namespace pay nothing for them). KEYS per message: meta,
/// history, [idempotency]. Returns two items per message: `1, "epoch:offset"`; `0,
/// "epoch:offset"` for a repeated idempotency key; `-1, "<redis error>"` when that message
/// failed (the others still ran: every message is its own `pcall`).
///
/// What a message costs Redis is mostly its commands (~1 µs of `redis.call` overhead each), so
/// the common case is four: HMGET and HSET of the meta, RPUSH, PUBLISH. The rest is done only
/// when due:
/// - one `TIME` per call (the messages of a call share a timestamp);
/// - the history is trimmed back to `history_size` once it outgrew it by an eighth (`HISTORY`
///   reads only the newest `history_size` entries, so the history is still exactly that);
///   entries older than `history_ttl` are pruned by every read (`HISTORY` prunes first), not by
///   every publish;
/// - the keys' expiries are pushed out only once per `slack` (the meta's `due`, ms): they are
///   set to their ttl plus `slack`, so a channel's keys live between ttl and ttl + slack after
///   its last publish, and a busy channel pays two PEXPIREs per `slack`, not per message.
const PUBLISH: &str = include_str!("../lua/publish.lua");

/// KEYS: meta, history. ARGV: new epoch, meta ttl ms, history ttl ms, since epoch ('' for the
/// latest `limit`), since offset, limit, history size. Returns `{epoch, top, gap, entry...}`.
///
/// History entries are contiguous by offset (every publish appends one; only the head is ever
/// trimmed), so the offset of the head entry locates every other one.
const HISTORY: &str = include_str!("../lua/history.lua");

/// Shared by the expiring-set scripts: drops members whose expiry passed (and their hash fields).
const TTL_PRELUDE: &str = include_str!("../lua/ttl_prelude.lua");

/// KEYS: zset, [hash]. ARGV: member, ttl ms, [value]. Adds or refreshes a member; the keys
/// live as long as their longest-lived member. Returns the number of live members.
const TTL_ADD: &str = include_str!("../lua/ttl_add.lua");

/// KEYS: zset, [hash]. Returns the live members' values (with a hash) or their count.
const TTL_LIST: &str = include_str!("../lua/ttl_list.lua");

/// KEYS: zset, [hash]. ARGV: member.
const TTL_REMOVE: &str = include_str!("../lua/ttl_remove.lua");

/// The periodic refresh of this node's own entries, many per call: ARGV: ttl ms, then per entry
/// `member, value` (value `''` for a set without a hash); KEYS per entry: zset, hash (the hash
/// key is ignored for `''`). Per entry: the member's expiry moves to now + ttl, its value is
/// (re)written, and the keys live as long as their longest-lived member. Expired members are
/// not swept here (every read and every first add does it): a refresh is ~4 commands per entry
/// in one script call, where one TTL_ADD call per entry cost ~8 and a call's overhead each.
const TTL_REFRESH: &str = include_str!("../lua/ttl_refresh.lua");

/// Shared by the presence scripts. A channel's presence is three keys under its hash tag: the
/// ZSET member → expiry (ms), the HASH member → entry JSON, and the HASH user → how many of the
/// channel's live members are that user's (so `presence_stats` is `ZCARD` + `HLEN`, no listing).
/// Every change keeps the three in step, in one script. On channels with join/leave (`pubsub`
/// not `''`) a member that arrives publishes a `join` and one that goes (removed or expired)
/// a `leave` on the channel's own pub/sub channel, payload `e:<frame>` (not a publication: no
/// offset); the frame is `{"type":<kind>,"channel":<c>,` + the entry JSON's fields,
/// byte-identical to `crier_protocol::frames::encode_presence_event`. Because the sweep of
/// expired members and their leaves are one script, a dead node's member is announced once,
/// by whichever node swept it first.
///
/// Webhooks (docs/hooks.md): every presence script takes three more ARGV, last: the hook
/// stream (`''`: no webhooks), the enabled event flags (see [`HOOK_PRELUDE`]) and the stream's
/// approximate bound; a member that arrives (`A`) or goes (`R`, removed or swept) is appended
/// to the stream by the same script that decided it, so it is produced once per cluster.
const PRES_PRELUDE: &str = include_str!("../lua/pres_prelude.lua");

/// KEYS: zset, hash, users. ARGV: member, ttl ms, entry JSON, publish command, pub/sub channel
/// (`''`: no join/leave), channel, max (0: no bound). Adds or refreshes a member; returns how many members the channel holds after it (expired ones swept first: what `max_subscribers` is checked against). A new member of a channel that holds `max` already is not added (no join): the answer is over `max`.
const PRES_ADD: &str = include_str!("../lua/pres_add.lua");

/// KEYS: zset, hash, users. ARGV: member, publish command, pub/sub channel (`''`: no
/// join/leave), channel. Returns 1 when the member was there.
const PRES_REMOVE: &str = include_str!("../lua/pres_remove.lua");

/// KEYS: zset, hash, users. ARGV: publish command, pub/sub channel (`''`: no join/leave),
/// channel, `list` or `stats`. Sweeps, then returns the entries' JSON or `{clients, users}`.
const PRES_READ: &str = include_str!("../lua/pres_read.lua");

/// The periodic refresh of this node's presence entries, many per call. ARGV: ttl ms, publish
/// command, then per entry `member, entry JSON, pub/sub channel ('' = no join/leave), channel`;
/// KEYS per entry: zset, hash, users. A member that expired meanwhile (swept, its leave
/// announced) comes back as new: counted again, and a `join` announced.
const PRES_REFRESH: &str = include_str!("../lua/pres_refresh.lua");

/// Event flags of the hook stream argument: `O` channel_occupied, `V` channel_vacated, `A`
/// member_added, `R` member_removed, `P` client_publish (appended by the node, not a script).
pub(crate) const HOOK_FLAGS: [(&str, char); 5] = [
    ("channel_occupied", 'O'),
    ("channel_vacated", 'V'),
    ("member_added", 'A'),
    ("member_removed", 'R'),
    ("client_publish", 'P'),
];

/// The cluster-wide occupancy of channels (webhooks), many channels per call: KEYS: the index
/// of node sets (ZSET channel → earliest expiry), then per channel its node set (ZSET broker
/// instance → expiry ms). ARGV: broker instance, ttl ms, then per channel `add`, `rem` or
/// `sweep` and the channel, then the hook arguments. Per channel, in order: expired instances
/// (dead nodes) are swept first; the set going from empty to one instance is
/// `channel_occupied`, to empty `channel_vacated` — decided and appended in this one script,
/// so a channel vacated on three nodes is one event. Returns how many channels it did.
const HOOK_NODES: &str = include_str!("../lua/hook_nodes.lua");

/// [`HOOK_NODES`] on a Redis Cluster, one channel per call (a script keeps to one slot): KEYS:
/// the channel's node set, its outbox (`Keys::hook_outbox`). ARGV: broker instance, ttl ms,
/// `add`/`rem`/`sweep`, the channel, the events' id prefix (unique per call: `<instance>:<n>`;
/// the k-th event of the call is `<prefix>-<k>`), the event flags. The events are pushed to the
/// outbox, not the stream (another slot): the node moves them ([`HOOK_TRIM`]). Returns the
/// set's earliest expiry (`''` when empty: the node writes the index, another slot), how many
/// events the call made, and the outbox's length.
const HOOK_NODES_REDIS_CLUSTER: &str = include_str!("../lua/hook_nodes_redis_cluster.lua");

/// Removes from the head of an outbox (KEYS[1]) the events moved to the stream (ARGV, in order),
/// as long as the head is the next of them: two nodes moving one outbox at once never remove an
/// event neither moved. Returns how many it removed.
const HOOK_TRIM: &str = include_str!("../lua/hook_trim.lua");

/// Removes a channel (ARGV[1]) from the index (KEYS[1]) if its score is not after ARGV[2] (ms):
/// an entry another node has just renewed stays.
const HOOK_UNINDEX: &str = include_str!("../lua/hook_unindex.lua");

/// The webhook delivery lease: one node of the cluster delivers at a time, so events go out in
/// stream order. KEYS: the lease key. ARGV: broker instance, lease ms. Takes the lease when free,
/// renews it when this instance holds it; returns 1 when it holds it after the call, else 0.
/// A lease of `0` ms releases it if this instance holds it (a node stopping).
const HOOK_LEAD: &str = include_str!("../lua/hook_lead.lua");

/// Appends one event made by the node (`client_publish`). ARGV: the event JSON, then the hook
/// arguments.
const HOOK_APPEND: &str = include_str!("../lua/hook_append.lua");

/// Delivered events: acknowledged and deleted (the stream keeps only what is to deliver).
/// KEYS: the stream. ARGV: the group, then the ids.
const HOOK_ACK: &str = include_str!("../lua/hook_ack.lua");

/// The scripts, hashed once.
pub(crate) struct Scripts {
    pub publish: Script,
    pub history: Script,
    pub ttl_add: Script,
    pub ttl_list: Script,
    pub ttl_remove: Script,
    pub ttl_refresh: Script,
    pub rate: Script,
    pub channels_report: Script,
    pub channels_page: Script,
    pub pres_add: Script,
    pub pres_remove: Script,
    pub pres_read: Script,
    pub pres_refresh: Script,
    pub hook_nodes: Script,
    pub hook_append: Script,
    pub hook_ack: Script,
    pub hook_nodes_redis_cluster: Script,
    pub hook_trim: Script,
    pub hook_unindex: Script,
    pub hook_lead: Script,
    pub revoke: Script,
}

impl Scripts {
    pub(crate) fn new() -> Scripts {
        Scripts {
            publish: Script::new(PUBLISH),
            history: Script::new(&format!("{PRELUDE}{HISTORY}")),
            ttl_add: Script::new(&format!("{TTL_PRELUDE}{TTL_ADD}")),
            ttl_list: Script::new(&format!("{TTL_PRELUDE}{TTL_LIST}")),
            ttl_remove: Script::new(TTL_REMOVE),
            ttl_refresh: Script::new(TTL_REFRESH),
            rate: Script::new(RATE),
            channels_report: Script::new(CHANNELS_REPORT),
            channels_page: Script::new(CHANNELS_PAGE),
            pres_add: Script::new(&format!("{PRES_PRELUDE}{PRES_ADD}")),
            pres_remove: Script::new(&format!("{PRES_PRELUDE}{PRES_REMOVE}")),
            pres_read: Script::new(&format!("{PRES_PRELUDE}{PRES_READ}")),
            pres_refresh: Script::new(&format!("{PRES_PRELUDE}{PRES_REFRESH}")),
            hook_nodes: Script::new(&format!("{PRES_PRELUDE}{HOOK_NODES}")),
            hook_append: Script::new(&format!("{PRES_PRELUDE}{HOOK_APPEND}")),
            hook_ack: Script::new(HOOK_ACK),
            hook_nodes_redis_cluster: Script::new(HOOK_NODES_REDIS_CLUSTER),
            hook_trim: Script::new(HOOK_TRIM),
            hook_unindex: Script::new(HOOK_UNINDEX),
            hook_lead: Script::new(HOOK_LEAD),
            revoke: Script::new(REVOKE),
        }
    }
}

/// A node's subscriber counts (issue 19, the channel listing). KEYS: the node's channel ZSET and
/// count HASH (`Keys::node_channels`). ARGV: expiry ms, full ('1': forget the node's other
/// channels first), then pairs channel, count (0 removes the channel). Returns whether the
/// node's set existed before the call (0: lost or expired, or the node had no channel).
const CHANNELS_REPORT: &str = include_str!("../lua/channels_report.lua");

/// One page of a node's channels. KEYS: as `CHANNELS_REPORT`. ARGV: the `ZRANGEBYLEX` start
/// (`-`, `[prefix` or `(cursor`), the prefix ('' for none), the limit. Returns channel, count
/// pairs in name order.
const CHANNELS_PAGE: &str = include_str!("../lua/channels_page.lua");

/// Cluster-wide GCRA (generic cell rate algorithm), the same algorithm as governor's.
/// KEYS[1] = the key; ARGV[1] = emission interval in ms (1000 / rate), ARGV[2] = burst.
/// Returns 0 when allowed, else the milliseconds until the next event would be allowed.
/// Time comes from Redis (`TIME`), so nodes' clocks do not matter.
const RATE: &str = include_str!("../lua/rate.lua");

/// A token revocation (`UserOp::Invalidate`) in one call. KEYS: the revocation ZSET. ARGV:
/// `before` (Unix s), user, the set's expiry (s), the oldest `before` still kept (older ones are
/// pruned). `ZADD GT`: a later `before` wins.
const REVOKE: &str = include_str!("../lua/revoke.lua");

/// A channel's history options, as the channel scripts take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChannelParams {
    pub history_size: usize,
    pub history_ttl_ms: u64,
}

impl ChannelParams {
    /// How long the publish script may leave a channel's key expiries alone: a tenth of
    /// `history_ttl`, at most 30 s (see `PUBLISH`). Reads still drop entries older than
    /// `history_ttl`; the keys themselves live at most this much longer.
    pub(crate) fn expiry_slack_ms(&self) -> u64 {
        (self.history_ttl_ms / 10).min(30_000)
    }
}

/// TTLs and sizes the channel scripts are called with: the namespaces' default policy's history
/// options, and each declared namespace's (a channel gets its namespace's, see
/// [`Params::channel`]).
#[derive(Debug, Clone)]
pub(crate) struct Params {
    /// Channels outside every declared namespace.
    pub default: ChannelParams,
    /// How long a channel's meta outlives its last publish: never less than any history TTL.
    pub meta_ttl_ms: u64,
    /// The longest expiry slack of any namespace (the meta's expiry is pushed out by it).
    pub meta_slack_ms: u64,
    namespaces: Arc<Namespaces>,
}

impl Params {
    /// Channels outside every declared namespace get the default policy's history options.
    pub(crate) fn new(namespaces: Arc<Namespaces>, meta_ttl: Duration) -> Params {
        let policy = namespaces.default_policy();
        let default = ChannelParams { history_size: policy.history_size, history_ttl_ms: millis(policy.history_ttl) };
        let named: Vec<u64> = namespaces.named().map(|(_, p)| millis(p.history_ttl)).collect();
        let longest = named.iter().copied().chain([default.history_ttl_ms]).max().unwrap_or(default.history_ttl_ms);
        let meta_slack_ms = named
            .into_iter()
            .map(|ttl_ms| ChannelParams { history_size: 0, history_ttl_ms: ttl_ms }.expiry_slack_ms())
            .chain([default.expiry_slack_ms()])
            .max()
            .unwrap_or(0);
        Params { default, meta_ttl_ms: millis(meta_ttl).max(longest), meta_slack_ms, namespaces }
    }

    /// The options of `channel` when its namespace is declared (`None`: the default ones).
    /// No allocation; no hashing at all when no namespace is declared.
    pub(crate) fn named(&self, channel: &str) -> Option<ChannelParams> {
        let policy = self.namespaces.policy(channel);
        if std::ptr::eq(policy, self.namespaces.default_policy()) {
            return None;
        }
        Some(ChannelParams { history_size: policy.history_size, history_ttl_ms: millis(policy.history_ttl) })
    }

    /// The history options of `channel`.
    pub(crate) fn channel(&self, channel: &str) -> ChannelParams {
        self.named(channel).unwrap_or(self.default)
    }
}

/// Largest `limit` handed to the history script ("everything").
pub(crate) const ALL: usize = 1 << 40;

/// The keys and arguments of one history-script call; run through the command connection
/// ([`HistoryCall::invocation`]) or pipelined on the pub/sub connection ([`HistoryCall::evalsha`]).
pub(crate) struct HistoryCall {
    keys: [String; 2],
    args: [String; 7],
}

impl HistoryCall {
    /// `since: None` asks for the latest `limit` publications.
    pub(crate) fn new(keys: &Keys, params: &Params, channel: &str, since: Option<(&str, u64)>, limit: usize) -> Self {
        let history = params.channel(channel);
        // '' asks for the latest; a `since` with an empty epoch must still be a position (one
        // that matches no epoch: epochs are alphanumeric).
        let (since_epoch, since_offset) = match since {
            Some(("", offset)) => ("-", offset),
            Some(pos) => pos,
            None => ("", 0),
        };
        HistoryCall {
            keys: [keys.meta(channel), keys.history(channel)],
            args: [
                new_epoch(),
                params.meta_ttl_ms.to_string(),
                history.history_ttl_ms.to_string(),
                since_epoch.to_owned(),
                since_offset.to_string(),
                limit.min(ALL).to_string(),
                history.history_size.to_string(),
            ],
        }
    }

    pub(crate) fn invocation<'a>(&self, script: &'a Script) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for k in &self.keys {
            inv.key(k);
        }
        for a in &self.args {
            inv.arg(a);
        }
        inv
    }

    pub(crate) fn evalsha(&self, sha: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(sha).arg(self.keys.len()).arg(&self.keys).arg(&self.args);
        cmd
    }
}

/// A fresh random epoch: 8 alphanumerics (used only if the channel has none).
pub(crate) fn new_epoch() -> String {
    use rand::Rng;
    rand::rng().sample_iter(rand::distr::Alphanumeric).take(8).map(char::from).collect()
}

fn bad(what: &str) -> Fault {
    Fault::reply(what)
}

pub(crate) fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        Value::VerbatimString { text, .. } => Some(text.as_bytes()),
        _ => None,
    }
}

pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        other => std::str::from_utf8(bulk(other)?).ok()?.parse().ok(),
    }
}

/// One call of the publish script: its keys and arguments built from a batch of messages
/// (see `PUBLISH`), run with [`PublishCall::invocation`], the reply read with
/// [`PublishCall::parse`].
pub(crate) struct PublishCall<'a> {
    inv: redis::ScriptInvocation<'a>,
    n: usize,
}

/// One message of a publish call.
pub(crate) struct Message<'a> {
    pub channel: &'a str,
    pub data: &'a str,
    pub idempotency_key: Option<&'a str>,
}

impl<'a> PublishCall<'a> {
    /// `generation`: the server generation the script checks (see `Commands::generational`).
    pub(crate) fn new(
        script: &'a Script,
        keys: &Keys,
        params: &Params,
        idempotency_ttl_s: u64,
        generation: &str,
        messages: impl ExactSizeIterator<Item = Message<'a>>,
    ) -> PublishCall<'a> {
        let n = messages.len();
        let default = params.default;
        let slack = default.expiry_slack_ms();
        let mut inv = script.prepare_invoke();
        inv.arg(n)
            .arg(new_epoch())
            .arg(default.history_size)
            .arg(default.history_ttl_ms + slack)
            .arg(params.meta_ttl_ms + params.meta_slack_ms)
            .arg(slack)
            .arg(idempotency_ttl_s)
            .arg(keys.publish_command())
            .arg(generation);
        for m in messages {
            inv.key(keys.meta(m.channel)).key(keys.history(m.channel));
            inv.arg(m.channel).arg(m.data).arg(keys.pubsub(m.channel));
            match m.idempotency_key {
                Some(k) => {
                    inv.key(keys.idempotency(m.channel, k));
                    inv.arg("1");
                }
                None => {
                    inv.arg("0");
                }
            }
            // The channel's own history options, only when its namespace declares them.
            match params.named(m.channel) {
                Some(own) => {
                    let slack = own.expiry_slack_ms();
                    inv.arg(format!("{}:{}:{}", own.history_size, own.history_ttl_ms + slack, slack));
                }
                None => {
                    inv.arg("");
                }
            }
        }
        PublishCall { inv, n }
    }

    pub(crate) fn invocation(&self) -> &redis::ScriptInvocation<'a> {
        &self.inv
    }

    /// The reply: one answer per message, in order.
    pub(crate) fn parse(&self, v: &Value) -> Result<Vec<Published>, Fault> {
        parse_publish(v, self.n)
    }
}

/// One message's answer in a publish reply: where it landed and whether this call published it
/// (false: an idempotent repeat), or the Redis error that failed it.
pub(crate) type Published = Result<(PublishResult, bool), Fault>;

/// `{fresh, "epoch:offset" | error, ...}` (two items per message) → one answer per message;
/// `Err` when the reply as a whole is not that for `n` messages.
fn parse_publish(v: &Value, n: usize) -> Result<Vec<Published>, Fault> {
    let Value::Array(items) = v else { return Err(bad("publish: not an array")) };
    if items.len() != 2 * n {
        return Err(bad("publish: length"));
    }
    Ok(items.chunks_exact(2).map(|pair| parse_one(&pair[0], &pair[1])).collect())
}

fn parse_one(fresh: &Value, result: &Value) -> Published {
    let (Some(fresh), Some(result)) = (int(fresh), bulk(result)) else {
        return Err(bad("publish: fields"));
    };
    let result = std::str::from_utf8(result).map_err(|_| bad("publish: not utf-8"))?;
    if fresh < 0 {
        return Err(Fault::from_script_message(result));
    }
    let (epoch, offset) = result.rsplit_once(':').ok_or_else(|| bad("publish: result"))?;
    let offset = offset.parse().map_err(|_| bad("publish: offset"))?;
    Ok((PublishResult { epoch: epoch.to_owned(), offset }, fresh == 1))
}

/// `{epoch, top, gap, entry...}` → a [`History`]. Consumes the value so the entries' buffers
/// become the publications' frames without a copy.
pub(crate) fn parse_history(v: Value) -> Result<History, Fault> {
    let Value::Array(items) = v else { return Err(bad("history: not an array")) };
    let mut items = items.into_iter();
    let epoch = items.next().as_ref().and_then(bulk).and_then(|b| std::str::from_utf8(b).ok()).map(Arc::<str>::from);
    let top = items.next().as_ref().and_then(int).and_then(|i| u64::try_from(i).ok());
    let gap = items.next().as_ref().and_then(int);
    let (Some(epoch), Some(offset), Some(gap)) = (epoch, top, gap) else {
        return Err(bad("history: header"));
    };
    let mut publications = Vec::with_capacity(items.len());
    for item in items {
        let Value::BulkString(entry) = item else { return Err(bad("history: entry")) };
        let p = payload::publication(Bytes::from(entry), Some(&epoch)).ok_or_else(|| bad("history: entry header"))?;
        publications.push(p);
    }
    Ok(History { epoch: epoch.to_string(), offset, publications, gap: gap != 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_replies() {
        let v = Value::Array(vec![
            Value::Int(1),
            Value::BulkString(b"abc:42".to_vec()),
            Value::Int(0),
            Value::BulkString(b"abc:41".to_vec()),
            Value::Int(-1),
            Value::BulkString(b"WRONGTYPE Operation against a key holding the wrong kind of value".to_vec()),
            Value::Int(-1),
            Value::BulkString(b"OOM command not allowed when used memory > 'maxmemory'.".to_vec()),
        ]);
        let answers = parse_publish(&v, 4).unwrap_or_else(|e| panic!("{e}"));
        let (r, fresh) = answers[0].as_ref().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.epoch.as_str(), r.offset, *fresh), ("abc", 42, true));
        let (r, fresh) = answers[1].as_ref().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((r.epoch.as_str(), r.offset, *fresh), ("abc", 41, false));
        assert!(matches!(answers[2], Err(Fault::Script(_))));
        assert!(matches!(answers[3], Err(Fault::Busy(_))));
        assert!(parse_publish(&v, 3).is_err());
        assert!(parse_publish(&Value::Nil, 1).is_err());
        let frame = crier_protocol::frames::encode_message("c", "abc", 7, "1");
        let mut entry = b"7:abc:5:".to_vec();
        entry.extend_from_slice(&frame);
        let v = Value::Array(vec![
            Value::BulkString(b"abc".to_vec()),
            Value::Int(7),
            Value::Int(0),
            Value::BulkString(entry),
        ]);
        let h = parse_history(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((h.epoch.as_str(), h.offset, h.gap, h.publications.len()), ("abc", 7, false, 1));
        assert_eq!(h.publications[0].frame, frame);
        assert!(parse_history(Value::Array(vec![Value::Int(1)])).is_err());
    }
}
