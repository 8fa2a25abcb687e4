-- One send's reservation (after windows.lua, which defines window_wait). ARGV and KEYS are
-- built by proxy/state/redis/scripts.py (reserve_args, BudgetKeys.reserve), whose docstrings
-- name each position.
local member, waiting, served, cursor, known_epoch, new_epoch, me, guard, horizon, grace, k =
  unpack(ARGV, 1, 11)
waiting, served, guard = waiting == '1', tonumber(served), tonumber(guard)
horizon, grace, k = tonumber(horizon), tonumber(grace), tonumber(k)
local windows = {}
for i = 1, k do
  windows[i] = {n = tonumber(ARGV[10 + 2 * i]), span = tonumber(ARGV[11 + 2 * i]) + guard}
end
local sends, frozen_key, line, epoch_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ext = {}
for i = 1, k do ext[i] = KEYS[4 + i] end

local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
-- The state's epoch: set by the first reservation a Redis sees. A replica that knew another
-- one is talking to a Redis that lost its data (restarted empty behind a client that
-- reconnected by itself): it must put back what it knows before anything is reserved.
local epoch = redis.call('GET', epoch_key)
if not epoch then
  epoch = new_epoch
  redis.call('SET', epoch_key, epoch)
end
redis.call('PEXPIRE', epoch_key, math.ceil(horizon * 1000))
if known_epoch ~= '' and known_epoch ~= epoch then
  return {-1, '0', string.format('%.6f', now), {}, epoch}
end
redis.call('ZREMRANGEBYSCORE', sends, '-inf', '(' .. string.format('%.6f', now - horizon))
local wait = 0
local frozen = tonumber(redis.call('GET', frozen_key) or '0')
if frozen > now then wait = frozen - now end
local window_w, free = window_wait(sends, ext, windows, now)
if window_w > wait then wait = window_w end
-- Classes of service (classes.lua): held back by the others' reservations, the send does
-- not go; the budget's own wait is what the replica is told (other classes may go now).
local class_w = class_wait(sends, ext, windows, now, k, 12 + 2 * k)
-- The line of replicas waiting for a free slot (proxy.budget.slots.Line): field = replica,
-- value = 'served due'. Each replica served before this one and about to try gets a
-- free slot first.
local mine = false
local ahead, first = 0, nil
local raw = redis.call('HGETALL', line)
for j = 1, #raw, 2 do
  local s, d = string.match(raw[j + 1], '^(%S+) (%S+)$')
  s, d = tonumber(s), tonumber(d)
  if raw[j] == me then
    mine = true
  elseif d < now - horizon then
    redis.call('HDEL', line, raw[j])
  elseif s < served and d >= now and d <= now + 2 * grace then
    ahead = ahead + 1
    if first == nil or d < first then first = d end
  end
end
local ok = 0
local retry = now + wait
if wait <= 0 and class_w <= 0 then
  if free > ahead then
    redis.call('ZADD', sends, string.format('%.6f', now), member)
    redis.call('PEXPIRE', sends, math.ceil(horizon * 1000))
    if mine then redis.call('HDEL', line, me) end
    ok = 1
  else
    -- theirs: look again when the first of them said it would try, or when it lapses
    if first - grace > now then retry = first - grace + 0.001 else retry = first end
    wait = retry - now
  end
end
if ok == 0 and waiting then
  redis.call('HSET', line, me, string.format('%.6f %.6f', served, retry + grace))
  redis.call('PEXPIRE', line, math.ceil(horizon * 1000))
end
-- Every send recorded after the caller's cursor (its own included): keeps its view fresh.
local fresh = redis.call('ZRANGEBYSCORE', sends, '(' .. cursor, '+inf', 'WITHSCORES', 'LIMIT', 0, 1000)
return {ok, string.format('%.6f', math.max(wait, 0)), string.format('%.6f', now), fresh, epoch,
  string.format('%.6f', frozen)}
