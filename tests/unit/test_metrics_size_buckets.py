"""ExplicitSeries' per-exchange recording (size buckets from a bounded cache, count
summed from the buckets) equals ExplicitHistogram.record's plain bisect."""

from __future__ import annotations

import random

from otel_ebpf.telemetry import metrics
from otel_ebpf.telemetry.metrics import (
    DURATION_BOUNDARIES,
    SIZE_BOUNDARIES,
    ExplicitHistogram,
    ExplicitSeries,
)


def test_series_buckets_equal_plain_bisect_across_cache_clears():
    r = random.Random(3)
    series = ExplicitSeries(lambda d: ExplicitHistogram(
        DURATION_BOUNDARIES if d else SIZE_BOUNDARIES), ("GET",), 0)
    plain = [ExplicitHistogram(DURATION_BOUNDARIES), ExplicitHistogram(SIZE_BOUNDARIES),
             ExplicitHistogram(SIZE_BOUNDARIES)]
    edges = [int(b) for b in SIZE_BOUNDARIES] + [int(b) + 1 for b in SIZE_BOUNDARIES]
    for i in range(3 * metrics._MAX_SIZE_BUCKETS):
        duration = r.random() * 12
        request = r.choice(edges) if i % 3 else r.randrange(20000)
        response = None if i % 7 == 0 else (r.choice(edges) if i % 2 else r.randrange(20000))
        series.record(duration, request, response)
        plain[0].record(duration)
        plain[1].record(request)
        if response is not None:
            plain[2].record(response)
    assert len(metrics._SIZE_BUCKETS) <= metrics._MAX_SIZE_BUCKETS
    for got, want in zip((series.duration, series.request_size, series.response_size), plain):
        assert (got.counts, got.count, got.sum, got.min, got.max) == (
            want.counts, want.count, want.sum, want.min, want.max)
        assert got.encode(b"", 1, 2) == want.encode(b"", 1, 2)
    assert series.response_size.count < series.request_size.count
