-- What echowin reported for one window: the sends it counts beyond those recorded here are
-- someone else's (external). ARGV and KEYS: proxy/state/redis/scripts.py (observe_args).
local used, span, requests, prefix = unpack(ARGV, 1, 4)
local sends, ext = KEYS[1], KEYS[2]

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lo = '(' .. string.format('%.6f', now - tonumber(span))
local c = redis.call('ZCOUNT', sends, lo, '+inf') + redis.call('ZCOUNT', ext, lo, '+inf')
local add = math.min(tonumber(used) - c, tonumber(requests))
for j = 1, add do
  redis.call('ZADD', ext, string.format('%.6f', now), prefix .. ':' .. j)
end
redis.call('ZREMRANGEBYSCORE', ext, '-inf', lo)
redis.call('PEXPIRE', ext, math.ceil(tonumber(span) * 1000))
return math.max(add, 0)
