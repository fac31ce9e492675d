"""RED metrics per process, aggregated here and encoded straight to OTLP.

In: one `record(pid, is_client, attrs, duration_s, request_size, response_size)` per
exchange (the caller has already reduced the exchange to its low-cardinality metric
attribute tuple, see METRIC_ATTRIBUTE_KEYS). Out: `collect(now_ns)` -> per pid, the
`ScopeMetrics.metrics` fields of:

  http.{server,client}.request.duration      histogram, seconds, semconv boundaries
  http.{server,client}.request.body.size     histogram, bytes ("By")
  http.{server,client}.response.body.size    histogram, bytes (only with a response)
  http.server.active_requests                up-down counter, from a callback

and for gRPC calls (`kind` RPC_SERVER / RPC_CLIENT instead of the HTTP role bool),
per the RPC metric conventions of v1.37 (see attributes.py for why that version):

  rpc.{server,client}.duration               histogram, milliseconds ("ms": those
                                             conventions' unit; later ones moved to
                                             rpc.*.call.duration in seconds), the
                                             SDK's default boundaries (made for ms)
  rpc.{server,client}.requests_per_rpc       histogram, messages the client sent
  rpc.{server,client}.responses_per_rpc      histogram, messages the server sent
                                             (both "required for streaming RPCs")

Why not the SDK: `Histogram.record` costs ~7.4 us with 3 attributes (measured here);
here one exchange is one dict lookup of its attribute tuple plus three bisects. The
three histograms of one role share one attribute set, so they live in one series.

Temporality (OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE, as the SDK maps it):
cumulative: everything cumulative. delta: histograms and counters delta, up-down
counters cumulative. lowmemory: histograms (synchronous) delta, observed counters and
up-down counters cumulative. Delta series are dropped after each collection, so memory
holds only the attribute sets seen in the last interval.

Histogram aggregation (OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION):
explicit buckets, or base-2 exponential buckets with the SDK's max_size 160 / max_scale
20, scale lowered as the range of values grows.

Cardinality: at most `cardinality_limit` attribute sets per (pid, role), the last one
being the overflow set `otel.metric.overflow=true` that takes everything beyond, as
the SDK does (default 2000); and at most `max_series` sets over all processes (the
memory bound), past which new sets also go to their process's overflow series. `forget(pid)` drops a process's series; the caller
collects them first so their last values are exported.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Collection, Mapping

from otel_ebpf.telemetry import otlp_encode as enc
from otel_ebpf.telemetry.attributes import KNOWN_METHODS as _KNOWN_METHODS

# Semantic-convention boundaries for http.*.request.duration, in seconds.
DURATION_BOUNDARIES: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0
)
# Body sizes: semconv gives no boundaries; these are the SDK's default explicit
# boundaries, which read naturally as bytes.
SIZE_BOUNDARIES: tuple[float, ...] = (
    0.0, 5.0, 10.0, 25.0, 50.0, 75.0, 100.0, 250.0, 500.0, 750.0, 1000.0, 2500.0, 5000.0,
    7500.0, 10000.0,
)

# The order of the metric attribute tuple built by the caller (telemetry.Telemetry).
METRIC_ATTRIBUTE_KEYS: tuple[str, ...] = (
    "http.request.method",
    "http.response.status_code",
    "http.route",
    "url.scheme",
    "network.protocol.version",
    "server.port",
    "error.type",
    "server.address",  # client metrics only, and only when enabled in the options
)
# The order of the attribute tuple of an RPC series. rpc.service/rpc.method are
# bounded by the caller (Telemetry) like http.route: past a per-process limit, and
# for calls a server answered UNIMPLEMENTED, they are "_OTHER".
RPC_METRIC_ATTRIBUTE_KEYS: tuple[str, ...] = (
    "rpc.system",
    "rpc.service",
    "rpc.method",
    "rpc.grpc.status_code",
    "server.port",
    "error.type",
    "server.address",  # client metrics only, and only when enabled in the options
)
# rpc.*.duration is in ms: the SDK's default explicit boundaries, which were made for ms.
RPC_DURATION_BOUNDARIES: tuple[float, ...] = SIZE_BOUNDARIES
# Series kinds (the second element of a series key): HTTP keeps its role bool
# (False server, True client, equal to 0 and 1); RPC series are 2 and 3.
RPC_SERVER = 2
RPC_CLIENT = 3
# Attribute sets over all processes together: the memory bound of the aggregator
# (~2 KB per set with explicit buckets, so ~40 MB at most).
MAX_SERIES = 20000
OVERFLOW = ("__overflow__",)  # the attribute tuple of the overflow series
OVERFLOW_ATTRIBUTES = {"otel.metric.overflow": True}

_INSTRUMENTS = {
    False: (
        ("http.server.request.duration", "Duration of HTTP server requests.", "s"),
        ("http.server.request.body.size", "Size of HTTP server request bodies.", "By"),
        ("http.server.response.body.size", "Size of HTTP server response bodies.", "By"),
    ),
    True: (
        ("http.client.request.duration", "Duration of HTTP client requests.", "s"),
        ("http.client.request.body.size", "Size of HTTP client request bodies.", "By"),
        ("http.client.response.body.size", "Size of HTTP client response bodies.", "By"),
    ),
    RPC_SERVER: (
        ("rpc.server.duration", "Measures the duration of inbound RPC.", "ms"),
        ("rpc.server.requests_per_rpc", "Measures the number of messages received per RPC.",
         "{count}"),
        ("rpc.server.responses_per_rpc", "Measures the number of messages sent per RPC.",
         "{count}"),
    ),
    RPC_CLIENT: (
        ("rpc.client.duration", "Measures the duration of outbound RPC.", "ms"),
        ("rpc.client.requests_per_rpc", "Measures the number of messages sent per RPC.",
         "{count}"),
        ("rpc.client.responses_per_rpc",
         "Measures the number of messages received per RPC.", "{count}"),
    ),
}
ACTIVE_REQUESTS = ("http.server.active_requests", "Number of active HTTP server requests.",
                   "{request}")

# (pid, http.request.method, url.scheme, server.port) -> in-flight server requests.
ActiveRequests = Callable[[], Mapping[tuple[int, str, str, int], int]]


def attribute_dict(attrs: tuple, keys: tuple[str, ...] = METRIC_ATTRIBUTE_KEYS
                   ) -> dict[str, object]:
    if attrs == OVERFLOW:
        return dict(OVERFLOW_ATTRIBUTES)
    return {k: v for k, v in zip(keys, attrs) if v is not None}


# ---------------------------------------------------------------- aggregations

class ExplicitHistogram:
    __slots__ = ("bounds", "counts", "sum", "min", "max")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    @property
    def count(self) -> int:
        # Every recording adds one to exactly one bucket: the total is their sum, summed
        # when exported rather than counted per recording.
        return sum(self.counts)

    def record(self, value: float) -> None:
        # bisect_left: bucket i holds (bounds[i-1], bounds[i]], upper bound inclusive.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def encode(self, attributes_fields: bytes, start_ns: int, now_ns: int) -> bytes:
        count = self.count
        return enc.encode_histogram_point(
            attributes_fields, start_ns, now_ns, count, self.sum, self.counts,
            self.bounds, self.min if count else None, self.max if count else None,
        )


_MIN_NORMAL = 2.2250738585072014e-308
_LN2 = math.log(2)


def map_to_index(value: float, scale: int) -> int:
    """Index of the base-2 exponential bucket (base = 2**2**-scale) holding value > 0;
    bucket i is (base**i, base**(i+1)], as in the OTLP data model and the SDK."""
    if value < _MIN_NORMAL:
        value = _MIN_NORMAL
    mantissa, exp = math.frexp(value)  # value = mantissa * 2**exp, mantissa in [0.5, 1)
    if scale > 0:
        if mantissa == 0.5:  # an exact power of two is the upper bound of its bucket
            return ((exp - 1) << scale) - 1
        return math.floor(math.log(value) * (math.ldexp(1.0, scale) / _LN2))
    exponent = exp - 1
    if mantissa == 0.5:
        exponent -= 1
    return exponent >> -scale


class ExponentialHistogram:
    __slots__ = ("scale", "max_size", "buckets", "lo", "hi", "zero_count", "count", "sum",
                 "min", "max")

    def __init__(self, max_size: int, max_scale: int) -> None:
        self.scale = max_scale
        self.max_size = max_size
        self.buckets: dict[int, int] = {}
        self.lo = 0
        self.hi = -1  # empty when hi < lo
        self.zero_count = 0
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf

    def record(self, value: float) -> None:
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        if value <= 0.0:  # sizes can be 0; nothing here is negative
            self.zero_count += 1
            return
        index = map_to_index(value, self.scale)
        buckets = self.buckets
        if not buckets:
            self.lo = self.hi = index
        elif index < self.lo or index > self.hi:
            lo = min(self.lo, index)
            hi = max(self.hi, index)
            change = 0
            while (hi >> change) - (lo >> change) + 1 > self.max_size:
                change += 1
            if change:
                self._downscale(change)
                buckets = self.buckets  # _downscale replaced the dict
                index >>= change
                lo >>= change
                hi >>= change
            self.lo, self.hi = lo, hi
        buckets[index] = buckets.get(index, 0) + 1

    def _downscale(self, change: int) -> None:
        merged: dict[int, int] = {}
        for i, c in self.buckets.items():
            j = i >> change
            merged[j] = merged.get(j, 0) + c
        self.buckets = merged
        self.scale -= change

    def encode(self, attributes_fields: bytes, start_ns: int, now_ns: int) -> bytes:
        if self.buckets:
            offset = self.lo
            counts = [self.buckets.get(i, 0) for i in range(self.lo, self.hi + 1)]
        else:
            offset, counts = 0, []
        return enc.encode_exponential_histogram_point(
            attributes_fields, start_ns, now_ns, self.count, self.sum, self.scale,
            self.zero_count, offset, counts,
            self.min if self.count else None, self.max if self.count else None,
        )


class Series:
    """The three histograms of one (pid, role, attribute set)."""

    __slots__ = ("duration", "request_size", "response_size", "start_ns", "attrs_hist",
                 "attrs_expo")

    def __init__(self, make: Callable[[bool], object], attrs: tuple, start_ns: int,
                 keys: tuple[str, ...] = METRIC_ATTRIBUTE_KEYS) -> None:
        # For RPC series the three are duration (ms), requests and responses per RPC.
        self.duration = make(True)
        self.request_size = make(False)
        self.response_size = make(False)
        self.start_ns = start_ns
        attributes = attribute_dict(attrs, keys)
        # HistogramDataPoint.attributes is field 9, ExponentialHistogramDataPoint's 1.
        self.attrs_hist = enc.field_attributes(9, attributes)
        self.attrs_expo = enc.field_attributes(1, attributes)

    def record(self, duration_s: float, request_size: int, response_size: int | None) -> None:
        self.duration.record(duration_s)
        self.request_size.record(request_size)
        if response_size is not None:
            self.response_size.record(response_size)


# Body size -> its bucket among SIZE_BOUNDARIES: sizes repeat (a page, an empty body),
# and bisecting floats with an int costs ~80 ns against ~20 for a dict hit. Bounded:
# cleared when full (a client controls its sizes).
_SIZE_BUCKETS: dict[int, int] = {}
_MAX_SIZE_BUCKETS = 4096


def _size_bucket(size: int) -> int:
    if len(_SIZE_BUCKETS) >= _MAX_SIZE_BUCKETS:
        _SIZE_BUCKETS.clear()
    i = _SIZE_BUCKETS[size] = bisect_left(SIZE_BOUNDARIES, size)
    return i


class ExplicitSeries(Series):
    """Series of explicit-bucket histograms with the three records inlined: this is
    the per-exchange path, and three method calls are a measurable share of it."""

    __slots__ = ()

    def record(self, duration_s: float, request_size: int, response_size: int | None) -> None:
        h = self.duration
        h.counts[bisect_left(DURATION_BOUNDARIES, duration_s)] += 1
        h.sum += duration_s
        if duration_s < h.min:
            h.min = duration_s
        if duration_s > h.max:
            h.max = duration_s
        h = self.request_size
        i = _SIZE_BUCKETS.get(request_size)
        h.counts[_size_bucket(request_size) if i is None else i] += 1
        h.sum += request_size
        if request_size < h.min:
            h.min = request_size
        if request_size > h.max:
            h.max = request_size
        if response_size is not None:
            h = self.response_size
            i = _SIZE_BUCKETS.get(response_size)
            h.counts[_size_bucket(response_size) if i is None else i] += 1
            h.sum += response_size
            if response_size < h.min:
                h.min = response_size
            if response_size > h.max:
                h.max = response_size


def _make_rpc_histogram(_duration: bool) -> ExplicitHistogram:
    return ExplicitHistogram(RPC_DURATION_BOUNDARIES)


# ---------------------------------------------------------------- aggregator

class MetricsAggregator:
    def __init__(
        self,
        temporality: str = "cumulative",
        histogram_aggregation: str = "explicit_bucket_histogram",
        cardinality_limit: int = 2000,
        max_series: int = MAX_SERIES,
        exponential_max_size: int = 160,
        exponential_max_scale: int = 20,
        active_server_requests: ActiveRequests | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self._delta = temporality in ("delta", "lowmemory")
        self._counter_delta = temporality == "delta"  # observed counters (self metrics)
        self._exponential = histogram_aggregation == "base2_exponential_bucket_histogram"
        self._limit = cardinality_limit
        self._max_series = max_series
        self._clock = clock_ns
        self._active = active_server_requests
        self._start_ns = clock_ns()
        self._last_collect_ns = self._start_ns
        # (pid, is_client, attrs) -> Series; (pid, is_client) -> number of series.
        self._series: dict[tuple[int, bool, tuple], Series] = {}
        # The hot path's shortcut past record(): (pid, is_client, attrs) -> the Series
        # to record into, or None (then call record()). _series is never rebound
        # (only cleared or trimmed in place), so this bound method stays valid.
        self.series_get = self._series.get
        self._per_role: dict[tuple[int, bool], int] = {}
        self._pid_start: dict[int, int] = {}
        self._last_self: dict[str, int | float] = {}
        self._last_self_ns = self._start_ns
        self._points = 0
        self.overflowed = 0  # series requests that went to an overflow series
        self.last_points = 0  # data points in the last collect()
        if self._exponential:
            def make(_duration: bool) -> object:
                return ExponentialHistogram(exponential_max_size, exponential_max_scale)
        else:
            def make(duration: bool) -> object:
                return ExplicitHistogram(DURATION_BOUNDARIES if duration else SIZE_BOUNDARIES)
        self._make = make

    @property
    def temporality(self) -> int:
        return enc.TEMPORALITY_DELTA if self._delta else enc.TEMPORALITY_CUMULATIVE

    def record(
        self,
        pid: int,
        is_client: bool | int,  # the series kind: False/True (HTTP), RPC_SERVER/RPC_CLIENT
        attrs: tuple,
        duration_s: float,  # RPC series: milliseconds
        request_size: int,
        response_size: int | None,
        started_ns: int | None = None,
    ) -> None:
        key = (pid, is_client, attrs)
        series = self._series.get(key)
        if series is None:
            series = self.new_series(pid, is_client, attrs, started_ns)
        series.record(duration_s, request_size, response_size)

    def new_series(self, pid: int, is_client: bool, attrs: tuple,
                   started_ns: int | None = None) -> Series:
        """The series to record into for an attribute set `series_get` did not find:
        a new one, or the process's overflow series past the cardinality limit."""
        role_key = (pid, is_client)
        n = self._per_role.get(role_key, 0)
        # The last slot per (pid, role) is reserved for the overflow series, which may
        # also be created past the global max_series (one per pid and role at most).
        if n >= self._limit - 1 or len(self._series) >= self._max_series:
            self.overflowed += 1
            key = (pid, is_client, OVERFLOW)
            series = self._series.get(key)
            if series is not None:
                return series
            attrs = OVERFLOW
        else:
            self._per_role[role_key] = n + 1
            key = (pid, is_client, attrs)
        now = self._clock()
        # A cumulative series' start time must not be later than the first exchange it
        # counts: that exchange began before the daemon processed it.
        if started_ns is not None and 0 < started_ns < now:
            now = started_ns
        self._pid_start.setdefault(pid, now)
        if is_client >= RPC_SERVER:  # an RPC series: generic Series, ms boundaries
            series = Series(self._make if self._exponential else _make_rpc_histogram,
                            attrs, now, RPC_METRIC_ATTRIBUTE_KEYS)
        else:
            series = (Series if self._exponential else ExplicitSeries)(self._make, attrs, now)
        self._series[key] = series
        return series

    def series_count(self, pid: int | None = None) -> int:
        if pid is None:
            return len(self._series)
        return sum(1 for (p, _, _) in self._series if p == pid)

    def collect(self, only_pid: int | None = None) -> dict[int, list[bytes]]:
        """Per pid, the metric fields to export now. With delta temporality the
        collected series are reset (dropped)."""
        now = self._clock()
        start_delta = self._last_collect_ns
        grouped: dict[tuple[int, bool], list[Series]] = {}
        for (pid, is_client, _), series in self._series.items():
            if only_pid is None or pid == only_pid:
                grouped.setdefault((pid, is_client), []).append(series)
        out: dict[int, list[bytes]] = {}
        self._points = 0
        expo = self._exponential
        temporality = self.temporality
        for (pid, is_client), series_list in grouped.items():
            fields = out.setdefault(pid, [])
            for i, (name, description, unit) in enumerate(_INSTRUMENTS[is_client]):
                points = []
                for s in series_list:
                    hist = (s.duration, s.request_size, s.response_size)[i]
                    if hist.count == 0:
                        continue  # e.g. no response sizes yet: no empty points
                    start = start_delta if self._delta else s.start_ns
                    points.append(hist.encode(s.attrs_expo if expo else s.attrs_hist,
                                              start, now))
                if not points:
                    continue
                self._points += len(points)
                if expo:
                    fields.append(enc.field_exponential_histogram_metric(
                        name, description, unit, temporality, points))
                else:
                    fields.append(enc.field_histogram_metric(
                        name, description, unit, temporality, points))
        self._collect_active(out, now, only_pid)
        self.last_points = self._points
        if self._delta:
            if only_pid is None:
                self._series.clear()
                self._per_role.clear()
            else:
                self._drop(only_pid)
        if only_pid is None:
            self._last_collect_ns = now
        return out

    def _collect_active(self, out: dict[int, list[bytes]], now: int,
                        only_pid: int | None) -> None:
        if self._active is None:
            return
        try:
            active = self._active()
        except Exception:  # a broken callback must not lose the histograms
            return
        per_pid: dict[int, list[bytes]] = {}
        for (pid, method, scheme, port), value in active.items():
            if only_pid is not None and pid != only_pid:
                continue
            if method not in _KNOWN_METHODS:
                method = "_OTHER"
            attrs = enc.field_attributes(
                7, {"http.request.method": method, "url.scheme": scheme, "server.port": port})
            start = self._pid_start.setdefault(pid, self._start_ns)
            per_pid.setdefault(pid, []).append(enc.encode_number_point(attrs, start, now,
                                                                       int(value)))
        name, description, unit = ACTIVE_REQUESTS
        for pid, points in per_pid.items():
            self._points += len(points)
            out.setdefault(pid, []).append(enc.field_sum_metric(
                name, description, unit, enc.TEMPORALITY_CUMULATIVE, False, points))

    def _drop(self, pid: int) -> None:
        for key in [k for k in self._series if k[0] == pid]:
            del self._series[key]
        for kind in (False, True, RPC_SERVER, RPC_CLIENT):
            self._per_role.pop((pid, kind), None)

    def forget(self, pid: int) -> None:
        self._drop(pid)
        self._pid_start.pop(pid, None)

    def self_metrics(
        self, snapshot: Mapping[str, int | float], gauge_names: Collection[str] = ()
    ) -> list[bytes]:
        """The daemon's health: counters as monotonic Sums `otel_ebpf.<name>`, names in
        `gauge_names` as Gauges. Delta temporality exports the increase since the
        previous call."""
        now = self._clock()
        fields = []
        for name in sorted(snapshot):
            value = snapshot[name]
            metric = "otel_ebpf." + name
            if name in gauge_names:
                fields.append(enc.field_gauge_metric(
                    metric, "", "1", [enc.encode_number_point(b"", now, now, value)]))
                continue
            if self._counter_delta:
                previous = self._last_self.get(name, 0)
                self._last_self[name] = value
                point = enc.encode_number_point(b"", self._last_self_ns, now,
                                                max(value - previous, 0))
                temporality = enc.TEMPORALITY_DELTA
            else:
                point = enc.encode_number_point(b"", self._start_ns, now, value)
                temporality = enc.TEMPORALITY_CUMULATIVE
            unit = "By" if "bytes" in name else "1"
            fields.append(enc.field_sum_metric(metric, "", unit, temporality, True, [point]))
        self._last_self_ns = now
        return fields

