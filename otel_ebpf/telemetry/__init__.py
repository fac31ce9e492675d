"""telemetry: HttpExchange -> OTLP spans and RED metrics, as serialized OTLP payloads.

Contract. In: `Telemetry.record(exchange)` once per HttpExchange (the hot path: route,
span bytes into the pending batch, metric aggregation; ~20 us is the budget of the
whole pipeline per exchange) and `tick(now_s)` from the daemon loop.
Out: `sink.export_traces(payload, spans)` with an ExportTraceServiceRequest and
`sink.export_metrics(payload, points)` with an ExportMetricsServiceRequest, bytes built
by otlp_encode (never through the SDK's per-span machinery, which costs ~35 us/span).

- The mapping is picked by the record: a gRPC call (`exchange.rpc` set) becomes an RPC
  span and rpc.{server,client}.* metrics (attributes.py says which conventions),
  anything else an HTTP span and http.* metrics (HTTP/2 too, protocol version "2").
- One Resource per observed process: `resource_for_pid(pid)` is asked the first time a
  pid is recorded and the encoded result is kept until `forget(pid)`, so spans and last
  metric values of a process that already exited still carry its identity. When it
  returns None, a minimal resource (service.name=unknown_service:<pid>, process.pid) is
  used and the lookup is retried at the next flush.
- Spans: batched per OTEL_BSP_* semantics: exported when `span_batch_size` spans (or
  1 MiB of encoded spans, below gRPC's default 4 MiB message limit) are pending, or
  when the oldest pending span is `span_schedule_delay_s` old (measured in `tick`
  calls). Unsampled parents (W3C traceparent with the sampled flag off) produce no
  span but still metrics.
- Metrics: collected every `metric_export_interval_s` (first collection one interval
  after the first tick); the daemon's own Stats go out on `daemon_resource` as
  `otel_ebpf.<counter>` monotonic Sums and `otel_ebpf.<gauge>` Gauges.
- Counted in Stats: telemetry.exchanges, telemetry.spans (produced),
  telemetry.spans_unsampled, telemetry.spans_dropped (could not be encoded, or
  recorded after shutdown), telemetry.metric_overflow (recordings folded into the
  otel.metric.overflow series), telemetry.unknown_role (exchanges with Role.UNKNOWN:
  span kind INTERNAL, no metrics, since server and client metrics would both lie).

Memory bounds (a client controls methods, paths, queries, Host and User-Agent: none of
them may grow memory without a bound). Caches are keyed by what repeats, cleared when
full unless said otherwise:
- routes.RouteResolver: templated paths, `route_cache_size` (4096) in two generations,
  paths over 512 characters not cached; routes per pid: `max_routes`, the rest "/*".
- spans.SpanEncoder: (key, value) fields 8192; url.path fields 4096 (paths <= 256
  chars); body-size pairs 4096; span names 8192; status fields 256 (+ the few without
  a message); request blocks 4096 (known methods) and 4096 (any other method, cached
  without it); origin blocks 4096; peer address fields 4096; one connection block per
  socket, 16384 (blocks <= 512 bytes); gRPC call blocks and message counts 4096 each.
- Telemetry: kinds of requests (pid, url.path, method, status, outcome, role) 4096,
  paths <= 256 chars that are their own route and known methods only.
- attributes.split_host 1024; otlp_encode attribute keys 4096 (kept, never cleared).
- metrics: body size -> histogram bucket 4096 (shared by every aggregator).
- metrics.MetricsAggregator: `metric_cardinality_limit` series per (pid, role), the
  excess folded into the overflow series (counted: telemetry.metric_overflow), and
  MAX_SERIES over all processes; rpc (service, method) pairs: `max_routes` per pid.
- pending spans: `span_batch_size` (<= `span_queue_size`) or MAX_BATCH_BYTES.
(The kernel-exchange decoder upstream keeps one entry per open descriptor, 16384, each
with its last request head if <= 256 bytes, and 4096 formatted addresses.)

Not thread-safe: record/tick/forget/flush/shutdown must come from one thread (the
daemon loop). shutdown() is idempotent and flushes everything first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Protocol

from otel_ebpf.exchange import HttpExchange, Role, RpcCall
from otel_ebpf.telemetry import otlp_encode as enc
from otel_ebpf.telemetry.attributes import (
    GRPC_UNIMPLEMENTED,
    AttrValue,
    server_endpoint,
    url_path,
)
from otel_ebpf.telemetry.metrics import (
    MAX_SERIES,
    RPC_CLIENT,
    RPC_SERVER,
    ActiveRequests,
    MetricsAggregator,
)
from otel_ebpf.telemetry.options import TelemetryOptions
from otel_ebpf.telemetry.redact import QueryRedactor
from otel_ebpf.telemetry.routes import RouteResolver
from otel_ebpf.telemetry.spans import SpanEncoder

__all__ = ["Telemetry", "TelemetryOptions", "TelemetrySink"]

log = logging.getLogger(__name__)

# Flush a span batch early at this many encoded bytes: gRPC servers reject messages
# over 4 MiB by default, and a batch of 512 spans with long URLs can get there.
MAX_BATCH_BYTES = 1 << 20

_CLIENT = Role.CLIENT
_SERVER = Role.SERVER
_OTHER_RPC = ("_OTHER", "_OTHER")  # rpc.service/rpc.method past the cardinality bound
# Kinds of requests kept by Telemetry._shape (cleared when full), paths up to this long.
_MAX_SHAPES = 4096
_MAX_SHAPE_PATH = 256


class TelemetrySink(Protocol):
    def export_traces(self, payload: bytes, spans: int = 1) -> None: ...

    def export_metrics(self, payload: bytes, points: int = 1) -> None: ...


class Telemetry:
    def __init__(
        self,
        options: TelemetryOptions,
        resource_for_pid: Callable[[int], Mapping[str, AttrValue] | None],
        daemon_resource: Mapping[str, AttrValue],
        sink: TelemetrySink,
        stats,  # otel_ebpf.stats.Stats
        active_server_requests: ActiveRequests | None = None,
        max_series: int = MAX_SERIES,
    ) -> None:
        self._options = options
        self._resource_for_pid = resource_for_pid
        self._daemon_resource = enc.encode_resource(daemon_resource)
        self._sink = sink
        self._stats = stats
        self._spans_on = options.spans_enabled
        self._metrics_on = options.metrics_enabled
        self._routes = RouteResolver(options.route_patterns, options.max_routes,
                                     options.route_cache_size)
        self._encoder = SpanEncoder(QueryRedactor(options.redacted_query_params))
        self._metrics = MetricsAggregator(
            temporality=options.metrics_temporality,
            histogram_aggregation=options.histogram_aggregation,
            cardinality_limit=options.metric_cardinality_limit,
            max_series=max_series,
            exponential_max_size=options.exponential_max_size,
            exponential_max_scale=options.exponential_max_scale,
            active_server_requests=active_server_requests,
        )
        self._series_get = self._metrics.series_get
        self._client_address = options.client_metrics_server_address
        self._batch_limit = min(options.span_batch_size, options.span_queue_size)
        # pid -> encoded Resource body; pids whose resource is the fallback are retried.
        self._resources: dict[int, bytes] = {}
        self._fallback: set[int] = set()
        self._pending: dict[int, list[bytes]] = {}
        # (pid, url.path, method, status, outcome, is client) -> (route, request info,
        # url.path field): see _shape.
        self._shapes: dict[tuple, tuple] = {}
        self._pending_spans = 0
        self._pending_bytes = 0
        self._batch_since: float | None = None  # tick time at which a batch was first seen
        self._next_metrics: float | None = None
        self._closed = False
        self._warned_encode = False
        # Hot-path counters, pushed into Stats at each flush (Stats.add is a dict update
        # per call; batching it keeps it off the per-exchange path).
        self._n_exchanges = 0
        self._n_unsampled = 0
        self._n_dropped = 0
        self._n_unknown = 0
        self._overflow_reported = 0
        # pid -> (rpc.service, rpc.method) pairs handed out to metrics (bounded).
        self._rpc_methods: dict[int, set[tuple[str, str]]] = {}

    # ------------------------------------------------------------------ hot path

    def record(self, exchange: HttpExchange) -> None:
        if self._closed:  # rare: straight into Stats, nothing will push it later
            self._stats.add("telemetry.spans_dropped")
            return
        self._n_exchanges += 1
        pid = exchange.pid
        if pid not in self._resources:
            self._resolve(pid)
        if exchange.rpc is not None:  # a gRPC call: the RPC mapping
            self._record_rpc(exchange)
            return
        path, sep, query = exchange.target.partition("?")
        if path[:1] != "/":
            path = url_path(exchange)
        role = exchange.role
        is_client = role is _CLIENT
        code = exchange.status_code
        shape = (pid, path, exchange.method, code, exchange.outcome, is_client)
        hit = self._shapes.get(shape)
        if hit is not None:
            route, request, path_field = hit
        else:
            route, request, path_field = self._shape(shape, path, code, is_client)
        if self._spans_on:
            try:
                span = self._encoder.encode(exchange, route, path, query if sep else None,
                                            request, path_field)
            except Exception:  # a value we cannot encode must not stop capture
                self._n_dropped += 1
                if not self._warned_encode:
                    self._warned_encode = True
                    log.warning("a span of pid %d could not be encoded and was dropped "
                                "(counted in telemetry.spans_dropped; further ones are "
                                "logged at debug level)", pid, exc_info=True)
                else:
                    log.debug("span of pid %d not encodable; dropped", pid, exc_info=True)
                span = b""
            if span is None:
                self._n_unsampled += 1
            elif span:
                batch = self._pending.get(pid)
                if batch is None:
                    batch = self._pending[pid] = []
                batch.append(span)
                self._pending_spans += 1
                self._pending_bytes += len(span)
                if (self._pending_spans >= self._batch_limit
                        or self._pending_bytes >= MAX_BATCH_BYTES):
                    self._flush_spans()
        if self._metrics_on:
            if role is _SERVER:
                port = exchange.local_port
                address = None
            elif is_client:
                address, port = server_endpoint(exchange)
                if not self._client_address:
                    address = None
            else:
                self._n_unknown += 1
                return
            start = exchange.start_time_unix_nano
            duration = (exchange.end_time_unix_nano - start) / 1e9
            if duration < 0.0:
                duration = 0.0
            # request = (..., error.type, normalized method): see SpanEncoder.request_info
            attrs = (request[4], exchange.status_code, route, exchange.scheme,
                     exchange.protocol_version, port, request[3], address)
            # MetricsAggregator.record, minus one call (and, for a new attribute set or
            # one past the cardinality limit, minus a second lookup of the same key)
            series = self._series_get((pid, is_client, attrs))
            if series is None:
                series = self._metrics.new_series(pid, is_client, attrs, start)
            series.record(duration, exchange.request_body_size, exchange.response_body_size)

    def _shape(self, shape: tuple, path: str, code: int | None, is_client: bool) -> tuple:
        """(http.route, SpanEncoder.request_info, url.path field or None) of one kind of
        request of a process; kept for paths that are their own route (they repeat) and
        known methods, so that record() pays one lookup for them. Exact: a route handed
        out to a pid stays its route until forget(pid), which clears this cache."""
        pid, _path, method, _code, outcome, _client = shape
        route = self._routes.route(pid, path)
        request = self._encoder.request_info(method, route, code, outcome, is_client)
        if path != route or request[4] != method or len(path) > _MAX_SHAPE_PATH:
            return route, request, None
        hit = (route, request, self._encoder.path_field(path))
        shapes = self._shapes
        if len(shapes) >= _MAX_SHAPES:
            shapes.clear()
        shapes[shape] = hit
        return hit

    def _record_rpc(self, exchange: HttpExchange) -> None:
        """record() of a gRPC call: the RPC span and rpc.* metrics (see
        attributes.py for the mapping, metrics.py for the instruments)."""
        rpc = exchange.rpc
        pid = exchange.pid
        role = exchange.role
        is_client = role is _CLIENT
        info = self._encoder.rpc_info(rpc, exchange.outcome, is_client)
        if self._spans_on:
            try:
                span = self._encoder.encode_rpc(exchange, info)
            except Exception:  # a value we cannot encode must not stop capture
                self._n_dropped += 1
                log.debug("gRPC span of pid %d not encodable; dropped", pid, exc_info=True)
                span = b""
            if span is None:
                self._n_unsampled += 1
            elif span:
                self._queue_span(pid, span)
        if not self._metrics_on:
            return
        if role is _SERVER:
            port = exchange.local_port
            address = None
            kind = RPC_SERVER
        elif is_client:
            address, port = server_endpoint(exchange)
            if not self._client_address:
                address = None
            kind = RPC_CLIENT
        else:
            self._n_unknown += 1
            return
        service, method = self._rpc_method(pid, rpc, is_client)
        start = exchange.start_time_unix_nano
        duration_ms = (exchange.end_time_unix_nano - start) / 1e6
        if duration_ms < 0.0:
            duration_ms = 0.0
        attrs = (rpc.system, service, method, rpc.status_code, port, info[3], address)
        self._metrics.record(pid, kind, attrs, duration_ms, rpc.request_messages,
                             rpc.response_messages, start)

    def _rpc_method(self, pid: int, rpc: RpcCall, is_client: bool) -> tuple[str, str]:
        """(rpc.service, rpc.method) for metrics, bounded like http.route: at most
        `max_routes` distinct pairs per process, the rest "_OTHER"; so is a method a
        server answered UNIMPLEMENTED (most likely one it does not have: a scanner
        must not be able to create series)."""
        pair = (rpc.service, rpc.method)
        known = self._rpc_methods.get(pid)
        if known is None:
            known = self._rpc_methods[pid] = set()
        if pair in known:
            return pair
        if len(known) >= self._options.max_routes or (
                not is_client and rpc.status_code == GRPC_UNIMPLEMENTED):
            return _OTHER_RPC
        known.add(pair)
        return pair

    def _queue_span(self, pid: int, span: bytes) -> None:
        """Add one encoded span to its process's pending batch (record() inlines this
        for HTTP exchanges)."""
        batch = self._pending.get(pid)
        if batch is None:
            batch = self._pending[pid] = []
        batch.append(span)
        self._pending_spans += 1
        self._pending_bytes += len(span)
        if (self._pending_spans >= self._batch_limit
                or self._pending_bytes >= MAX_BATCH_BYTES):
            self._flush_spans()

    # ------------------------------------------------------------------ resources

    def _resolve(self, pid: int) -> bytes:
        try:
            attributes = self._resource_for_pid(pid)
        except Exception:  # the process module must not break export
            log.debug("resource lookup for pid %d failed", pid, exc_info=True)
            attributes = None
        if attributes:
            self._fallback.discard(pid)
            encoded = enc.encode_resource(attributes)
        else:
            self._fallback.add(pid)
            encoded = enc.encode_resource(
                {"service.name": "unknown_service:%d" % pid, "process.pid": pid})
        self._resources[pid] = encoded
        return encoded

    def _resource(self, pid: int) -> bytes:
        if pid in self._fallback or pid not in self._resources:
            return self._resolve(pid)
        return self._resources[pid]

    # ------------------------------------------------------------------ export

    def _flush_spans(self, only_pid: int | None = None) -> None:
        if only_pid is not None:
            batch = self._pending.pop(only_pid, None)
            if not batch:
                return
            groups = {only_pid: batch}
            self._pending_spans -= len(batch)
            self._pending_bytes -= sum(len(s) for s in batch)
        else:
            if not self._pending:
                return
            groups = self._pending
            self._pending = {}
            self._pending_spans = 0
            self._pending_bytes = 0
            self._batch_since = None
        count = sum(len(b) for b in groups.values())
        payload = enc.encode_trace_request(
            [(self._resource(pid), spans) for pid, spans in groups.items()])
        self._stats.add("telemetry.spans", count)
        self._sink.export_traces(payload, count)

    def _push_counters(self) -> None:
        stats = self._stats
        for name, attr in (("telemetry.exchanges", "_n_exchanges"),
                           ("telemetry.spans_unsampled", "_n_unsampled"),
                           ("telemetry.spans_dropped", "_n_dropped"),
                           ("telemetry.unknown_role", "_n_unknown")):
            n = getattr(self, attr)
            if n:
                stats.add(name, n)
                setattr(self, attr, 0)
        overflowed = self._metrics.overflowed
        if overflowed != self._overflow_reported:
            stats.add("telemetry.metric_overflow", overflowed - self._overflow_reported)
            self._overflow_reported = overflowed

    def _export_metrics(self, only_pid: int | None = None) -> None:
        collected = self._metrics.collect(only_pid)
        groups = [(self._resource(pid), fields) for pid, fields in collected.items() if fields]
        points = self._metrics.last_points
        if only_pid is None:
            self._push_counters()
            snapshot = self._stats.snapshot()
            gauge_names = _gauge_names(self._stats)
            fields = self._metrics.self_metrics(snapshot, gauge_names)
            if fields:
                groups.append((self._daemon_resource, fields))
                points += len(fields)
        if groups:
            self._sink.export_metrics(enc.encode_metrics_request(groups), points)

    def tick(self, now_s: float) -> None:
        """Call often (every loop iteration): time-based span and metric export."""
        if self._closed:
            return
        if self._n_exchanges:  # keep Stats current for the console line and /stats
            self._push_counters()
        if self._pending_spans:
            if self._batch_since is None:
                self._batch_since = now_s
            elif now_s - self._batch_since >= self._options.span_schedule_delay_s:
                self._flush_spans()
        if self._metrics_on:
            if self._next_metrics is None:
                self._next_metrics = now_s + self._options.metric_export_interval_s
            elif now_s >= self._next_metrics:
                self._next_metrics = now_s + self._options.metric_export_interval_s
                self._export_metrics()
                self._forget_vanished()

    def forget(self, pid: int) -> None:
        """The process exited: export its pending spans and last metric values, then
        drop everything kept for it."""
        if not self._closed:
            self._flush_spans(pid)
            if self._metrics_on:
                self._export_metrics(pid)
        self._metrics.forget(pid)
        self._routes.forget(pid)
        self._shapes.clear()  # the pid's routes start afresh
        self._rpc_methods.pop(pid, None)
        self._resources.pop(pid, None)
        self._fallback.discard(pid)

    def _forget_vanished(self) -> None:
        """Pids the process module never knew (gone before their first lookup) are
        never swept by the daemon; forget them here once they left /proc, so that
        per-pid state stays bounded by the live processes."""
        for pid in [p for p in self._fallback if not os.path.exists("/proc/%d" % p)]:
            self.forget(pid)

    def flush(self) -> None:
        """Export pending spans and the current metrics now."""
        if self._closed:
            return
        self._push_counters()
        self._flush_spans()
        if self._metrics_on:
            self._export_metrics()

    def shutdown(self) -> None:
        if self._closed:
            return
        self.flush()
        self._closed = True

    def metrics_request(self) -> bytes:
        """The ExportMetricsServiceRequest the periodic export would send now (every
        process's series and the daemon's self-metrics), built but not sent: the
        Prometheus endpoint renders it on each scrape (telemetry/prometheus.py). It
        reads the aggregator without resetting it only with cumulative temporality,
        which config requires together with that endpoint."""
        self._push_counters()
        collected = self._metrics.collect()
        groups = [(self._resource(pid), fields) for pid, fields in collected.items() if fields]
        fields = self._metrics.self_metrics(self._stats.snapshot(), _gauge_names(self._stats))
        if fields:
            groups.append((self._daemon_resource, fields))
        return enc.encode_metrics_request(groups)


def _gauge_names(stats) -> frozenset[str]:
    # Snapshot values that may go down: exported as gauges, not monotonic sums.
    return stats.gauge_names()
