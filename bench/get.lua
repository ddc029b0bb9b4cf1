-- wrk script: GET one path, and write a JSON summary to RESULT.
function done(summary, latency, requests)
  local out = io.open(os.getenv("RESULT"), "w")
  out:write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d}',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout
      + summary.errors.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
  out:close()
end
