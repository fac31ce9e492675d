"""Telemetry of HTTP/2 and gRPC records: the RPC mapping (span name, rpc.* attributes,
status rules, rpc.* metrics, cardinality bound) and the HTTP mapping of plain HTTP/2
with its new outcomes. Payloads are decoded with opentelemetry.proto."""

from __future__ import annotations

import dataclasses

import pytest

from otel_ebpf.capture.events import Role
from otel_ebpf.exchange import HttpExchange, Outcome, RpcCall
from otel_ebpf.stats import Stats
from otel_ebpf.telemetry.attributes import (
    GRPC_STATUS_NAMES,
    exchange_attributes,
    http_attributes,
    rpc_attributes,
)
from otel_ebpf.telemetry.metrics import RPC_DURATION_BOUNDARIES
from tests.unit.test_telemetry import T0, TRACE, PARENT, Sink, attrs_of, one_span, telemetry

UNARY = RpcCall(system="grpc", service="helloworld.Greeter", method="SayHello",
                status_code=0, request_messages=1, response_messages=1)


def grpc(rpc: RpcCall = UNARY, **kw) -> HttpExchange:
    base = dict(
        pid=4242, tid=4243, role=Role.SERVER, local_address="127.0.0.1", local_port=50051,
        remote_address="127.0.0.2", remote_port=51234, scheme="http",
        protocol_version="2", method="POST",
        target="/%s/%s" % (rpc.service, rpc.method) if rpc else "/", host="localhost:50051",
        user_agent="grpc-python/1.60.0", traceparent=None, tracestate=None,
        request_body_size=12, response_body_size=17, status_code=200,
        start_time_unix_nano=T0, end_time_unix_nano=T0 + 2_500_000, stream_id=1, rpc=rpc,
    )
    base.update(kw)
    return HttpExchange(**base)


def metric_points(sink: Sink) -> dict[str, list]:
    """metric name -> [(attributes, data point, metric)] over every export."""
    out: dict[str, list] = {}
    for req in sink.metrics:
        for rm in req.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    data = getattr(m, m.WhichOneof("data"))
                    for p in data.data_points:
                        out.setdefault(m.name, []).append((attrs_of(p.attributes), p, m))
    return out


# ---------------------------------------------------------------- spans

def test_unary_server_span():
    rs, span = one_span(grpc())
    assert span.name == "helloworld.Greeter/SayHello"
    assert span.kind == 2  # SERVER
    assert span.start_time_unix_nano == T0 and span.end_time_unix_nano == T0 + 2_500_000
    assert span.status.code == 0  # unset: OK is not an error, and we do not set Ok
    assert attrs_of(span.attributes) == {
        "rpc.system": "grpc",
        "rpc.service": "helloworld.Greeter",
        "rpc.method": "SayHello",
        "rpc.grpc.status_code": 0,
        "server.address": "localhost",
        "server.port": 50051,
        "client.address": "127.0.0.2",
        "client.port": 51234,
        "network.peer.address": "127.0.0.2",
        "network.peer.port": 51234,
        "network.protocol.version": "2",
        "otel_ebpf.rpc.request_messages": 1,
        "otel_ebpf.rpc.response_messages": 1,
    }


def test_client_span_server_endpoint_from_authority_else_remote_socket():
    _, span = one_span(grpc(role=Role.CLIENT, pid=777, host="greeter.svc:443",
                            scheme="https", remote_address="10.0.0.9", remote_port=443))
    assert span.kind == 3  # CLIENT
    attrs = attrs_of(span.attributes)
    assert (attrs["server.address"], attrs["server.port"]) == ("greeter.svc", 443)
    assert "client.address" not in attrs and attrs["network.peer.address"] == "10.0.0.9"
    _, span = one_span(grpc(role=Role.CLIENT, pid=777, host=None,
                            remote_address="10.0.0.9", remote_port=50051))
    attrs = attrs_of(span.attributes)
    assert (attrs["server.address"], attrs["server.port"]) == ("10.0.0.9", 50051)


STREAMING = RpcCall("grpc", "routeguide.RouteGuide", "RecordRoute", 0, 7, 1)

VARIANTS = [
    grpc(),
    grpc(role=Role.CLIENT, pid=777),
    grpc(STREAMING),
    grpc(RpcCall("grpc", "routeguide.RouteGuide", "ListFeatures", 0, 1, 5)),
    grpc(RpcCall("grpc", "a.B", "C", 4, 1, 0)),
    grpc(RpcCall("grpc", "a.B", "C", 5, 1, 0)),
    grpc(RpcCall("grpc", "a.B", "C", 5, 1, 0), role=Role.CLIENT, pid=777),
    grpc(RpcCall("grpc", "a.B", "C", None, 1, 0), outcome=Outcome.STREAM_RESET,
         error_reason="cancel"),
    grpc(RpcCall("grpc", "a.B", "C", None, 1, 0), outcome=Outcome.GOAWAY),
    grpc(RpcCall("grpc", "a.B", "C", None, 1, 1)),
    grpc(RpcCall("grpc", "", "Bare", 0, 1, 1)),
    grpc(RpcCall("grpc", "not-a-grpc-path", "", 12, 1, 0)),
    grpc(host=None),
    grpc(role=Role.UNKNOWN),
]


@pytest.mark.parametrize("ex", VARIANTS)
def test_span_attributes_equal_rpc_attributes(ex):
    """The span encoder and attributes.rpc_attributes() (jsonl) never disagree."""
    _, span = one_span(ex)
    assert attrs_of(span.attributes) == rpc_attributes(ex) == exchange_attributes(ex, None)


# (role, grpc-status, outcome) -> (span status code, error.type)
SERVER_ERRORS = {2, 4, 12, 13, 14, 15}


@pytest.mark.parametrize("code", range(17))
def test_server_status_only_the_server_fault_codes_are_errors(code):
    _, span = one_span(grpc(RpcCall("grpc", "a.B", "C", code, 1, 1)))
    attrs = attrs_of(span.attributes)
    assert attrs["rpc.grpc.status_code"] == code
    if code in SERVER_ERRORS:
        assert span.status.code == 2 and attrs["error.type"] == GRPC_STATUS_NAMES[code]
        assert span.status.message == ""  # the code says it all
    else:
        assert span.status.code == 0 and "error.type" not in attrs


@pytest.mark.parametrize("code", range(17))
def test_client_status_every_code_but_ok_is_an_error(code):
    _, span = one_span(grpc(RpcCall("grpc", "a.B", "C", code, 1, 1), role=Role.CLIENT,
                            pid=777))
    attrs = attrs_of(span.attributes)
    if code == 0:
        assert span.status.code == 0 and "error.type" not in attrs
    else:
        assert span.status.code == 2 and attrs["error.type"] == GRPC_STATUS_NAMES[code]


def test_status_names_and_unknown_code():
    assert GRPC_STATUS_NAMES[4] == "DEADLINE_EXCEEDED" and GRPC_STATUS_NAMES[16] == \
        "UNAUTHENTICATED"
    _, span = one_span(grpc(RpcCall("grpc", "a.B", "C", 99, 1, 1), role=Role.CLIENT,
                            pid=777))
    assert attrs_of(span.attributes)["error.type"] == "99" and span.status.code == 2


@pytest.mark.parametrize("outcome, reason", [
    (Outcome.STREAM_RESET, "cancel"), (Outcome.GOAWAY, None),
    (Outcome.CONNECTION_RESET, "ECONNRESET"), (Outcome.TIMEOUT, None),
])
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_call_without_status_is_an_error_named_by_its_outcome(outcome, reason, role):
    ex = grpc(RpcCall("grpc", "a.B", "C", None, 1, 0), role=role, outcome=outcome,
              error_reason=reason, pid=4242 if role is Role.SERVER else 777)
    _, span = one_span(ex)
    attrs = attrs_of(span.attributes)
    assert "rpc.grpc.status_code" not in attrs
    assert attrs["error.type"] == outcome.value
    assert span.status.code == 2
    assert span.status.message == (reason or outcome.value)


def test_completed_call_without_grpc_status_is_an_error():
    _, span = one_span(grpc(RpcCall("grpc", "a.B", "C", None, 1, 1)))
    assert attrs_of(span.attributes)["error.type"] == "missing_grpc_status"
    assert span.status.code == 2


def test_streaming_call_is_one_span_with_message_counts():
    _, span = one_span(grpc(STREAMING))
    attrs = attrs_of(span.attributes)
    assert span.name == "routeguide.RouteGuide/RecordRoute"
    assert (attrs["otel_ebpf.rpc.request_messages"],
            attrs["otel_ebpf.rpc.response_messages"]) == (7, 1)


def test_traceparent_joins_the_trace_and_unsampled_means_no_span():
    _, span = one_span(grpc(traceparent=f"00-{TRACE}-{PARENT}-01", tracestate="k=v"))
    assert span.trace_id.hex() == TRACE and span.parent_span_id.hex() == PARENT
    assert span.trace_state == "k=v"
    sink, stats = Sink(), Stats()
    t = telemetry(sink, stats)
    t.record(grpc(traceparent=f"00-{TRACE}-{PARENT}-00"))
    t.flush()
    assert sink.spans() == [] and stats.snapshot()["telemetry.spans_unsampled"] == 1
    assert metric_points(sink)["rpc.server.duration"][0][1].count == 1


def test_long_values_encode_exactly():
    """Spans over 16 KiB of attributes still decode (multi-byte length prefixes)."""
    service = "pkg." + "S" * 20000
    _, span = one_span(grpc(RpcCall("grpc", service, "M", 0, 1, 1)))
    assert span.name == service + "/M"
    assert attrs_of(span.attributes)["rpc.service"] == service


# ---------------------------------------------------------------- metrics

def test_server_duration_and_messages_per_rpc_histograms():
    sink = Sink()
    t = telemetry(sink)
    durations_ms = [0.4, 3.0, 7.5, 30.0, 120.0, 900.0, 4000.0]
    for i, ms in enumerate(durations_ms):
        t.record(grpc(STREAMING, end_time_unix_nano=T0 + int(ms * 1e6),
                      remote_port=40000 + i))
    t.flush()
    points = metric_points(sink)
    assert "http.server.request.duration" not in points
    [(attrs, p, m)] = points["rpc.server.duration"]
    assert m.unit == "ms" and m.histogram.aggregation_temporality == 2
    assert attrs == {"rpc.system": "grpc", "rpc.service": "routeguide.RouteGuide",
                     "rpc.method": "RecordRoute", "rpc.grpc.status_code": 0,
                     "server.port": 50051}
    assert p.count == 7 and p.sum == pytest.approx(sum(durations_ms))
    assert list(p.explicit_bounds) == list(RPC_DURATION_BOUNDARIES)
    assert sum(p.bucket_counts) == 7
    assert list(p.bucket_counts)[:3] == [0, 2, 1]  # (.., 0], (0, 5], (5, 10]
    [(_, req, m)] = points["rpc.server.requests_per_rpc"]
    assert m.unit == "{count}" and req.count == 7 and req.sum == 49
    [(_, resp, _)] = points["rpc.server.responses_per_rpc"]
    assert resp.count == 7 and resp.sum == 7


def test_client_metrics_error_type_and_server_address_option():
    sink = Sink()
    t = telemetry(sink, client_metrics_server_address=True)
    for code in (0, 0, 4):
        t.record(grpc(RpcCall("grpc", "a.B", "C", code, 1, 1), role=Role.CLIENT, pid=777,
                      host="greeter:50051"))
    t.flush()
    points = metric_points(sink)
    assert "rpc.server.duration" not in points
    by_code = {a["rpc.grpc.status_code"]: (a, p) for a, p, _ in points["rpc.client.duration"]}
    assert by_code[0][1].count == 2 and by_code[4][1].count == 1
    assert by_code[4][0]["error.type"] == "DEADLINE_EXCEEDED"
    assert "error.type" not in by_code[0][0]
    assert by_code[0][0]["server.address"] == "greeter" and by_code[0][0]["server.port"] == 50051
    sink = Sink()
    t = telemetry(sink)
    t.record(grpc(role=Role.CLIENT, pid=777))
    t.flush()
    [(attrs, _, _)] = metric_points(sink)["rpc.client.duration"]
    assert "server.address" not in attrs


def test_metric_methods_are_bounded_like_routes():
    sink = Sink()
    t = telemetry(sink, max_routes=3)
    for i in range(10):
        t.record(grpc(RpcCall("grpc", "svc.S", "M%d" % i, 0, 1, 1)))
    # A server that answers UNIMPLEMENTED does not know the method: never a new series.
    t.record(grpc(RpcCall("grpc", "scan.X", "Probe", 12, 1, 0)))
    # ...but a method already known keeps its name whatever it answers.
    t.record(grpc(RpcCall("grpc", "svc.S", "M0", 12, 1, 0)))
    t.flush()
    points = metric_points(sink)["rpc.server.duration"]
    names = {(a["rpc.service"], a["rpc.method"]): 0 for a, _, _ in points}
    for a, p, _ in points:
        names[(a["rpc.service"], a["rpc.method"])] += p.count
    assert names == {("svc.S", "M0"): 2, ("svc.S", "M1"): 1, ("svc.S", "M2"): 1,
                     ("_OTHER", "_OTHER"): 8}
    # Spans keep the real names: a span describes one call.
    assert {s.name for _, s in sink.spans()} >= {"svc.S/M9", "scan.X/Probe"}
    t.forget(4242)
    assert 4242 not in t._rpc_methods


def test_rpc_and_http_series_of_one_process_stay_apart():
    from tests.unit.test_telemetry import make
    sink = Sink()
    t = telemetry(sink, metrics_temporality="delta")
    t.record(grpc())
    t.record(make())
    t.record(grpc(role=Role.CLIENT))
    t.flush()
    points = metric_points(sink)
    assert {n for n in points if not n.startswith("otel_ebpf.")} == {
        "rpc.server.duration", "rpc.server.requests_per_rpc", "rpc.server.responses_per_rpc",
        "rpc.client.duration", "rpc.client.requests_per_rpc", "rpc.client.responses_per_rpc",
        "http.server.request.duration", "http.server.request.body.size",
        "http.server.response.body.size"}
    assert points["rpc.server.duration"][0][2].histogram.aggregation_temporality == 1
    sink.metrics.clear()
    t.flush()  # delta: nothing recorded since, no rpc point exported again
    assert sink.metrics and not [n for n in metric_points(sink) if n.startswith("rpc.")]


def test_exponential_histograms_for_rpc():
    sink = Sink()
    t = telemetry(sink, histogram_aggregation="base2_exponential_bucket_histogram")
    t.record(grpc())
    t.record(grpc(end_time_unix_nano=T0 + 40_000_000))
    t.flush()
    [(_, p, m)] = metric_points(sink)["rpc.server.duration"]
    assert m.WhichOneof("data") == "exponential_histogram" and m.unit == "ms"
    assert p.count == 2 and p.sum == pytest.approx(42.5)
    assert p.min == pytest.approx(2.5) and p.max == pytest.approx(40.0)


def test_unknown_role_rpc_gets_internal_span_and_no_metrics():
    sink, stats = Sink(), Stats()
    t = telemetry(sink, stats)
    t.record(grpc(role=Role.UNKNOWN))
    t.flush()
    [(_, span)] = sink.spans()
    assert span.kind == 1
    assert not [n for n in metric_points(sink) if n.startswith("rpc.")]
    assert stats.snapshot()["telemetry.unknown_role"] == 1


# ---------------------------------------------------------------- plain HTTP/2

def h2(**kw) -> HttpExchange:
    return grpc(rpc=None, **{**dict(method="GET", target="/index.html?x=1", status_code=200,
                                    stream_id=3), **kw})


def test_plain_http2_uses_the_http_mapping_with_version_2():
    _, span = one_span(h2())
    attrs = attrs_of(span.attributes)
    assert span.name == "GET /index.html"
    assert attrs == http_attributes(h2(), "/index.html") == exchange_attributes(
        h2(), "/index.html")
    assert attrs["network.protocol.version"] == "2"
    assert not [k for k in attrs if k.startswith("rpc.") or "stream" in k]
    sink = Sink()
    t = telemetry(sink)
    t.record(h2())
    t.flush()
    [(a, _, _)] = metric_points(sink)["http.server.request.duration"]
    assert a["network.protocol.version"] == "2"


@pytest.mark.parametrize("outcome, reason", [(Outcome.STREAM_RESET, "refused_stream"),
                                             (Outcome.GOAWAY, None)])
def test_http2_outcomes_are_errors_in_span_and_metrics(outcome, reason):
    ex = h2(outcome=outcome, error_reason=reason, status_code=None, response_body_size=None)
    _, span = one_span(ex)
    attrs = attrs_of(span.attributes)
    assert attrs["error.type"] == outcome.value and span.status.code == 2
    assert span.status.message == (reason or outcome.value)
    assert attrs == http_attributes(ex, "/index.html")
    sink = Sink()
    t = telemetry(sink)
    t.record(ex)
    t.flush()
    [(a, _, _)] = metric_points(sink)["http.server.request.duration"]
    assert a["error.type"] == outcome.value


def test_records_are_what_the_tests_build():
    """Guard: the helpers above build the record the seam defines (no silent drift)."""
    fields = {f.name for f in dataclasses.fields(HttpExchange)}
    assert {"stream_id", "rpc"} <= fields
    assert {f.name for f in dataclasses.fields(RpcCall)} == {
        "system", "service", "method", "status_code", "request_messages",
        "response_messages"}


@pytest.mark.parametrize("service, method, name", [
    ("a.B", "C", "a.B/C"), ("not/a-path", "", "not/a-path"), ("", "C", "C"), ("", "", "grpc")])
def test_span_name_when_the_path_was_not_service_slash_method(service, method, name):
    _, span = one_span(grpc(RpcCall("grpc", service, method, 0, 1, 1)))
    assert span.name == name
    assert ("rpc.method" in attrs_of(span.attributes)) == bool(method)
