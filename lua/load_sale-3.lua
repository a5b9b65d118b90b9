--[[
load_sale -- put a new sale into Redis, once.

KEYS[1]  sale hash  <p>:{<sale>}:sale
KEYS[2]  stream     <p>:{<sale>}:stream
KEYS[3]  restocks   <p>:{<sale>}:restocks  (set of applied restock ids; not written here)
ARGV     stock (>= 0), limit (>= 1), price (>= 0), starts_ms (>= 0),
         ends_ms (0 = none), hold_ms (>= 1), group (non-empty),
         then, for a sale with a waiting room (flashsale/room/), four more:
         room_rate (1..100000), room_pass_ms (>= 10000), room_oversub (1..10),
         room_paused ("0"/"1"), written with the counters (room = "1") so that
         no reservation ever sees the sale without its room

Returns 1 when loaded, 0 when the sale was already there (nothing changed).
Errors (nothing written): "ERR bad arguments", "ERR stream key holds a <type>".

Guarantee: never overwrites a live sale's counters; the stream's consumer
group exists from the first entry on (created at id 0, so nothing added
before a consumer starts is missed). Checks first, writes last: the
arguments are validated and the group looked up (XINFO GROUPS) before the
first write, so no error can leave a sale without its group.
]]
-- @include "lib/checks.lua"
-- @include "lib/stream.lua"

-- checks
local stock, limit, price = int(ARGV[1]), int(ARGV[2]), int(ARGV[3])
local starts_ms, ends_ms, hold_ms = int(ARGV[4]), int(ARGV[5]), int(ARGV[6])
local room = #ARGV == 11
if room and not (int(ARGV[8]) and int(ARGV[9]) and tonumber(ARGV[10])
    and (ARGV[11] == '0' or ARGV[11] == '1')) then
  return redis.error_reply('ERR bad arguments')
end
if (#ARGV ~= 7 and not room) or not (stock and stock >= 0 and limit and limit >= 1 and price and price >= 0
    and starts_ms and starts_ms >= 0 and ends_ms and ends_ms >= 0 and hold_ms and hold_ms >= 1)
    or ARGV[7] == '' then
  return redis.error_reply('ERR bad arguments')
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local err = key_types({{KEYS[2], 'stream', 'stream'}})
if err then return err end
local has_group = group_exists(KEYS[2], ARGV[7])

-- writes
redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'available', ARGV[1], 'pending', 0,
  'limit', ARGV[2], 'price', ARGV[3], 'starts_ms', ARGV[4], 'ends_ms', ARGV[5], 'hold_ms', ARGV[6])
if room then
  redis.call('HSET', KEYS[1], 'room', '1', 'room_rate', ARGV[8], 'room_pass_ms', ARGV[9],
    'room_oversub', ARGV[10], 'room_paused', ARGV[11])
end
if not has_group then
  redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[7], '0', 'MKSTREAM')
end
return 1
