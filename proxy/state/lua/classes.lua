-- Classes of service (after windows.lua): the reserve rule, the Lua twin of
-- proxy/budget/classes.py (ClassBook's reserve check). Its ARGV follow the windows', from
-- position `base` (built by proxy/state/redis/scripts.py, reserve_args): the class of the
-- send ('' or absent: no classes), the class of a member that names none, the number of
-- classes m, then per class its name and its reservation in each of the k windows. A send's
-- member ends in '|' .. its class.
-- Returns the seconds until, in every window, what is free exceeds the unused reservations
-- of the other classes (0: now): the send may go as far as the classes go.
local function class_wait(sends, ext, windows, now, k, base)
  local cls = ARGV[base]
  if cls == nil or cls == '' then return 0 end
  local default, m = ARGV[base + 1], tonumber(ARGV[base + 2])
  local held, any = {}, false
  for j = 0, m - 1 do
    local at = base + 3 + j * (k + 1)
    if ARGV[at] ~= cls then
      local r = {}
      for i = 1, k do
        r[i] = tonumber(ARGV[at + i])
        if r[i] > 0 then any = true end
      end
      held[ARGV[at]] = r
    end
  end
  if not any then return 0 end
  local wait = 0
  for i, w in ipairs(windows) do
    local others = 0
    for _, r in pairs(held) do others = others + r[i] end
    if others > 0 then
      local lo = '(' .. string.format('%.6f', now - w.span)
      local got = redis.call('ZRANGEBYSCORE', sends, lo, '+inf', 'WITHSCORES')
      local used = {}
      for j = 1, #got, 2 do
        local c = string.match(got[j], '|([^|]+)$') or default
        used[c] = (used[c] or 0) + 1
      end
      local unused = 0
      for name, r in pairs(held) do
        if r[i] > (used[name] or 0) then unused = unused + r[i] - (used[name] or 0) end
      end
      local counting = #got / 2 + redis.call('ZCOUNT', ext[i], lo, '+inf')
      if w.n - counting <= unused then
        -- look again when the oldest send counting here stops counting
        local oldest = now
        if #got > 0 then oldest = tonumber(got[2]) end
        local e = redis.call('ZRANGEBYSCORE', ext[i], lo, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
        if #e > 0 and tonumber(e[2]) < oldest then oldest = tonumber(e[2]) end
        local w_wait = math.max(oldest + w.span - now, 0.001)
        if w_wait > wait then wait = w_wait end
      end
    end
  end
  return wait
end
