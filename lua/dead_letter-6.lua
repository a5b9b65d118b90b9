--[[
dead_letter -- move a stream entry that cannot be persisted to the
dead-letter stream and compensate its reservation, once, so it never blocks
the entries behind it.

KEYS[1]  sale hash     <p>:{<sale>}:sale     (available, pending)
KEYS[2]  users hash    <p>:{<sale>}:users
KEYS[3]  holds hash    <p>:{<sale>}:holds
KEYS[4]  pending hash  <p>:{<sale>}:pending
KEYS[5]  stream        <p>:{<sale>}:stream
KEYS[6]  dead letters  <p>:{<sale>}:dlq      (capped with approximate MAXLEN)
ARGV[1]  consumer group
ARGV[2]  entry id
ARGV[3]  order id ('' when unreadable)
ARGV[4]  quantity as the pending counter knows it (0 when unreadable)
ARGV[5]  reason
ARGV[6]  raw entry fields, as text
ARGV[7]  dead-letter stream max length

Returns {moved (1/0), quantity released}.

When the sale hash is missing (being rebuilt) only the entry and its
pending record go: the rebuild counts holds from what remains.

Guarantee: the XACK answer gates everything, so an entry is dead-lettered at
most once, its pending quantity lowered at most once, and its hold (if still
held) returned to `available` at most once: the accepted order ends as
exactly one compensation.
]]
if redis.call('XACK', KEYS[5], ARGV[1], ARGV[2]) == 0 then return {0, 0} end
local released = 0
local order_id = ARGV[3]
local live = redis.call('EXISTS', KEYS[1]) == 1
if order_id ~= '' and live then
  local hold = redis.call('HGET', KEYS[3], order_id)
  if hold then
    local sep = string.find(hold, ':', 1, true)
    released = tonumber(string.sub(hold, 1, sep - 1))
    local user = string.sub(hold, sep + 1)
    redis.call('HDEL', KEYS[3], order_id)
    redis.call('HINCRBY', KEYS[1], 'available', released)
    if redis.call('HINCRBY', KEYS[2], user, -released) <= 0 then
      redis.call('HDEL', KEYS[2], user)
    end
  end
end
if order_id ~= '' then
  redis.call('HDEL', KEYS[4], order_id)
end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[7], '*', 'entry', ARGV[2], 'o', order_id,
  'q', ARGV[4], 'reason', ARGV[5], 'raw', ARGV[6])
redis.call('XDEL', KEYS[5], ARGV[2])
-- an unreadable entry counts 0: never pass -0, which HINCRBY refuses (the
-- script would fail after its writes, uncounted, and stall the batch)
local qty = tonumber(ARGV[4])
if live and qty > 0 then redis.call('HINCRBY', KEYS[1], 'pending', -qty) end
return {1, released}
