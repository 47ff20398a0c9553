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
