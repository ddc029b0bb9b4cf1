-- wrk script: POST pre-signed webhook bodies, each at most once, and remember which
-- deliveries were acknowledged (status 200), by the X-Request-ID each server echoes.
--   BODIES  file of lines "<signature> <message_id> <body>"
--   NTHREADS the -t given to wrk; RESULT  where done() writes its JSON summary
--   DELAY_MS  if set, each connection waits this long between requests: a steady load
--             (connections x 1000 / DELAY_MS requests/s at most) instead of a flood
local threads = {}
local delay_ms = tonumber(os.getenv("DELAY_MS") or "")
if delay_ms then
  function delay()
    return delay_ms
  end
end

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  local nthreads = tonumber(os.getenv("NTHREADS") or "1")
  requests_list = {}
  local i = 0
  for line in io.lines(os.getenv("BODIES")) do
    if i % nthreads == tid then
      local sig = string.sub(line, 1, 64)
      local rest = string.sub(line, 66)
      local space = string.find(rest, " ", 1, true)
      local id = string.sub(rest, 1, space - 1)
      local body = string.sub(rest, space + 1)
      table.insert(requests_list, wrk.format("POST", "/webhook", {
        ["Content-Type"] = "application/json",
        ["X-Signature"] = sig,
        ["X-Request-ID"] = id,
      }, body))
    end
    i = i + 1
  end
  counter = 0
  acked = {}
  statuses = {}
  exhausted = 0
end

function request()
  counter = counter + 1
  if counter > #requests_list then
    -- Never send a body twice in a fresh-insert load: wrap around only for duplicates.
    exhausted = exhausted + 1
    counter = 1
  end
  return requests_list[counter]
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 then
    acked[#acked + 1] = headers["x-request-id"] or headers["X-Request-ID"]
  end
end

function done(summary, latency, requests)
  local out = io.open(os.getenv("RESULT"), "w")
  local counts = {}
  local ids = {}
  local wrapped = 0
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
    for _, id in ipairs(thread:get("acked")) do
      ids[#ids + 1] = '"' .. id .. '"'
    end
    wrapped = wrapped + thread:get("exhausted")
  end
  local parts = {}
  for status, n in pairs(counts) do
    parts[#parts + 1] = '"' .. status .. '":' .. n
  end
  out:write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"wrapped":%d,"statuses":{%s},"acked":[%s]}',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    wrapped, table.concat(parts, ","), table.concat(ids, ",")))
  out:close()
end
