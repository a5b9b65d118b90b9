--[[
publish_events -- append a batch of domain events to the events stream, in order.

KEYS[1]  events stream   <p>:events   capped: MAXLEN ~ ARGV[1]
ARGV[1]  maxlen          approximate cap of the stream (a positive integer)
ARGV[2..] the events, one after another, each as: n (number of field/value
          pairs, 1..64), then its n field/value pairs

Returns the number of events appended.
Errors (nothing written): "ERR bad maxlen", "ERR bad event at argument <i>",
"ERR events key holds a <type>".

Guarantee: the events of one call are appended in the given order, all of
them or none: the argument list (and the key's type) is checked whole before
the first XADD. One
call replaces a pipeline of XADDs, whose per-command client cost dominated
the consumer's CPU per drained row.
]]
local maxlen = string.match(ARGV[1] or '', '^%d+$') and #ARGV[1] <= 15 and tonumber(ARGV[1])
if not maxlen or maxlen < 1 then
  return redis.error_reply('ERR bad maxlen')
end
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' and t ~= 'stream' then
  return redis.error_reply('ERR events key holds a ' .. t)
end
local i = 2
local events = 0
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  if not n or n < 1 or n > 64 or n % 1 ~= 0 or i + 2 * n > #ARGV then
    return redis.error_reply('ERR bad event at argument ' .. i)
  end
  i = i + 1 + 2 * n
  events = events + 1
end
i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, i + 1, i + 2 * n))
  i = i + 1 + 2 * n
end
return events
