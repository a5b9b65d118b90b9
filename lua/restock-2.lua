--[[
restock -- add a committed restock to a sale's Redis counters, at most once.

KEYS[1]  sale hash  <p>:{<sale>}:sale      (stock, available)
KEYS[2]  restocks   <p>:{<sale>}:restocks  set of applied restock ids
ARGV[1]  restock id (the PostgreSQL restocks row, an integer >= 1)
ARGV[2]  quantity (an integer >= 1)

Returns 1 applied, 0 already applied, -1 sale not in Redis (reconcile
rebuilds it from PostgreSQL, which already counts this restock).
Errors (nothing written): "ERR bad arguments", "ERR <field> of <key> is not
an integer", "ERR restocks key holds a <type>".

Guarantee: a restock row is applied to Redis exactly once however often the
front or the compensator retries it. Checks first, writes last: the id is
recorded only in the step that adds the quantity, never alone.
]]
-- @include "lib/checks.lua"

-- checks
local id, qty = int(ARGV[1]), int(ARGV[2])
if #ARGV ~= 2 or not id or id < 1 or not qty or qty < 1 then
  return redis.error_reply('ERR bad arguments')
end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local f = redis.call('HMGET', KEYS[1], 'stock', 'available')
local err = counter(KEYS[1], 'stock', f[1]) or counter(KEYS[1], 'available', f[2])
  or key_types({{KEYS[2], 'set', 'restocks'}})
if err then return err end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 0 end
-- writes
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'stock', qty)
redis.call('HINCRBY', KEYS[1], 'available', qty)
return 1
