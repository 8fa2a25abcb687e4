-- No send for some seconds (an upstream 429), published to the other replicas.
-- ARGV and KEYS: proxy/state/redis/scripts.py (freeze_args).
local seconds, channel, replica = unpack(ARGV, 1, 3)
seconds = tonumber(seconds)
local frozen_key = KEYS[1]

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local untl = now + seconds
local held = tonumber(redis.call('GET', frozen_key) or '0')
if held < untl then
  redis.call('SET', frozen_key, string.format('%.6f', untl), 'PX', math.ceil(seconds * 1000))
else
  untl = held
end
-- Tell the replicas listening (proxy/state/redis/freezes.py): their waiters need not wait it out.
redis.call('PUBLISH', channel, replica .. ' ' .. string.format('%.6f', untl))
return 1
