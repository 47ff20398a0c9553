local meta, hist = KEYS[1], KEYS[2]
local cur = redis.call('HMGET', meta, 'epoch', 'top')
local epoch, top = cur[1], tonumber(cur[2]) or 0
if not epoch or not string.match(epoch, '^%w+$') then
  epoch = ARGV[1]
  top = 0
  redis.call('DEL', meta, hist)
  redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
  redis.call('PEXPIRE', meta, ARGV[2])
end
prune(hist, now_us() - tonumber(ARGV[3]) * 1000)
local len = redis.call('LLEN', hist)
local first = top + 1
if len > 0 then
  first = tonumber(string.match(redis.call('LINDEX', hist, 0), '^(%d+):')) or first
end
-- The publish script trims in steps, so the list may hold a few more than `history_size`
-- entries: only the newest `history_size` are the history.
local size, skip = tonumber(ARGV[7]), 0
if size > 0 and len > size then
  skip = len - size
  first, len = first + skip, size
end
local limit = tonumber(ARGV[6])
local gap, from, n = 0, 0, 0
if ARGV[4] == '' then
  n = math.min(limit, len)
  from = len - n
else
  local since = tonumber(ARGV[5])
  if ARGV[4] == epoch and since <= top then
    if first > since + 1 then gap = 1 end
    from = math.max(since + 1, first) - first
    n = math.min(limit, len - from)
  else
    gap = 1
    n = math.min(limit, len)
  end
end
local out = {epoch, top, gap}
if n > 0 then
  local entries = redis.call('LRANGE', hist, skip + from, skip + from + n - 1)
  for i = 1, #entries do out[#out + 1] = entries[i] end
end
return out
