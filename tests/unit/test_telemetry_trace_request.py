"""Telemetry's one-join ExportTraceServiceRequest equals otlp_encode's nested one."""

from __future__ import annotations

import random

from otel_ebpf.telemetry import _trace_request
from otel_ebpf.telemetry import otlp_encode as enc


def test_one_join_trace_request_equals_the_nested_encoding():
    r = random.Random(7)
    for _ in range(300):
        groups = [(r.randbytes(r.randrange(0, 300)),
                   [r.randbytes(r.randrange(1, 600)) for _ in range(r.randrange(0, 40))])
                  for _ in range(r.randrange(0, 4))]
        assert _trace_request(groups) == enc.encode_trace_request(groups)
    # lengths past one and two varint bytes at every level
    big = [(b"r" * 200, [b"s" * 454] * 600)]
    assert _trace_request(big) == enc.encode_trace_request(big)
