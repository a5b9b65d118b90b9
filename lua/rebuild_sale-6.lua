--[[
rebuild_sale -- recreate a sale's Redis counters from PostgreSQL plus what
Redis still holds, after Redis lost the sale (restart without data,
eviction), after `reconcile --repair` removed the sale hash to freeze it, or
after Redis lost writes PostgreSQL has (a restart that lost its last second:
the stream was last generated below the last entry PostgreSQL persisted).
Runs only while the sale hash is absent (reservations answer "unavailable"
meanwhile, and no other script recreates the hash) or while the stream is
behind the watermark.

KEYS[1]  sale hash     <p>:{<sale>}:sale
KEYS[2]  users hash    <p>:{<sale>}:users
KEYS[3]  holds hash    <p>:{<sale>}:holds
KEYS[4]  pending hash  <p>:{<sale>}:pending   (read: orders still to persist)
KEYS[5]  stream        <p>:{<sale>}:stream
KEYS[6]  restocks      <p>:{<sale>}:restocks
ARGV[1..7]  stock, limit, price, starts_ms, ends_ms, hold_ms, consumer group
ARGV[8]     watermark "<ms>-<seq>": the last stream entry id PostgreSQL persisted
ARGV[9]     n: number of PostgreSQL holds that follow
ARGV[10 .. 9+3n]  triples order_id, qty, user_id: orders PostgreSQL has holding
                  stock (awaiting_payment, paid, shipped)
ARGV[10+3n]       m: number of released order ids that follow
ARGV[11+3n .. 10+3n+m]  orders PostgreSQL has released that Redis still holds
ARGV[11+3n+m ..]  restock ids already counted in `stock`

Holds = PostgreSQL's holds, plus every hold Redis still has that PostgreSQL
has not released (pending orders, or orders persisted after the snapshot).
A hold counted here whose release is still under way is returned later by
the release outbox (the release script finds it and adds it back), so the
only possible error is transient under-selling, never overselling.

The stream's last id is raised to the watermark (XSETID) when it was behind,
so new entries sort after every persisted one and the sale is not found
behind again.

Returns 1 rebuilt (the hash was missing), 2 rebuilt over a sale whose stream
was behind the watermark, 0 the sale hash exists and its stream is not
behind (nothing changed).
Errors (nothing written): "ERR bad arguments", "ERR bad hold at argument <i>",
"ERR malformed hold of <order_id>", "ERR malformed pending record of <order_id>",
"ERR <what> key holds a <type>", "rebuild_sale: holds exceed stock".

Guarantee: checks first, writes last. Every argument, every hold and pending
record Redis has, the key types and the group's existence (XINFO GROUPS) are
checked before the first write, so a refused rebuild changes nothing.
]]
-- @include "lib/checks.lua"
-- @include "lib/stream.lua"

-- checks: arguments
local stock, limit, price = int(ARGV[1]), int(ARGV[2]), int(ARGV[3])
local starts_ms, ends_ms, hold_ms = int(ARGV[4]), int(ARGV[5]), int(ARGV[6])
local group = ARGV[7]
local wm_ms, wm_seq = string.match(ARGV[8] or '', '^(%d+)%-(%d+)$')
wm_ms, wm_seq = int(wm_ms), int(wm_seq)
local n = int(ARGV[9])
if not (stock and stock >= 0 and limit and limit >= 1 and price and price >= 0
    and starts_ms and starts_ms >= 0 and ends_ms and ends_ms >= 0 and hold_ms and hold_ms >= 1
    and group and group ~= '' and wm_ms and wm_seq and n and n >= 0
    and #ARGV >= 10 + 3 * n) then
  return redis.error_reply('ERR bad arguments')
end
local holds, order = {}, {}
for i = 0, n - 1 do
  local b = 10 + 3 * i
  local oid, qty, user = ARGV[b], int(ARGV[b + 1]), ARGV[b + 2]
  if oid == '' or not qty or qty < 1 or user == '' then
    return redis.error_reply('ERR bad hold at argument ' .. b)
  end
  if not holds[oid] then order[#order + 1] = oid end
  holds[oid] = {qty, user}
end
local m_at = 10 + 3 * n
local m = int(ARGV[m_at])
if not m or m < 0 or #ARGV < m_at + m then return redis.error_reply('ERR bad arguments') end
local released = {}
for i = m_at + 1, m_at + m do released[ARGV[i]] = true end
for i = m_at + m + 1, #ARGV do
  if ARGV[i] == '' then return redis.error_reply('ERR bad arguments') end
end
-- checks: the keys
local err = key_types({{KEYS[1], 'hash', 'sale'}, {KEYS[2], 'hash', 'users'},
                       {KEYS[3], 'hash', 'holds'}, {KEYS[4], 'hash', 'pending'},
                       {KEYS[5], 'stream', 'stream'}, {KEYS[6], 'set', 'restocks'}})
if err then return err end
local has_group, last_ms, last_seq = group_exists(KEYS[5], group), 0, 0
if redis.call('EXISTS', KEYS[5]) == 1 then
  local info = redis.call('XINFO', 'STREAM', KEYS[5])
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then
      local ms, seq = string.match(info[j + 1], '^(%d+)%-(%d+)$')
      last_ms, last_seq = tonumber(ms), tonumber(seq)
    end
  end
end
local behind = last_ms < wm_ms or (last_ms == wm_ms and last_seq < wm_seq)
local existed = redis.call('EXISTS', KEYS[1]) == 1
if existed and not behind then return 0 end
-- checks: what Redis still holds, and its pending orders
local redis_holds = redis.call('HGETALL', KEYS[3])
for i = 1, #redis_holds, 2 do
  local oid = redis_holds[i]
  local qty, user = hold(redis_holds[i + 1])
  if not qty then return redis.error_reply('ERR malformed hold of ' .. oid) end
  if not holds[oid] and not released[oid] then
    holds[oid] = {qty, user}
    order[#order + 1] = oid
  end
end
local held = 0
for _, oid in ipairs(order) do held = held + holds[oid][1] end
local available = stock - held
if available < 0 then
  return redis.error_reply('rebuild_sale: holds exceed stock')
end
local pending = 0
local pend = redis.call('HGETALL', KEYS[4])
for i = 1, #pend, 2 do
  local v = pend[i + 1]
  local t1 = string.find(v, '\t', 1, true)
  local t2 = t1 and string.find(v, '\t', t1 + 1, true)
  local qty = t2 and int(string.sub(v, t1 + 1, t2 - 1))
  if not qty or qty < 1 then
    return redis.error_reply('ERR malformed pending record of ' .. pend[i])
  end
  pending = pending + qty
end

-- writes
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
for _, oid in ipairs(order) do
  local h = holds[oid]
  redis.call('HSET', KEYS[3], oid, h[1] .. ':' .. h[2])
  redis.call('HINCRBY', KEYS[2], h[2], h[1])
end
for i = m_at + m + 1, #ARGV do
  redis.call('SADD', KEYS[6], ARGV[i])
end
redis.call('HSET', KEYS[1], 'stock', ARGV[1], 'available', available, 'pending', pending,
  'limit', ARGV[2], 'price', ARGV[3], 'starts_ms', ARGV[4], 'ends_ms', ARGV[5], 'hold_ms', ARGV[6])
if not has_group then
  redis.call('XGROUP', 'CREATE', KEYS[5], group, '0', 'MKSTREAM')
end
if behind then
  redis.call('XSETID', KEYS[5], ARGV[8])
end
if existed then return 2 end
return 1
