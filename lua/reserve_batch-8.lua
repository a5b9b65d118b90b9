--[[
reserve_batch -- reserve stock of ONE sale for N buyers in one atomic call.

The HTTP front coalesces the reservations that arrive in the same event-loop
tick for a sale into one call; a single request is a batch of one. Items are
decided in order, each exactly as if it were alone: checks first, then writes.
No check can fail after a write of the same item (all inputs are validated
by the caller; numbers are parsed before anything is written).

KEYS[1]    sale hash      <p>:{<sale>}:sale     stock, available, pending, limit,
                                                price, starts_ms, ends_ms, hold_ms
KEYS[2]    users hash     <p>:{<sale>}:users    user_id -> quantity held
KEYS[3]    holds hash     <p>:{<sale>}:holds    order_id -> "<qty>:<user_id>"
KEYS[4]    pending hash   <p>:{<sale>}:pending  order_id -> the order's record (below)
KEYS[5]    stream         <p>:{<sale>}:stream   one entry per accepted order: o <order_id>,
                                                r <the order's record>
KEYS[6]    void zset      <p>:{<sale>}:void     order ids found unreserved after a lost
                                                reply (resolve_orders-3.lua); never reserved
KEYS[7]    room used hash <p>:{<sale>}:room:used      ticket -> order id: passes that reserved
KEYS[8]    room admitted  <p>:{<sale>}:room:admitted  ticket -> pass expiry: unused passes
           (KEYS[7], KEYS[8]: the waiting room, flashsale/room/; untouched without one)
KEYS[8+i]  idempotency record of item i (a string key with a TTL); when the
           item has no key, KEYS[1] is repeated there and never touched

ARGV[1]    now_ms         the front's clock (UTC ms)
ARGV[2]    idem_ttl_s     how long a decided outcome is remembered
ARGV[3]    n              number of items
ARGV[3+i]  item i, its fields joined by "\31" (unit separator, which no field
           may contain: ids and keys are printable, user ids have no control
           characters): order_id, user_id, qty, has_key ("0"/"1"),
           fingerprint (sale and body), idempotency key text, and the ticket
           of the waiting-room pass the front verified ("" when none was sent)
           (one argument per item: the client packs 6x fewer arguments)

Returns a flat array, two entries per item:  code, detail
   0  accepted            detail = "<order_id>\t<qty>\t<amount>\t<expires_ms>"
   1  idempotent replay   detail = the stored record (see below)
  -1  sale_not_found      (no item is looked at further; nothing written)
  -2  sale_not_active     remembered under the key
  -3  idempotency_key_reused  (key holds another fingerprint; nothing written)
  -4  limit_exceeded      remembered under the key
  -5  sold_out            remembered under the key
  -7  pass_required       the sale has a waiting room and the item has no pass, or its
                          pass already reserved an order; nothing written, not remembered
  -6  void                the order id was voided by resolve_orders (its reply was
                          lost and the front answered that nothing was reserved);
                          nothing written. Only a late copy of a lost request sees it.
Precedence per item: sale exists > void > order id already held (the same
batch sent again: its acceptance, detail as the first time, nothing written) >
idempotency replay/reuse > pass (waiting room) > sale active > per-user limit > stock. Replay comes
before the active check so that a retry returns the first response "however
many times" (contract, guarantee 4). Because of the first two, a batch sent
twice (a client library's retry) reserves each order id at most once.

Idempotency record: "<fingerprint>\n<code>\n<detail>" (detail empty for errors).

The order's record (flashsale/core/record.py owns the layout), one string
kept in the pending hash and the stream entry alike:
  "<user>\t<qty>\t<amount>\t<expires_ms>\t<created_ms>\t<idempotency key or empty>"

Guarantee: available never goes below 0; a buyer's held quantity never
exceeds the limit; one key yields at most one order; one order id is reserved
at most once, and never after it was voided; one pass reserves at most one
order; each accepted order is in holds, pending and the stream (the same
record in both), all written together.
]]
-- @include "lib/replies.lua"

local sale_key, users_key, holds_key, pending_key, stream_key, void_key =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local room_used_key, room_admitted_key = KEYS[7], KEYS[8]
local now_ms = tonumber(ARGV[1])
local idem_ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[3])

if redis.call('EXISTS', sale_key) == 0 then return sale_missing(n) end
local out = {}

local f = redis.call('HMGET', sale_key, 'available', 'limit', 'price', 'starts_ms', 'ends_ms', 'hold_ms',
  'room')
local available = tonumber(f[1])
local limit = tonumber(f[2])
local price = tonumber(f[3])
local starts_ms = tonumber(f[4])
local ends_ms = tonumber(f[5])
local hold_ms = tonumber(f[6])
local room = f[7] == '1'
local active = now_ms >= starts_ms and (ends_ms == 0 or now_ms < ends_ms)
-- the void set exists only after a lost reply: one EXISTS per batch otherwise
local any_void = redis.call('EXISTS', void_key) == 1

local function fields(packed)
  local out, at = {}, 1
  while true do
    local sep = string.find(packed, '\31', at, true)
    if not sep then
      out[#out + 1] = string.sub(packed, at)
      return out
    end
    out[#out + 1] = string.sub(packed, at, sep - 1)
    at = sep + 1
  end
end

for i = 1, n do
  local item = fields(ARGV[3 + i])
  local order_id = item[1]
  local user = item[2]
  local qty = tonumber(item[3])
  local has_key = item[4] == '1'
  local fp = item[5]
  local idem_text = item[6]
  local ticket = item[7] or ''
  local idem_key = KEYS[8 + i]
  local code, detail = 0, ''

  local rec, decided = false, false
  if any_void and redis.call('ZSCORE', void_key, order_id) then
    code, decided = -6, true
  elseif not has_key and redis.call('HEXISTS', holds_key, order_id) == 1 then
    -- the batch was sent again after its first run accepted this item (a keyed
    -- item replays its record instead): the same acceptance, nothing written
    detail = order_id .. '\t' .. qty .. '\t' .. string.format('%d', price * qty) .. '\t'
      .. string.format('%d', now_ms + hold_ms)
    decided = true
  elseif has_key then
    rec = redis.call('GET', idem_key)
  end
  if decided then
    -- void, or accepted before: decided above
  elseif rec then
    local nl = string.find(rec, '\n', 1, true)
    if string.sub(rec, 1, nl - 1) == fp then
      code, detail = 1, rec
    else
      code = -3
    end
  elseif room and (ticket == '' or redis.call('HEXISTS', room_used_key, ticket) == 1) then
    code = -7
  elseif not active then
    code = -2
  else
    local held = tonumber(redis.call('HGET', users_key, user) or '0')
    if held + qty > limit then
      code = -4
    elseif available < qty then
      code = -5
    else
      -- writes: every check for this item has passed
      local amount = price * qty
      local expires_ms = now_ms + hold_ms
      available = available - qty
      redis.call('HINCRBY', sale_key, 'available', -qty)
      redis.call('HINCRBY', sale_key, 'pending', qty)
      redis.call('HINCRBY', users_key, user, qty)
      redis.call('HSET', holds_key, order_id, qty .. ':' .. user)
      local amount_s = string.format('%d', amount)
      local expires_s = string.format('%d', expires_ms)
      local record = user .. '\t' .. qty .. '\t' .. amount_s .. '\t' .. expires_s .. '\t'
        .. string.format('%d', now_ms) .. '\t' .. idem_text
      redis.call('HSET', pending_key, order_id, record)
      redis.call('XADD', stream_key, '*', 'o', order_id, 'r', record)
      detail = order_id .. '\t' .. qty .. '\t' .. amount_s .. '\t' .. expires_s
      if room then  -- the pass is spent: one order per pass
        redis.call('HSET', room_used_key, ticket, order_id)
        redis.call('ZREM', room_admitted_key, ticket)
      end
    end
  end
  if has_key and code ~= 1 and code ~= -3 and code ~= -6 and code ~= -7 then
    redis.call('SET', idem_key, fp .. '\n' .. code .. '\n' .. detail, 'EX', idem_ttl)
  end
  out[#out + 1] = code
  out[#out + 1] = detail
end
return out
