"""Microbenchmark: Telemetry.record() (span bytes + metric aggregation) side by side
with the OTel SDK path it replaces (tracer.start_span with 8 attributes + end, and
Histogram.record), interleaved and repeated in one run. Prints numbers; asserts only
that what was measured was real (every span and data point exported and decodable),
never a time.

    .venv/bin/python tests/unit/test_telemetry_bench.py [exchanges-per-round]
    .venv/bin/python -m pytest -s tests/unit/test_telemetry_bench.py   (short run)
"""

from __future__ import annotations

import statistics
import sys
import time

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_ebpf.capture.events import Role
from otel_ebpf.exchange import HttpExchange
from otel_ebpf.stats import Stats
from otel_ebpf.telemetry import Telemetry, TelemetryOptions

T0 = 1_700_000_000_000_000_000


def workload(n: int) -> list[HttpExchange]:
    """A realistic mix: ids in paths, 10 requests per keep-alive connection, a few
    queries, errors and a traceparent on every 4th request."""
    out = []
    for i in range(n):
        out.append(HttpExchange(
            pid=1000 + i % 3, tid=1000, role=Role.SERVER if i % 5 else Role.CLIENT,
            local_address="10.0.0.1", local_port=8080, remote_address="10.0.0.%d" % (i // 10 % 7),
            remote_port=30000 + i // 10, scheme="http", protocol_version="1.1",
            method="GET" if i % 4 else "POST",
            target="/api/users/%d/orders%s" % (i, "?page=2&token=t%d" % i if i % 3 == 0 else ""),
            host="shop.local:8080", user_agent="wrk/4.2.0",
            traceparent="00-4bf92f3577b34da6a3ce929d0e0e%04x-00f067aa0ba902b7-01" % (i % 65536)
            if i % 4 == 0 else None,
            tracestate=None, request_body_size=0 if i % 4 else 120,
            response_body_size=612, status_code=500 if i % 50 == 0 else 200,
            start_time_unix_nano=T0 + i * 1000, end_time_unix_nano=T0 + i * 1000 + 250_000,
        ))
    return out


def workload_nginx(n: int) -> list[HttpExchange]:
    """The common production shape: one nginx-like server process, one route
    (GET /index.html?rid=N, a query unique per request), a Host header, 200, 50
    keep-alive connections of a load generator (wrk-like), no traceparent."""
    out = []
    for i in range(n):
        conn = i % 50
        out.append(HttpExchange(
            pid=4242, tid=4242, role=Role.SERVER,
            local_address="10.0.0.1", local_port=80, remote_address="10.0.0.2",
            remote_port=40000 + conn, scheme="http", protocol_version="1.1",
            method="GET", target="/index.html?rid=%d" % i,
            host="web.local", user_agent="wrk/4.2.0",
            traceparent=None, tracestate=None, request_body_size=0,
            response_body_size=615, status_code=200,
            start_time_unix_nano=T0 + i * 20_000,
            end_time_unix_nano=T0 + i * 20_000 + 80_000 + (i * 7919) % 50_000,
        ))
    return out


WORKLOADS = {"mixed": workload, "nginx": workload_nginx}


class CountingSink:
    def __init__(self) -> None:
        self.spans = 0
        self.points = 0
        self.trace_payloads: list[bytes] = []
        self.metric_payloads: list[bytes] = []

    def export_traces(self, payload: bytes, spans: int = 1) -> None:
        self.spans += spans
        if len(self.trace_payloads) < 2:
            self.trace_payloads.append(payload)

    def export_metrics(self, payload: bytes, points: int = 1) -> None:
        self.points += points
        self.metric_payloads.append(payload)


def run_ours(exchanges: list[HttpExchange], sink: CountingSink) -> float:
    t = Telemetry(TelemetryOptions(), resource_for_pid=lambda pid: {"service.name": "s%d" % pid},
                  daemon_resource={"service.name": "otel-ebpf"}, sink=sink, stats=Stats())
    record = t.record
    start = time.process_time()
    for ex in exchanges:
        record(ex)
    t.flush()  # the batch encode/export is part of the cost
    return (time.process_time() - start) / len(exchanges) * 1e6


def make_sdk():
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class NullExporter(SpanExporter):
        def export(self, spans):
            return SpanExportResult.SUCCESS

    tp = TracerProvider()
    tp.add_span_processor(BatchSpanProcessor(NullExporter()))
    reader = InMemoryMetricReader()
    mp = MeterProvider(metric_readers=[reader])
    tracer = tp.get_tracer("bench")
    hist = mp.get_meter("bench").create_histogram("http.server.request.duration", unit="s")
    return tp, mp, tracer, hist


def run_sdk(exchanges: list[HttpExchange], sdk) -> float:
    from opentelemetry.trace import SpanKind

    _, _, tracer, hist = sdk
    start = time.process_time()
    for ex in exchanges:
        attrs = {
            "http.request.method": ex.method, "url.path": ex.path, "url.scheme": ex.scheme,
            "http.response.status_code": ex.status_code, "server.address": "shop.local",
            "server.port": ex.local_port, "client.address": ex.remote_address,
            "client.port": ex.remote_port,
        }
        span = tracer.start_span(ex.method, kind=SpanKind.SERVER, attributes=attrs,
                                 start_time=ex.start_time_unix_nano)
        span.end(end_time=ex.end_time_unix_nano)
        hist.record(ex.duration_ns / 1e9, {"http.request.method": ex.method,
                                          "http.response.status_code": ex.status_code,
                                          "url.scheme": ex.scheme})
    return (time.process_time() - start) / len(exchanges) * 1e6


def bench(n: int = 20000, rounds: int = 5, shape: str = "mixed") -> dict:
    exchanges = WORKLOADS[shape](n)
    sdk = make_sdk()
    ours, theirs = [], []
    sink = CountingSink()
    for _ in range(rounds):  # interleaved: noise hits both sides alike
        ours.append(run_ours(exchanges, sink))
        theirs.append(run_sdk(exchanges, sdk))
    sdk[0].shutdown()
    sdk[1].shutdown()
    result = {
        "shape": shape, "exchanges_per_round": n, "rounds": rounds,
        "ours_us_median": statistics.median(ours), "ours_us_min": min(ours),
        "sdk_us_median": statistics.median(theirs), "sdk_us_min": min(theirs),
        "spans_exported": sink.spans, "points_exported": sink.points,
        "sink": sink,
    }
    result["speedup"] = result["sdk_us_median"] / result["ours_us_median"]
    return result


def report(r: dict) -> None:
    print("\ntelemetry record() microbenchmark (%s): %d exchanges x %d rounds, CPU time"
          % (r["shape"], r["exchanges_per_round"], r["rounds"]))
    print("  %-52s %7.2f us/exchange (min %.2f)" % (
        "otel-ebpf Telemetry.record (span bytes + 3 histograms)", r["ours_us_median"],
        r["ours_us_min"]))
    print("  %-52s %7.2f us/exchange (min %.2f)" % (
        "OTel SDK start_span(8 attrs)+end + Histogram.record", r["sdk_us_median"],
        r["sdk_us_min"]))
    print("  speedup x%.1f; per core: %.0f vs %.0f exchanges/s" % (
        r["speedup"], 1e6 / r["ours_us_median"], 1e6 / r["sdk_us_median"]))


def test_record_vs_sdk_microbenchmark():
    n, rounds = 2000, 3
    r = bench(n, rounds)
    report(r)
    # What was timed really happened: every exchange became a span (none of the
    # workload's traceparents is unsampled) and metric points went out.
    assert r["spans_exported"] == n * rounds
    sink = r["sink"]
    req = ExportTraceServiceRequest.FromString(sink.trace_payloads[0])
    assert sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans) == 512
    m = ExportMetricsServiceRequest.FromString(sink.metric_payloads[0])
    counts = [p.count for rm in m.resource_metrics for sm in rm.scope_metrics
              for metric in sm.metrics if metric.name.endswith("request.duration")
              for p in metric.histogram.data_points]
    assert sum(counts) == n


def test_record_nginx_shape_microbenchmark():
    n, rounds = 2000, 3
    r = bench(n, rounds, "nginx")
    report(r)
    assert r["spans_exported"] == n * rounds
    sink = r["sink"]
    req = ExportTraceServiceRequest.FromString(sink.trace_payloads[0])
    spans = [s for rs in req.resource_spans for ss in rs.scope_spans for s in ss.spans]
    assert len(spans) == 512
    queries = [a.value.string_value for s in spans for a in s.attributes
               if a.key == "url.query"]
    assert queries == ["rid=%d" % i for i in range(512)]  # unique per request, kept
    m = ExportMetricsServiceRequest.FromString(sink.metric_payloads[0])
    counts = [p.count for rm in m.resource_metrics for sm in rm.scope_metrics
              for metric in sm.metrics if metric.name.endswith("request.duration")
              for p in metric.histogram.data_points]
    assert counts == [n]  # one route, one series


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    for shape in (sys.argv[2:] or WORKLOADS):
        report(bench(n, shape=shape))
