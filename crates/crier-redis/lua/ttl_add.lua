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
