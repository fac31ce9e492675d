"""tests/receiver.py's parser on literal rotel-agent output (as printed by rotel 0.0.1a10
with --debug-log-verbosity detailed), so a change in its format fails here, plainly."""

from __future__ import annotations

from tests.receiver import RotelOutputParser, decode_value

SAMPLE = """\
{"v":0,"name":"rotel-0.0.1-alpha10","msg":"Starting Rotel.","level":30}
ResourceSpans #0
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(svc a)
     -> process.pid: Int(123)
     -> process.command_args: Slice(Str(a), Str(b c))
     -> ok: Bool(true)
     -> ratio: Double(0.5)
     -> note: Str(line one) (x
line two)
ScopeSpans #0
ScopeSpans SchemaURL: 
InstrumentationScope otel-ebpf 0.1.0
Span #0
    Trace ID       : 000102030405060708090a0b0c0d0e0f
    Parent ID      : 0102030405060708
    ID             : 0001020304050607
    Name           : GET /users/{id}
    Kind           : SPAN_KIND_SERVER
    TraceState     : k=v
Start time: 1700000000000000000
End time: 1700000000005000000
    Status code    : STATUS_CODE_ERROR
    Status message : boom
Attributes:
     -> http.request.method: Str(GET)
     -> http.response.status_code: Int(500)
Span #1
    Trace ID       : 000102030405060708090a0b0c0d0e0f
    Parent ID      : 
    ID             : 0001020304050608
    Name           : GET
    Kind           : SPAN_KIND_CLIENT
Start time: 1
End time: 2
ResourceMetrics #0
Resource SchemaURL: 
Resource attributes:
     -> service.name: Str(svc b)
ScopeMetrics #0
ScopeMetrics SchemaURL: 
InstrumentationScope otel-ebpf 
Metric #0
Descriptor:
     -> Name: http.server.request.duration
     -> Description: Duration of HTTP server requests.
     -> Unit: s
     -> DataType: Histogram
     -> AggregationTemporality: AGGREGATION_TEMPORALITY_CUMULATIVE
HistogramDataPoints #0
Data point attributes:
     -> http.request.method: Str(GET)
StartTimestamp: 1
Timestamp: 2
Count: 23
Sum: 1.5
Min: 0.001
Max: 0.009
ExplicitBounds #0: 0.005
ExplicitBounds #1: 0.01
Buckets #0, Count: 1
Buckets #1, Count: 22
Buckets #2, Count: 0
Metric #1
Descriptor:
     -> Name: otel_ebpf.capture.events
     -> Description: 
     -> Unit: 
     -> DataType: Sum
     -> IsMonotonic: true
     -> AggregationTemporality: AGGREGATION_TEMPORALITY_CUMULATIVE
NumberDataPoints #0
StartTimestamp: 0
Timestamp: 2
Value: 42
Metric #2
Descriptor:
     -> Name: eh
     -> Description: 
     -> Unit: s
     -> DataType: ExponentialHistogram
     -> AggregationTemporality: AGGREGATION_TEMPORALITY_DELTA
ExponentialHistogramDataPoints #0
StartTimestamp: 4
Timestamp: 5
Count: 23
Sum: 2
Bucket [0, 0], Count: 1
Bucket (0.8408964152537145, 0.9170040432046712], Count: 1
Bucket (0.9170040432046712, 1], Count: 2
Bucket (1, 1.0905077326652577], Count: 19
"""


def parse() -> RotelOutputParser:
    p = RotelOutputParser()
    for line in SAMPLE.splitlines(keepends=True):
        p.feed(line)
    return p


def test_spans():
    p = parse()
    assert len(p.spans) == 2
    s0, s1 = p.spans
    assert s0.resource == {"service.name": "svc a", "process.pid": 123,
                           "process.command_args": ["a", "b c"], "ok": True, "ratio": 0.5,
                           "note": "line one) (x\nline two"}
    assert (s0.scope_name, s0.scope_version) == ("otel-ebpf", "0.1.0")
    assert s0.name == "GET /users/{id}" and s0.kind == "SPAN_KIND_SERVER"
    assert s0.trace_id == "000102030405060708090a0b0c0d0e0f"
    assert s0.parent_id == "0102030405060708" and s0.span_id == "0001020304050607"
    assert s0.fields["TraceState"] == "k=v"
    assert s0.start_time_unix_nano == 1700000000000000000
    assert s0.end_time_unix_nano == 1700000000005000000
    assert s0.status_code == "STATUS_CODE_ERROR"
    assert s0.attributes == {"http.request.method": "GET", "http.response.status_code": 500}
    assert s1.parent_id == "" and s1.attributes == {} and s1.status_code == "STATUS_CODE_UNSET"


def test_metric_points():
    p = parse()
    assert [pt.metric for pt in p.points] == ["http.server.request.duration",
                                              "otel_ebpf.capture.events", "eh"]
    h, s, e = p.points
    assert h.resource == {"service.name": "svc b"}
    assert h.descriptor["Description"] == "Duration of HTTP server requests."
    assert h.descriptor["Unit"] == "s"
    assert h.attributes == {"http.request.method": "GET"}
    assert (h.count, h.sum) == (23, 1.5)
    assert h.explicit_bounds == [0.005, 0.01] and h.bucket_counts == [1, 22, 0]
    assert s.value == 42 and s.descriptor["IsMonotonic"] == "true"
    assert s.descriptor["Description"] == "" and s.attributes == {}
    assert e.descriptor["DataType"] == "ExponentialHistogram"
    assert e.count == 23 and e.bucket_counts == [1, 1, 2, 19]


def test_decode_value():
    assert decode_value("Int", "-5") == -5
    assert decode_value("Bool", "false") is False
    assert decode_value("Slice", "") == []
    assert decode_value("Bytes", "00ff") == "Bytes(00ff)"
