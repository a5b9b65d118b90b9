--[[
undo_delivery -- take one delivery back from stream entries that a consumer
could not persist for a reason that is not theirs (PostgreSQL busy,
restarting or unreachable), so that the delivery counter counts only the
deliveries that ended in a crash or in PostgreSQL refusing the entry: the
counter decides dead-lettering (see persist.py), a busy database must not.

KEYS[1]  stream  <p>:{<sale>}:stream
ARGV[1]  consumer group
ARGV[2..] entry ids (each delivered once to the caller, undone once)

Returns the number of entries whose counter was lowered.

Each entry keeps its owner and its idle time (XCLAIM to the current owner
with IDLE set to the current idle time, JUSTID), so it is reclaimed exactly
when it would have been. An entry no longer pending (acked or dead-lettered
meanwhile) is skipped, and a counter never goes below 0.

Guarantee: the check (XPENDING) and the write (XCLAIM) of each entry happen
in one script, so no claim by another consumer can slip in between and be
overwritten. A missing stream or group (Redis lost it) changes nothing.
]]
local undone = 0
for i = 2, #ARGV do
  local got = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if type(got) == 'table' and got.err then return undone end  -- no stream or group
  local p = got[1]
  if p and tonumber(p[4]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], p[2], 0, ARGV[i], 'IDLE', p[3],
      'RETRYCOUNT', tonumber(p[4]) - 1, 'JUSTID')
    undone = undone + 1
  end
end
return undone
