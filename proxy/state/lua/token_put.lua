-- Insert a token: its hash, its place in the index and in its name's index, unless the id
-- exists or, when ARGV[3] holds a time, a token of its name is active then.
-- KEYS[1] the token's hash, KEYS[2] the id index, KEYS[3] the name's index (hash:
-- id -> created_at), KEYS[4] how many ids the name indexes hold, KEYS[5..] the hashes of
-- the tokens of that name as the caller read KEYS[3]; ARGV[1] score (created_at), ARGV[2]
-- id, ARGV[3] the time of the name check ('' for none), ARGV[4..] field/value pairs
-- (proxy/state/redis/tokens.py: RedisTokenStore.put and put_unique_name).
-- Returns 1 (stored), 0 (the id exists), -1 (the name's index is not what the caller read,
-- or misses tokens: read it again) or the id of an active token of that name.
-- The count follows the id index only while every id is in a name index: a token put by
-- a gateway older than the name indexes leaves it behind for good, and the store then
-- rebuilds them (RedisTokenStore._named_ids).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local indexed = tonumber(redis.call('GET', KEYS[4]) or '0')
local complete = indexed == redis.call('ZCOUNT', KEYS[2], '-inf', '+inf')
if ARGV[3] ~= '' then
  -- A name's index only grows: as many ids as the caller read means the same ids.
  if not complete or #redis.call('HGETALL', KEYS[3]) ~= 2 * (#KEYS - 4) then return -1 end
  local now = tonumber(ARGV[3])
  for i = 5, #KEYS do
    local flat, f = redis.call('HGETALL', KEYS[i]), {}
    for j = 1, #flat, 2 do f[flat[j]] = flat[j + 1] end
    if f.id and not f.revoked_at and (not f.expires_at or tonumber(f.expires_at) > now) then
      return f.id
    end
  end
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
if complete then redis.call('SET', KEYS[4], indexed + 1) end
return 1
