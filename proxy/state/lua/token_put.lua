-- Insert a token: its hash and its place in the index, unless the id exists.
-- KEYS[1] the token's hash, KEYS[2] the id index; ARGV[1] score (created_at), ARGV[2] id,
-- ARGV[3..] field/value pairs (proxy/state/redis/tokens.py: RedisTokenStore.put).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
