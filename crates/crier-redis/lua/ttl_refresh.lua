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
