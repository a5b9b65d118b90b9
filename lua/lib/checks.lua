--[[
lib/checks -- the checks scripts make before their first write. Included with
`-- @include "lib/checks.lua"` (flashsale/core/scripts.py inlines it, once).

int(v)         the integer the string v spells (at most 15 characters: digits,
               an optional leading '-'), else nil
key_types(t)   for each {key, type, what} of t: an error reply "ERR <what> key
               holds a <type>" for the first key that exists with another type,
               else nil
counter(key, field, value)
               an error reply "ERR <field> of <key> is not an integer" when
               value, a hash field HINCRBY may change (nil: absent, counts 0),
               is not an integer, else nil
hold(v)        a holds hash value "<qty>:<user_id>": qty (>= 1) and user (non-
               empty), or nil when malformed

Guarantee: reads only; none of them writes, so a script may call them anywhere
among its checks.
]]
local function int(v)
  if type(v) ~= 'string' or #v > 15 or not string.match(v, '^-?%d+$') then return nil end
  return tonumber(v)
end
local function key_types(t)
  for _, c in ipairs(t) do
    local kind = redis.call('TYPE', c[1])['ok']
    if kind ~= 'none' and kind ~= c[2] then
      return redis.error_reply('ERR ' .. c[3] .. ' key holds a ' .. kind)
    end
  end
end
local function counter(key, field, value)
  if value and not int(value) then
    return redis.error_reply('ERR ' .. field .. ' of ' .. key .. ' is not an integer')
  end
end
local function hold(v)
  local sep = string.find(v, ':', 1, true)
  local qty = sep and int(string.sub(v, 1, sep - 1))
  if not qty or qty < 1 or sep == #v then return nil end
  return qty, string.sub(v, sep + 1)
end
