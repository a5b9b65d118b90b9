--[[
ack_persisted -- after the PostgreSQL commit: ack the stream entries, drop
them from the stream and from the pending orders, and lower the sale's
pending quantity, once per entry.

KEYS[1]  sale hash     <p>:{<sale>}:sale     (pending)
KEYS[2]  pending hash  <p>:{<sale>}:pending  order_id -> order fields
KEYS[3]  stream        <p>:{<sale>}:stream
ARGV[1]  consumer group name
ARGV[2..] triples: entry_id ("<ms>-<seq>"), order_id, qty (an integer >= 1)

Returns the number of entries acked by this call.
Errors (nothing written): "ERR bad arguments", "ERR bad entry at argument <i>",
"ERR pending of <key> is not an integer", "ERR <what> key holds a <type>".
When the sale hash is missing (Redis lost it; rebuild_sale recomputes
`pending` from the pending hash) the counter is left alone, never recreated.

Guarantee: XACK answers 1 only for the first ack of an entry, and that answer
gates the pending decrement, so redelivered or reclaimed entries never lower
`pending` twice. The stream is trimmed by id, once per call, below the oldest
entry still pending in the group (XPENDING's summary), or, with none pending,
up to and including the group's last delivered entry: the group delivers in id
order, so every entry below either was delivered and then acked (persisted) or
dead-lettered; an entry not yet persisted is never trimmed away. Nothing is
trimmed when this call acked nothing (a stale consumer's ack after the group
was recreated at 0, whose entries are to be delivered again). One XTRIM MINID
frees whole stream nodes instead of an XDEL per entry. Checks first, writes last: every triple,
the key types and the pending counter are validated before the first XACK,
so no command after it can fail.
]]
-- @include "lib/checks.lua"
-- @include "lib/stream.lua"

-- checks
if #ARGV < 1 or ARGV[1] == '' or (#ARGV - 1) % 3 ~= 0 then
  return redis.error_reply('ERR bad arguments')
end
local qtys = {}
for i = 2, #ARGV, 3 do
  local qty = int(ARGV[i + 2])
  if not string.match(ARGV[i], '^%d+%-%d+$') or ARGV[i + 1] == '' or not qty or qty < 1 then
    return redis.error_reply('ERR bad entry at argument ' .. i)
  end
  qtys[i] = qty
end
local err = key_types({{KEYS[2], 'hash', 'pending'}, {KEYS[3], 'stream', 'stream'}})
if err then return err end
local live = redis.call('EXISTS', KEYS[1]) == 1
if live then
  err = counter(KEYS[1], 'pending', redis.call('HGET', KEYS[1], 'pending'))
  if err then return err end
end
-- writes
local acked = 0
for i = 2, #ARGV, 3 do
  local entry_id, order_id = ARGV[i], ARGV[i + 1]
  if redis.call('XACK', KEYS[3], ARGV[1], entry_id) == 1 then
    redis.call('HDEL', KEYS[2], order_id)
    if live then redis.call('HINCRBY', KEYS[1], 'pending', -qtys[i]) end
    acked = acked + 1
  end
end
if acked > 0 then trim_acked(KEYS[3], ARGV[1]) end
return acked
