--[[
restock -- add a committed restock to a sale's Redis counters, at most once.

KEYS[1]  sale hash  <p>:{<sale>}:sale      (stock, available)
KEYS[2]  restocks   <p>:{<sale>}:restocks  set of applied restock ids
ARGV[1]  restock id (the PostgreSQL restocks row)
ARGV[2]  quantity

Returns 1 applied, 0 already applied, -1 sale not in Redis (reconcile
rebuilds it from PostgreSQL, which already counts this restock).

Guarantee: a restock row is applied to Redis exactly once however often the
front or the compensator retries it.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'stock', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'available', ARGV[2])
return 1
