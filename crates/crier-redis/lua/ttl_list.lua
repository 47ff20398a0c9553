local z, h = KEYS[1], KEYS[2]
cleanup(z, h, now_ms())
if h then return redis.call('HVALS', h) end
return redis.call('ZCARD', z)
