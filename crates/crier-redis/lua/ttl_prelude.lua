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
