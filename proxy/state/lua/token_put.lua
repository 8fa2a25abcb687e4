-- Insert a token: its hash, its place in the index and in its name's index, unless the id
-- exists. KEYS[1] the token's hash, KEYS[2] the id index, KEYS[3] the name's index (hash:
-- id -> created_at), KEYS[4] how many ids the name indexes hold; ARGV[1] score
-- (created_at), ARGV[2] id, ARGV[3..] field/value pairs (proxy/state/redis/tokens.py:
-- RedisTokenStore.put). The count follows the id index only while every id is in a name
-- index: a token put by a gateway older than the name indexes leaves it behind for good,
-- and the store then rebuilds them (RedisTokenStore.by_name).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local indexed = tonumber(redis.call('GET', KEYS[4]) or '0')
local complete = indexed == redis.call('ZCOUNT', KEYS[2], '-inf', '+inf')
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
if complete then redis.call('SET', KEYS[4], indexed + 1) end
return 1
