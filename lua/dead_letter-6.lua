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

Returns {moved (1/0), quantity released}: {0, 0} when the entry is not
pending in the group (acked already, no such group or stream).
Errors (nothing written): "ERR bad arguments", "ERR bad quantity",
"ERR bad max length", "ERR malformed hold of <order_id>",
"ERR <field> of <key> is not an integer", "ERR <what> key holds a <type>".

When the sale hash is missing (being rebuilt) only the entry and its
pending record go: the rebuild counts holds from what remains.

Guarantee: checks first, writes last. Whether the entry is still pending
(what XACK would answer) is read first and gates everything, so an entry is
dead-lettered at most once, its pending quantity lowered at most once, and
its hold (if still held) returned to `available` at most once: the accepted
order ends as exactly one compensation. Every argument and every value read
is validated before the first write, so a refused call changes nothing (the
entry stays pending and is retried). The stream is then trimmed by id as
ack_persisted trims it (below the oldest entry still pending, or up to the
last delivered one when none is): entries acked above this one while it was
retried go with it.
]]
-- @include "lib/checks.lua"
-- @include "lib/stream.lua"

-- checks: arguments
local group, entry_id, order_id = ARGV[1], ARGV[2], ARGV[3]
if #ARGV ~= 7 or group == '' or not string.match(entry_id, '^%d+%-%d+$') then
  return redis.error_reply('ERR bad arguments')
end
local qty = int(ARGV[4])
if not qty or qty < 0 then return redis.error_reply('ERR bad quantity') end
local maxlen = int(ARGV[7])
if not maxlen or maxlen < 1 then return redis.error_reply('ERR bad max length') end
-- checks: is the entry pending in the group?
local err = key_types({{KEYS[5], 'stream', 'stream'}})
if err then return err end
if not group_exists(KEYS[5], group) then return {0, 0} end
if #redis.call('XPENDING', KEYS[5], group, entry_id, entry_id, 1) == 0 then return {0, 0} end
-- checks: every key written and every value read
err = key_types({{KEYS[2], 'hash', 'users'}, {KEYS[3], 'hash', 'holds'},
                 {KEYS[4], 'hash', 'pending'}, {KEYS[6], 'stream', 'dead-letter'}})
if err then return err end
local live = redis.call('EXISTS', KEYS[1]) == 1
local released, user = 0, nil
if live then
  local f = redis.call('HMGET', KEYS[1], 'available', 'pending')
  err = counter(KEYS[1], 'available', f[1]) or counter(KEYS[1], 'pending', f[2])
  if err then return err end
  local held = order_id ~= '' and redis.call('HGET', KEYS[3], order_id)
  if held then
    released, user = hold(held)
    if not released then return redis.error_reply('ERR malformed hold of ' .. order_id) end
    err = counter(KEYS[2], user, redis.call('HGET', KEYS[2], user))
    if err then return err end
  end
end

-- writes
redis.call('XACK', KEYS[5], group, entry_id)
if user then
  redis.call('HDEL', KEYS[3], order_id)
  redis.call('HINCRBY', KEYS[1], 'available', released)
  if redis.call('HINCRBY', KEYS[2], user, -released) <= 0 then
    redis.call('HDEL', KEYS[2], user)
  end
end
if order_id ~= '' then
  redis.call('HDEL', KEYS[4], order_id)
end
redis.call('XADD', KEYS[6], 'MAXLEN', '~', maxlen, '*', 'entry', entry_id, 'o', order_id,
  'q', ARGV[4], 'reason', ARGV[5], 'raw', ARGV[6])
redis.call('XDEL', KEYS[5], entry_id)
trim_acked(KEYS[5], group)
-- an unreadable entry counts 0: never pass -0, which HINCRBY refuses
if live and qty > 0 then redis.call('HINCRBY', KEYS[1], 'pending', -qty) end
return {1, released}
