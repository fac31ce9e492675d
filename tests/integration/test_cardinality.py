"""A cardinality attack against a traced server: 100,000 requests with random paths,
methods, Host headers and user agents (wrk with a Lua generator) against nginx, the
daemon exporting to a real OTLP receiver (rotel).

What must hold: every request is counted in the metrics (the sum of the duration
histograms' counts equals what nginx logged), the metric series per process stay within
`telemetry.metric_cardinality_limit` with the excess folded into the overflow series and
counted (`telemetry.metric_overflow`), span names stay low-cardinality (routes past
`telemetry.max_routes` and unknown methods are folded), and the daemon's memory stays
bounded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import require_or_fail
from tests.integration.peers import Daemon, Nginx, free_port
from tests.receiver import Receiver

pytestmark = pytest.mark.usefixtures("bpf_available")

REQUESTS = 100_000
CARDINALITY_LIMIT = 10  # below what the random traffic makes: the overflow must show
MAX_ROUTES = 20
METRIC = "http.server.request.duration"

# Random everything a client controls: method (known and invented), path segments,
# query, Host and User-Agent. Invented methods are uppercase tokens nginx answers (405).
RANDOM_REQUESTS_LUA = r"""
math.randomseed(12345 + os.time())
local known = {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}
local letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
local function word(n)
  local t = {}
  for i = 1, n do
    local k = math.random(1, 26)
    t[i] = letters:sub(k, k)
  end
  return table.concat(t)
end
local calls = 0
request = function()
  calls = calls + 1
  local method
  -- wrk checks the first request with a parser that knows only standard methods
  if calls > 1 and math.random(1, 4) == 1 then method = word(math.random(3, 9)) else
    method = known[math.random(1, #known)] end
  local path = string.format("/%x/%x/%s?id=%d", math.random(0, 2^30), math.random(0, 2^30),
                             word(6):lower(), math.random(0, 2^30))
  local headers = {
    ["Host"] = word(8):lower() .. ".example:" .. math.random(1, 65535),
    ["User-Agent"] = "agent-" .. word(12),
  }
  return wrk.format(method, path, headers, nil)
end
-- Paced (1 ms between a connection's requests): the point is cardinality, not capacity,
-- and every request must be counted.
delay = function() return 1 end
"""


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def daemon_stats(health_port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/stats", timeout=5) as r:
        return json.load(r)


def test_random_paths_methods_hosts_and_agents_keep_series_and_memory_bounded(tmp_path):
    require_or_fail(None if shutil.which("wrk") else "wrk is not installed (bootstrap --test-peers)")
    port, health_port = free_port(), free_port()
    script = tmp_path / "random.lua"
    script.write_text(RANDOM_REQUESTS_LUA)
    config = tmp_path / "otel-ebpf.yaml"
    config.write_text(f"""
telemetry:
  metric_cardinality_limit: {CARDINALITY_LIMIT}
  max_routes: {MAX_ROUTES}
  metric_export_interval_s: 2
  span_schedule_delay_s: 0.5
""")
    with Receiver() as rx, Nginx(tmp_path, port) as nginx, Daemon(
            tmp_path, "--config", str(config), "--port", str(port),
            "--health-listen", f"127.0.0.1:{health_port}", exporter="otlp",
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": rx.grpc_endpoint,
                 "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}) as daemon:
        # Baseline after start-up has settled: the first export loads the gRPC stack
        # (~10 MB once), which is not what random traffic costs.
        subprocess.run(["curl", "-sS", "-o", "/dev/null", f"http://127.0.0.1:{port}/warmup"],
                       check=True, timeout=30)
        time.sleep(3)
        rss_before = rss_kib(daemon.proc.pid)
        served = 0
        deadline = time.monotonic() + 300
        while served < REQUESTS and time.monotonic() < deadline:
            run = subprocess.run(["wrk", "-t1", "-c4", "-d5s", "-s", str(script),
                                  f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                                 timeout=60)
            assert run.returncode == 0, f"wrk failed: {run.stdout} {run.stderr}"
            served = len(nginx.access_log())
        assert served >= REQUESTS, f"nginx served only {served} requests in 300 s"
        rss_after = rss_kib(daemon.proc.pid)

        # Metrics are cumulative: wait until the latest export counts every request.
        def latest_total() -> tuple[int, list]:
            # (server metrics: only nginx's worker serves on the selected port)
            points = [p for p in rx.points if p.metric == METRIC]
            latest: dict = {}
            for p in points:  # the receiver keeps every export: the last point per series
                latest[tuple(sorted((k, str(v)) for k, v in p.attributes.items()))] = p
            return sum(p.count for p in latest.values()), list(latest.values())

        deadline = time.monotonic() + 60
        total, series = latest_total()
        while total < served and time.monotonic() < deadline:
            time.sleep(1)
            total, series = latest_total()
        stats = daemon_stats(health_port)
        spans = rx.spans

    loss = {k: v for k, v in stats.items() if "lost" in k or "loss" in k}
    assert total == served, f"metrics count {total} of {served} served requests; loss {loss}"
    assert len(series) <= CARDINALITY_LIMIT, len(series)
    overflow = [p for p in series if p.attributes.get("otel.metric.overflow") is True]
    assert len(overflow) == 1 and overflow[0].count > 0, (
        len(series), [p.attributes for p in series[:5]])
    assert stats.get("telemetry.metric_overflow", 0) > 0
    # Spans: a sample arrives (the export queue drops what it cannot hold, counted); their
    # names are "{method} {route}" from a bounded set, never a raw path or method.
    assert spans, "no span reached the receiver"
    names = {s.name for s in spans}
    methods = {s.attributes.get("http.request.method") for s in spans}
    assert methods <= {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "_OTHER"}
    assert len(names) <= 7 * (MAX_ROUTES + 1), sorted(names)[:20]
    # nginx's server spans: at most max_routes routes, the rest folded into "/*"
    routes = {s.name.partition(" ")[2] for s in spans if s.kind == "SPAN_KIND_SERVER"}
    assert len(routes) <= MAX_ROUTES + 1 and "/*" in routes, sorted(routes)
    # Memory: the daemon's own bounds hold; report the growth.
    growth_mib = (rss_after - rss_before) / 1024
    print(f"served {served}, series {len(series)}, span names {len(names)}, "
          f"spans received {len(spans)}, daemon RSS {rss_before / 1024:.1f} -> "
          f"{rss_after / 1024:.1f} MiB")
    assert growth_mib < 24, f"daemon RSS grew {growth_mib:.1f} MiB under random requests"
