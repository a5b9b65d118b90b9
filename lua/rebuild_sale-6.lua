--[[
rebuild_sale -- recreate a sale's Redis counters from PostgreSQL plus what
Redis still holds, after Redis lost the sale (restart without data,
eviction) or after `reconcile --repair` removed the sale hash to freeze it.
Runs only while the sale hash is absent: reservations answer "unavailable"
meanwhile, and no other script recreates the hash.

KEYS[1]  sale hash     <p>:{<sale>}:sale
KEYS[2]  users hash    <p>:{<sale>}:users
KEYS[3]  holds hash    <p>:{<sale>}:holds
KEYS[4]  pending hash  <p>:{<sale>}:pending   (read: orders still to persist)
KEYS[5]  stream        <p>:{<sale>}:stream
KEYS[6]  restocks      <p>:{<sale>}:restocks
ARGV[1..7]  stock, limit, price, starts_ms, ends_ms, hold_ms, consumer group
ARGV[8]     n: number of PostgreSQL holds that follow
ARGV[9 .. 8+3n]   triples order_id, qty, user_id: orders PostgreSQL has holding
                  stock (awaiting_payment, paid, shipped)
ARGV[9+3n]        m: number of released order ids that follow
ARGV[10+3n .. 9+3n+m]  orders PostgreSQL has released that Redis still holds
ARGV[10+3n+m ..]  restock ids already counted in `stock`

Holds = PostgreSQL's holds, plus every hold Redis still has that PostgreSQL
has not released (pending orders, or orders persisted after the snapshot).
A hold counted here whose release is still under way is returned later by
the release outbox (the release script finds it and adds it back), so the
only possible error is transient under-selling, never overselling.

Returns 1 rebuilt, 0 the sale hash exists (nothing changed).
]]
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local stock = tonumber(ARGV[1])
local n = tonumber(ARGV[8])
local holds = {}
local order = {}
for i = 0, n - 1 do
  local b = 9 + 3 * i
  if not holds[ARGV[b]] then order[#order + 1] = ARGV[b] end
  holds[ARGV[b]] = {tonumber(ARGV[b + 1]), ARGV[b + 2]}
end
local m_at = 9 + 3 * n
local m = tonumber(ARGV[m_at])
local released = {}
for i = m_at + 1, m_at + m do released[ARGV[i]] = true end
local redis_holds = redis.call('HGETALL', KEYS[3])
for i = 1, #redis_holds, 2 do
  local oid = redis_holds[i]
  if not holds[oid] and not released[oid] then
    local v = redis_holds[i + 1]
    local sep = string.find(v, ':', 1, true)
    holds[oid] = {tonumber(string.sub(v, 1, sep - 1)), string.sub(v, sep + 1)}
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
local pend = redis.call('HVALS', KEYS[4])
for _, v in ipairs(pend) do
  local t1 = string.find(v, '\t', 1, true)
  local t2 = string.find(v, '\t', t1 + 1, true)
  pending = pending + tonumber(string.sub(v, t1 + 1, t2 - 1))
end
-- writes
redis.call('DEL', KEYS[2], KEYS[3])
for _, oid in ipairs(order) do
  local h = holds[oid]
  redis.call('HSET', KEYS[3], oid, h[1] .. ':' .. h[2])
  redis.call('HINCRBY', KEYS[2], h[2], h[1])
end
for i = m_at + m + 1, #ARGV do
  redis.call('SADD', KEYS[6], ARGV[i])
end
redis.call('HSET', KEYS[1], 'stock', stock, 'available', available, 'pending', pending,
  'limit', ARGV[2], 'price', ARGV[3], 'starts_ms', ARGV[4], 'ends_ms', ARGV[5], 'hold_ms', ARGV[6])
local ok = redis.pcall('XGROUP', 'CREATE', KEYS[5], ARGV[7], '0', 'MKSTREAM')
if type(ok) == 'table' and ok.err and not string.find(ok.err, 'BUSYGROUP', 1, true) then
  return redis.error_reply(ok.err)
end
return 1
