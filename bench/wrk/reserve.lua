-- wrk script of the flashsale bench: one POST .../orders per request.
--
--   wrk -t2 -c64 -d5s --latency -s bench/wrk/reserve.lua URL -- TOKENS NONCE NTHREADS
--
-- TOKENS    file of pre-minted buyer JWTs, one a line (the buyer pool)
-- NONCE     text that makes this run's Idempotency-Keys unique
-- NTHREADS  the -t value (each thread takes its own slice of the pool)
--
-- Buyers are random: each thread walks its slice of the pool in a shuffled
-- order (so a buyer repeats only once the slice is used up). Every request
-- carries a unique Idempotency-Key and the body {"quantity":1}.
-- done() prints one line: "BENCH_JSON {...}" with the request count, the
-- socket errors, the status codes and the latency percentiles (microseconds).

local threads = {}

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local path, nonce, nthreads = args[1], args[2], tonumber(args[3])
  mine = {}
  local i = 0
  for line in io.lines(path) do
    if i % nthreads == tid then mine[#mine + 1] = line end
    i = i + 1
  end
  -- seed from the nonce and the thread id; Fisher-Yates shuffle
  local seed = tid * 7919
  for c in nonce:gmatch(".") do seed = (seed * 31 + c:byte()) % 2147483647 end
  math.randomseed(seed)
  for j = #mine, 2, -1 do
    local k = math.random(j)
    mine[j], mine[k] = mine[k], mine[j]
  end
  for j = 1, #mine do mine[j] = "Bearer " .. mine[j] end
  pos = 0
  seq = 0
  key_prefix = nonce .. "-" .. tid .. "-"
  statuses = {}
  body = '{"quantity":1}'
  headers = {["Content-Type"] = "application/json"}
end

function request()
  pos = pos + 1
  if pos > #mine then pos = 1 end
  seq = seq + 1
  headers["Authorization"] = mine[pos]
  headers["Idempotency-Key"] = key_prefix .. seq
  return wrk.format("POST", wrk.path, headers, body)
end

function response(status, hdrs, resp_body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local codes = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    if s then
      for code, n in pairs(s) do codes[code] = (codes[code] or 0) + n end
    end
  end
  local parts = {}
  for code, n in pairs(codes) do parts[#parts + 1] = string.format('"%d":%d', code, n) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d,"status":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f},' ..
    '"status":{%s}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean,
    table.concat(parts, ",")))
end
