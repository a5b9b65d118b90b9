--[[
room_poll -- a buyer reads its ticket; for a waiting ticket this is the heartbeat.

KEYS[1]  sale hash      <p>:{<sale>}:sale           room, room_rate, room_pass_ms,
                                                    room_oversub, room_paused, available,
                                                    starts_ms
KEYS[2]  room hash      <p>:{<sale>}:room           closed, measured, expired
KEYS[3]  queue zset     <p>:{<sale>}:room:queue     ticket -> order score
KEYS[4]  tickets hash   <p>:{<sale>}:room:tickets   ticket -> "<state>\t<pass_exp_ms>\t<user>"
KEYS[5]  beats zset     <p>:{<sale>}:room:beats     ticket -> heartbeat deadline (ms)
KEYS[6]  used hash      <p>:{<sale>}:room:used      ticket -> order id (reserve_batch-8.lua)
KEYS[7]  admitted zset  <p>:{<sale>}:room:admitted  ticket -> pass expiry (ms), unused passes
ARGV[1]  now_ms         the front's clock (UTC ms)
ARGV[2]  ticket_id
ARGV[3]  user_id        the caller: a ticket of another buyer is "not found"

poll_after_ms grows with the position (1 s + 10 ms per ticket ahead), never past
half the time the position needs at the configured rate, a quarter of the pass
time, or 30 s; before the start, half the time to the start. A waiting ticket's
heartbeat deadline becomes now + max(3 x poll_after_ms, 30 s): past it the
ticket is dropped (here, or by room_admit) and never holds the inlet.

Returns {code, state, position, pass_exp_ms, poll_after_ms, rate, paused, closed,
         waiting, measured_x1000, outstanding, available, starts_ms, oversub}
  code 0 ok; -1 sale_not_found (hash missing); -2 no room; -3 no such ticket of
  this buyer (nothing written).
  state: waiting | admitted | used | sold_out | expired; position -1 when none
  (not waiting, or before the start).
Writes: a waiting ticket's heartbeat; a ticket found past its deadline is
dropped now (out of the queue and beats, state x, `expired` counted), so a late
poll never revives it.
]]
local now_ms, ticket, user = tonumber(ARGV[1]), ARGV[2], ARGV[3]
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local f = redis.call('HMGET', KEYS[1], 'room', 'room_rate', 'room_pass_ms', 'room_oversub',
  'room_paused', 'available', 'starts_ms')
if f[1] ~= '1' then return {-2} end
local rec = redis.call('HGET', KEYS[4], ticket)
if not rec then return {-3} end
local t1 = string.find(rec, '\t', 1, true)
local t2 = string.find(rec, '\t', t1 + 1, true)
if string.sub(rec, t2 + 1) ~= user then return {-3} end
local st = string.sub(rec, 1, t1 - 1)
local pass_exp = tonumber(string.sub(rec, t1 + 1, t2 - 1))
local rate, pass_ms = tonumber(f[2]), tonumber(f[3])
local paused, available, starts_ms = f[5] == '1', tonumber(f[6]) or 0, tonumber(f[7]) or 0
local r = redis.call('HMGET', KEYS[2], 'closed', 'measured')
local closed = r[1] == '1'
local waiting = redis.call('ZCARD', KEYS[3])
local outstanding = redis.call('ZCARD', KEYS[7])

local state, pos, poll_after = 'expired', -1, 30000
if st == 'a' then
  if redis.call('HEXISTS', KEYS[6], ticket) == 1 then
    state = 'used'
  elseif closed then
    state = 'sold_out'
  elseif pass_exp > now_ms then
    state, poll_after = 'admitted', 2000
  end
elseif st == 'w' then
  local deadline = tonumber(redis.call('ZSCORE', KEYS[5], ticket) or '0')
  if deadline < now_ms then
    -- dropped: not polled in time (writes below)
    redis.call('ZREM', KEYS[3], ticket)
    redis.call('ZREM', KEYS[5], ticket)
    redis.call('HSET', KEYS[4], ticket, 'x\t0\t' .. user)
    redis.call('HINCRBY', KEYS[2], 'expired', 1)
    waiting = waiting - 1
  else
    if closed then state = 'sold_out' else state = 'waiting' end
    if now_ms < starts_ms then
      poll_after = math.floor((starts_ms - now_ms) / 2)
    else
      pos = redis.call('ZRANK', KEYS[3], ticket) or 0
      poll_after = 1000 + 10 * pos
      local half_eta = math.floor(pos * 500 / rate)
      if half_eta < poll_after then poll_after = half_eta end
      if math.floor(pass_ms / 4) < poll_after then poll_after = math.floor(pass_ms / 4) end
    end
    if poll_after < 1000 then poll_after = 1000 end
    if poll_after > 30000 then poll_after = 30000 end
    local grace = 3 * poll_after
    if grace < 30000 then grace = 30000 end
    redis.call('ZADD', KEYS[5], now_ms + grace, ticket)
  end
end
local measured = math.floor((tonumber(r[2]) or 0) * 1000)
return {0, state, pos, pass_exp, poll_after, rate, paused and 1 or 0, closed and 1 or 0,
  waiting, measured, outstanding, available, starts_ms, f[4]}
