redis.call('ZREM', KEYS[1], ARGV[1])
if KEYS[2] then redis.call('HDEL', KEYS[2], ARGV[1]) end
return 1
