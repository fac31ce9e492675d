"""OtlpExporter against a real OTLP receiver process (rotel), over gRPC and HTTP/protobuf.

Payloads are built with opentelemetry.proto (the reference encoder), carrying a real
per-process resource from ProcessResolver; the assertions are on what rotel printed.
No eBPF here, so no `bpf_available`: these need only the `rotel` test dependency.
"""

from __future__ import annotations

import os
import time

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from otel_ebpf.export import OtlpExporter, OtlpOptions, OtlpSignalOptions
from otel_ebpf.process import ProcessResolver
from otel_ebpf.stats import Stats
from tests.receiver import Receiver, free_port

N = 23  # prime: off-by-one and duplicates show
BOUNDS = [0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10]


def kv(key: str, value) -> KeyValue:
    if isinstance(value, bool):
        return KeyValue(key=key, value=AnyValue(bool_value=value))
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    if isinstance(value, list):
        return KeyValue(key=key, value=AnyValue(array_value=ArrayValue(
            values=[AnyValue(string_value=v) for v in value])))
    return KeyValue(key=key, value=AnyValue(string_value=value))


def resource() -> dict:
    info = ProcessResolver(Stats()).get(os.getpid())
    assert info is not None
    return info.resource_attributes


def trace_payload(res: dict, names: list[str]) -> bytes:
    req = ExportTraceServiceRequest()
    rs = req.resource_spans.add()
    rs.resource.attributes.extend(kv(k, v) for k, v in res.items())
    ss = rs.scope_spans.add()
    ss.scope.name = "otel-ebpf"
    ss.scope.version = "0.1.0"
    for i, name in enumerate(names):
        s = ss.spans.add()
        s.trace_id = bytes.fromhex("5b8efff798038103d269b633813fc6%02x" % i)
        s.span_id = bytes.fromhex("eee19b7ec3c1b1%02x" % i)
        s.parent_span_id = bytes.fromhex("00f067aa0ba902b7")
        s.name = name
        s.kind = trace_pb2.Span.SPAN_KIND_SERVER
        s.start_time_unix_nano = 1_700_000_000_000_000_000 + i
        s.end_time_unix_nano = 1_700_000_000_002_500_000 + i
        s.attributes.extend([kv("http.request.method", "GET"), kv("url.path", "/users/%d" % i),
                             kv("http.route", "/users/{id}"),
                             kv("http.response.status_code", 500 if i == 7 else 200)])
        if i == 7:
            s.status.code = trace_pb2.Status.STATUS_CODE_ERROR
            s.attributes.append(kv("error.type", "500"))
    return req.SerializeToString()


def metrics_payload(res: dict) -> bytes:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    rm.resource.attributes.extend(kv(k, v) for k, v in res.items())
    sm = rm.scope_metrics.add()
    sm.scope.name = "otel-ebpf"
    m = sm.metrics.add()
    m.name = "http.server.request.duration"
    m.unit = "s"
    m.histogram.aggregation_temporality = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    p = m.histogram.data_points.add()
    p.attributes.extend([kv("http.request.method", "GET"), kv("http.route", "/users/{id}"),
                         kv("http.response.status_code", 200)])
    p.start_time_unix_nano, p.time_unix_nano = 1_700_000_000_000_000_000, 1_700_000_060_000_000_000
    p.count = N
    p.sum = 0.0575
    p.explicit_bounds.extend(BOUNDS)
    p.bucket_counts.extend([20, 3] + [0] * (len(BOUNDS) - 1))
    return req.SerializeToString()


def options(protocol: str, rx_grpc: str, rx_http: str, compression: str = "gzip",
            **kw) -> OtlpOptions:
    def sig(signal):
        endpoint = rx_grpc if protocol == "grpc" else "%s/v1/%s" % (rx_http, signal)
        return OtlpSignalOptions(protocol=protocol, endpoint=endpoint, timeout_s=2.0,
                                 compression=compression, headers=(("x-tenant", "t1"),))
    kw.setdefault("retry_initial_backoff_s", 0.1)
    kw.setdefault("retry_max_backoff_s", 0.5)
    return OtlpOptions(traces=sig("traces"), metrics=sig("metrics"), **kw)


PROTOCOLS = [("grpc", "gzip"), ("http/protobuf", "gzip"), ("http/protobuf", "none"),
             ("grpc", "none")]


@pytest.mark.parametrize("protocol,compression", PROTOCOLS)
def test_spans_arrive_with_exact_attributes_and_resource(protocol, compression):
    res = resource()
    names = ["GET /users/{id}"] * N
    stats = Stats()
    with Receiver() as rx:
        ex = OtlpExporter(options(protocol, rx.grpc_endpoint, rx.http_endpoint, compression),
                          stats)
        ex.export_traces(trace_payload(res, names), N)
        assert ex.force_flush(10)
        spans = rx.wait_for_spans(N)
        ex.shutdown(5)
    assert len(spans) == N
    assert stats.get("export.spans_sent") == N
    assert stats.get("export.failures") == 0
    by_path = {s.attributes["url.path"]: s for s in spans}
    assert sorted(by_path) == sorted("/users/%d" % i for i in range(N))
    s7 = by_path["/users/7"]
    assert s7.name == "GET /users/{id}"
    assert s7.kind == "SPAN_KIND_SERVER"
    assert s7.trace_id == "5b8efff798038103d269b633813fc607"
    assert s7.span_id == "eee19b7ec3c1b107"
    assert s7.parent_id == "00f067aa0ba902b7"
    assert s7.start_time_unix_nano == 1_700_000_000_000_000_007
    assert s7.end_time_unix_nano == 1_700_000_000_002_500_007
    assert s7.status_code == "STATUS_CODE_ERROR"
    assert s7.attributes == {"http.request.method": "GET", "url.path": "/users/7",
                             "http.route": "/users/{id}", "http.response.status_code": 500,
                             "error.type": "500"}
    assert by_path["/users/3"].status_code == "STATUS_CODE_UNSET"
    assert s7.scope_name == "otel-ebpf" and s7.scope_version == "0.1.0"
    # The per-process resource arrived intact, value types included.
    assert s7.resource == res
    assert s7.resource["process.pid"] == os.getpid()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_histogram_point_arrives_with_exact_count_and_buckets(protocol):
    res = resource()
    stats = Stats()
    with Receiver() as rx:
        ex = OtlpExporter(options(protocol, rx.grpc_endpoint, rx.http_endpoint), stats)
        ex.export_metrics(metrics_payload(res), 1)
        assert ex.force_flush(10)
        points = rx.wait_for_points("http.server.request.duration", 1)
        ex.shutdown(5)
    assert len(points) == 1
    p = points[0]
    assert p.descriptor["Unit"] == "s"
    assert p.descriptor["DataType"] == "Histogram"
    assert p.descriptor["AggregationTemporality"] == "AGGREGATION_TEMPORALITY_CUMULATIVE"
    assert p.count == N
    assert p.sum == 0.0575
    assert p.explicit_bounds == BOUNDS
    assert p.bucket_counts == [20, 3] + [0] * (len(BOUNDS) - 1)
    assert p.attributes == {"http.request.method": "GET", "http.route": "/users/{id}",
                            "http.response.status_code": 200}
    assert p.resource["service.name"] == res["service.name"]
    assert stats.get("export.points_sent") == 1


def _wait(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_receiver_down_at_start_then_started(protocol):
    """The exporter survives a missing collector, retries, and delivers once it is up."""
    res = resource()
    grpc_port, http_port = free_port(), free_port()
    rx = Receiver(grpc_port, http_port)
    stats = Stats()
    ex = OtlpExporter(options(protocol, rx.grpc_endpoint, rx.http_endpoint,
                              retry_max_elapsed_s=20), stats)
    try:
        ex.export_traces(trace_payload(res, ["early"]), 1)
        assert _wait(lambda: stats.get("export.retries") >= 2, 10), stats.snapshot()
        assert stats.get("export.spans_sent") == 0
        rx.start()
        ex.export_traces(trace_payload(res, ["late"]), 1)
        assert ex.force_flush(15)
        spans = rx.wait_for_spans(2)
    finally:
        ex.shutdown(5)
        rx.stop()
    assert sorted(s.name for s in spans) == ["early", "late"]
    assert stats.get("export.spans_sent") == 2
    assert stats.get("export.failures") == 0
    assert stats.get("export.payloads_dropped") == 0


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_long_outage_drops_oldest_and_counts_then_delivers_what_is_new(protocol):
    res = resource()
    rx = Receiver(free_port(), free_port())
    stats = Stats()
    ex = OtlpExporter(options(protocol, rx.grpc_endpoint, rx.http_endpoint,
                              max_queue_payloads=3, retry_max_elapsed_s=30), stats)
    try:
        ex.export_traces(trace_payload(res, ["p00"]), 1)
        assert _wait(lambda: stats.get("export.retries") >= 1, 10)  # p00 is in flight
        for i in range(1, N):
            ex.export_traces(trace_payload(res, ["p%02d" % i]), 1)
        assert stats.get("export.payloads_dropped") == N - 1 - 3
        assert stats.get("export.spans_dropped") == N - 1 - 3
        rx.start()
        assert ex.force_flush(15)
        ex.export_traces(trace_payload(res, ["after"]), 1)
        assert ex.force_flush(10)
        spans = rx.wait_for_spans(5)
    finally:
        ex.shutdown(5)
        rx.stop()
    assert sorted(s.name for s in spans) == ["after", "p00", "p20", "p21", "p22"]
    assert stats.get("export.failures") == 0
