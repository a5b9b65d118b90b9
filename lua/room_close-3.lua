--[[
room_close -- close a sale's waiting room: every waiting (or admitted, unused)
ticket reads sold_out, and no ticket is taken any more.

The caller (flashsale/room/admitter.py) has seen, in this order:
  T0  in Redis: available = 0, pending = 0, the stream's last generated id L;
  T1  in PostgreSQL: no order awaiting_payment and no release unfinished in Redis.
This script (T2) closes only if available = 0, pending = 0 and the stream's last
generated id is still L. Then no hold can come back: no reservation was accepted
since T0 (L unchanged), every order accepted before T0 was persisted before T0
(pending 0 then), so PostgreSQL at T1 saw every order that could still expire or
be cancelled, and found none. Paid orders do not come back (a refused shipment's
release makes available > 0 and room_admit reopens the room).

KEYS[1]  sale hash  <p>:{<sale>}:sale     room, available, pending
KEYS[2]  room hash  <p>:{<sale>}:room     closed, closed_ms (written)
KEYS[3]  stream     <p>:{<sale>}:stream   (XINFO STREAM: last-generated-id)
ARGV[1]  seen_last_id  L, "" when the stream did not exist
ARGV[2]  now_ms

Returns 1 closed now, 0 not closed (a condition no longer holds), 2 closed already,
-1 sale_not_found, -2 no room. Checks first, writes last.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local f = redis.call('HMGET', KEYS[1], 'room', 'available', 'pending')
if f[1] ~= '1' then return -2 end
if redis.call('HGET', KEYS[2], 'closed') == '1' then return 2 end
if tonumber(f[2]) ~= 0 or (tonumber(f[3]) or 0) ~= 0 then return 0 end
local last = ''
if redis.call('EXISTS', KEYS[3]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[3])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then last = info[i + 1] end
  end
end
if last ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], 'closed', '1', 'closed_ms', ARGV[2])
return 1
