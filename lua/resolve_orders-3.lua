--[[
resolve_orders -- after a reserve_batch reply was lost: which of its order ids
were reserved; the others are voided, so they are never reserved afterwards.

The front makes the order ids before it calls reserve_batch. When the call
fails after it was sent (timeout, broken connection), the script may have run
or may still run (the request can sit in a socket buffer). This script decides
it, atomically, for each order id of the batch:
  reserved  -- its hold is in the holds hash (holds is the truth while the order
               holds stock; the pending entry may be gone: persisted and acked)
  void      -- no hold: recorded in the void set, which reserve_batch checks
               before anything else, so a late copy of the request reserves
               nothing. The front can then truthfully answer "nothing reserved".

KEYS[1]  sale hash   <p>:{<sale>}:sale    price, hold_ms
KEYS[2]  holds hash  <p>:{<sale>}:holds   order_id -> "<qty>:<user_id>"
KEYS[3]  void zset   <p>:{<sale>}:void    order_id -> ms it was voided
ARGV[1]  now_ms      the failed batch's now_ms (the same ARGV[1] reserve_batch got)
ARGV[2]  keep_ms     how long a void is kept; older ones are trimmed by this call
ARGV[3..] order ids (n >= 1)

Returns a flat array, two entries per order id, in order:
   0  reserved   detail = "<order_id>\t<qty>\t<amount>\t<expires_ms>", exactly
                 reserve_batch's acceptance (amount = price * qty, expires =
                 now_ms + hold_ms, as the batch computed them)
  -6  void       detail = "" (not reserved, and now never will be)
  -1  sale missing (Redis lost it or it is being rebuilt): for every order id;
                 nothing written, the outcome stays unknown
Error (nothing written): "ERR malformed hold of <order_id>".

Guarantee: one atomic step per call, so an order id is either reserved before
it or void after it -- never reserved after an answer of void.
]]
-- @include "lib/checks.lua"
-- @include "lib/replies.lua"

if redis.call('EXISTS', KEYS[1]) == 0 then return sale_missing(#ARGV - 2) end
local out = {}
local now_ms = tonumber(ARGV[1])
local keep_ms = tonumber(ARGV[2])
local f = redis.call('HMGET', KEYS[1], 'price', 'hold_ms')
local price, hold_ms = tonumber(f[1]), tonumber(f[2])
-- checks: read and parse every hold before the first write
local qtys = {}
for i = 3, #ARGV do
  local held = redis.call('HGET', KEYS[2], ARGV[i])
  if held then
    qtys[i] = hold(held)
    if not qtys[i] then return redis.error_reply('ERR malformed hold of ' .. ARGV[i]) end
  end
end
-- writes
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%d', now_ms - keep_ms))
for i = 3, #ARGV do
  local qty = qtys[i]
  if qty then
    out[#out + 1] = 0
    out[#out + 1] = ARGV[i] .. '\t' .. qty .. '\t' .. string.format('%d', price * qty) .. '\t'
      .. string.format('%d', now_ms + hold_ms)
  else
    redis.call('ZADD', KEYS[3], 'NX', now_ms, ARGV[i])
    out[#out + 1] = -6
    out[#out + 1] = ''
  end
end
return out
