local z, out = KEYS[1], KEYS[2]
local inst, ttl, op, channel, idp, flags = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local k = 0
local function hook(name, flag)
  if not string.find(flags, flag, 1, true) then return end
  k = k + 1
  redis.call('RPUSH', out, cjson.encode({id = idp .. '-' .. k, name = name, channel = channel, time_ms = now}))
end
if redis.call('ZCARD', z) > 0 then
  redis.call('ZREMRANGEBYSCORE', z, '-inf', string.format('%d', now))
  if redis.call('ZCARD', z) == 0 then hook('channel_vacated', 'V') end
end
if op == 'add' then
  local before = redis.call('ZCARD', z)
  redis.call('ZADD', z, string.format('%d', now + ttl), inst)
  if before == 0 then hook('channel_occupied', 'O') end
elseif op == 'rem' then
  if redis.call('ZREM', z, inst) == 1 and redis.call('ZCARD', z) == 0 then hook('channel_vacated', 'V') end
end
local score = ''
local first = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
if first[2] then
  score = first[2]
  local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', z, string.format('%d', tonumber(last[2]) + ttl))
end
return {score, k, redis.call('LLEN', out)}
