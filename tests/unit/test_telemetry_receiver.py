"""Telemetry's hand-written payloads through the real OtlpExporter to a real OTLP
receiver process (rotel), over gRPC and HTTP/protobuf: what the receiver prints is
what the exchanges said. No eBPF and no root: exchanges are built here, everything
after them is real. Needs the `rotel` test dependency (scripts/bootstrap.sh)."""

from __future__ import annotations

import pytest

from otel_ebpf import __version__
from otel_ebpf.capture.events import Role
from otel_ebpf.export import OtlpExporter, OtlpOptions, OtlpSignalOptions
from otel_ebpf.exchange import HttpExchange, RpcCall
from otel_ebpf.stats import Stats
from otel_ebpf.telemetry import Telemetry, TelemetryOptions

receiver = pytest.importorskip("tests.receiver")

N = 23
T0 = 1_700_000_000_000_000_000
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
RESOURCE = {"service.name": "shop", "process.pid": 4242, "process.command_line": "shop --x"}


def exchange(i: int) -> HttpExchange:
    return HttpExchange(
        pid=4242, tid=4242, role=Role.SERVER, local_address="127.0.0.1", local_port=8080,
        remote_address="127.0.0.1", remote_port=40000 + i, scheme="http",
        protocol_version="1.1", method="GET", target="/users/%d?token=s3cret" % i,
        host="localhost:8080", user_agent="curl/7.88.1",
        traceparent="00-%s-00f067aa0ba902b7-01" % TRACE if i == 7 else None, tracestate=None,
        request_body_size=0, response_body_size=12, status_code=500 if i == 7 else 200,
        start_time_unix_nano=T0 + i * 1_000_000, end_time_unix_nano=T0 + i * 1_000_000 + 30_000_000,
    )


def exporter_options(protocol: str, rx) -> OtlpOptions:
    def sig(signal: str) -> OtlpSignalOptions:
        endpoint = (rx.grpc_endpoint if protocol == "grpc"
                    else "%s/v1/%s" % (rx.http_endpoint, signal))
        return OtlpSignalOptions(protocol=protocol, endpoint=endpoint, timeout_s=2.0)
    return OtlpOptions(traces=sig("traces"), metrics=sig("metrics"),
                       retry_initial_backoff_s=0.1, retry_max_backoff_s=0.5)


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_spans_and_histogram_arrive_exactly(protocol):
    try:
        rx = receiver.Receiver().start()
    except RuntimeError as exc:  # rotel missing: say how to get it
        pytest.skip(str(exc))
    try:
        stats = Stats()
        exporter = OtlpExporter(exporter_options(protocol, rx), stats)
        t = Telemetry(TelemetryOptions(), resource_for_pid={4242: RESOURCE}.get,
                      daemon_resource={"service.name": "otel-ebpf"}, sink=exporter,
                      stats=stats)
        for i in range(N):
            t.record(exchange(i))
        t.flush()
        assert exporter.force_flush(10)
        spans = rx.wait_for_spans(N)
        points = rx.wait_for_points("http.server.request.duration", 2)
        exporter.shutdown(5)
    finally:
        rx.stop()
    assert stats.get("export.failures") == 0
    assert len(spans) == N
    by_port = {s.attributes["client.port"]: s for s in spans}
    s7 = by_port[40007]
    assert s7.resource == RESOURCE
    assert (s7.scope_name, s7.scope_version) == ("otel-ebpf", __version__)
    assert s7.name == "GET /users/{id}" and s7.kind == "SPAN_KIND_SERVER"
    assert s7.trace_id == TRACE and s7.parent_id == "00f067aa0ba902b7"
    assert s7.start_time_unix_nano == T0 + 7_000_000
    assert s7.end_time_unix_nano == T0 + 37_000_000
    assert s7.status_code == "STATUS_CODE_ERROR"
    assert s7.attributes == {
        "http.request.method": "GET", "url.path": "/users/7", "url.query": "token=REDACTED",
        "url.scheme": "http", "http.route": "/users/{id}", "http.response.status_code": 500,
        "server.address": "localhost", "server.port": 8080, "client.address": "127.0.0.1",
        "client.port": 40007, "network.peer.address": "127.0.0.1", "network.peer.port": 40007,
        "network.protocol.version": "1.1", "user_agent.original": "curl/7.88.1",
        "http.request.body.size": 0, "http.response.body.size": 12, "error.type": "500",
    }
    assert by_port[40003].status_code == "STATUS_CODE_UNSET"
    by_status = {p.attributes["http.response.status_code"]: p for p in points
                 if p.resource == RESOURCE}
    assert by_status[200].count == N - 1 and by_status[500].count == 1
    assert by_status[200].explicit_bounds == [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25,
                                              0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0]
    # every request took 30 ms: bucket (0.025, 0.05]
    assert by_status[200].bucket_counts == [0, 0, 0, N - 1] + [0] * 11
    assert by_status[200].sum == pytest.approx(0.03 * (N - 1))


def grpc_call(i: int) -> HttpExchange:
    """Unary SayHello calls, every fifth one answered UNAVAILABLE (a server error)."""
    code = 14 if i % 5 == 0 else 0
    return HttpExchange(
        pid=4242, tid=4242, role=Role.SERVER, local_address="127.0.0.1", local_port=50051,
        remote_address="127.0.0.1", remote_port=40000 + i, scheme="http",
        protocol_version="2", method="POST", target="/helloworld.Greeter/SayHello",
        host="localhost:50051", user_agent="grpc-python/1.60.0", traceparent=None,
        tracestate=None, request_body_size=12, response_body_size=17 if code == 0 else 0,
        status_code=200, start_time_unix_nano=T0 + i * 1_000_000,
        end_time_unix_nano=T0 + i * 1_000_000 + 30_000_000, stream_id=2 * i + 1,
        rpc=RpcCall("grpc", "helloworld.Greeter", "SayHello", code, 1, 1 if code == 0 else 0),
    )


def test_grpc_spans_and_rpc_histograms_arrive_exactly():
    try:
        rx = receiver.Receiver().start()
    except RuntimeError as exc:  # rotel missing: say how to get it
        pytest.skip(str(exc))
    try:
        stats = Stats()
        exporter = OtlpExporter(exporter_options("grpc", rx), stats)
        t = Telemetry(TelemetryOptions(), resource_for_pid={4242: RESOURCE}.get,
                      daemon_resource={"service.name": "otel-ebpf"}, sink=exporter,
                      stats=stats)
        for i in range(N):
            t.record(grpc_call(i))
        t.flush()
        assert exporter.force_flush(10)
        spans = rx.wait_for_spans(N)
        points = rx.wait_for_points("rpc.server.duration", 2)
        exporter.shutdown(5)
    finally:
        rx.stop()
    assert stats.get("export.failures") == 0
    assert len(spans) == N
    by_port = {s.attributes["client.port"]: s for s in spans}
    assert by_port[40005].name == "helloworld.Greeter/SayHello"
    assert by_port[40005].status_code == "STATUS_CODE_ERROR"
    assert by_port[40005].attributes == {
        "rpc.system": "grpc", "rpc.service": "helloworld.Greeter", "rpc.method": "SayHello",
        "rpc.grpc.status_code": 14, "error.type": "UNAVAILABLE",
        "server.address": "localhost", "server.port": 50051, "client.address": "127.0.0.1",
        "client.port": 40005, "network.peer.address": "127.0.0.1", "network.peer.port": 40005,
        "network.protocol.version": "2", "otel_ebpf.rpc.request_messages": 1,
        "otel_ebpf.rpc.response_messages": 0,
    }
    assert by_port[40001].status_code == "STATUS_CODE_UNSET"
    by_code = {p.attributes["rpc.grpc.status_code"]: p for p in points
               if p.resource == RESOURCE}
    unavailable = (N + 4) // 5  # i = 0, 5, 10, 15, 20
    assert by_code[0].count == N - unavailable and by_code[14].count == unavailable
    assert by_code[14].attributes["error.type"] == "UNAVAILABLE"
    assert by_code[0].descriptor["Unit"] == "ms"
    # every call took 30 ms: bucket (25, 50] of the ms boundaries 0, 5, 10, 25, 50, ...
    assert by_code[0].bucket_counts == [0, 0, 0, 0, N - unavailable] + [0] * 11
    assert by_code[0].sum == pytest.approx(30.0 * (N - unavailable))
