--[[
lib/replies -- replies that several scripts give alike. Included with
`-- @include "lib/replies.lua"` (flashsale/core/scripts.py inlines it, once).

sale_missing(n)  the flat reply of a batch of n items when the sale hash is
                 missing (Redis lost it, or it is being rebuilt): n pairs
                 {-1, ''} (reserve_batch's and resolve_orders' sale_not_found)

Guarantee: builds a reply only; reads and writes nothing.
]]
local function sale_missing(n)
  local out = {}
  for _ = 1, n do
    out[#out + 1] = -1
    out[#out + 1] = ''
  end
  return out
end
