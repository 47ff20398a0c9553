local v = redis.call('GET', KEYS[1])
if ARGV[2] == '0' then
  if v == ARGV[1] then redis.call('DEL', KEYS[1]) end
  return 0
end
if v == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
elseif v == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
