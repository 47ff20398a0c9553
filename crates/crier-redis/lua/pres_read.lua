local z, h, u = KEYS[1], KEYS[2], KEYS[3]
sweep(z, h, u, now_ms(), ARGV[1], ARGV[2], ARGV[3])
if ARGV[4] == 'list' then return redis.call('HVALS', h) end
return {redis.call('ZCARD', z), redis.call('HLEN', u)}
