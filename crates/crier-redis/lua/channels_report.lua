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
