"""otlp_encode's one-join Export*ServiceRequest equals the plain nested encoding."""

from __future__ import annotations

import random

from otel_ebpf.telemetry import otlp_encode as enc


def nested(groups) -> bytes:
    """The request built field by field (each length-delimited field around the next)."""
    return b"".join(
        enc._ld(1, enc._ld(1, resource) + enc._ld(2, enc.SCOPE_FIELD + b"".join(items)))
        for resource, items in groups)


def test_one_join_trace_request_equals_the_nested_encoding():
    r = random.Random(7)
    for _ in range(300):
        groups = [(r.randbytes(r.randrange(0, 300)),
                   [r.randbytes(r.randrange(1, 600)) for _ in range(r.randrange(0, 40))])
                  for _ in range(r.randrange(0, 4))]
        assert enc.encode_trace_request(groups) == nested(groups)
    # lengths past one and two varint bytes at every level
    big = [(b"r" * 200, [b"s" * 454] * 600)]
    assert enc.encode_trace_request(big) == nested(big)
