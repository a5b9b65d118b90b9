--[[
lib/stream -- a sale's stream and its consumer group. Included with
`-- @include "lib/stream.lua"` (flashsale/core/scripts.py inlines it, once).

group_exists(stream, group)
               whether the stream exists and has the consumer group (XINFO
               GROUPS); reads only
trim_acked(stream, group)
               trims the stream by id: below the oldest entry still pending in
               the group (XPENDING's summary), or, with none pending, up to and
               including the group's last delivered entry; nothing when the
               group is gone. Writes: call it after every check

Guarantee of trim_acked: the group delivers in id order, so every entry it
drops was delivered and then acked (persisted) or dead-lettered; an entry
not yet persisted is never trimmed away. One XTRIM MINID frees whole stream
nodes instead of an XDEL per entry.
]]
local function group_exists(stream, group)
  if redis.call('EXISTS', stream) == 0 then return false end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    for j = 1, #g, 2 do
      if g[j] == 'name' and g[j + 1] == group then return true end
    end
  end
  return false
end
local function trim_acked(stream, group)
  local oldest = redis.call('XPENDING', stream, group)[2]
  if oldest then
    redis.call('XTRIM', stream, 'MINID', oldest)
    return
  end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local f = {}
    for j = 1, #g, 2 do f[g[j]] = g[j + 1] end
    if f['name'] == group then
      redis.call('XTRIM', stream, 'MINID', f['last-delivered-id'])
      redis.call('XDEL', stream, f['last-delivered-id'])
    end
  end
end
