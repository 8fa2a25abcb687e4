-- Revoke a token, keeping the first revocation time; false for an unknown id.
-- KEYS[1] the token's hash; ARGV[1] the revocation time.
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1])
return redis.call('HGETALL', KEYS[1])
