--[[
room_admit -- one admission step of a sale's waiting room: drop the tickets not
polled in time, retire the passes that ran out, and admit the next live tickets
at the configured rate and within the stock.

KEYS[1]  sale hash      <p>:{<sale>}:sale           room, room_rate, room_pass_ms,
                                                    room_oversub, room_paused,
                                                    available, starts_ms, ends_ms
KEYS[2]  room hash      <p>:{<sale>}:room           tokens, last_ms, closed,
                                                    admitted_total, expired, first_ms,
                                                    measured
KEYS[3]  queue zset     <p>:{<sale>}:room:queue     ticket -> order score
KEYS[4]  tickets hash   <p>:{<sale>}:room:tickets   ticket -> "<state>\t<pass_exp_ms>\t<user>"
KEYS[5]  beats zset     <p>:{<sale>}:room:beats     ticket -> heartbeat deadline (ms)
KEYS[6]  admitted zset  <p>:{<sale>}:room:admitted  ticket -> pass expiry (ms), unused passes
KEYS[7]  used hash      <p>:{<sale>}:room:used      ticket -> order id (reserve_batch-8.lua)
KEYS[8]  log list       <p>:{<sale>}:room:log       "<ms>:<n>" per step that admitted, newest
                                                    first, capped at 256 entries
ARGV[1]  now_ms         the caller's clock (UTC ms)
ARGV[2]  batch_max      at most this many admissions in this call
ARGV[3]  sweep_max      at most this many dropped tickets and lapsed passes retired
ARGV[4]  window_ms      the measured rate counts the admissions of this last window

Rate: a token bucket kept in the room hash (tokens, last_ms): each call adds
(now_ms - last_ms) x rate / 1000 tokens, up to a burst of max(1, rate / 2)
(half a second's worth: an admitter step delayed by up to 500 ms loses nothing),
starting from 1 token, and admits at most floor(tokens). The bucket is in Redis, so any number of
admitters (two compensators) together admit at most the rate; a clock behind
last_ms adds nothing.
Stock: admits while the unused passes (admitted zset) stay below
floor(available x oversub). A closed room (room_close) reopens here as soon as
available > 0 (a restock, a release PostgreSQL had not finished).
No admission before starts_ms, after ends_ms, or while paused.

Returns {code, admitted, expired, available, closed, waiting}
  code 0 ok; -1 sale_not_found (hash missing); -2 the sale has no room.
Checks first, writes last: everything is read and computed before the first
write, and no write can fail.
Guarantee: a ticket is admitted once, only while its heartbeat is live; never
more than `rate` per second over any interval T (at most rate x T + burst) for the whole sale.
]]
local now_ms, batch_max = tonumber(ARGV[1]), tonumber(ARGV[2])
local sweep_max, window_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local f = redis.call('HMGET', KEYS[1], 'room', 'room_rate', 'room_pass_ms', 'room_oversub',
  'room_paused', 'available', 'starts_ms', 'ends_ms')
if f[1] ~= '1' then return {-2} end
local rate, pass_ms, oversub = tonumber(f[2]), tonumber(f[3]), tonumber(f[4])
local paused, available = f[5] == '1', tonumber(f[6]) or 0
local starts_ms, ends_ms = tonumber(f[7]) or 0, tonumber(f[8]) or 0
local r = redis.call('HMGET', KEYS[2], 'tokens', 'last_ms', 'closed', 'first_ms')
local tokens, last_ms = tonumber(r[1]), tonumber(r[2])
local reopen = r[3] == '1' and available > 0
local closed = r[3] == '1' and not reopen
local first_ms = tonumber(r[4])

-- checks and reads
local function parts(rec)
  local t1 = string.find(rec, '\t', 1, true)
  local t2 = string.find(rec, '\t', t1 + 1, true)
  return string.sub(rec, 1, t1 - 1), string.sub(rec, t2 + 1)
end
local dropped = redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', '(' .. now_ms, 'LIMIT', 0, sweep_max)
local dropped_users, is_dropped = {}, {}
for i, t in ipairs(dropped) do
  local rec = redis.call('HGET', KEYS[4], t)
  dropped_users[i] = rec and select(2, parts(rec)) or false
  is_dropped[t] = true
end
local lapsed = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now_ms, 'LIMIT', 0, sweep_max)
local lapsed_unused = 0
for _, t in ipairs(lapsed) do
  if redis.call('HEXISTS', KEYS[7], t) == 0 then lapsed_unused = lapsed_unused + 1 end
end
local outstanding = redis.call('ZCARD', KEYS[6]) - #lapsed
local waiting = redis.call('ZCARD', KEYS[3])

local burst = math.max(1, rate / 2)
if not tokens then tokens = 1 end
if not last_ms then last_ms = now_ms end
if now_ms > last_ms then
  tokens = math.min(burst, tokens + (now_ms - last_ms) * rate / 1000)
  last_ms = now_ms
end
local active = now_ms >= starts_ms and (ends_ms == 0 or now_ms < ends_ms) and not paused
local n = 0
if active and not closed then
  n = math.floor(tokens)
  local cap = math.floor(available * oversub) - outstanding
  if cap < n then n = cap end
  if batch_max < n then n = batch_max end
end
local admit, admit_users = {}, {}
if n > 0 then
  local cands = redis.call('ZRANGE', KEYS[3], 0, n + #dropped - 1)
  for _, t in ipairs(cands) do
    if #admit >= n then break end
    if not is_dropped[t] then
      local deadline = tonumber(redis.call('ZSCORE', KEYS[5], t) or '0')
      local rec = redis.call('HGET', KEYS[4], t)
      if deadline >= now_ms and rec then
        admit[#admit + 1] = t
        admit_users[#admit] = select(2, parts(rec))
      end
    end
  end
end
local log = redis.call('LRANGE', KEYS[8], 0, 255)

-- writes
for i, t in ipairs(dropped) do
  redis.call('ZREM', KEYS[3], t)
  redis.call('ZREM', KEYS[5], t)
  if dropped_users[i] then redis.call('HSET', KEYS[4], t, 'x\t0\t' .. dropped_users[i]) end
end
if #lapsed > 0 then redis.call('ZREM', KEYS[6], unpack(lapsed)) end
local exp_s = string.format('%d', now_ms + pass_ms)
for i, t in ipairs(admit) do
  redis.call('ZREM', KEYS[3], t)
  redis.call('ZREM', KEYS[5], t)
  redis.call('HSET', KEYS[4], t, 'a\t' .. exp_s .. '\t' .. admit_users[i])
  redis.call('ZADD', KEYS[6], now_ms + pass_ms, t)
end
local expired = #dropped + lapsed_unused
if expired > 0 then redis.call('HINCRBY', KEYS[2], 'expired', expired) end
local sum = 0
if #admit > 0 then
  redis.call('HINCRBY', KEYS[2], 'admitted_total', #admit)
  redis.call('LPUSH', KEYS[8], string.format('%d', now_ms) .. ':' .. #admit)
  redis.call('LTRIM', KEYS[8], 0, 255)
  if not first_ms then first_ms = now_ms; redis.call('HSET', KEYS[2], 'first_ms', now_ms) end
  sum = #admit
end
for _, e in ipairs(log) do
  local c = string.find(e, ':', 1, true)
  if tonumber(string.sub(e, 1, c - 1)) > now_ms - window_ms then
    sum = sum + tonumber(string.sub(e, c + 1))
  end
end
local span = window_ms
if first_ms and now_ms - first_ms < span then span = math.max(1000, now_ms - first_ms) end
redis.call('HSET', KEYS[2], 'tokens', string.format('%.6f', tokens - #admit),
  'last_ms', string.format('%d', last_ms), 'measured', string.format('%.3f', sum * 1000 / span))
if reopen then redis.call('HSET', KEYS[2], 'closed', '0') end
return {0, #admit, expired, available, closed and 1 or 0, waiting - #dropped - #admit}
