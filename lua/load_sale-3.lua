--[[
load_sale -- put a new sale into Redis, once.

KEYS[1]  sale hash  <p>:{<sale>}:sale
KEYS[2]  stream     <p>:{<sale>}:stream
KEYS[3]  restocks   <p>:{<sale>}:restocks  (set of applied restock ids)
ARGV     stock, limit, price, starts_ms, ends_ms (0 = none), hold_ms, group

Returns 1 when loaded, 0 when the sale was already there (nothing changed).

Guarantee: never overwrites a live sale's counters; the stream's consumer
group exists from the first entry on (created at id 0, so nothing added
before a consumer starts is missed).
]]
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'available', ARGV[1], 'pending', 0,
  'limit', ARGV[2], 'price', ARGV[3], 'starts_ms', ARGV[4], 'ends_ms', ARGV[5], 'hold_ms', ARGV[6])
local ok = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[7], '0', 'MKSTREAM')
if type(ok) == 'table' and ok.err and not string.find(ok.err, 'BUSYGROUP', 1, true) then
  return redis.error_reply(ok.err)
end
return 1
