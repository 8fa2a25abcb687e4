-- Classes of service (after windows.lua): the class rules, the Lua twin of
-- proxy/budget/classes.py (ClassBook.wait: reserve and pace). Its ARGV follow the windows',
-- from position `base` (built by proxy/state/redis/scripts.py, class_args): the class of the
-- send ('' or absent: no classes), the class of a member that names none, the number of
-- classes m, then per class its name and its reservation in each of the k windows; then 1 if
-- the send's class is paced, followed by each window's bucket size and refill per second, or
-- 0. A send's member ends in '|' .. its class.
-- Returns the seconds until the send may go as far as the classes go (0: now).

-- Reserve: what is free in window w must exceed the others' unused reservations there.
local function reserve_wait(got, ext_key, w, now, held, default)
  local used = {}
  for j = 1, #got, 2 do
    local c = string.match(got[j], '|([^|]+)$') or default
    used[c] = (used[c] or 0) + 1
  end
  local unused = 0
  for name, r in pairs(held) do
    if r > (used[name] or 0) then unused = unused + r - (used[name] or 0) end
  end
  local lo = '(' .. string.format('%.6f', now - w.span)
  local counting = #got / 2 + redis.call('ZCOUNT', ext_key, lo, '+inf')
  if w.n - counting > unused then return 0 end
  -- look again when the oldest send counting here stops counting
  local oldest = now
  if #got > 0 then oldest = tonumber(got[2]) end
  local e = redis.call('ZRANGEBYSCORE', ext_key, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
  if #e > 0 and tonumber(e[2]) < oldest then oldest = tonumber(e[2]) end
  return math.max(oldest + w.span - now, 0.001)
end

-- Pace: the class's bucket (size, rate), replayed over its sends Redis keeps (oldest first).
local function pace_wait(all, cls, default, size, rate, now)
  local level, last = size, nil
  for j = 1, #all, 2 do
    if (string.match(all[j], '|([^|]+)$') or default) == cls then
      local s = tonumber(all[j + 1])
      if last ~= nil and s > last then level = math.min(size, level + rate * (s - last)) end
      if last == nil or s > last then last = s end
      level = level - 1
    end
  end
  if last ~= nil and now > last then level = math.min(size, level + rate * (now - last)) end
  if level >= 1 then return 0 end
  return (1 - level) / rate
end

local function class_wait(sends, ext, windows, now, k, base)
  local cls = ARGV[base]
  if cls == nil or cls == '' then return 0 end
  local default, m = ARGV[base + 1], tonumber(ARGV[base + 2])
  local wait = 0
  for i, w in ipairs(windows) do
    local held, others = {}, 0
    for j = 0, m - 1 do
      local at = base + 3 + j * (k + 1)
      local r = tonumber(ARGV[at + i])
      if ARGV[at] ~= cls and r > 0 then
        held[ARGV[at]] = r
        others = others + r
      end
    end
    if others > 0 then
      local lo = '(' .. string.format('%.6f', now - w.span)
      local got = redis.call('ZRANGEBYSCORE', sends, lo, '+inf', 'WITHSCORES')
      wait = math.max(wait, reserve_wait(got, ext[i], w, now, held, default))
    end
  end
  local p = base + 3 + m * (k + 1)
  if ARGV[p] == '1' then
    local all = redis.call('ZRANGEBYSCORE', sends, '-inf', '+inf', 'WITHSCORES')
    for i = 1, k do
      local size, rate = tonumber(ARGV[p - 1 + 2 * i]), tonumber(ARGV[p + 2 * i])
      wait = math.max(wait, pace_wait(all, cls, default, size, rate, now))
    end
  end
  return wait
end
