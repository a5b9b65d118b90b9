--[[
end_sale -- end a sale now in Redis (the kill switch), never reopening it.

KEYS[1]  sale hash  <p>:{<sale>}:sale   (starts_ms, ends_ms read by reserve_batch)
ARGV[1]  ends_ms    the ends_at PostgreSQL committed (UTC ms)
ARGV[2]  starts_ms  the starts_at PostgreSQL committed (UTC ms; lowered for a
                    sale ended before it started)

Returns 1 when ends_ms was lowered, 0 when the sale already ended at or
before ARGV[1] (nothing changed), -1 when the sale is not in Redis (the
rebuild reads ends_at from PostgreSQL, which has it already).

Guarantee: from the reply on, every reserve_batch call of the sale on any
front process answers sale_not_active (it reads ends_ms in the same hash);
ends_ms only ever goes down, so a late or repeated call never reopens a sale.
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local f = redis.call('HMGET', KEYS[1], 'ends_ms', 'starts_ms')
local ends_ms = tonumber(f[1]) or 0
local starts_ms = tonumber(f[2]) or 0
local new_ends = tonumber(ARGV[1])
local new_starts = tonumber(ARGV[2])
if ends_ms ~= 0 and ends_ms <= new_ends then return 0 end
if new_starts < starts_ms then
  redis.call('HSET', KEYS[1], 'ends_ms', ARGV[1], 'starts_ms', ARGV[2])
else
  redis.call('HSET', KEYS[1], 'ends_ms', ARGV[1])
end
return 1
