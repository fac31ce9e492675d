"""The daemon end to end over OTLP: real eBPF, a real server and curl, a real OTLP
receiver process (rotel), over gRPC and over HTTP/protobuf.

The receiver must show one SERVER span per request with exact attributes and the
server's own per-process resource, and histogram data points whose counts equal the
requests sent (for a grpcio service and client too: rpc.* spans on both sides and
rpc.{server,client}.* histograms); a receiver that is down when the daemon starts must not stop it, and
what was captured meanwhile arrives once the receiver is up.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

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


# ---------------------------------------------------------------- gRPC

GRPC_SERVER = "e2e-grpc-server"
GRPC_CLIENT = "e2e-grpc-client"
GREETER = Path(__file__).with_name("grpc_greeter.py")
# method -> calls; 11 unary OK (prime), streaming both ways, a caller's error status
# (NOT_FOUND), a server's (INTERNAL), and a deadline that expires.
GRPC_PLAN = {"SayHello": 11, "ListFeatures": 3, "RecordRoute": 2, "Lookup": 2, "Crash": 2,
             "Slow": 1}


def rpc_spans(rx: Receiver, service: str) -> list[ReceivedSpan]:
    return [s for s in rx.spans
            if s.resource.get("service.name") == service and "rpc.system" in s.attributes]


def test_grpc_spans_and_rpc_metrics_reach_a_real_receiver(tmp_path):
    """A real grpcio server and client (separate processes, each with its own
    service.name): one SERVER and one CLIENT span per call with the rpc.* attributes
    and the status rules of each side, and rpc.{server,client}.duration histograms
    counting every call, at a real OTLP receiver."""
    port = free_port()
    calls = sum(GRPC_PLAN.values())
    plan = ",".join("%s:%d" % kv for kv in GRPC_PLAN.items())
    with Receiver() as rx, \
            process([sys.executable, str(GREETER), "serve", str(port)], port=port,
                    env={"OTEL_SERVICE_NAME": GRPC_SERVER},
                    log_path=tmp_path / "greeter.log") as srv, \
            Daemon(tmp_path, "--port", str(port), env=daemon_env("http/protobuf", rx),
                   exporter="otlp") as daemon:
        client = subprocess.run(
            [sys.executable, str(GREETER), "call", str(port), plan],
            env={**os.environ, "OTEL_SERVICE_NAME": GRPC_CLIENT},
            capture_output=True, text=True, timeout=120)
        assert client.returncode == 0, client.stderr
        results = [json.loads(line) for line in client.stdout.splitlines()]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (len(rpc_spans(rx, GRPC_SERVER)) < calls
                                               or len(rpc_spans(rx, GRPC_CLIENT)) < calls):
            time.sleep(0.2)
        time.sleep(3.0)  # the Slow handler's late answer, and duplicates, would show
        server_spans_, client_spans = rpc_spans(rx, GRPC_SERVER), rpc_spans(rx, GRPC_CLIENT)
        assert daemon.stop() == 0
        points = rx.points
    # What the client saw: the plan, with the statuses the server meant.
    expected_codes = {"SayHello": "OK", "ListFeatures": "OK", "RecordRoute": "OK",
                      "Lookup": "NOT_FOUND", "Crash": "INTERNAL", "Slow": "DEADLINE_EXCEEDED"}
    assert Counter(r["method"] for r in results) == Counter(GRPC_PLAN)
    assert all(r["code"] == expected_codes[r["method"]] for r in results), results

    # Exactly one span per call and side, named {service}/{method}.
    expected_names = Counter({"helloworld.Greeter/" + m: n for m, n in GRPC_PLAN.items()})
    assert Counter(s.name for s in server_spans_) == expected_names, daemon.log[-3000:]
    assert Counter(s.name for s in client_spans) == expected_names, daemon.log[-3000:]
    grpc_status = {"OK": 0, "NOT_FOUND": 5, "INTERNAL": 13}
    for side, spans in (("server", server_spans_), ("client", client_spans)):
        for s in spans:
            a = s.attributes
            method = s.name.split("/", 1)[1]
            assert s.kind == ("SPAN_KIND_SERVER" if side == "server" else "SPAN_KIND_CLIENT")
            assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == (
                "grpc", "helloworld.Greeter", method)
            assert a["network.protocol.version"] == "2"
            assert a["server.port"] == port
            assert a["network.peer.address"] == "127.0.0.1"
            assert not [k for k in a if k.startswith("http.") or k.startswith("url.")]
            code = expected_codes[method]
            if method == "Slow":
                # The client's deadline expires: it resets the stream (RST_STREAM), unless
                # the server's own deadline answer (grpc-status 4) wins the race.
                assert s.status_code == "STATUS_CODE_ERROR", (side, a)
                assert a["error.type"] in ("stream_reset", "DEADLINE_EXCEEDED"), (side, a)
                assert a.get("rpc.grpc.status_code", 4) == 4, (side, a)
                continue
            assert a["rpc.grpc.status_code"] == grpc_status[code], (side, a)
            # NOT_FOUND: the caller's error, so an error for the client only.
            error = code == "INTERNAL" or (code == "NOT_FOUND" and side == "client")
            assert s.status_code == ("STATUS_CODE_ERROR" if error else "STATUS_CODE_UNSET")
            assert a.get("error.type") == (code if error else None), (side, a)
            messages = {"ListFeatures": (1, 5), "RecordRoute": (7, 1)}.get(method, (1, 1))
            if code != "OK":
                messages = (1, 0)
            assert (a["otel_ebpf.rpc.request_messages"],
                    a["otel_ebpf.rpc.response_messages"]) == messages, (side, method, a)
    assert {s.resource["process.pid"] for s in server_spans_} == {srv.pid}
    client_pids = {s.resource["process.pid"] for s in client_spans}
    assert len(client_pids) == 1 and srv.pid not in client_pids

    # Metrics: cumulative histograms whose last point counts every call of a method.
    def last(metric: str, service: str, method: str, code: int = 0):
        ours = [p for p in points if p.metric == metric
                and p.resource.get("service.name") == service
                and p.attributes.get("rpc.method") == method
                and p.attributes.get("rpc.grpc.status_code") == code]
        assert ours, (metric, service, method, sorted({p.metric for p in points}))
        return ours[-1]

    unary = last("rpc.server.duration", GRPC_SERVER, "SayHello")
    assert unary.count == GRPC_PLAN["SayHello"] and sum(unary.bucket_counts) == unary.count
    assert unary.descriptor["Unit"] == "ms"
    assert unary.attributes["rpc.system"] == "grpc"
    assert unary.attributes["rpc.service"] == "helloworld.Greeter"
    assert unary.attributes["server.port"] == port
    assert "error.type" not in unary.attributes
    assert 0 < unary.sum < 1000 * unary.count  # milliseconds, not seconds or ns
    streamed = last("rpc.server.responses_per_rpc", GRPC_SERVER, "ListFeatures")
    assert (streamed.count, streamed.sum) == (GRPC_PLAN["ListFeatures"],
                                              5 * GRPC_PLAN["ListFeatures"])
    crash = last("rpc.server.duration", GRPC_SERVER, "Crash", 13)
    assert crash.count == GRPC_PLAN["Crash"] and crash.attributes["error.type"] == "INTERNAL"
    assert last("rpc.client.duration", GRPC_CLIENT, "SayHello").count == GRPC_PLAN["SayHello"]
    lookup = last("rpc.client.duration", GRPC_CLIENT, "Lookup", 5)
    assert lookup.attributes["error.type"] == "NOT_FOUND"
    # gRPC calls are not counted a second time as HTTP requests.
    assert not [p for p in points if p.metric.startswith("http.")
                and p.resource.get("service.name") in (GRPC_SERVER, GRPC_CLIENT)]
    assert "export_failures=0" in daemon.log
