-- The shared view: Redis time, the freeze, the epoch, every send and the external sends of
-- each window. ARGV and KEYS: proxy/state/redis/scripts.py (snapshot_args, BudgetKeys.snapshot).
local horizon, new_epoch = unpack(ARGV, 1, 2)
horizon = tonumber(horizon)
local sends, frozen_key, epoch_key = KEYS[1], KEYS[2], KEYS[3]

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local lo = '(' .. string.format('%.6f', now - horizon)
-- The state's epoch, as the reservation script keeps it (a new one if Redis has none).
local epoch = redis.call('GET', epoch_key)
if not epoch then
  epoch = new_epoch
  redis.call('SET', epoch_key, epoch, 'PX', math.ceil(horizon * 1000))
end
local out = {string.format('%.6f', now), redis.call('GET', frozen_key) or '0', epoch,
  redis.call('ZRANGEBYSCORE', sends, lo, '+inf', 'WITHSCORES')}
for i = 4, #KEYS do
  out[#out + 1] = redis.call('ZRANGEBYSCORE', KEYS[i], lo, '+inf', 'WITHSCORES')
end
return out
