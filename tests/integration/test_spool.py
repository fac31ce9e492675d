"""The export spool end to end: real eBPF, real servers and clients, a real OTLP receiver
(rotel) that is down, then up.

- The collector is down while traffic runs: nothing is given up, the daemon's memory
  stays flat-ish (numbers printed; the bound asserted is generous), and when the receiver
  comes back it gets every span exactly once, the curl ones in the order they were made.
- The daemon is stopped (SIGTERM) during the outage: it exits within seconds, and a
  daemon started again on the same spool delivers what the first one captured.
"""

from __future__ import annotations

import collections
import http.client
import json
import sys
import time
import urllib.request

import pytest

from tests.integration.peers import REPO, Daemon, Nginx, curl, free_port, process
from tests.receiver import Receiver, ReceivedSpan

pytestmark = pytest.mark.usefixtures("bpf_available")

N = 41  # curl requests, prime: off-by-one and duplicates show
SERVICE = "spool-static"


def daemon_env(rx: Receiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": rx.http_endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: many small payloads, so order is tested
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",  # ms
        "OTEL_EBPF_EXPORT_OTLP_RETRY_MAX_BACKOFF_S": "0.5",  # notice the return quickly
    }


def static_server(tmp_path, port: int):
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "hello.txt").write_bytes(b"hello\n")
    return process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                    "--directory", str(www)], port=port, env={"OTEL_SERVICE_NAME": SERVICE})


def curl_requests(port: int, first: int, count: int) -> None:
    for i in range(first, first + count):
        assert curl("http://127.0.0.1:%d/hello.txt?i=%d" % (port, i)).stdout == "200"


def curl_spans(rx: Receiver) -> list[ReceivedSpan]:
    return [s for s in rx.spans
            if s.kind == "SPAN_KIND_SERVER" and s.resource.get("service.name") == SERVICE]


def wait_for(probe, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.2)
    return False


def daemon_stats(health_port: int) -> collections.Counter:
    """The daemon's /stats (a counter never incremented is absent: 0)."""
    with urllib.request.urlopen("http://127.0.0.1:%d/stats" % health_port, timeout=5) as r:
        return collections.Counter(json.loads(r.read()))


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def keepalive_load(port: int, count: int, rate_per_s: float) -> None:
    """`count` GETs of distinct paths over one keep-alive connection, paced."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.monotonic()
    for k in range(count):
        conn.request("GET", "/load/%d" % k)
        resp = conn.getresponse()
        resp.read()
        ahead = started + (k + 1) / rate_per_s - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    conn.close()


def test_collector_down_while_traffic_runs_then_back_receives_every_span_in_order(tmp_path):
    port, nginx_port, health_port = free_port(), free_port(), free_port()
    load = 6000
    rx = Receiver(free_port(), free_port())  # not started: the collector is down
    try:
        with static_server(tmp_path, port), Nginx(tmp_path, nginx_port) as nginx, \
                Daemon(tmp_path, "--port", str(port), "--port", str(nginx_port),
                       "--health-listen", "127.0.0.1:%d" % health_port,
                       env=daemon_env(rx), exporter="otlp") as daemon:
            rss_before = rss_kib(daemon.proc.pid)
            curl_requests(port, 0, N)
            samples = []
            started = time.monotonic()
            with process([sys.executable, "-c",
                          "from tests.integration.test_spool import keepalive_load; "
                          "keepalive_load(%d, %d, 600)" % (nginx_port, load)],
                         cwd=REPO) as client:
                while client.poll() is None:
                    samples.append(rss_kib(daemon.proc.pid))
                    time.sleep(0.5)
                assert client.returncode == 0
            load_s = time.monotonic() - started
            assert wait_for(lambda: daemon_stats(health_port)["export.spans_dropped"] == 0
                            and daemon_stats(health_port)["export.spool.payloads"] > 0, 10)
            time.sleep(1.0)  # the last batches reach the spool
            during = daemon_stats(health_port)
            samples.append(rss_kib(daemon.proc.pid))
            assert during["export.payloads_sent"] == 0  # nothing could be sent yet
            rx.start()  # the collector comes back
            assert wait_for(lambda: len(curl_spans(rx)) >= N and len(
                {s.attributes.get("url.path") for s in rx.spans
                 if str(s.attributes.get("url.path", "")).startswith("/load/")}) >= load, 120)
            time.sleep(1.0)  # duplicates would show
            after = daemon_stats(health_port)
            assert daemon.stop() == 0
        access = nginx.access_log()
    finally:
        rx.stop()
    spans = curl_spans(rx)
    # Exactly once each, in the order curl made them.
    assert [s.attributes["url.query"] for s in spans] == ["i=%d" % i for i in range(N)], \
        daemon.log[-3000:]
    load_spans = [s for s in rx.spans if s.kind == "SPAN_KIND_SERVER"
                  and str(s.attributes.get("url.path", "")).startswith("/load/")]
    assert len(access) == load
    assert sorted(s.attributes["url.path"] for s in load_spans) == sorted(
        "/load/%d" % k for k in range(load))
    assert after["export.spool.delivered"] >= 2
    assert after["export.spans_dropped"] == 0 and after["export.failures"] == 0
    growth_mib = (max(samples) - rss_before) / 1024
    print("\nspool outage: %d + %d requests in %.1f s; daemon RSS %.1f MiB before, max %.1f MiB "
          "during (+%.1f MiB); spool %d payloads, %d bytes, oldest %.1f s; delivered %d "
          "payloads from the spool"
          % (N, load, load_s, rss_before / 1024, max(samples) / 1024, growth_mib,
             during["export.spool.payloads"], during["export.spool.bytes"],
             during["export.spool.oldest_age_s"], after["export.spool.delivered"]))
    # Generous: the outage's payloads are on disk, not in memory (before the spool the
    # in-memory queue alone could grow by 64 MiB).
    assert growth_mib < 40, samples


def test_sigterm_during_an_outage_is_quick_and_the_next_start_delivers(tmp_path):
    port = free_port()
    rx = Receiver(free_port(), free_port())  # not started: the collector is down
    try:
        with static_server(tmp_path, port):
            daemon = Daemon(tmp_path, "--port", str(port), env=daemon_env(rx), exporter="otlp")
            daemon.start()
            curl_requests(port, 0, N)
            time.sleep(1.0)  # exported, failing, spooled (the rest is flushed at stop)
            started = time.monotonic()
            assert daemon.stop() == 0
            stop_s = time.monotonic() - started
            first_log = daemon.log
            assert stop_s < 5.0, first_log[-3000:]
            assert "spans_dropped=0 export_failures=0" in first_log, first_log[-3000:]
            rx.start()  # the collector is back; a new daemon on the same spool
            again = Daemon(tmp_path, "--port", str(port), env=daemon_env(rx), exporter="otlp")
            again.start()
            try:
                assert wait_for(lambda: len(curl_spans(rx)) >= N, 60), again.log[-3000:]
                curl_requests(port, N, N)  # and what the new daemon captures itself
                assert wait_for(lambda: len(curl_spans(rx)) >= 2 * N, 60), again.log[-3000:]
                time.sleep(1.0)  # duplicates would show
            finally:
                assert again.stop() == 0
    finally:
        rx.stop()
    print("\nSIGTERM during the outage: exited in %.2f s" % stop_s)
    assert [s.attributes["url.query"] for s in curl_spans(rx)] == [
        "i=%d" % i for i in range(2 * N)], again.log[-3000:]
    assert "wait in the spool" in first_log or "were spooled" in first_log, first_log[-3000:]
    assert "holds" in again.log  # the start-up line of a spool with payloads in it
