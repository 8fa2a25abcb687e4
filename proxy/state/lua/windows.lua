-- The window rule, the Lua twin of proxy/budget/windows.py (the reference; the property test
-- tests/state/redis/test_lua_windows.py feeds both the same sends). A send recorded at Redis
-- time s counts in window i while s > now - span (span = its seconds plus the guard).
-- windows[i] = {n = requests, span = seconds}; ext[i] = the key of window i's external sends.
-- Returns the seconds until one more send fits every window (0 if it fits now) and the
-- fewest free slots over the windows.
local function window_wait(sends, ext, windows, now)
  local wait, free = 0, math.huge
  for i, w in ipairs(windows) do
    local lo = '(' .. string.format('%.6f', now - w.span)
    local c = redis.call('ZCOUNT', sends, lo, '+inf') + redis.call('ZCOUNT', ext[i], lo, '+inf')
    if w.n - c < free then free = w.n - c end
    if c >= w.n then
      -- the (c - n + 1)-th oldest send counting must stop counting first
      local m = c - w.n + 1
      local scores = {}
      for _, key in ipairs({sends, ext[i]}) do
        local got = redis.call('ZRANGEBYSCORE', key, lo, '+inf', 'WITHSCORES', 'LIMIT', 0, m)
        for j = 2, #got, 2 do scores[#scores + 1] = tonumber(got[j]) end
      end
      table.sort(scores)
      local w_wait = scores[m] + w.span - now
      if w_wait > wait then wait = w_wait end
    end
  end
  return wait, free
end
