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
