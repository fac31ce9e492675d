"""Counters for the daemon's own health: one registry shared by every stage.

Stages increment named counters (cheap: one dict update); the console sink prints a
periodic stats line from `snapshot()` and telemetry exports them as the daemon's own
metrics. Names are dotted and stable, e.g. `capture.events`, `capture.lost.ringbuf_full`,
`http.parse_failures`, `export.spans_dropped`. Gauges (values that go down) are
registered as callbacks, read at snapshot time.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable


class Stats:
    __slots__ = ("_counters", "_gauges")

    def __init__(self) -> None:
        self._counters: defaultdict[str, int] = defaultdict(int)
        self._gauges: dict[str, Callable[[], int | float]] = {}

    def add(self, name: str, value: int = 1) -> None:
        self._counters[name] += value

    def set_total(self, name: str, value: int) -> None:
        """For counters whose running total lives elsewhere (e.g. in a kernel map)."""
        self._counters[name] = value

    def gauge(self, name: str, read: Callable[[], int | float]) -> None:
        self._gauges[name] = read

    def gauge_names(self) -> frozenset[str]:
        """Names whose values may go down (exported as gauges, not monotonic sums)."""
        return frozenset(self._gauges)

    def get(self, name: str) -> int:
        return self._counters.get(name, 0)

    def snapshot(self) -> dict[str, int | float]:
        values: dict[str, int | float] = dict(self._counters)
        for name, read in self._gauges.items():
            try:
                values[name] = read()
            except Exception:  # a gauge must never break the stats line
                values[name] = -1
        return values
