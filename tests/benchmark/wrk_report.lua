-- wrk hooks for the benchmark: optional per-connection pacing and an exact result line.
-- BENCH_DELAY_MS > 0 makes each connection wait that many ms before every request
-- (Debian's wrk 4.1 has no -R rate option; connections x pacing sets the offered load).
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0") or 0
if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

-- One JSON line with raw counts and percentiles in microseconds, so the harness never
-- parses wrk's rounded, unit-suffixed table.
function done(summary, latency, requests)
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"timeout":%d,"status":%d,"p50_us":%.1f,"p99_us":%.1f,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, summary.errors.status,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
