--[[
room_join -- a buyer takes a ticket in a sale's waiting room (one per buyer).

KEYS[1]  sale hash     <p>:{<sale>}:sale          room, starts_ms, ends_ms
KEYS[2]  room hash     <p>:{<sale>}:room          seq (arrival counter), closed
KEYS[3]  queue zset    <p>:{<sale>}:room:queue    ticket -> order score (waiting tickets)
KEYS[4]  tickets hash  <p>:{<sale>}:room:tickets  ticket -> "<state>\t<pass_exp_ms>\t<user>"
KEYS[5]  buyers hash   <p>:{<sale>}:room:buyers   user -> ticket
KEYS[6]  beats zset    <p>:{<sale>}:room:beats    ticket -> heartbeat deadline (ms)
ARGV[1]  now_ms        the front's clock (UTC ms)
ARGV[2]  user_id
ARGV[3]  ticket_id     a new id made by the caller (used only if a ticket is created)
ARGV[4]  draw          an integer 0 .. 2^53-1 from the caller's CSPRNG (the lottery)
ARGV[5]  tickets_max   the room's cap of tickets
ARGV[6]  grace_ms      the first heartbeat deadline is now_ms + grace_ms

Order score: a ticket taken before starts_ms scores draw / 2^53, in [0, 1): the
tickets taken before the start are in a uniformly random order (independent
uniform draws make every permutation equally likely), whatever their arrival.
A ticket taken later scores 1 + seq (its arrival number): FIFO, behind them.

Returns {code, ticket_id}:
   0  created          ticket_id = ARGV[3]
   1  existing         ticket_id = the buyer's ticket (whatever its state); nothing written
  -1  sale_not_found   (the sale hash is missing: unknown sale, or being rebuilt)
  -2  waiting_room_off the sale has no waiting room
  -3  sold_out         the room is closed (available 0, no hold can come back)
  -4  sale_not_active  the sale has ended
  -5  overloaded       the room holds tickets_max tickets
Precedence: -1 > -2 > existing > -3 > -4 > -5. Checks first, writes last.

Guarantee: one ticket per buyer and sale; at most tickets_max tickets.
]]
local now_ms, user, ticket = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local draw, tickets_max, grace_ms = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, ''} end
local f = redis.call('HMGET', KEYS[1], 'room', 'starts_ms', 'ends_ms')
if f[1] ~= '1' then return {-2, ''} end
local existing = redis.call('HGET', KEYS[5], user)
if existing then return {1, existing} end
local r = redis.call('HMGET', KEYS[2], 'closed', 'seq')
if r[1] == '1' then return {-3, ''} end
local starts_ms, ends_ms = tonumber(f[2]) or 0, tonumber(f[3]) or 0
if ends_ms ~= 0 and now_ms >= ends_ms then return {-4, ''} end
if redis.call('HLEN', KEYS[4]) >= tickets_max then return {-5, ''} end
local score
if now_ms < starts_ms then
  score = draw / 9007199254740992  -- 2^53: exact in a double
else
  score = 1 + (tonumber(r[2]) or 0) + 1
end
-- writes
if now_ms >= starts_ms then redis.call('HINCRBY', KEYS[2], 'seq', 1) end
redis.call('ZADD', KEYS[3], score, ticket)
redis.call('HSET', KEYS[4], ticket, 'w\t0\t' .. user)
redis.call('HSET', KEYS[5], user, ticket)
redis.call('ZADD', KEYS[6], now_ms + grace_ms, ticket)
return {0, ticket}
