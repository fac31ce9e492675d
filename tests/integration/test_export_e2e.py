"""The daemon end to end over OTLP: real eBPF, a real server and curl, a real OTLP
receiver process (rotel), over gRPC and over HTTP/protobuf.

The receiver must show one SERVER span per request with exact attributes and the
server's own per-process resource, and histogram data points whose counts equal the
requests sent; a receiver that is down when the daemon starts must not stop it, and
what was captured meanwhile arrives once the receiver is up.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from otel_ebpf.process import read_machine_id
from tests.integration.peers import Daemon, curl, free_port, process
from tests.receiver import Receiver, ReceivedSpan

pytestmark = pytest.mark.usefixtures("bpf_available")

N = 23  # prime: off-by-one and duplicates show
SERVICE = "e2e-static"
BODY = b"hello world\n" * 100


def daemon_env(protocol: str, rx: Receiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_EXPORTER_OTLP_ENDPOINT": rx.grpc_endpoint if protocol == "grpc"
        else rx.http_endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans reach the receiver quickly
        "OTEL_METRIC_EXPORT_INTERVAL": "1000",  # ms
        "OTEL_EBPF_EXPORT_OTLP_RETRY_MAX_BACKOFF_S": "1",
    }


def server(tmp_path, port: int):
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "hello.txt").write_bytes(BODY)
    # The target's own OTEL_SERVICE_NAME, read by the daemon from /proc/PID/environ.
    return process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                    "--directory", str(www)], port=port, env={"OTEL_SERVICE_NAME": SERVICE})


def server_spans(rx: Receiver) -> list[ReceivedSpan]:
    return [s for s in rx.spans
            if s.kind == "SPAN_KIND_SERVER" and s.resource.get("service.name") == SERVICE]


def wait_for_server_spans(rx: Receiver, count: int, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(server_spans(rx)) < count:
        time.sleep(0.1)
    time.sleep(0.5)  # duplicates beyond `count` would show in the exact assertion
    return server_spans(rx)


def requests(port: int, first: int, count: int) -> None:
    for i in range(first, first + count):
        assert curl("http://127.0.0.1:%d/hello.txt?i=%d" % (port, i)).stdout == "200"


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_and_metrics_reach_a_real_receiver(tmp_path, protocol):
    port = free_port()
    with Receiver() as rx, server(tmp_path, port) as srv, \
            Daemon(tmp_path, "--port", str(port), env=daemon_env(protocol, rx),
                   exporter="otlp") as daemon:
        started_ns = time.time_ns()
        requests(port, 0, N)
        ended_ns = time.time_ns()
        spans = wait_for_server_spans(rx, N)
        assert daemon.stop() == 0
        points = rx.wait_for_points("http.server.request.duration", 1)
    assert len(spans) == N, daemon.log[-3000:]
    assert sorted(s.attributes["url.query"] for s in spans) == sorted(
        "i=%d" % i for i in range(N))
    for s in spans:
        assert s.name == "GET /hello.txt"
        assert s.status_code == "STATUS_CODE_UNSET"
        assert started_ns <= s.start_time_unix_nano <= s.end_time_unix_nano <= ended_ns
        a = s.attributes
        assert a["http.request.method"] == "GET"
        assert a["url.path"] == "/hello.txt"
        assert a["url.scheme"] == "http"
        assert a["http.route"] == "/hello.txt"
        assert a["http.response.status_code"] == 200
        assert a["http.response.body.size"] == len(BODY)
        assert a["server.port"] == port
        assert a["network.peer.address"] == "127.0.0.1"
        assert a["user_agent.original"].startswith("curl/")
        r = s.resource
        assert r["process.pid"] == srv.pid
        assert r["process.executable.path"] == os.path.realpath(sys.executable)
        assert r["process.command_line"].endswith("--directory %s" % (tmp_path / "www"))
        assert r["host.id"] == read_machine_id()
        assert r["telemetry.distro.name"] == "otel-ebpf"
    # One instance id for the one server process.
    assert len({s.resource["service.instance.id"] for s in spans}) == 1
    # Cumulative histogram: the last point of the series counts every request.
    ours = [p for p in points if p.resource.get("service.name") == SERVICE
            and p.attributes.get("http.route") == "/hello.txt"]
    assert ours, [p.resource.get("service.name") for p in points]
    last = ours[-1]
    assert last.count == N
    assert last.attributes["http.request.method"] == "GET"
    assert last.attributes["http.response.status_code"] == 200
    assert "url.path" not in last.attributes  # never a raw path on metrics
    assert last.descriptor["Unit"] == "s"
    assert last.explicit_bounds[0] == 0.005 and last.explicit_bounds[-1] == 10
    assert sum(last.bucket_counts) == N
    assert "export_failures=0" in daemon.log


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_receiver_down_at_start_then_started(tmp_path, protocol):
    port = free_port()
    rx = Receiver(free_port(), free_port())  # not started yet: nothing listens
    try:
        with server(tmp_path, port), \
                Daemon(tmp_path, "--port", str(port), env=daemon_env(protocol, rx),
                       exporter="otlp") as daemon:
            requests(port, 0, N)
            time.sleep(2.0)  # the export of these is failing and being retried
            assert daemon.proc.poll() is None  # the daemon survives
            rx.start()
            requests(port, N, N)
            spans = wait_for_server_spans(rx, 2 * N, timeout_s=30)
            assert daemon.stop() == 0
    finally:
        rx.stop()
    # What was captured while the receiver was down arrived too, exactly once.
    assert sorted(s.attributes["url.query"] for s in spans) == sorted(
        "i=%d" % i for i in range(2 * N)), daemon.log[-3000:]
    assert "export_failures=0" in daemon.log
