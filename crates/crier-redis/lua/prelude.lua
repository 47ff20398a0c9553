local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function prune(hist, cutoff_us)
  while true do
    local head = redis.call('LINDEX', hist, 0)
    if not head then return end
    local ts = tonumber(string.match(head, '^%d+:%w+:(%d+):'))
    if ts and ts >= cutoff_us then return end
    redis.call('LPOP', hist)
  end
end
