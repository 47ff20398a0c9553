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
