"""The hand-written OTLP writer, checked field by field with opentelemetry.proto."""

from __future__ import annotations

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

from otel_ebpf import __version__
from otel_ebpf.telemetry import otlp_encode as enc


@pytest.mark.parametrize("n", [0, 1, 127, 128, 300, 16383, 16384, 40000, 2097151, 2097152,
                               2**32, 2**63 - 1])
def test_varint_roundtrip_through_protobuf(n):
    kv = KeyValue.FromString(enc.encode_key_value("k", n))
    assert kv.key == "k" and kv.value.int_value == n


def test_any_value_types():
    assert AnyValue.FromString(enc.encode_any_value("héllo")).string_value == "héllo"
    assert AnyValue.FromString(enc.encode_any_value(True)).bool_value is True
    v = AnyValue.FromString(enc.encode_any_value(False))
    assert v.WhichOneof("value") == "bool_value" and v.bool_value is False
    assert AnyValue.FromString(enc.encode_any_value(-5)).int_value == -5
    assert AnyValue.FromString(enc.encode_any_value(2.5)).double_value == 2.5
    arr = AnyValue.FromString(enc.encode_any_value(["a", 1, 0.5, True]))
    assert [x.WhichOneof("value") for x in arr.array_value.values] == [
        "string_value", "int_value", "double_value", "bool_value"]
    assert arr.array_value.values[0].string_value == "a"
    assert arr.array_value.values[1].int_value == 1
    assert AnyValue.FromString(enc.encode_any_value(b"\x00\x01")).bytes_value == b"\x00\x01"
    with pytest.raises(TypeError):
        enc.encode_any_value(object())


def _attrs(kvs):
    out = {}
    for kv in kvs:
        which = kv.value.WhichOneof("value")
        out[kv.key] = getattr(kv.value, which)
    return out


def test_trace_request_with_two_resources_and_all_span_fields():
    cache = enc.AttributeFieldCache(9)
    attrs = cache.get("http.request.method", "GET") + cache.fresh("url.path", "/x/" + "y" * 300)
    span = enc.field_span(
        trace_id=bytes(range(16)), span_id=b"\x01" * 8, parent_span_id=b"\x02" * 8,
        trace_state="a=b,c=d", name_field=enc.span_name_field("GET /x"),
        kind=enc.SPAN_KIND_SERVER, start_time_unix_nano=1_700_000_000_000_000_001,
        end_time_unix_nano=1_700_000_000_123_456_789, attributes_fields=attrs,
        status_field=enc.status_field(True, "boom"),
        flags=enc.SPAN_FLAGS_SAMPLED | enc.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE
        | enc.SPAN_FLAGS_CONTEXT_IS_REMOTE,
    )
    span2 = enc.field_span(
        trace_id=b"\xff" * 16, span_id=b"\x03" * 8, parent_span_id=None, trace_state=None,
        name_field=enc.span_name_field("HTTP"), kind=enc.SPAN_KIND_CLIENT,
        start_time_unix_nano=5, end_time_unix_nano=6, attributes_fields=b"",
        status_field=enc.status_field(False), flags=enc.SPAN_FLAGS_SAMPLED,
    )
    payload = enc.encode_trace_request([
        (enc.encode_resource({"service.name": "svc", "process.pid": 42}), [span, span2]),
        (enc.encode_resource({"service.name": "other"}), [span2]),
    ])
    req = ExportTraceServiceRequest.FromString(payload)
    assert len(req.resource_spans) == 2
    rs = req.resource_spans[0]
    assert _attrs(rs.resource.attributes) == {"service.name": "svc", "process.pid": 42}
    assert rs.scope_spans[0].scope.name == "otel-ebpf"
    assert rs.scope_spans[0].scope.version == __version__
    s = rs.scope_spans[0].spans[0]
    assert s.trace_id == bytes(range(16)) and s.span_id == b"\x01" * 8
    assert s.parent_span_id == b"\x02" * 8 and s.trace_state == "a=b,c=d"
    assert s.name == "GET /x" and s.kind == 2
    assert s.start_time_unix_nano == 1_700_000_000_000_000_001
    assert s.end_time_unix_nano == 1_700_000_000_123_456_789
    assert _attrs(s.attributes) == {"http.request.method": "GET", "url.path": "/x/" + "y" * 300}
    assert s.status.code == 2 and s.status.message == "boom"
    assert s.flags == 0x301
    s2 = rs.scope_spans[0].spans[1]
    assert s2.parent_span_id == b"" and s2.kind == 3 and s2.status.code == 0
    assert s2.name == "HTTP" and s2.flags == 1 and len(s2.attributes) == 0
    assert _attrs(req.resource_spans[1].resource.attributes) == {"service.name": "other"}
    assert req.resource_spans[1].scope_spans[0].spans[0].span_id == b"\x03" * 8


def test_metrics_request_all_kinds():
    a9 = enc.field_attributes(9, {"http.request.method": "GET", "server.port": 8080})
    a7 = enc.field_attributes(7, {"k": "v"})
    a1 = enc.field_attributes(1, {"k": "e"})
    hist = enc.field_histogram_metric(
        "http.server.request.duration", "Duration", "s", enc.TEMPORALITY_CUMULATIVE,
        [enc.encode_histogram_point(a9, 10, 20, 3, 0.6, [1, 2, 0], [0.1, 0.5], 0.05, 0.3)],
    )
    expo = enc.field_exponential_histogram_metric(
        "x.exp", "E", "s", enc.TEMPORALITY_DELTA,
        [enc.encode_exponential_histogram_point(a1, 1, 2, 6, 9.5, -3, 1, -2, [1, 0, 4],
                                                0.0, 7.0)],
    )
    counter = enc.field_sum_metric("otel_ebpf.capture.events", "", "1",
                                   enc.TEMPORALITY_CUMULATIVE, True,
                                   [enc.encode_number_point(b"", 1, 2, 2**40)])
    updown = enc.field_sum_metric("http.server.active_requests", "A", "{request}",
                                  enc.TEMPORALITY_CUMULATIVE, False,
                                  [enc.encode_number_point(a7, 1, 2, -3)])
    gauge = enc.field_gauge_metric("g", "", "1", [enc.encode_number_point(b"", 0, 2, 1.25)])
    payload = enc.encode_metrics_request(
        [(enc.encode_resource({"service.name": "s"}), [hist, expo, counter, updown, gauge])]
    )
    req = ExportMetricsServiceRequest.FromString(payload)
    sm = req.resource_metrics[0].scope_metrics[0]
    assert sm.scope.name == "otel-ebpf"
    m = {x.name: x for x in sm.metrics}
    h = m["http.server.request.duration"]
    assert h.unit == "s" and h.description == "Duration"
    assert h.histogram.aggregation_temporality == 2
    p = h.histogram.data_points[0]
    assert _attrs(p.attributes) == {"http.request.method": "GET", "server.port": 8080}
    assert (p.start_time_unix_nano, p.time_unix_nano, p.count, p.sum) == (10, 20, 3, 0.6)
    assert list(p.bucket_counts) == [1, 2, 0] and list(p.explicit_bounds) == [0.1, 0.5]
    assert p.min == 0.05 and p.max == 0.3
    e = m["x.exp"].exponential_histogram
    assert e.aggregation_temporality == 1
    ep = e.data_points[0]
    assert (ep.count, ep.sum, ep.scale, ep.zero_count) == (6, 9.5, -3, 1)
    assert ep.positive.offset == -2 and list(ep.positive.bucket_counts) == [1, 0, 4]
    assert (ep.min, ep.max) == (0.0, 7.0) and _attrs(ep.attributes) == {"k": "e"}
    c = m["otel_ebpf.capture.events"].sum
    assert c.is_monotonic and c.aggregation_temporality == 2
    assert c.data_points[0].as_int == 2**40
    u = m["http.server.active_requests"].sum
    assert not u.is_monotonic and u.data_points[0].as_int == -3
    assert _attrs(u.data_points[0].attributes) == {"k": "v"}
    assert m["g"].gauge.data_points[0].as_double == 1.25
