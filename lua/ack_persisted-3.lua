--[[
ack_persisted -- after the PostgreSQL commit: ack the stream entries, drop
them from the stream and from the pending orders, and lower the sale's
pending quantity, once per entry.

KEYS[1]  sale hash     <p>:{<sale>}:sale     (pending)
KEYS[2]  pending hash  <p>:{<sale>}:pending  order_id -> order fields
KEYS[3]  stream        <p>:{<sale>}:stream
ARGV[1]  consumer group name
ARGV[2..] triples: entry_id, order_id, qty

Returns the number of entries acked by this call.
When the sale hash is missing (Redis lost it; rebuild_sale recomputes
`pending` from the pending hash) the counter is left alone, never recreated.

Guarantee: XACK answers 1 only for the first ack of an entry, and that answer
gates the pending decrement, so redelivered or reclaimed entries never lower
`pending` twice. The stream is trimmed entry by entry (XDEL), so an entry not
yet persisted is never trimmed away.
]]
local acked = 0
local live = redis.call('EXISTS', KEYS[1]) == 1
for i = 2, #ARGV, 3 do
  local entry_id, order_id, qty = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  if redis.call('XACK', KEYS[3], ARGV[1], entry_id) == 1 then
    redis.call('XDEL', KEYS[3], entry_id)
    redis.call('HDEL', KEYS[2], order_id)
    if live then redis.call('HINCRBY', KEYS[1], 'pending', -qty) end
    acked = acked + 1
  end
end
return acked
