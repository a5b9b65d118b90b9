--[[
release -- return held stock of one or more orders of ONE sale, each at most once.

KEYS[1]  sale hash   <p>:{<sale>}:sale    (available)
KEYS[2]  users hash  <p>:{<sale>}:users   user_id -> quantity held
KEYS[3]  holds hash  <p>:{<sale>}:holds   order_id -> "<qty>:<user_id>"
ARGV[1..n]  order ids (the compensator releases a batch per call; n >= 1)

Returns an array of n integers, one per order id, in order: the quantity
released, 0 when the order holds nothing (already released, never accepted,
or Redis was rebuilt from PostgreSQL after the release committed there), or
-1 for every order when the sale is missing in Redis (lost or being rebuilt):
nothing changes and the caller must retry after the rebuild.
Errors (nothing written): "ERR no order ids", "ERR malformed hold of <order_id>",
"ERR <field> of <key> is not an integer".

Guarantee: the hold entry is the guard; it is removed in the same atomic step
that adds the quantity back, so a release retried any number of times (a
compensator crash, two compensators, an order id twice in one call) returns
stock exactly once. Checks first, writes last: every hold, every held count
and `available` are read and validated before the first write.
]]
-- @include "lib/checks.lua"

if #ARGV == 0 then return redis.error_reply('ERR no order ids') end
local out = {}
if redis.call('EXISTS', KEYS[1]) == 0 then
  for i = 1, #ARGV do out[i] = -1 end
  return out
end
-- checks: read and parse every hold, every held count and `available`
local err = counter(KEYS[1], 'available', redis.call('HGET', KEYS[1], 'available'))
if err then return err end
local qtys, users, seen = {}, {}, {}
for i = 1, #ARGV do
  local held = (not seen[ARGV[i]]) and redis.call('HGET', KEYS[3], ARGV[i])
  seen[ARGV[i]] = true
  if held then
    qtys[i], users[i] = hold(held)
    if not qtys[i] then return redis.error_reply('ERR malformed hold of ' .. ARGV[i]) end
    err = counter(KEYS[2], users[i], redis.call('HGET', KEYS[2], users[i]))
    if err then return err end
  end
end
-- writes
local returned = 0
for i = 1, #ARGV do
  local qty = qtys[i]
  if qty then
    redis.call('HDEL', KEYS[3], ARGV[i])
    if redis.call('HINCRBY', KEYS[2], users[i], -qty) <= 0 then
      redis.call('HDEL', KEYS[2], users[i])
    end
    returned = returned + qty
    out[i] = qty
  else
    out[i] = 0
  end
end
if returned > 0 then
  redis.call('HINCRBY', KEYS[1], 'available', returned)
end
return out
