--[[
room_configure -- write a sale's waiting-room settings into its sale hash, where
reserve_batch-8.lua (pass required), room_join, room_poll and room_admit read them.

Called by the admin PATCH (rate, pause) after PostgreSQL committed them, and
after a rebuild of the sale hash from PostgreSQL (ledger.rebuild).

KEYS[1]  sale hash  <p>:{<sale>}:sale   room, room_rate, room_pass_ms, room_oversub, room_paused
ARGV[1]  admit_per_s  (1..100000)
ARGV[2]  pass_ms      (10000..3600000)
ARGV[3]  oversub      (a decimal number 1..10)
ARGV[4]  paused       "0" | "1"

Returns 1 written, -1 the sale hash is missing (nothing written: a rebuild
writes it, then calls this again). Errors (nothing written): "ERR bad arguments".
Guarantee: never creates a sale hash; checks first, writes last.
]]
local rate, pass_ms, oversub = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if not (rate and rate >= 1 and rate <= 100000 and pass_ms and pass_ms >= 10000
    and pass_ms <= 3600000 and oversub and oversub >= 1 and oversub <= 10
    and (ARGV[4] == '0' or ARGV[4] == '1')) then
  return redis.error_reply('ERR bad arguments')
end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'room', '1', 'room_rate', ARGV[1], 'room_pass_ms', ARGV[2],
  'room_oversub', ARGV[3], 'room_paused', ARGV[4])
return 1
