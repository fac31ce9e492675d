"""A minimal OTLP protobuf writer: bytes for ExportTraceServiceRequest and
ExportMetricsServiceRequest, written by hand.

Why by hand: building `opentelemetry.proto` message objects costs ~24 us per span
(measured here), the SDK span path ~35 us; the per-exchange budget is ~20 us for
everything. The wire format itself is cheap: varints, length-delimited fields and
little-endian fixed64s. Encodings that repeat (attribute keys, low-cardinality
key/value pairs, the instrumentation scope, a process's Resource) are built once and
reused as bytes.

In: Python values. Out: bytes that `opentelemetry.proto` parses back field for field
(tests/unit/test_otlp_encode.py checks every message type this module writes). Only
the fields the daemon uses are written; field numbers are from opentelemetry-proto
(trace/v1/trace.proto, metrics/v1/metrics.proto, common/v1/common.proto).

Conventions: `encode_X` returns a message body (no tag); `field_X` / `_ld(n, body)`
return a whole field (tag + length + body) ready to be concatenated into a parent.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

from otel_ebpf import __version__

SCOPE_NAME = "otel-ebpf"

# Span.kind (trace.proto)
SPAN_KIND_INTERNAL = 1
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
# Status.code
STATUS_CODE_UNSET = 0
STATUS_CODE_OK = 1
STATUS_CODE_ERROR = 2
# Span.flags: W3C trace flags in the low byte, then the is-remote bits of the parent.
SPAN_FLAGS_SAMPLED = 0x01
SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE = 0x100
SPAN_FLAGS_CONTEXT_IS_REMOTE = 0x200
# AggregationTemporality (metrics.proto)
TEMPORALITY_DELTA = 1
TEMPORALITY_CUMULATIVE = 2

_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_I = struct.Struct("<I").pack
_pack_q_signed = struct.Struct("<q").pack

# Varints below 128 are one byte: the common case for lengths, kinds and small ints.
_SMALL_VARINTS = [bytes((i,)) for i in range(128)]


def varint(n: int) -> bytes:
    """Unsigned LEB128; negative ints are written as their 64-bit two's complement."""
    if 0 <= n < 128:
        return _SMALL_VARINTS[n]
    if 0 < n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    if 0 < n < 2097152:  # three bytes: ports above 16383, most body sizes
        return bytes(((n & 0x7F) | 0x80, ((n >> 7) & 0x7F) | 0x80, n >> 14))
    if n < 0:
        n &= 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def _ld(field: int, body: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return tag(field, 2) + varint(len(body)) + body


def _str(field: int, value: str) -> bytes:
    return _ld(field, value.encode("utf-8", "replace"))


def _fixed64(field: int, value: int) -> bytes:
    return tag(field, 1) + _pack_q(value)


def _double(field: int, value: float) -> bytes:
    return tag(field, 1) + _pack_d(value)


def _uint(field: int, value: int) -> bytes:
    return tag(field, 0) + varint(value)


# ---------------------------------------------------------------- common.proto

def encode_any_value(value: object) -> bytes:
    """AnyValue body: string(1) bool(2) int(3) double(4) array(5) bytes(7)."""
    if isinstance(value, str):
        return _str(1, value)
    if isinstance(value, bool):  # before int: bool is an int subclass
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    if isinstance(value, (bytes, bytearray)):
        return _ld(7, bytes(value))
    if isinstance(value, (list, tuple)):
        return _ld(5, b"".join(_ld(1, encode_any_value(v)) for v in value))
    raise TypeError("unsupported attribute value type %s" % type(value).__name__)


_KEY_CACHE: dict[str, bytes] = {}


def _key_field(key: str) -> bytes:
    encoded = _KEY_CACHE.get(key)
    if encoded is None:
        encoded = _str(1, key)
        if len(_KEY_CACHE) < 4096:  # keys are constants in practice; bound anyway
            _KEY_CACHE[key] = encoded
    return encoded


def encode_key_value(key: str, value: object) -> bytes:
    """KeyValue body: key(1) value(2)."""
    return _key_field(key) + _ld(2, encode_any_value(value))


def field_key_any(field: int, key: str, any_value: bytes) -> bytes:
    """A KeyValue field from a key and an already encoded AnyValue body."""
    return _ld(field, _key_field(key) + _ld(2, any_value))


def field_attributes(field: int, attributes: Mapping[str, object]) -> bytes:
    """Repeated KeyValue field `field` for every attribute (None values skipped)."""
    return b"".join(
        _ld(field, encode_key_value(k, v)) for k, v in attributes.items() if v is not None
    )


class AttributeFieldCache:
    """Whole `repeated KeyValue` fields for (key, value) pairs that repeat.

    A bounded dict, cleared when full: the values cached are low-cardinality by
    construction (method, scheme, route, status, port), so the clear is a safety net
    against pathological input, not a steady-state event.
    """

    __slots__ = ("_field", "_tag", "_cache", "_max")

    def __init__(self, field: int, max_entries: int = 8192) -> None:
        self._field = field
        self._tag = tag(field, 2)
        self._cache: dict[tuple[str, object], bytes] = {}
        self._max = max_entries

    def get(self, key: str, value: object) -> bytes:
        k = (key, value)
        encoded = self._cache.get(k)
        if encoded is None:
            encoded = _ld(self._field, encode_key_value(key, value))
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[k] = encoded
        return encoded

    def fresh(self, key: str, value: object) -> bytes:
        """Uncached (for high-cardinality values)."""
        return _ld(self._field, encode_key_value(key, value))

    def fresh_str(self, key: str, value: str) -> bytes:
        """Uncached string attribute, with a fast path when every length fits one byte."""
        vb = value.encode("utf-8", "replace")
        n = len(vb)
        keyf = _key_field(key)
        kv_len = len(keyf) + 4 + n  # key field + (0x12 len (0x0a len value))
        if kv_len < 128:
            return b"".join((self._tag, _SMALL_VARINTS[kv_len], keyf, b"\x12",
                             _SMALL_VARINTS[n + 2], b"\x0a", _SMALL_VARINTS[n], vb))
        return _ld(self._field, keyf + _ld(2, _ld(1, vb)))

    def fresh_int(self, key: str, value: int) -> bytes:
        """Uncached int attribute."""
        vb = varint(value)
        keyf = _key_field(key)
        kv_len = len(keyf) + 3 + len(vb)  # key field + (0x12 len (0x18 varint))
        if kv_len < 128:
            return b"".join((self._tag, _SMALL_VARINTS[kv_len], keyf, b"\x12",
                             _SMALL_VARINTS[len(vb) + 1], b"\x18", vb))
        return _ld(self._field, keyf + _ld(2, b"\x18" + vb))


def encode_scope(name: str = SCOPE_NAME, version: str = __version__) -> bytes:
    """InstrumentationScope body: name(1) version(2)."""
    return _str(1, name) + _str(2, version)


SCOPE_FIELD = _ld(1, encode_scope())  # ScopeSpans.scope / ScopeMetrics.scope


def encode_resource(attributes: Mapping[str, object]) -> bytes:
    """Resource body: attributes(1)."""
    return field_attributes(1, attributes)


# ---------------------------------------------------------------- trace.proto

def encode_status(is_error: bool, message: str | None = None) -> bytes:
    """Status body: message(2) code(3)."""
    body = b""
    if message:
        body += _str(2, message)
    return body + _uint(3, STATUS_CODE_ERROR if is_error else STATUS_CODE_UNSET)


def field_span(
    trace_id: bytes,
    span_id: bytes,
    parent_span_id: bytes | None,
    trace_state: str | None,
    name_field: bytes,
    kind: int,
    start_time_unix_nano: int,
    end_time_unix_nano: int,
    attributes_fields: bytes,
    status_field: bytes,
    flags: int,
) -> bytes:
    """One Span as field 2 of ScopeSpans. `name_field` is `span_name_field(name)`,
    `attributes_fields` concatenated field-9 KeyValues, `status_field` `status_field()`
    (both may come from caches)."""
    head = b"\x0a\x10" + trace_id + b"\x12\x08" + span_id  # trace_id(1), span_id(2)
    if trace_state:
        head += _str(3, trace_state)
    if parent_span_id is not None:
        head += b"\x22\x08" + parent_span_id  # parent_span_id(4)
    flags_field = _FLAGS_FIELDS.get(flags)
    if flags_field is None:
        flags_field = b"\x85\x01" + _pack_I(flags)  # flags(16) fixed32
    payload = b"".join((
        head,
        name_field,  # name(5)
        _KIND_FIELDS[kind],  # kind(6)
        _pack_times(0x39, start_time_unix_nano, 0x41, end_time_unix_nano),  # (7) (8) fixed64
        attributes_fields,  # attributes(9)
        status_field,  # status(15)
        flags_field,
    ))
    n = len(payload)
    if n < 16384:  # two-byte length: nearly every span
        length = _SMALL_VARINTS[n] if n < 128 else bytes(((n & 0x7F) | 0x80, n >> 7))
        return b"\x12" + length + payload
    return b"\x12" + varint(n) + payload


_pack_times = struct.Struct("<BQBQ").pack
_KIND_FIELDS = [b"\x30" + _SMALL_VARINTS[k] for k in range(6)]
_FLAGS_FIELDS = {
    f: b"\x85\x01" + _pack_I(f)
    for f in (
        SPAN_FLAGS_SAMPLED | SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE,
        SPAN_FLAGS_SAMPLED | SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE | SPAN_FLAGS_CONTEXT_IS_REMOTE,
    )
}


def span_name_field(name: str) -> bytes:
    return _str(5, name)


def status_field(is_error: bool, message: str | None = None) -> bytes:
    return _ld(15, encode_status(is_error, message))


_REQUEST_RESOURCE_TAG = tag(1, 2)  # Export*ServiceRequest.resource_{spans,metrics}(1)
_RESOURCE_SCOPE_TAG = tag(2, 2)  # Resource*.scope_{spans,metrics}(2)


def _encode_export_request(groups: Iterable[tuple[bytes, Sequence[bytes]]]) -> bytes:
    """Export{Trace,Metrics}ServiceRequest: both nest the same way, resource_X(1) ->
    resource(1) + scope_X(2) -> scope(1) + the item fields (spans or metrics, field 2).

    One join: the lengths are summed first, so the items are copied once. Nesting them
    field by field copies a whole batch (~230 KB for 512 spans) at each level, and each
    fresh block that size is page-faulted in anew: ~330 us against ~45 us per batch."""
    out = []
    for resource_body, item_fields in groups:
        resource = _ld(1, resource_body)  # Resource{Spans,Metrics}.resource(1)
        scope_len = len(SCOPE_FIELD) + sum(map(len, item_fields))
        scope_head = _RESOURCE_SCOPE_TAG + varint(scope_len)
        out.append(b"".join((
            _REQUEST_RESOURCE_TAG, varint(len(resource) + len(scope_head) + scope_len),
            resource, scope_head, SCOPE_FIELD)))
        out += item_fields
    return b"".join(out)


def encode_trace_request(groups: Iterable[tuple[bytes, Sequence[bytes]]]) -> bytes:
    """ExportTraceServiceRequest from (Resource body, [span fields]) per resource."""
    return _encode_export_request(groups)


# ---------------------------------------------------------------- metrics.proto

def encode_number_point(
    attributes_fields: bytes,
    start_time_unix_nano: int,
    time_unix_nano: int,
    value: int | float,
) -> bytes:
    """NumberDataPoint body: start(2) time(3) as_double(4) | as_int(6) attributes(7)."""
    if isinstance(value, float):
        v = _double(4, value)
    else:
        v = tag(6, 1) + _pack_q_signed(value)  # sfixed64
    return (
        _fixed64(2, start_time_unix_nano) + _fixed64(3, time_unix_nano) + v
        + attributes_fields
    )


def encode_histogram_point(
    attributes_fields: bytes,
    start_time_unix_nano: int,
    time_unix_nano: int,
    count: int,
    total: float,
    bucket_counts: Sequence[int],
    explicit_bounds: Sequence[float],
    minimum: float | None,
    maximum: float | None,
) -> bytes:
    """HistogramDataPoint body; attributes are field 9, min 11, max 12."""
    parts = [
        _fixed64(2, start_time_unix_nano),
        _fixed64(3, time_unix_nano),
        _fixed64(4, count),
        _double(5, total),
        _ld(6, struct.pack("<%dQ" % len(bucket_counts), *bucket_counts)),  # packed
        _ld(7, struct.pack("<%dd" % len(explicit_bounds), *explicit_bounds)),
        attributes_fields,
    ]
    if minimum is not None:
        parts.append(_double(11, minimum))
    if maximum is not None:
        parts.append(_double(12, maximum))
    return b"".join(parts)


def encode_buckets(offset: int, counts: Sequence[int]) -> bytes:
    """ExponentialHistogramDataPoint.Buckets body: offset(1) sint32, counts(2) packed."""
    return _uint(1, zigzag(offset)) + _ld(2, b"".join(varint(c) for c in counts))


def encode_exponential_histogram_point(
    attributes_fields: bytes,
    start_time_unix_nano: int,
    time_unix_nano: int,
    count: int,
    total: float,
    scale: int,
    zero_count: int,
    positive_offset: int,
    positive_counts: Sequence[int],
    minimum: float | None,
    maximum: float | None,
) -> bytes:
    """ExponentialHistogramDataPoint body: attributes are field 1, min 12, max 13.
    Only positive buckets: durations and sizes are never negative."""
    parts = [
        attributes_fields,
        _fixed64(2, start_time_unix_nano),
        _fixed64(3, time_unix_nano),
        _fixed64(4, count),
        _double(5, total),
        _uint(6, zigzag(scale)),  # sint32
        _fixed64(7, zero_count),
        _ld(8, encode_buckets(positive_offset, positive_counts)),
    ]
    if minimum is not None:
        parts.append(_double(12, minimum))
    if maximum is not None:
        parts.append(_double(13, maximum))
    return b"".join(parts)


def _metric(name: str, description: str, unit: str, data_field: bytes) -> bytes:
    return _str(1, name) + _str(2, description) + _str(3, unit) + data_field


def field_histogram_metric(
    name: str, description: str, unit: str, temporality: int, points: Sequence[bytes]
) -> bytes:
    """A Metric (ScopeMetrics.metrics, field 2) holding a Histogram(9)."""
    data = b"".join(_ld(1, p) for p in points) + _uint(2, temporality)
    return _ld(2, _metric(name, description, unit, _ld(9, data)))


def field_exponential_histogram_metric(
    name: str, description: str, unit: str, temporality: int, points: Sequence[bytes]
) -> bytes:
    """A Metric holding an ExponentialHistogram(10)."""
    data = b"".join(_ld(1, p) for p in points) + _uint(2, temporality)
    return _ld(2, _metric(name, description, unit, _ld(10, data)))


def field_sum_metric(
    name: str,
    description: str,
    unit: str,
    temporality: int,
    monotonic: bool,
    points: Sequence[bytes],
) -> bytes:
    """A Metric holding a Sum(7) (monotonic counter or up-down counter)."""
    data = (
        b"".join(_ld(1, p) for p in points)
        + _uint(2, temporality)
        + (b"\x18\x01" if monotonic else b"")
    )
    return _ld(2, _metric(name, description, unit, _ld(7, data)))


def field_gauge_metric(
    name: str, description: str, unit: str, points: Sequence[bytes]
) -> bytes:
    """A Metric holding a Gauge(5)."""
    data = b"".join(_ld(1, p) for p in points)
    return _ld(2, _metric(name, description, unit, _ld(5, data)))


def encode_metrics_request(groups: Iterable[tuple[bytes, Sequence[bytes]]]) -> bytes:
    """ExportMetricsServiceRequest from (Resource body, [metric fields]) per resource."""
    return _encode_export_request(groups)
