//! The Lua scripts (every multi-step change is one script, so it is atomic) and the parsing of
//! their replies.
//!
//! Timestamps come from Redis `TIME` inside the scripts, so history ages and presence expiries
//! are measured on one clock, whatever the nodes' clocks say. Numbers handed back to Redis go
//! through `string.format('%d', ...)` so large values never turn into floating-point notation.

use std::sync::Arc;

use bytes::Bytes;
use std::time::Duration;

use crier_core::{BrokerError, History, Namespaces, PublishResult};
use redis::{Script, Value};

use crate::keys::Keys;
use crate::{millis, payload};

/// Shared by the scripts: milliseconds and microseconds of Redis `TIME`, and the pruning of a
/// history list's expired head.
const PRELUDE: &str = r#"
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function prune(hist, cutoff_us)
  while true do
    local head = redis.call('LINDEX', hist, 0)
    if not head then return end
    local ts = tonumber(string.match(head, '^%d+:%w+:(%d+):'))
    if ts and ts >= cutoff_us then return end
    redis.call('LPOP', hist)
  end
end
"#;

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
const PUBLISH: &str = r#"
local n = tonumber(ARGV[1])
local new_epoch, size, hist_exp, meta_exp, slack, idem_ttl, command, gen =
  ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
if gen == '*' then gen = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or '' end
local trim_step = math.floor(size / 8)
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function one(channel, data, pubsub, meta, hist, idem, size, hist_exp, slack, trim_step)
  if idem then
    local prev = redis.call('GET', idem)
    if prev then return 0, prev end
  end
  local cur = redis.call('HMGET', meta, 'epoch', 'top', 'due', 'gen')
  local epoch, top, due = cur[1], tonumber(cur[2]) or 0, tonumber(cur[3]) or 0
  local stale = gen ~= '' and cur[4] ~= gen
  -- The meta was last written by another server process (a replica promoted by a failover,
  -- which may lack the last acknowledged writes): its offsets may be behind what subscribers
  -- saw, so continuing would reuse offsets.
  if stale and top > 0 then epoch = nil end
  local set = {}
  if not epoch or not string.match(epoch, '^%w+$') then
    -- No meta: the channel is new, or its state was lost (flush, restart without persistence,
    -- expiry, eviction), or stale (above). A new epoch begins and any stale history goes with
    -- the old one.
    epoch, top, due = new_epoch, 0, 0
    redis.call('DEL', meta, hist)
    set = {'epoch', epoch}
  end
  if stale then set[#set + 1] = 'gen'; set[#set + 1] = gen end
  local refresh = now_ms >= due
  if refresh then set[#set + 1] = 'due'; set[#set + 1] = string.format('%d', now_ms + slack) end
  local off = string.format('%d', top + 1)
  redis.call('HSET', meta, 'top', off, unpack(set))
  local frame = '{"type":"message","channel":"' .. channel .. '","epoch":"' .. epoch ..
    '","offset":' .. off .. ',"data":' .. data .. '}'
  local payload = off .. ':' .. epoch .. ':' .. now .. ':' .. frame
  if size > 0 then
    if redis.call('RPUSH', hist, payload) > size + trim_step then redis.call('LTRIM', hist, -size, -1) end
    if refresh then redis.call('PEXPIRE', hist, hist_exp) end
  elseif refresh then
    -- No history kept (a history from before `history_size` became 0 goes too).
    redis.call('DEL', hist)
  end
  if refresh then redis.call('PEXPIRE', meta, meta_exp) end
  redis.call(command, pubsub, payload)
  local result = epoch .. ':' .. off
  if idem then redis.call('SET', idem, result, 'EX', idem_ttl) end
  return 1, result
end
local out = {}
local k, a = 1, 10
for _ = 1, n do
  local idem = nil
  if ARGV[a + 3] == '1' then idem = KEYS[k + 2] end
  local m_size, m_exp, m_slack, m_step = size, hist_exp, slack, trim_step
  local own = ARGV[a + 4]
  if own ~= '' then
    local s, e, l = string.match(own, '^(%d+):(%d+):(%d+)$')
    m_size, m_exp, m_slack = tonumber(s) or size, e or hist_exp, tonumber(l) or slack
    m_step = math.floor(m_size / 8)
  end
  local ok, fresh, result = pcall(one, ARGV[a], ARGV[a + 1], ARGV[a + 2], KEYS[k], KEYS[k + 1], idem,
    m_size, m_exp, m_slack, m_step)
  if not ok then
    result = type(fresh) == 'table' and fresh.err or tostring(fresh)
    fresh = -1
  end
  out[#out + 1] = fresh
  out[#out + 1] = result
  if idem then k = k + 3 else k = k + 2 end
  a = a + 5
end
return out
"#;

/// KEYS: meta, history. ARGV: new epoch, meta ttl ms, history ttl ms, since epoch ('' for the
/// latest `limit`), since offset, limit, history size. Returns `{epoch, top, gap, entry...}`.
///
/// History entries are contiguous by offset (every publish appends one; only the head is ever
/// trimmed), so the offset of the head entry locates every other one.
const HISTORY: &str = r#"
local meta, hist = KEYS[1], KEYS[2]
local cur = redis.call('HMGET', meta, 'epoch', 'top')
local epoch, top = cur[1], tonumber(cur[2]) or 0
if not epoch or not string.match(epoch, '^%w+$') then
  epoch = ARGV[1]
  top = 0
  redis.call('DEL', meta, hist)
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
  redis.call('PEXPIRE', meta, ARGV[2])
end
prune(hist, now_us() - tonumber(ARGV[3]) * 1000)
local len = redis.call('LLEN', hist)
local first = top + 1
if len > 0 then
  first = tonumber(string.match(redis.call('LINDEX', hist, 0), '^(%d+):')) or first
end
-- The publish script trims in steps, so the list may hold a few more than `history_size`
-- entries: only the newest `history_size` are the history.
local size, skip = tonumber(ARGV[7]), 0
if size > 0 and len > size then
  skip = len - size
  first, len = first + skip, size
end
local limit = tonumber(ARGV[6])
local gap, from, n = 0, 0, 0
if ARGV[4] == '' then
  n = math.min(limit, len)
  from = len - n
else
  local since = tonumber(ARGV[5])
  if ARGV[4] == epoch and since <= top then
    if first > since + 1 then gap = 1 end
    from = math.max(since + 1, first) - first
    n = math.min(limit, len - from)
  else
    gap = 1
    n = math.min(limit, len)
  end
end
local out = {epoch, top, gap}
if n > 0 then
  local entries = redis.call('LRANGE', hist, skip + from, skip + from + n - 1)
  for i = 1, #entries do out[#out + 1] = entries[i] end
end
return out
"#;

/// Shared by the expiring-set scripts: drops members whose expiry passed (and their hash fields).
const TTL_PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function cleanup(z, h, now)
  local cutoff = string.format('%d', now)
  if not h then
    redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
    return
  end
  while true do
    local dead = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff, 'LIMIT', 0, 500)
    if #dead == 0 then return end
    redis.call('HDEL', h, unpack(dead))
    redis.call('ZREM', z, unpack(dead))
  end
end
"#;

/// KEYS: zset, [hash]. ARGV: member, ttl ms, [value]. Adds or refreshes a member; the keys
/// live as long as their longest-lived member. Returns the number of live members.
const TTL_ADD: &str = r#"
local z, h = KEYS[1], KEYS[2]
local now = now_ms()
cleanup(z, h, now)
redis.call('ZADD', z, string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', z, last[2])
if h then
  redis.call('HSET', h, ARGV[1], ARGV[3])
  redis.call('PEXPIREAT', h, last[2])
end
return redis.call('ZCARD', z)
"#;

/// KEYS: zset, [hash]. Returns the live members' values (with a hash) or their count.
const TTL_LIST: &str = r#"
local z, h = KEYS[1], KEYS[2]
cleanup(z, h, now_ms())
if h then return redis.call('HVALS', h) end
return redis.call('ZCARD', z)
"#;

/// KEYS: zset, [hash]. ARGV: member.
const TTL_REMOVE: &str = r#"
redis.call('ZREM', KEYS[1], ARGV[1])
if KEYS[2] then redis.call('HDEL', KEYS[2], ARGV[1]) end
return 1
"#;

/// The periodic refresh of this node's own entries, many per call: ARGV: ttl ms, then per entry
/// `member, value` (value `''` for a set without a hash); KEYS per entry: zset, hash (the hash
/// key is ignored for `''`). Per entry: the member's expiry moves to now + ttl, its value is
/// (re)written, and the keys live as long as their longest-lived member. Expired members are
/// not swept here (every read and every first add does it): a refresh is ~4 commands per entry
/// in one script call, where one TTL_ADD call per entry cost ~8 and a call's overhead each.
const TTL_REFRESH: &str = r#"
local t = redis.call('TIME')
local expiry = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
local score = string.format('%d', expiry)
local n = 0
for i = 2, #ARGV, 2 do
  local z, h, member, value = KEYS[i - 1], KEYS[i], ARGV[i], ARGV[i + 1]
  redis.call('ZADD', z, score, member)
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', z, last[2])
  if value ~= '' then
    redis.call('HSET', h, member, value)
    redis.call('PEXPIREAT', h, last[2])
  end
  n = n + 1
end
return n
"#;

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
const PRES_PRELUDE: &str = r#"
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local HOOK_KEY, HOOK_FLAGS, HOOK_MAX = ARGV[#ARGV - 2], ARGV[#ARGV - 1], ARGV[#ARGV]
-- The stream holds only undelivered events (delivered ones are deleted with their ack): at
-- the bound, the oldest is trimmed and counted as dropped.
local function append(json)
  if redis.call('XLEN', HOOK_KEY) >= tonumber(HOOK_MAX) then redis.call('INCR', HOOK_KEY .. ':dropped') end
  redis.call('XADD', HOOK_KEY, 'MAXLEN', HOOK_MAX, '*', 'e', json)
end
local function hook(name, flag, channel, v)
  if HOOK_KEY == nil or HOOK_KEY == '' or not string.find(HOOK_FLAGS, flag, 1, true) then return end
  local ev = {name = name, channel = channel, time_ms = now_ms()}
  if v then
    local ok, e = pcall(cjson.decode, v)
    if ok and type(e) == 'table' then ev.user = e.user; ev.client = e.client end
  end
  append(cjson.encode(ev))
end
local function user_of(v)
  local ok, e = pcall(cjson.decode, v)
  if ok and type(e) == 'table' and type(e.user) == 'string' then return e.user end
  return nil
end
local function add_user(u, v)
  local user = user_of(v)
  if user then redis.call('HINCRBY', u, user, 1) end
end
local function drop_user(u, v)
  local user = user_of(v)
  if user and redis.call('HINCRBY', u, user, -1) <= 0 then redis.call('HDEL', u, user) end
end
local function announce(pub, pubsub, kind, channel, v)
  if pubsub == '' then return end
  redis.call(pub, pubsub, 'e:{"type":"' .. kind .. '","channel":"' .. channel .. '",' .. string.sub(v, 2))
end
local function sweep(z, h, u, now, pub, pubsub, channel)
  local cutoff = string.format('%d', now)
  while true do
    local dead = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff, 'LIMIT', 0, 500)
    if #dead == 0 then return end
    local vals = redis.call('HMGET', h, unpack(dead))
    for i = 1, #dead do
      local v = vals[i]
      if v then
        drop_user(u, v)
        announce(pub, pubsub, 'leave', channel, v)
        hook('member_removed', 'R', channel, v)
      end
    end
    redis.call('HDEL', h, unpack(dead))
    redis.call('ZREM', z, unpack(dead))
  end
end
local function expire_with(z, h, u)
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIREAT', z, last[2])
    redis.call('PEXPIREAT', h, last[2])
    redis.call('PEXPIREAT', u, last[2])
  end
end
-- Adds or refreshes `member` (expiring at `score`): a new one is counted, its join announced
-- and its member_added hooked.
local function enter(z, h, u, score, member, v, pub, pubsub, channel)
  local fresh = redis.call('ZADD', z, score, member)
  redis.call('HSET', h, member, v)
  if fresh == 1 then
    add_user(u, v)
    announce(pub, pubsub, 'join', channel, v)
    hook('member_added', 'A', channel, v)
  end
  expire_with(z, h, u)
end
"#;

/// KEYS: zset, hash, users. ARGV: member, ttl ms, entry JSON, publish command, pub/sub channel
/// (`''`: no join/leave), channel, max (0: no bound). Adds or refreshes a member; returns how many members the channel holds after it (expired ones swept first: what `max_subscribers` is checked against). A new member of a channel that holds `max` already is not added (no join): the answer is over `max`.
const PRES_ADD: &str = r#"
local z, h, u = KEYS[1], KEYS[2], KEYS[3]
local member, ttl, v, pub, pubsub, channel = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local max = tonumber(ARGV[7]) or 0
local now = now_ms()
sweep(z, h, u, now, pub, pubsub, channel)
if max > 0 and not redis.call('ZSCORE', z, member) then
  local held = redis.call('ZCARD', z)
  if held >= max then return held + 1 end
end
enter(z, h, u, string.format('%d', now + ttl), member, v, pub, pubsub, channel)
return redis.call('ZCARD', z)
"#;

/// KEYS: zset, hash, users. ARGV: member, publish command, pub/sub channel (`''`: no
/// join/leave), channel. Returns 1 when the member was there.
const PRES_REMOVE: &str = r#"
local z, h, u = KEYS[1], KEYS[2], KEYS[3]
local member, pub, pubsub, channel = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('ZREM', z, member) == 0 then return 0 end
local v = redis.call('HGET', h, member)
redis.call('HDEL', h, member)
if v then
  drop_user(u, v)
  announce(pub, pubsub, 'leave', channel, v)
  hook('member_removed', 'R', channel, v)
end
return 1
"#;

/// KEYS: zset, hash, users. ARGV: publish command, pub/sub channel (`''`: no join/leave),
/// channel, `list` or `stats`. Sweeps, then returns the entries' JSON or `{clients, users}`.
const PRES_READ: &str = r#"
local z, h, u = KEYS[1], KEYS[2], KEYS[3]
sweep(z, h, u, now_ms(), ARGV[1], ARGV[2], ARGV[3])
if ARGV[4] == 'list' then return redis.call('HVALS', h) end
return {redis.call('ZCARD', z), redis.call('HLEN', u)}
"#;

/// The periodic refresh of this node's presence entries, many per call. ARGV: ttl ms, publish
/// command, then per entry `member, entry JSON, pub/sub channel ('' = no join/leave), channel`;
/// KEYS per entry: zset, hash, users. A member that expired meanwhile (swept, its leave
/// announced) comes back as new: counted again, and a `join` announced.
const PRES_REFRESH: &str = r#"
local t = redis.call('TIME')
local score = string.format('%d', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1]))
local pub = ARGV[2]
local n = 0
for i = 1, #KEYS, 3 do
  local z, h, u = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local a = 3 + (i - 1) / 3 * 4
  local member, v, pubsub, channel = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  enter(z, h, u, score, member, v, pub, pubsub, channel)
  n = n + 1
end
return n
"#;

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
const HOOK_NODES: &str = r#"
local idx, inst, ttl = KEYS[1], ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local n = 0
for i = 2, #KEYS do
  local z, op, channel = KEYS[i], ARGV[2 * i - 1], ARGV[2 * i]
  if redis.call('ZCARD', z) > 0 then
    redis.call('ZREMRANGEBYSCORE', z, '-inf', string.format('%d', now))
    if redis.call('ZCARD', z) == 0 then hook('channel_vacated', 'V', channel, nil) end
  end
  if op == 'add' then
    local before = redis.call('ZCARD', z)
    redis.call('ZADD', z, string.format('%d', now + ttl), inst)
    if before == 0 then hook('channel_occupied', 'O', channel, nil) end
  elseif op == 'rem' then
    if redis.call('ZREM', z, inst) == 1 and redis.call('ZCARD', z) == 0 then
      hook('channel_vacated', 'V', channel, nil)
    end
  end
  local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
  if first[2] then
    redis.call('ZADD', idx, first[2], channel)
    -- Kept past its last expiry (by one more ttl) for the sweep to see it and report the vacate.
    local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
    redis.call('PEXPIREAT', z, string.format('%d', tonumber(last[2]) + ttl))
  else
    redis.call('ZREM', idx, channel)
  end
  n = n + 1
end
return n
"#;

/// Appends one event made by the node (`client_publish`). ARGV: the event JSON, then the hook
/// arguments.
const HOOK_APPEND: &str = r#"
append(ARGV[1])
return 1
"#;

/// Delivered events: acknowledged and deleted (the stream keeps only what is to deliver).
/// KEYS: the stream. ARGV: the group, then the ids.
const HOOK_ACK: &str = r#"
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
return redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
"#;

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
        }
    }
}

/// A node's subscriber counts (issue 19, the channel listing). KEYS: the node's channel ZSET and
/// count HASH (`Keys::node_channels`). ARGV: expiry ms, full ('1': forget the node's other
/// channels first), then pairs channel, count (0 removes the channel). Returns whether the
/// node's set existed before the call (0: lost or expired, or the node had no channel).
const CHANNELS_REPORT: &str = r#"
local held = redis.call('EXISTS', KEYS[1])
if ARGV[2] == '1' then redis.call('DEL', KEYS[1], KEYS[2]) end
for i = 3, #ARGV - 1, 2 do
  local c, n = ARGV[i], tonumber(ARGV[i + 1]) or 0
  if n > 0 then
    redis.call('ZADD', KEYS[1], 0, c)
    redis.call('HSET', KEYS[2], c, n)
  else
    redis.call('ZREM', KEYS[1], c)
    redis.call('HDEL', KEYS[2], c)
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[1])
end
return held
"#;

/// One page of a node's channels. KEYS: as `CHANNELS_REPORT`. ARGV: the `ZRANGEBYLEX` start
/// (`-`, `[prefix` or `(cursor`), the prefix ('' for none), the limit. Returns channel, count
/// pairs in name order.
const CHANNELS_PAGE: &str = r#"
local max = '+'
if ARGV[2] ~= '' then max = '(' .. ARGV[2] .. '\255' end
local names = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], max, 'LIMIT', 0, tonumber(ARGV[3]))
if #names == 0 then return {} end
local counts = redis.call('HMGET', KEYS[2], unpack(names))
local out = {}
for i, c in ipairs(names) do
  out[#out + 1] = c
  out[#out + 1] = counts[i] or '0'
end
return out
"#;

/// Cluster-wide GCRA (generic cell rate algorithm), the same algorithm as governor's.
/// KEYS[1] = the key; ARGV[1] = emission interval in ms (1000 / rate), ARGV[2] = burst.
/// Returns 0 when allowed, else the milliseconds until the next event would be allowed.
/// Time comes from Redis (`TIME`), so nodes' clocks do not matter.
const RATE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > tolerance then
  return math.max(1, math.ceil(new_tat - now - tolerance))
end
redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.max(1, math.ceil(new_tat - now)))
return 0
"#;

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

/// TTLs and sizes the channel scripts are called with: the top-level history options, and
/// each declared namespace's (a channel gets its namespace's, see [`Params::channel`]).
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
    /// `default_*`: the top-level history options (they win over `namespaces`' default policy).
    pub(crate) fn new(
        namespaces: Arc<Namespaces>,
        default_size: usize,
        default_ttl: Duration,
        meta_ttl: Duration,
    ) -> Params {
        let default = ChannelParams { history_size: default_size, history_ttl_ms: millis(default_ttl) };
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

fn bad(what: &str) -> BrokerError {
    BrokerError::Internal(format!("unexpected reply from redis: {what}"))
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

/// One message's answer in a publish reply: where it landed and whether this call published it
/// (false: an idempotent repeat), or the Redis error that failed it.
pub(crate) type Published = Result<(PublishResult, bool), BrokerError>;

/// `{fresh, "epoch:offset" | error, ...}` (two items per message) → one answer per message;
/// `Err` when the reply as a whole is not that for `n` messages.
pub(crate) fn parse_publish(v: &Value, n: usize) -> Result<Vec<Published>, BrokerError> {
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
        return Err(crate::command::script_error(result));
    }
    let (epoch, offset) = result.rsplit_once(':').ok_or_else(|| bad("publish: result"))?;
    let offset = offset.parse().map_err(|_| bad("publish: offset"))?;
    Ok((PublishResult { epoch: epoch.to_owned(), offset }, fresh == 1))
}

/// `{epoch, top, gap, entry...}` → a [`History`]. Consumes the value so the entries' buffers
/// become the publications' frames without a copy.
pub(crate) fn parse_history(v: Value) -> Result<History, BrokerError> {
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
        assert!(matches!(answers[2], Err(BrokerError::Internal(_))));
        assert!(matches!(answers[3], Err(BrokerError::Unavailable(_))));
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
