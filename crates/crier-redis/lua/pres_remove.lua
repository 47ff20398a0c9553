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
