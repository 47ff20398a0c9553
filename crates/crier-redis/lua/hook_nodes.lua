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
