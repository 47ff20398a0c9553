local max = '+'
if ARGV[2] ~= '' then max = '(' .. ARGV[2] .. '\255' end
local names = redis.call('ZRANGEBYLEX', KEYS[1], ARGV[1], max, 'LIMIT', 0, tonumber(ARGV[3]))
if #names == 0 then return {} end
local counts = redis.call('HMGET', KEYS[2], unpack(names))
local out = {}
for i, c in ipairs(names) do
  out[#out + 1] = c
  out[#out + 1] = counts[i] or '0'
end
return out
