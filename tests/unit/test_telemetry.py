"""Telemetry: HttpExchange -> OTLP payloads, decoded with opentelemetry.proto and
compared field by field."""

from __future__ import annotations

import dataclasses

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from otel_ebpf import __version__
from otel_ebpf.capture.events import Role
from otel_ebpf.exchange import HttpExchange, Outcome
from otel_ebpf.stats import Stats
from otel_ebpf.telemetry import Telemetry, TelemetryOptions
from otel_ebpf.telemetry.attributes import http_attributes, span_name, span_status
from otel_ebpf.telemetry.metrics import DURATION_BOUNDARIES, SIZE_BOUNDARIES

T0 = 1_700_000_000_000_000_000
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def make(**kw) -> HttpExchange:
    base = dict(
        pid=4242, tid=4243, role=Role.SERVER, local_address="127.0.0.1", local_port=8080,
        remote_address="127.0.0.2", remote_port=51234, scheme="http",
        protocol_version="1.1", method="GET", target="/users/42?q=1", host="localhost:8080",
        user_agent="curl/8.1.2", traceparent=None, tracestate=None, request_body_size=0,
        response_body_size=612, status_code=200, start_time_unix_nano=T0,
        end_time_unix_nano=T0 + 1_500_000,
    )
    base.update(kw)
    return HttpExchange(**base)


class Sink:
    """In-memory stand-in for the OTLP exporter: keeps the decoded requests."""

    def __init__(self) -> None:
        self.traces: list[ExportTraceServiceRequest] = []
        self.metrics: list[ExportMetricsServiceRequest] = []
        self.span_counts: list[int] = []
        self.point_counts: list[int] = []

    def export_traces(self, payload: bytes, spans: int = 1) -> None:
        self.traces.append(ExportTraceServiceRequest.FromString(payload))
        self.span_counts.append(spans)

    def export_metrics(self, payload: bytes, points: int = 1) -> None:
        self.metrics.append(ExportMetricsServiceRequest.FromString(payload))
        self.point_counts.append(points)

    def spans(self):
        return [(rs, s) for req in self.traces for rs in req.resource_spans
                for ss in rs.scope_spans for s in ss.spans]


def attrs_of(kvs) -> dict:
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which)
    return out


RESOURCES = {
    4242: {"service.name": "shop", "process.pid": 4242},
    777: {"service.name": "client-app", "process.pid": 777},
}


def telemetry(sink: Sink, stats: Stats | None = None, **opts) -> Telemetry:
    return Telemetry(
        TelemetryOptions(**opts), resource_for_pid=RESOURCES.get,
        daemon_resource={"service.name": "otel-ebpf"}, sink=sink, stats=stats or Stats(),
    )


def one_span(ex: HttpExchange, **opts):
    sink = Sink()
    t = telemetry(sink, **opts)
    t.record(ex)
    t.flush()
    spans = sink.spans()
    assert len(spans) == 1
    return spans[0]


# ---------------------------------------------------------------- spans

def test_server_span_fields_resource_and_attributes():
    ex = make()
    rs, span = one_span(ex, route_patterns=("/users/{id}",))
    assert attrs_of(rs.resource.attributes) == RESOURCES[4242]
    assert rs.scope_spans[0].scope.name == "otel-ebpf"
    assert rs.scope_spans[0].scope.version == __version__
    assert span.name == "GET /users/{id}"
    assert span.kind == 2  # SERVER
    assert span.start_time_unix_nano == T0 and span.end_time_unix_nano == T0 + 1_500_000
    assert len(span.trace_id) == 16 and any(span.trace_id)
    assert len(span.span_id) == 8 and any(span.span_id)
    assert span.parent_span_id == b""
    assert span.flags & 0xFF == 1  # sampled
    assert span.status.code == 0
    assert attrs_of(span.attributes) == {
        "http.request.method": "GET",
        "url.path": "/users/42",
        "url.query": "q=1",
        "url.scheme": "http",
        "http.route": "/users/{id}",
        "http.response.status_code": 200,
        "server.address": "localhost",
        "server.port": 8080,
        "client.address": "127.0.0.2",
        "client.port": 51234,
        "network.peer.address": "127.0.0.2",
        "network.peer.port": 51234,
        "network.protocol.version": "1.1",
        "user_agent.original": "curl/8.1.2",
        "http.request.body.size": 0,
        "http.response.body.size": 612,
    }


VARIANTS = [
    make(),
    make(role=Role.CLIENT, pid=777, host="api.example.com", remote_port=443, scheme="https",
         status_code=404, target="/v1/items?token=abc&x=2"),
    make(role=Role.CLIENT, pid=777, host=None, status_code=503, remote_address="10.0.0.9"),
    make(host=None, method="PURGE", target="/cache/ab12cd34ef"),
    make(host="[::1]:9000", outcome=Outcome.TIMEOUT, status_code=None,
         response_body_size=None),
    make(outcome=Outcome.CONNECTION_RESET, error_reason="ECONNRESET while writing",
         status_code=None, response_body_size=None, user_agent=None),
    make(target="http://proxy.example/abs/path?sig=zz", host="proxy.example"),
    make(host="example.org", protocol_version="1.0", status_code=500),
]


@pytest.mark.parametrize("ex", VARIANTS)
def test_span_attributes_equal_http_attributes(ex):
    """The fast span encoder and attributes.http_attributes() (jsonl) never disagree."""
    sink = Sink()
    t = telemetry(sink)
    t.record(ex)
    t.flush()
    (_, span), = sink.spans()
    route = attrs_of(span.attributes).get("http.route")
    assert attrs_of(span.attributes) == http_attributes(ex, route)
    assert span.name == span_name(ex, route)
    is_error, error_type = span_status(ex)
    assert span.status.code == (2 if is_error else 0)
    assert attrs_of(span.attributes).get("error.type") == error_type


def test_other_method():
    _, span = one_span(make(method="PURGE"))
    a = attrs_of(span.attributes)
    assert span.name == "HTTP"
    assert a["http.request.method"] == "_OTHER"
    assert a["http.request.method_original"] == "PURGE"
    _, span = one_span(make(method="get"))  # methods are case-sensitive (semconv)
    assert span.name == "HTTP"
    assert attrs_of(span.attributes)["http.request.method_original"] == "get"


def test_name_without_route_is_method_only():
    assert span_name(make(), None) == "GET"
    assert span_name(make(), "/x") == "GET /x"


@pytest.mark.parametrize(
    "role,code,outcome,error,expect_type",
    [
        (Role.SERVER, 200, Outcome.OK, False, None),
        (Role.SERVER, 404, Outcome.OK, False, None),
        (Role.SERVER, 500, Outcome.OK, True, "500"),
        (Role.SERVER, 503, Outcome.OK, True, "503"),
        (Role.CLIENT, 404, Outcome.OK, True, "404"),
        (Role.CLIENT, 502, Outcome.OK, True, "502"),
        (Role.CLIENT, 302, Outcome.OK, False, None),
        (Role.SERVER, None, Outcome.TIMEOUT, True, "timeout"),
        (Role.CLIENT, None, Outcome.CONNECTION_RESET, True, "connection_reset"),
        (Role.SERVER, None, Outcome.CONNECTION_CLOSED, True, "connection_closed"),
        (Role.SERVER, 200, Outcome.TRUNCATED, True, "truncated"),
    ],
)
def test_status_rules(role, code, outcome, error, expect_type):
    ex = make(role=role, status_code=code, outcome=outcome,
              response_body_size=None if code is None else 10)
    assert span_status(ex) == (error, expect_type)
    _, span = one_span(ex)
    assert span.status.code == (2 if error else 0)
    assert attrs_of(span.attributes).get("error.type") == expect_type
    if error and code is not None and outcome is Outcome.OK:
        assert span.status.message == ""  # the status code says it all


def test_reset_reason_is_the_status_message_not_the_error_type():
    _, span = one_span(make(outcome=Outcome.CONNECTION_RESET, error_reason="EPIPE on write",
                            status_code=None, response_body_size=None))
    assert span.status.code == 2 and span.status.message == "EPIPE on write"
    assert attrs_of(span.attributes)["error.type"] == "connection_reset"


def test_client_span_server_endpoint_from_host_else_remote():
    _, span = one_span(make(role=Role.CLIENT, host="api.example.com", remote_port=443,
                            scheme="https"))
    a = attrs_of(span.attributes)
    assert span.kind == 3
    assert (a["server.address"], a["server.port"]) == ("api.example.com", 443)
    assert "client.address" not in a and a["network.peer.address"] == "127.0.0.2"
    _, span = one_span(make(role=Role.CLIENT, host=None, remote_address="10.1.1.1",
                            remote_port=9200))
    a = attrs_of(span.attributes)
    assert (a["server.address"], a["server.port"]) == ("10.1.1.1", 9200)


def test_server_span_without_host_uses_local_socket_and_default_port_for_bare_host():
    a = attrs_of(one_span(make(host=None))[1].attributes)
    assert (a["server.address"], a["server.port"]) == ("127.0.0.1", 8080)
    a = attrs_of(one_span(make(host="example.org"))[1].attributes)
    assert (a["server.address"], a["server.port"]) == ("example.org", 80)


# ---------------------------------------------------------------- trace context

def test_valid_traceparent_joins_the_trace():
    _, span = one_span(make(traceparent="00-%s-%s-01" % (TRACE, PARENT),
                            tracestate="rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"))
    assert span.trace_id.hex() == TRACE
    assert span.parent_span_id.hex() == PARENT
    assert span.span_id.hex() != PARENT and any(span.span_id)
    assert span.trace_state == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert span.flags == 0x301  # sampled, parent is remote


def test_unsampled_parent_means_no_span_but_metrics():
    sink, stats = Sink(), Stats()
    t = telemetry(sink, stats)
    for _ in range(23):
        t.record(make(traceparent="00-%s-%s-00" % (TRACE, PARENT)))
    t.flush()
    assert sink.spans() == []
    assert stats.get("telemetry.spans_unsampled") == 23
    assert stats.get("telemetry.exchanges") == 23
    (metric,) = [m for rm in sink.metrics[0].resource_metrics for sm in rm.scope_metrics
                 for m in sm.metrics if m.name == "http.server.request.duration"]
    assert metric.histogram.data_points[0].count == 23


@pytest.mark.parametrize("header", [
    "01-%s-%s-01" % (TRACE, PARENT),  # unknown version for this parser
    "00-%s-%s-01" % ("0" * 32, PARENT),  # zero trace id
    "00-%s-%s-01" % (TRACE, "0" * 16),  # zero parent id
    "00-%s-%s-01" % (TRACE.upper(), PARENT),  # upper-case hex is invalid
    "00-%s-%s-1" % (TRACE, PARENT),
    "00-%s-%s-01-extra" % (TRACE, PARENT),
    "garbage",
    "",
])
def test_invalid_traceparent_is_ignored(header):
    _, span = one_span(make(traceparent=header, tracestate="a=b"))
    assert span.trace_id.hex() != TRACE.lower() and any(span.trace_id)
    assert span.parent_span_id == b""
    assert span.trace_state == ""  # tracestate goes with an invalid traceparent
    assert span.flags == 0x101


def test_random_ids_differ():
    sink = Sink()
    t = telemetry(sink)
    for _ in range(23):
        t.record(make())
    t.flush()
    spans = [s for _, s in sink.spans()]
    assert len(spans) == 23
    assert len({s.trace_id for s in spans}) == 23
    assert len({s.span_id for s in spans}) == 23


# ---------------------------------------------------------------- redaction

def test_query_redaction_default_and_configured():
    a = attrs_of(one_span(make(target="/s?q=shoes&token=abc123&Signature=xyz&sig=1&page=2"))
                 [1].attributes)
    assert a["url.query"] == "q=shoes&token=REDACTED&Signature=REDACTED&sig=REDACTED&page=2"
    assert a["url.path"] == "/s"
    a = attrs_of(one_span(make(target="/s?q=shoes&token=abc"),
                          redacted_query_params=("q",))[1].attributes)
    assert a["url.query"] == "q=REDACTED&token=abc"


# ---------------------------------------------------------------- batching

def test_span_batches_by_size_and_by_time():
    sink, stats = Sink(), Stats()
    t = telemetry(sink, stats, span_batch_size=10, span_schedule_delay_s=5.0)
    for i in range(23):
        t.record(make(pid=4242 if i % 2 else 777))
    assert sink.span_counts == [10, 10]
    t.tick(100.0)  # first sight of the pending batch
    t.tick(104.0)
    assert sink.span_counts == [10, 10]
    t.tick(105.0)
    assert sink.span_counts == [10, 10, 3]
    assert len(sink.spans()) == 23
    assert stats.get("telemetry.spans") == 23
    # one ResourceSpans per pid in a mixed batch
    services = [attrs_of(rs.resource.attributes)["service.name"]
                for rs in sink.traces[0].resource_spans]
    assert sorted(services) == ["client-app", "shop"]


def test_unknown_pid_gets_fallback_resource_then_real_one():
    sink = Sink()
    known: dict = {}
    t = Telemetry(TelemetryOptions(), resource_for_pid=known.get, daemon_resource={},
                  sink=sink, stats=Stats())
    t.record(make(pid=99))
    t.flush()
    assert attrs_of(sink.traces[0].resource_spans[0].resource.attributes) == {
        "service.name": "unknown_service:99", "process.pid": 99}
    known[99] = {"service.name": "late"}
    t.record(make(pid=99))
    t.flush()
    assert attrs_of(sink.traces[1].resource_spans[0].resource.attributes) == {
        "service.name": "late"}


def test_shutdown_flushes_and_is_idempotent():
    sink, stats = Sink(), Stats()
    t = telemetry(sink, stats)
    for _ in range(23):
        t.record(make())
    t.shutdown()
    t.shutdown()
    assert len(sink.spans()) == 23
    t.record(make())
    t.flush()
    assert len(sink.spans()) == 23
    t.shutdown()
    assert stats.get("telemetry.spans_dropped") == 1  # recorded after shutdown


def test_spans_disabled_still_records_metrics():
    sink = Sink()
    t = telemetry(sink, spans_enabled=False)
    t.record(make())
    t.flush()
    assert sink.traces == [] and len(sink.metrics) == 1


# ---------------------------------------------------------------- metrics

def metrics_by_name(req: ExportMetricsServiceRequest, service: str | None = "shop") -> dict:
    out = {}
    for rm in req.resource_metrics:
        if service is not None and attrs_of(rm.resource.attributes).get("service.name") != service:
            continue
        for sm in rm.scope_metrics:
            assert sm.scope.name == "otel-ebpf"
            for m in sm.metrics:
                out[m.name] = m
    return out


DURATIONS_S = [0.001, 0.004, 0.005, 0.007, 0.02, 0.03, 0.06, 0.09, 0.2, 0.3, 0.6, 0.8, 1.5,
               3.0, 6.0, 8.0, 12.0, 0.0049, 0.011, 0.026, 0.076, 0.101, 0.251]
assert len(DURATIONS_S) == 23


def test_duration_histogram_for_23_exchanges():
    sink = Sink()
    t = telemetry(sink)
    sizes = list(range(0, 23 * 7, 7))
    for d, size in zip(DURATIONS_S, sizes):
        t.record(make(end_time_unix_nano=T0 + round(d * 1e9), request_body_size=size,
                      response_body_size=size * 100))
    t.flush()
    m = metrics_by_name(sink.metrics[0])
    dur = m["http.server.request.duration"]
    assert dur.unit == "s" and dur.histogram.aggregation_temporality == 2
    (p,) = dur.histogram.data_points
    assert list(p.explicit_bounds) == list(DURATION_BOUNDARIES)
    assert p.count == 23
    assert p.sum == pytest.approx(sum(DURATIONS_S))
    assert p.min == pytest.approx(0.001) and p.max == pytest.approx(12.0)
    expected = [0] * 15
    for d in DURATIONS_S:
        expected[next((i for i, b in enumerate(DURATION_BOUNDARIES) if d <= b), 14)] += 1
    assert list(p.bucket_counts) == expected
    # worked out by hand: 0.005 is inclusive in the first bucket, 12 s overflows
    assert list(p.bucket_counts) == [4, 1, 2, 2, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1]
    assert attrs_of(p.attributes) == {
        "http.request.method": "GET", "http.response.status_code": 200,
        "http.route": "/users/{id}", "url.scheme": "http", "network.protocol.version": "1.1",
        "server.port": 8080,
    }
    req_size = m["http.server.request.body.size"]
    assert req_size.unit == "By"
    (q,) = req_size.histogram.data_points
    assert list(q.explicit_bounds) == list(SIZE_BOUNDARIES)
    assert q.count == 23 and q.sum == sum(sizes)
    resp = m["http.server.response.body.size"].histogram.data_points[0]
    assert resp.count == 23 and resp.sum == sum(s * 100 for s in sizes)


def test_metric_attributes_never_carry_high_cardinality_values():
    sink = Sink()
    t = telemetry(sink)
    for i in range(23):
        t.record(make(target="/orders/%d?token=s%d" % (1000 + i, i), remote_port=40000 + i,
                      user_agent="agent/%d" % i))
    t.flush()
    (p,) = metrics_by_name(sink.metrics[0])["http.server.request.duration"].histogram.data_points
    a = attrs_of(p.attributes)
    assert p.count == 23
    assert a["http.route"] == "/orders/{id}"
    assert set(a) <= {"http.request.method", "http.response.status_code", "http.route",
                      "url.scheme", "network.protocol.version", "server.port", "error.type"}


def test_client_metrics_and_error_type():
    sink = Sink()
    t = telemetry(sink)
    for i in range(23):
        t.record(make(pid=777, role=Role.CLIENT, host="api:9000",
                      status_code=404 if i < 5 else 200))
    t.record(make(pid=777, role=Role.CLIENT, host="api:9000", status_code=None,
                  response_body_size=None, outcome=Outcome.TIMEOUT))
    t.flush()
    m = metrics_by_name(sink.metrics[0], "client-app")
    points = m["http.client.request.duration"].histogram.data_points
    by_type = {attrs_of(p.attributes).get("error.type"): p for p in points}
    assert by_type["404"].count == 5 and by_type[None].count == 18
    assert by_type["timeout"].count == 1
    assert attrs_of(by_type["timeout"].attributes).get("http.response.status_code") is None
    assert attrs_of(by_type[None].attributes)["server.port"] == 9000
    assert "server.address" not in attrs_of(by_type[None].attributes)
    # no response -> no response size point
    assert sum(p.count for p in
               m["http.client.response.body.size"].histogram.data_points) == 23
    assert "http.server.request.duration" not in m


def test_cumulative_vs_delta():
    for temporality in ("cumulative", "delta", "lowmemory"):
        sink = Sink()
        t = telemetry(sink, metrics_temporality=temporality)
        for _ in range(23):
            t.record(make())
        t.flush()
        for _ in range(23):
            t.record(make(status_code=201))
        t.flush()
        t.flush()  # nothing new
        first = metrics_by_name(sink.metrics[0])["http.server.request.duration"].histogram
        second = metrics_by_name(sink.metrics[1])["http.server.request.duration"].histogram
        third = metrics_by_name(sink.metrics[2])
        counts = {attrs_of(p.attributes)["http.response.status_code"]: p.count
                  for p in second.data_points}
        if temporality == "cumulative":
            assert first.aggregation_temporality == 2
            assert counts == {200: 23, 201: 23}
            p200 = [p for p in second.data_points
                    if attrs_of(p.attributes)["http.response.status_code"] == 200][0]
            assert p200.start_time_unix_nano == first.data_points[0].start_time_unix_nano
            # The series began no later than the first exchange it counts.
            assert first.data_points[0].start_time_unix_nano <= T0
            assert sum(p.count for p in
                       third["http.server.request.duration"].histogram.data_points) == 46
        else:
            assert first.aggregation_temporality == 1
            assert counts == {201: 23}
            assert (second.data_points[0].start_time_unix_nano
                    == first.data_points[0].time_unix_nano)
            assert "http.server.request.duration" not in third


def test_self_metrics_temporality():
    for temporality, expect_kind, second_value in (("cumulative", 2, 46), ("delta", 1, 23),
                                                   ("lowmemory", 2, 46)):
        sink, stats = Sink(), Stats()
        stats.gauge("conntrack.connections", lambda: 7)
        t = telemetry(sink, stats, metrics_temporality=temporality)
        stats.add("capture.events", 23)
        t.flush()
        stats.add("capture.events", 23)
        t.flush()
        m = metrics_by_name(sink.metrics[1], "otel-ebpf")
        events = m["otel_ebpf.capture.events"].sum
        assert events.is_monotonic and events.aggregation_temporality == expect_kind
        assert events.data_points[0].as_int == second_value
        assert m["otel_ebpf.conntrack.connections"].gauge.data_points[0].as_int == 7


def test_active_requests_from_callback():
    sink = Sink()
    t = Telemetry(TelemetryOptions(), resource_for_pid=RESOURCES.get, daemon_resource={},
                  sink=sink, stats=Stats(),
                  active_server_requests=lambda: {(4242, "GET", "http", 8080): 3,
                                                  (4242, "BREW", "http", 8080): 1})
    t.flush()
    m = metrics_by_name(sink.metrics[0])["http.server.active_requests"]
    assert m.unit == "{request}" and not m.sum.is_monotonic
    assert m.sum.aggregation_temporality == 2
    got = {attrs_of(p.attributes)["http.request.method"]: p.as_int for p in m.sum.data_points}
    assert got == {"GET": 3, "_OTHER": 1}
    assert attrs_of(m.sum.data_points[0].attributes)["server.port"] == 8080


def test_metric_interval_on_tick():
    sink = Sink()
    t = telemetry(sink, metric_export_interval_s=60.0)
    t.record(make())
    t.tick(1000.0)
    t.tick(1059.0)
    assert sink.metrics == []
    t.tick(1060.0)
    assert len(sink.metrics) == 1


def test_cardinality_overflow():
    sink, stats = Sink(), Stats()
    t = telemetry(sink, stats, metric_cardinality_limit=5)
    for i in range(23):
        t.record(make(status_code=200 + i))
    t.flush()
    points = metrics_by_name(sink.metrics[0])["http.server.request.duration"].histogram.data_points
    assert len(points) == 5
    overflow = [p for p in points if attrs_of(p.attributes) == {"otel.metric.overflow": True}]
    assert len(overflow) == 1 and overflow[0].count == 19
    assert sum(p.count for p in points) == 23
    assert stats.get("telemetry.metric_overflow") == 19


def test_forget_exports_last_values_then_drops_the_pid():
    sink = Sink()
    t = telemetry(sink)
    for _ in range(23):
        t.record(make())
    t.record(make(pid=777, role=Role.CLIENT))
    t.forget(4242)
    assert len(sink.spans()) == 23
    assert all(attrs_of(rs.resource.attributes)["service.name"] == "shop"
               for rs, _ in sink.spans())
    m = metrics_by_name(sink.metrics[0])
    assert m["http.server.request.duration"].histogram.data_points[0].count == 23
    t.flush()
    later = sink.metrics[-1]
    services = {attrs_of(rm.resource.attributes).get("service.name")
                for rm in later.resource_metrics}
    assert "shop" not in services and "client-app" in services


def test_exponential_histogram_sanity():
    sink = Sink()
    t = telemetry(sink, histogram_aggregation="base2_exponential_bucket_histogram")
    for d in DURATIONS_S:
        t.record(make(end_time_unix_nano=T0 + round(d * 1e9), request_body_size=0))
    t.flush()
    m = metrics_by_name(sink.metrics[0])
    e = m["http.server.request.duration"].exponential_histogram
    (p,) = e.data_points
    assert p.count == 23 and p.zero_count == 0
    assert sum(p.positive.bucket_counts) == 23
    assert -10 <= p.scale <= 20 and len(p.positive.bucket_counts) <= 160
    assert p.sum == pytest.approx(sum(DURATIONS_S))
    base = 2.0 ** (2.0 ** -p.scale)
    # every value lies in the bucket the encoding says: (base**i, base**(i+1)]
    bucket_of = {}
    for i, c in enumerate(p.positive.bucket_counts):
        if c:
            bucket_of[p.positive.offset + i] = c
    seen: dict[int, int] = {}
    for d in DURATIONS_S:
        v = round(d * 1e9) / 1e9
        eps = 1 + 1e-12  # float slack at the bucket edges
        idx = next(i for i in bucket_of if base ** i < v * eps and v <= base ** (i + 1) * eps)
        seen[idx] = seen.get(idx, 0) + 1
    assert seen == bucket_of
    size = m["http.server.request.body.size"].exponential_histogram.data_points[0]
    assert size.zero_count == 23 and size.count == 23


def test_exponential_histogram_downscales_to_max_size():
    from otel_ebpf.telemetry.metrics import ExponentialHistogram, map_to_index
    h = ExponentialHistogram(max_size=160, max_scale=20)
    values = [1e-6 * 1.37 ** i for i in range(101)]
    for v in values:
        h.record(v)
    assert h.count == 101 and sum(h.buckets.values()) == 101
    assert h.hi - h.lo + 1 <= 160 and -10 <= h.scale <= 20
    for v in values:
        assert h.lo <= map_to_index(v, h.scale) <= h.hi
    # exact powers of two sit at the top of their bucket
    assert map_to_index(1.0, 0) == -1 and map_to_index(2.0, 0) == 0
    assert map_to_index(1.0, 3) == -1 and map_to_index(4.0, -1) == 0


def test_unknown_role_gets_internal_span_and_no_metrics():
    sink, stats = Sink(), Stats()
    t = telemetry(sink, stats)
    t.record(make(role=Role.UNKNOWN))
    t.flush()
    assert sink.spans()[0][1].kind == 1
    assert "http.server.request.duration" not in metrics_by_name(sink.metrics[0], None)
    assert stats.get("telemetry.unknown_role") == 1


def test_options_reject_bad_values():
    with pytest.raises(ValueError, match="metrics_temporality"):
        TelemetryOptions(metrics_temporality="weekly")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="histogram_aggregation"):
        TelemetryOptions(histogram_aggregation="summary")  # type: ignore[arg-type]
    assert dataclasses.replace(TelemetryOptions(), max_routes=5).max_routes == 5


def test_vanished_unknown_pids_are_forgotten_at_metric_export():
    sink = Sink()
    t = Telemetry(TelemetryOptions(metric_export_interval_s=1.0), resource_for_pid=lambda p: None,
                  daemon_resource={}, sink=sink, stats=Stats())
    gone = 2**22 + 12345  # above pid_max's default: never a live process
    t.record(make(pid=gone))
    t.tick(0.0)
    t.tick(1.0)
    assert any(attrs_of(rm.resource.attributes).get("process.pid") == gone
               for rm in sink.metrics[0].resource_metrics)
    assert gone not in t._resources and t._metrics.series_count(gone) == 0


def test_encode_failure_is_counted_not_raised():
    sink, stats = Sink(), Stats()
    t = telemetry(sink, stats)
    t.record(make(start_time_unix_nano=-1))  # cannot be a fixed64: dropped, counted
    t.record(make())
    t.flush()
    assert len(sink.spans()) == 1
    assert stats.get("telemetry.spans_dropped") == 1


def test_global_series_cap_bounds_memory_across_processes():
    sink = Sink()
    t = Telemetry(TelemetryOptions(), resource_for_pid=RESOURCES.get, daemon_resource={},
                  sink=sink, stats=Stats(), max_series=10)
    for pid in range(23):
        t.record(make(pid=pid, status_code=200))
        t.record(make(pid=pid, status_code=201))
    t.flush()
    points = [p for rm in sink.metrics[0].resource_metrics for sm in rm.scope_metrics
              for m in sm.metrics if m.name == "http.server.request.duration"
              for p in m.histogram.data_points]
    assert sum(p.count for p in points) == 46
    regular = [p for p in points if "otel.metric.overflow" not in attrs_of(p.attributes)]
    assert len(regular) == 10


def test_stats_are_current_after_each_tick():
    sink, stats = Sink(), Stats()
    t = telemetry(sink, stats, span_batch_size=512)
    for _ in range(23):
        t.record(make())
    t.record(make(traceparent="00-%s-%s-00" % (TRACE, PARENT)))
    t.tick(1.0)
    assert stats.get("telemetry.exchanges") == 24
    assert stats.get("telemetry.spans_unsampled") == 1
    assert stats.get("telemetry.spans") == 0  # still pending in the batch


# ---------------------------------------------------------------- hot-path caches

def spans_of(exchanges, **opts):
    sink = Sink()
    t = telemetry(sink, **opts)
    for ex in exchanges:
        t.record(ex)
    t.flush()
    return t, [attrs_of(s.attributes) for _, s in sink.spans()]


def test_unique_query_per_request_stays_unique_and_redacted():
    targets = ["/index.html?rid=%d" % i for i in range(5)] + [
        "/index.html?token=s3cret", "/index.html?TOKEN=x", "/index.html?token=",
        "/index.html?token", "/index.html?rid=7&token=t&sig=", "/index.html?",
        "/index.html?q=" + "é" * 120]
    _, attrs = spans_of([make(target=t) for t in targets])
    assert [a["url.query"] for a in attrs] == [
        "rid=0", "rid=1", "rid=2", "rid=3", "rid=4", "token=REDACTED", "TOKEN=REDACTED",
        "token=", "token", "rid=7&token=REDACTED&sig=", "", "q=" + "é" * 120]
    assert all(a["url.path"] == "/index.html" for a in attrs)
    _, attrs = spans_of([make(target="/index.html?rid=%d" % i) for i in range(2)],
                        redacted_query_params=("rid",))
    assert [a["url.query"] for a in attrs] == ["rid=REDACTED", "rid=REDACTED"]


def test_path_field_cache_only_low_cardinality_paths_and_bounded(monkeypatch):
    from otel_ebpf.telemetry import spans as spans_mod
    monkeypatch.setattr(spans_mod, "_MAX_PATHS", 3)
    paths = ["/a", "/b", "/users/42", "/c", "/d", "/a", "/" + "x" * 300, "/e"]
    t, attrs = spans_of([make(target=p + "?q=1") for p in paths])
    assert [a["url.path"] for a in attrs] == paths
    cached = t._encoder._paths
    assert len(cached) <= 3
    assert "/users/42" not in cached and "/" + "x" * 300 not in cached  # id / too long
    assert "/e" in cached


def test_size_and_connection_caches_are_bounded_and_exact(monkeypatch):
    from otel_ebpf.telemetry import spans as spans_mod
    monkeypatch.setattr(spans_mod, "_MAX_SIZES", 2)
    monkeypatch.setattr(spans_mod, "_MAX_CONNECTIONS", 2)
    exchanges = [make(remote_port=50000 + i % 4, request_body_size=i % 3,
                      response_body_size=None if i % 5 == 0 else 600 + i % 4)
                 for i in range(20)]
    t, attrs = spans_of(exchanges)
    for ex, a in zip(exchanges, attrs):
        assert a["client.port"] == a["network.peer.port"] == ex.remote_port
        assert a["http.request.body.size"] == ex.request_body_size
        assert a.get("http.response.body.size") == ex.response_body_size
    assert len(t._encoder._sizes) <= 2 and len(t._encoder._connections) <= 2


def test_connection_cache_keys_on_every_origin_attribute():
    base = dict(role=Role.CLIENT, pid=777, host=None, remote_address="10.1.1.1",
                remote_port=443, scheme="https")
    exchanges = [make(**base), make(**{**base, "remote_port": 444}),
                 make(**{**base, "host": "api.example:9000"}),
                 make(**{**base, "user_agent": None}),
                 make(**{**base, "protocol_version": "1.0"})]
    _, attrs = spans_of(exchanges)
    assert [(a["server.address"], a["server.port"]) for a in attrs] == [
        ("10.1.1.1", 443), ("10.1.1.1", 444), ("api.example", 9000), ("10.1.1.1", 443),
        ("10.1.1.1", 443)]
    assert [a.get("user_agent.original") for a in attrs] == [
        "curl/8.1.2", "curl/8.1.2", "curl/8.1.2", None, "curl/8.1.2"]
    assert attrs[4]["network.protocol.version"] == "1.0"


def test_connection_cache_skips_huge_blocks():
    ua = "u" * 2000
    t, attrs = spans_of([make(user_agent=ua), make(user_agent=ua, remote_port=1)])
    assert [a["user_agent.original"] for a in attrs] == [ua, ua]
    assert [a["client.port"] for a in attrs] == [51234, 1]
    assert not t._encoder._connections
