--[[
release -- return one order's held stock to the sale, at most once.

KEYS[1]  sale hash   <p>:{<sale>}:sale    (available)
KEYS[2]  users hash  <p>:{<sale>}:users   user_id -> quantity held
KEYS[3]  holds hash  <p>:{<sale>}:holds   order_id -> "<qty>:<user_id>"
ARGV[1]  order_id

Returns the quantity released, 0 when the order holds nothing (already
released, never accepted, or Redis was rebuilt from PostgreSQL after the
release committed there), or -1 when the sale is missing in Redis (lost or
being rebuilt): nothing changes and the caller must retry after the rebuild.

Guarantee: the hold entry is the guard; it is removed in the same atomic step
that adds the quantity back, so a release retried any number of times (a
compensator crash, two compensators) returns stock exactly once.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local hold = redis.call('HGET', KEYS[3], ARGV[1])
if not hold then return 0 end
local sep = string.find(hold, ':', 1, true)
local qty = tonumber(string.sub(hold, 1, sep - 1))
local user = string.sub(hold, sep + 1)
-- writes
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'available', qty)
if redis.call('HINCRBY', KEYS[2], user, -qty) <= 0 then
  redis.call('HDEL', KEYS[2], user)
end
return qty
