--[[
forget_idempotency -- forget the "accepted" idempotency records of orders that
were voided before their buyer was told (replication.py: a reservation batch
that too few replicas acknowledged in time is released and answered 503
"nothing reserved"). A retry with the same key then decides afresh instead of
replaying an order that no longer holds stock.

KEYS[i]   idempotency record of order i   <p>:idem:<len>:<user>:<key>
          (on Redis Cluster <p>:{<sale>}:idem:..., the sale's slot)
ARGV[i]   order id i (n = #KEYS = #ARGV, n >= 1)

A record is "<fingerprint>\n<code>\n<detail>" (the reserve_batch script); it is
deleted only when it still says accepted (code 0) for exactly ARGV[i]: a
record of another order, or a refusal, is left alone.

Returns the number of records deleted.

Guarantee: only the voided order's own acceptance is forgotten, each at most
once (a retried call deletes nothing more). The caller runs it after the
release committed in PostgreSQL, so a retry that decides afresh can never
hold a second live order under the same key.
]]
if #KEYS ~= #ARGV then
  return redis.error_reply('ERR forget_idempotency: one order id per record')
end
-- checks: read every record before the first write
local doomed = {}
for i = 1, #KEYS do
  local rec = redis.call('GET', KEYS[i])
  if rec and string.find(rec, '\n0\n' .. ARGV[i] .. '\t', 1, true) then
    doomed[#doomed + 1] = KEYS[i]
  end
end
-- writes
for i = 1, #doomed do
  redis.call('DEL', doomed[i])
end
return #doomed
