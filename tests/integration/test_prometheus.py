"""`--prometheus-listen`, proven by a real Prometheus server.

Debian's `prometheus` (scripts/bootstrap.sh --test-peers) scrapes the daemon every
second while curl drives real traffic at a real server; the test then asks Prometheus,
through its HTTP API (/api/v1/query), PromQL questions whose answers are known: the
number of requests sent (exact), per status code, a histogram_quantile, and the
resource of the server process in target_info. Under CI=true a missing or failing
Prometheus fails the test.
"""

from __future__ import annotations

import json
import math
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import require_or_fail
from tests.integration.peers import Daemon, curl, free_port, python_http_server, settle
from tests.receiver import Receiver

pytestmark = pytest.mark.usefixtures("bpf_available")

N_OK = 23  # prime: off-by-one and duplicates show
N_MISSING = 7
SCRAPE_S = 1


class PrometheusServer:
    """`prometheus` in a subprocess scraping one target every SCRAPE_S, with its own
    storage in a temp dir, queried through its HTTP API."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.binary = shutil.which("prometheus")
        self.dir = workdir / "prometheus"
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        self.target = target
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> PrometheusServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        config = self.dir / "prometheus.yml"
        # honor_labels: keep the job/instance labels the daemon sets from each resource.
        config.write_text(
            "global:\n"
            "  scrape_interval: %ds\n"
            "  scrape_timeout: %ds\n"
            "scrape_configs:\n"
            "  - job_name: otel-ebpf\n"
            "    honor_labels: true\n"
            "    static_configs:\n"
            "      - targets: ['%s']\n" % (SCRAPE_S, SCRAPE_S, self.target))
        self.log_path = self.dir / "prometheus.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.binary, "--config.file=%s" % config,
             "--storage.tsdb.path=%s" % (self.dir / "data"),
             "--web.listen-address=127.0.0.1:%d" % self.port],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=self.dir)
        # Ready, and the target scraped once: Prometheus starts scraping a new target only
        # at its next target reload (up to ~5 s after start).
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited with %d:\n%s"
                                   % (self.proc.returncode, self.log_path.read_text()[-3000:]))
            try:
                if self.scalar('up{job="otel-ebpf"}') == 1:
                    return self
            except OSError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("prometheus did not scrape the daemon within 60 s:\n"
                           + self.log_path.read_text()[-3000:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def api(self, path: str, **params: str) -> object:
        url = "%s/api/v1/%s?%s" % (self.url, path, urllib.parse.urlencode(params))
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        """The instant vector of `promql` now: [{"metric": {...}, "value": [t, "v"]}]."""
        data = self.api("query", query=promql)
        assert data["resultType"] == "vector", data
        return data["result"]

    def scalar(self, promql: str) -> float | None:
        """The value of a one-element result; None while the result is empty."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, expected: float, timeout_s: float = 30.0) -> float | None:
        """Poll until `promql` equals `expected`; the last value seen."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            value = self.scalar(promql)
            if value == expected:
                return value
            time.sleep(0.5)
        return value


def prometheus_or_fail() -> None:
    require_or_fail(None if shutil.which("prometheus") else
                    "the prometheus server is not installed (Debian package prometheus; "
                    "scripts/bootstrap.sh --test-peers installs it)")


def server_series(prom: PrometheusServer, pid: int, port: int, daemon: Daemon) -> str:
    """The label matchers of the server process's series: target_info{process_pid}
    gives the job and instance that label every series of that process's resource."""
    query = 'target_info{process_pid="%d"}' % pid
    deadline = time.monotonic() + 20
    targets = prom.query(query)
    while not targets and time.monotonic() < deadline:
        time.sleep(0.5)
        targets = prom.query(query)
    assert len(targets) == 1, (targets, daemon.log[-3000:])
    target = targets[0]["metric"]
    assert target["job"] and target["instance"], target
    assert target["process_executable_name"].startswith("python"), target
    return 'job="%s",instance="%s",server_port="%d"' % (target["job"], target["instance"], port)


def drive_traffic(port: int) -> None:
    """N_OK 200s and N_MISSING 404s, with a pause of a few scrapes in the middle: rate()
    needs the counters to grow while Prometheus watches."""
    for i in range(N_OK):
        if i == N_OK // 2:
            time.sleep(3 * SCRAPE_S)
        assert curl(f"http://127.0.0.1:{port}/hello.txt?i={i}").stdout == "200"
    for i in range(N_MISSING):
        assert curl(f"http://127.0.0.1:{port}/missing-{i}.txt").stdout == "404"


@pytest.mark.parametrize("exporter", ["none", "jsonl"])
def test_prometheus_scrapes_the_daemon_without_a_collector(tmp_path, exporter):
    """No collector anywhere, and Prometheus still gets exact numbers: with --exporter
    none, and beside the jsonl output (both outputs see every exchange)."""
    prometheus_or_fail()
    port, metrics_port = free_port(), free_port()
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_bytes(b"hello world\n" * 100)
    with python_http_server(www, port) as server, \
            Daemon(tmp_path, "--port", str(port), "--prometheus-listen",
                   "127.0.0.1:%d" % metrics_port, exporter=exporter) as daemon, \
            PrometheusServer(tmp_path, "127.0.0.1:%d" % metrics_port) as prom:
        drive_traffic(port)

        who = server_series(prom, server.pid, port, daemon)

        total = "sum(http_server_request_duration_seconds_count{%s})" % who
        assert prom.wait_for(total, N_OK + N_MISSING) == N_OK + N_MISSING, (
            prom.query("http_server_request_duration_seconds_count"), daemon.log[-3000:])
        # Exact, not "at least": a few more scrapes later it is still the number sent.
        time.sleep(3 * SCRAPE_S)
        assert prom.scalar(total) == N_OK + N_MISSING

        by_status = {r["metric"]["http_response_status_code"]: float(r["value"][1])
                     for r in prom.query("sum by (http_response_status_code) "
                                         "(http_server_request_duration_seconds_count{%s})"
                                         % who)}
        assert by_status == {"200": N_OK, "404": N_MISSING}
        routes = {r["metric"]["http_route"]: float(r["value"][1]) for r in prom.query(
            "sum by (http_route) (http_server_request_duration_seconds_count{%s})" % who)}
        assert routes == {"/hello.txt": N_OK,
                          **{"/missing-%d.txt" % i: 1 for i in range(N_MISSING)}}, routes

        # The +Inf bucket is the count; the quantile of loopback requests is a real,
        # small number of seconds.
        assert prom.scalar('sum(http_server_request_duration_seconds_bucket{%s,le="+Inf"})'
                           % who) == N_OK + N_MISSING
        p99 = prom.scalar("histogram_quantile(0.99, sum by (le) "
                          "(http_server_request_duration_seconds_bucket{%s}))" % who)
        assert p99 is not None and math.isfinite(p99) and 0 < p99 <= 10.0, p99
        p50_rate = prom.scalar("histogram_quantile(0.5, sum by (le) (rate("
                               "http_server_request_duration_seconds_bucket{%s}[1m])))" % who)
        assert p50_rate is not None and math.isfinite(p50_rate) and 0 < p50_rate <= 10.0

        # Response bodies: 1200 bytes for each 200.
        ok = 'http_response_status_code="200"'
        assert prom.scalar("sum(http_server_response_body_size_bytes_sum{%s,%s})"
                           % (who, ok)) == 1200 * N_OK

        # The daemon's self-metrics, under its own resource.
        exchanges = prom.scalar('otel_ebpf_http_exchanges_total{job="otel-ebpf"}')
        assert exchanges is not None and exchanges >= N_OK + N_MISSING
        assert prom.scalar('up{job="otel-ebpf"}') == 1
        health = prom.api("targets")["activeTargets"]
        assert [t["health"] for t in health] == ["up"], health
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log[-3000:]
    if exporter == "jsonl":
        served = [e for e in daemon.exchanges()
                  if e["kind"] == "SERVER" and e["process.pid"] == server.pid]
        assert len(served) == N_OK + N_MISSING


def test_prometheus_and_otlp_read_one_aggregation(tmp_path):
    """--exporter otlp and --prometheus-listen together: the collector and Prometheus
    receive the same count for the same series."""
    prometheus_or_fail()
    port, metrics_port = free_port(), free_port()
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_bytes(b"hello world\n" * 100)
    with Receiver() as rx, python_http_server(www, port) as server, \
            Daemon(tmp_path, "--port", str(port), "--prometheus-listen",
                   str(metrics_port), "--otlp-endpoint", rx.http_endpoint, exporter="otlp",
                   env={"OTEL_METRIC_EXPORT_INTERVAL": "1000"}) as daemon, \
            PrometheusServer(tmp_path, "127.0.0.1:%d" % metrics_port) as prom:
        drive_traffic(port)
        promql = ("sum(http_server_request_duration_seconds_count{%s})"
                  % server_series(prom, server.pid, port, daemon))
        assert prom.wait_for(promql, N_OK + N_MISSING) == N_OK + N_MISSING, (
            prom.query("http_server_request_duration_seconds_count"), daemon.log[-3000:])
        settle(2.5)  # one more OTLP export interval with the final counts
        points = [p for p in rx.wait_for_points("http.server.request.duration", 1)
                  if p.attributes.get("server.port") == port
                  and p.resource.get("process.pid") == server.pid]
        latest: dict[tuple, int] = {}
        for p in points:  # cumulative: the last point per attribute set is the total
            latest[tuple(sorted(p.attributes.items()))] = p.count
        assert sum(latest.values()) == N_OK + N_MISSING, points[-5:]
        daemon.stop()
    assert daemon.proc.returncode == 0, daemon.log[-3000:]


def test_address_in_use_is_a_configuration_error(tmp_path):
    """The port is taken: a clear message naming the flag, exit code 2, before any
    BPF program is loaded."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "otel_ebpf.cli", "run", "--exporter", "none",
             "--prometheus-listen", "127.0.0.1:%d" % busy],
            capture_output=True, text=True, timeout=120,
            cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "export.prometheus.listen: cannot listen on 127.0.0.1:%d" % busy in proc.stderr
    assert "--prometheus-listen" in proc.stderr
    assert "Traceback" not in proc.stderr
