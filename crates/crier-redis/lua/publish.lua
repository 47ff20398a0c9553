local n = tonumber(ARGV[1])
local new_epoch, size, hist_exp, meta_exp, slack, idem_ttl, command, gen =
  ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], tonumber(ARGV[6]), ARGV[7], ARGV[8], ARGV[9]
if gen == '*' then gen = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or '' end
local trim_step = math.floor(size / 8)
local t = redis.call('TIME')
local now = string.format('%d', tonumber(t[1]) * 1000000 + tonumber(t[2]))
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function one(channel, data, pubsub, meta, hist, idem, size, hist_exp, slack, trim_step)
  if idem then
    local prev = redis.call('GET', idem)
    if prev then return 0, prev end
  end
  local cur = redis.call('HMGET', meta, 'epoch', 'top', 'due', 'gen')
  local epoch, top, due = cur[1], tonumber(cur[2]) or 0, tonumber(cur[3]) or 0
  local stale = gen ~= '' and cur[4] ~= gen
  -- The meta was last written by another server process (a replica promoted by a failover,
  -- which may lack the last acknowledged writes): its offsets may be behind what subscribers
  -- saw, so continuing would reuse offsets.
  if stale and top > 0 then epoch = nil end
  local set = {}
  if not epoch or not string.match(epoch, '^%w+$') then
    -- No meta: the channel is new, or its state was lost (flush, restart without persistence,
    -- expiry, eviction), or stale (above). A new epoch begins and any stale history goes with
    -- the old one.
    epoch, top, due = new_epoch, 0, 0
    redis.call('DEL', meta, hist)
    set = {'epoch', epoch}
  end
  if stale then set[#set + 1] = 'gen'; set[#set + 1] = gen end
  local refresh = now_ms >= due
  if refresh then set[#set + 1] = 'due'; set[#set + 1] = string.format('%d', now_ms + slack) end
  local off = string.format('%d', top + 1)
  redis.call('HSET', meta, 'top', off, unpack(set))
  local frame = '{"type":"message","channel":"' .. channel .. '","epoch":"' .. epoch ..
    '","offset":' .. off .. ',"data":' .. data .. '}'
  local payload = off .. ':' .. epoch .. ':' .. now .. ':' .. frame
  if size > 0 then
    if redis.call('RPUSH', hist, payload) > size + trim_step then redis.call('LTRIM', hist, -size, -1) end
    if refresh then redis.call('PEXPIRE', hist, hist_exp) end
  elseif refresh then
    -- No history kept (a history from before `history_size` became 0 goes too).
    redis.call('DEL', hist)
  end
  if refresh then redis.call('PEXPIRE', meta, meta_exp) end
  redis.call(command, pubsub, payload)
  local result = epoch .. ':' .. off
  if idem then redis.call('SET', idem, result, 'EX', idem_ttl) end
  return 1, result
end
local out = {}
local k, a = 1, 10
for _ = 1, n do
  local idem = nil
  if ARGV[a + 3] == '1' then idem = KEYS[k + 2] end
  local m_size, m_exp, m_slack, m_step = size, hist_exp, slack, trim_step
  local own = ARGV[a + 4]
  if own ~= '' then
    local s, e, l = string.match(own, '^(%d+):(%d+):(%d+)$')
    m_size, m_exp, m_slack = tonumber(s) or size, e or hist_exp, tonumber(l) or slack
    m_step = math.floor(m_size / 8)
  end
  local ok, fresh, result = pcall(one, ARGV[a], ARGV[a + 1], ARGV[a + 2], KEYS[k], KEYS[k + 1], idem,
    m_size, m_exp, m_slack, m_step)
  if not ok then
    result = type(fresh) == 'table' and fresh.err or tostring(fresh)
    fresh = -1
  end
  out[#out + 1] = fresh
  out[#out + 1] = result
  if idem then k = k + 3 else k = k + 2 end
  a = a + 5
end
return out
