"""The Prometheus endpoint: `/metrics` with the metrics the OTLP export carries.

`--prometheus-listen HOST:PORT` (export.prometheus.listen) serves the RED histograms
and the daemon's self-metrics for a Prometheus server to scrape, with or without a
collector (any output.exporter, `none` included).

One aggregation. The numbers come from the same MetricsAggregator the OTLP export
reads (inside Telemetry). On each scrape the daemon loop, the only thread that touches
the aggregator, builds the ExportMetricsServiceRequest the periodic export would send
(`Telemetry.metrics_request()`), and this module translates that request into
Prometheus families. So whatever instruments metrics.py holds (histograms, exponential
histograms, sums, gauges) appear here with no change to this file, with the same
values, attributes, resources and redaction the collector would receive.

Threads. prometheus_client's threaded WSGI server answers scrapes on its own threads.
A scrape asks the loop for a request (`MetricsBridge.fetch`) and waits; the loop
answers on its next pass (`MetricsBridge.serve`, a cheap flag check when nobody
asked; a pass is at most ~150 ms: the 100 ms ring-buffer wait plus one drain). One
build serves every scrape waiting at that moment. A loop stuck for SCRAPE_WAIT_S fails
the scrape (HTTP 500: Prometheus records up=0) rather than serve stale numbers.

Cost. The loop's part is the periodic export's work (collect and encode: ~0.1 ms per
attribute set); the translation and the text format run on the scrape thread, where
they take the GIL from the loop meanwhile: each attribute set is three histograms of
~17 lines, ~15 KB of text, ~2 ms of CPU on a loaded 2-core machine (prometheus_client's
formatting is most of it). Hundreds of series cost well under a second per scrape; at
thousands, scrape less often than every few seconds.

Names, by the OpenTelemetry-to-Prometheus compatibility rules (as the Collector's
Prometheus exporter applies them):
- metric names: characters outside [a-zA-Z0-9_:] -> `_`, the unit appended as words
  when not already in the name (`s` -> `seconds`, `By` -> `bytes`, `X/s` ->
  `X_per_second`, `{annotations}` dropped), monotonic sums end in `_total`, histograms
  give `_bucket{le}` / `_sum` / `_count`:
      http.server.request.duration (s) -> http_server_request_duration_seconds
      otel_ebpf.capture.events (counter) -> otel_ebpf_capture_events_total
  Unit `1` adds nothing: our self-metric gauges carry `1` for plain counts (connections,
  queue lengths), which the spec's `_ratio` would misname.
- labels: attribute keys with invalid characters -> `_` (`http.route` ->
  `http_route`), a leading digit gets `key_`; keys that collide after that are merged,
  values joined by `;` in key order. Non-string values as strings (arrays as JSON).
- resources: one per observed process (plus the daemon's own). Every series carries
  `job` (service.namespace/service.name) and `instance` (service.instance.id, else
  process.pid), and `target_info{job, instance, <the other resource attributes>} 1`
  holds the rest of the resource. Scrape with `honor_labels: true` to keep them as
  they are (else Prometheus renames them exported_job / exported_instance).
- `otel_scope_name` / `otel_scope_version` labels name the instrumentation scope.
- exponential histograms become classic buckets at their bucket boundaries
  (le = base**(index+1); `le="0"` holds the zero bucket).

Temporality: Prometheus wants cumulative values. Without OTLP export the aggregator is
made cumulative; with OTLP export config refuses delta/lowmemory together with this
endpoint (a delta export resets the series a scrape reads).
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# prometheus_client, opentelemetry-proto and wsgiref (which pulls in ssl) are imported
# where used: a daemon run without --prometheus-listen does not pay for them in memory.

log = logging.getLogger(__name__)

# Longest a scrape waits for the daemon loop to build the metrics request.
SCRAPE_WAIT_S = 5.0
DEFAULT_LISTEN_HOST = "127.0.0.1"
DEFAULT_PORT = 9464  # the port OpenTelemetry's Prometheus exporters use by default
LISTEN_KEY = "export.prometheus.listen"
LISTEN_FLAG = "--prometheus-listen"


class PrometheusError(RuntimeError):
    """The endpoint cannot be served as configured (the message says the fix)."""


class ListenError(PrometheusError):
    """A listen value that is not an address; config reports problem and fix its way."""

    def __init__(self, listen: str, problem: str, fix: str) -> None:
        super().__init__("%s: %r %s; %s" % (LISTEN_KEY, listen, problem, fix))
        self.problem = problem
        self.fix = fix


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:9464', '0.0.0.0:9464', '[::1]:9464', ':9464' or '9464' -> (host, port);
    no host binds 127.0.0.1. Raises PrometheusError naming the key and the flag."""
    text = listen.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        host = "?"  # an IPv6 address must be bracketed: [::1]:9464
    host = host.strip("[]") or DEFAULT_LISTEN_HOST
    fix = ("use HOST:PORT or PORT, e.g. 127.0.0.1:%d, 0.0.0.0:%d to be scraped from other "
           "hosts, [::1]:%d (%s, %s)" % (DEFAULT_PORT, DEFAULT_PORT, DEFAULT_PORT, LISTEN_FLAG,
                                         LISTEN_KEY))
    if not port_text.isdigit() or host == "?" or any(c.isspace() for c in host):
        raise ListenError(listen, "is not a listen address", fix)
    port = int(port_text)
    if port > 65535:
        raise ListenError(listen, "has a port outside 0-65535", fix)
    return host, port


# ---------------------------------------------------------------- daemon loop <-> scrapes

class MetricsBridge:
    """Hands the daemon loop's metrics request to the scrape threads."""

    def __init__(self, build: Callable[[], bytes], wait_s: float = SCRAPE_WAIT_S) -> None:
        self._build = build  # called on the daemon loop's thread only
        self._wait_s = wait_s
        self._wanted = threading.Event()
        self._done = threading.Condition()
        self._generation = 0
        self._payload: bytes | None = None
        self._error: BaseException | None = None

    def fetch(self) -> bytes:
        """Scrape thread: the request built by the loop after this call began (or by
        the build already under way when it began)."""
        with self._done:
            generation = self._generation
            self._wanted.set()
            if not self._done.wait_for(lambda: self._generation != generation, self._wait_s):
                raise PrometheusError("the daemon loop did not answer within %.0f s"
                                      % self._wait_s)
            if self._error is not None:
                raise PrometheusError("building the metrics failed: %s" % self._error)
            assert self._payload is not None
            return self._payload

    def serve(self) -> None:
        """Daemon loop, every pass: build the request if a scrape waits for one."""
        if not self._wanted.is_set():
            return
        self._wanted.clear()
        payload, error = None, None
        try:
            payload = self._build()
        except Exception as exc:  # a scrape must never break capture
            log.warning("building the Prometheus metrics failed", exc_info=True)
            error = exc
        with self._done:
            self._payload, self._error = payload, error
            self._generation += 1
            self._done.notify_all()


# ---------------------------------------------------------------- OTLP -> Prometheus

_NAME_INVALID = re.compile(r"[^a-zA-Z0-9_:]+")
_LABEL_INVALID = re.compile(r"[^a-zA-Z0-9_]")
_MULTI_UNDERSCORE = re.compile(r"__+")
_ANNOTATION = re.compile(r"\{[^}]*\}")

# UCUM units -> the words Prometheus names carry (the Collector's translation table).
UNIT_WORDS = {
    "d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds",
    "us": "microseconds", "ns": "nanoseconds",
    "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
    "TiBy": "tibibytes", "KBy": "kilobytes", "MBy": "megabytes", "GBy": "gigabytes",
    "TBy": "terabytes",
    "m": "meters", "V": "volts", "A": "amperes", "J": "joules", "W": "watts", "g": "grams",
    "Cel": "celsius", "Hz": "hertz", "%": "percent",
}
PER_UNIT_WORDS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week",
                  "mo": "month", "y": "year"}

RESOURCE_JOB_KEYS = ("service.namespace", "service.name")
RESOURCE_INSTANCE_KEY = "service.instance.id"


def unit_words(unit: str) -> tuple[str, str]:
    """`s` -> ("seconds", ""), `By/s` -> ("bytes", "second"), `{request}`, `1` -> ("", "")."""
    unit = _ANNOTATION.sub("", unit).strip()
    main, _, per = unit.partition("/")
    main = main.strip()
    per = per.strip()
    main_word = UNIT_WORDS.get(main, _clean(_LABEL_INVALID.sub("_", main))) \
        if main and main != "1" else ""
    per_word = PER_UNIT_WORDS.get(per, _clean(_LABEL_INVALID.sub("_", per))) if per else ""
    return main_word, per_word


def unit_suffix(unit: str) -> str:
    """The unit as a name suffix: `bytes_per_second`, `seconds`, or ``."""
    main, per = unit_words(unit)
    return "_".join(w for w in (main, "per_" + per if per else "") if w)


def _clean(name: str) -> str:
    return _MULTI_UNDERSCORE.sub("_", name).strip("_")


def metric_name(otel_name: str, unit: str, counter: bool = False) -> str:
    """The Prometheus family name (a counter's samples add `_total`)."""
    name = _clean(_NAME_INVALID.sub("_", otel_name))
    if counter and name.endswith("_total"):
        name = name[: -len("_total")]
    main, per = unit_words(unit)
    if main and main not in name.split("_"):
        name += "_" + main
    if per and not name.endswith("_per_" + per):
        name += "_per_" + per
    if name[:1].isdigit():
        name = "_" + name
    return name


def label_name(key: str) -> str:
    name = _LABEL_INVALID.sub("_", key)
    if name[:1].isdigit():
        name = "key_" + name
    elif name.startswith("_") and not name.startswith("__"):
        name = "key" + name
    return name


def _any_value(value) -> object:
    """An OTLP AnyValue as a plain Python value."""
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind) if kind else ""


def label_value(value: object) -> str:
    from prometheus_client.utils import floatToGoString

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return floatToGoString(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def labels_of(attributes: Iterable) -> dict[str, str]:
    """OTLP KeyValues -> Prometheus labels; keys that sanitize to one name are merged."""
    merged: dict[str, list[tuple[str, str]]] = {}
    for kv in attributes:
        if not kv.key:
            continue
        merged.setdefault(label_name(kv.key), []).append(
            (kv.key, label_value(_any_value(kv.value))))
    return {name: ";".join(v for _, v in sorted(pairs)) for name, pairs in merged.items()}


def resource_labels(resource_attributes: Iterable) -> tuple[dict[str, str], dict[str, str]]:
    """(job/instance labels for every series of the resource, target_info's labels)."""
    attrs = {kv.key: label_value(_any_value(kv.value)) for kv in resource_attributes}
    identity: dict[str, str] = {}
    job = "/".join(attrs[k] for k in RESOURCE_JOB_KEYS if attrs.get(k))
    if job:
        identity["job"] = job
    instance = attrs.get(RESOURCE_INSTANCE_KEY) or attrs.get("process.pid")
    if instance:
        identity["instance"] = instance
    rest = [kv for kv in resource_attributes
            if kv.key not in RESOURCE_JOB_KEYS and kv.key != RESOURCE_INSTANCE_KEY]
    info = labels_of(rest)
    info.pop("job", None)
    info.pop("instance", None)
    info.update(identity)
    return identity, info


class _Families:
    """Prometheus families by name, samples appended per data point."""

    def __init__(self) -> None:
        self.by_name: dict[str, Metric] = {}

    def family(self, name: str, help_text: str, typ: str, unit_words: str) -> Metric | None:
        from prometheus_client.metrics_core import Metric

        metric = self.by_name.get(name)
        if metric is None:
            # prometheus_client appends `unit` to a name that does not end with it; pass
            # it only as metadata (OpenMetrics # UNIT) when the name already ends with it.
            unit = unit_words if unit_words and name.endswith("_" + unit_words) else ""
            metric = self.by_name[name] = Metric(name, help_text, typ, unit)
        elif metric.type != typ:
            log.debug("metric %s is both %s and %s; kept the first", name, metric.type, typ)
            return None
        return metric


def families(request_bytes: bytes) -> list[Metric]:
    """An ExportMetricsServiceRequest (serialized) as Prometheus metric families."""
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    request = ExportMetricsServiceRequest.FromString(request_bytes)
    out = _Families()
    targets = out.family("target", "Target metadata: the OpenTelemetry resource", "info", "")
    for rm in request.resource_metrics:
        identity, info = resource_labels(rm.resource.attributes)
        if rm.scope_metrics and targets is not None:
            targets.add_sample("target_info", info, 1)
        for sm in rm.scope_metrics:
            scope = {"otel_scope_name": sm.scope.name} if sm.scope.name else {}
            if sm.scope.version:
                scope["otel_scope_version"] = sm.scope.version
            for m in sm.metrics:
                _add_metric(out, m, {**scope, **identity})
    return [f for f in out.by_name.values() if f.samples]


def _point_labels(point, common: dict[str, str]) -> dict[str, str]:
    labels = labels_of(point.attributes)
    labels.update(common)
    return labels


def _add_metric(out: _Families, m, common: dict[str, str]) -> None:
    kind = m.WhichOneof("data")
    help_text = m.description or m.name
    unit = unit_suffix(m.unit)
    if kind == "histogram" or kind == "exponential_histogram":
        name = metric_name(m.name, m.unit)
        family = out.family(name, help_text, "histogram", unit)
        if family is None:
            return
        for p in getattr(m, kind).data_points:
            labels = _point_labels(p, common)
            buckets = (_explicit_buckets(p) if kind == "histogram"
                       else _exponential_buckets(p))
            for le, count in buckets:
                family.add_sample(name + "_bucket", {**labels, "le": le}, count)
            family.add_sample(name + "_sum", labels, p.sum)
            family.add_sample(name + "_count", labels, p.count)
    elif kind == "sum" or kind == "gauge":
        data = getattr(m, kind)
        counter = kind == "sum" and data.is_monotonic
        name = metric_name(m.name, m.unit, counter=counter)
        family = out.family(name, help_text, "counter" if counter else "gauge", unit)
        if family is None:
            return
        sample = name + "_total" if counter else name
        for p in data.data_points:
            value = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
            family.add_sample(sample, _point_labels(p, common), value)
    else:
        log.debug("metric %s: %s data has no Prometheus form here; skipped", m.name, kind)


def _explicit_buckets(p) -> list[tuple[str, int]]:
    from prometheus_client.utils import floatToGoString

    out = []
    running = 0
    counts = list(p.bucket_counts)
    for bound, count in zip(p.explicit_bounds, counts):
        running += count
        out.append((floatToGoString(bound), running))
    out.append(("+Inf", p.count))
    return out


def _exponential_buckets(p) -> list[tuple[str, int]]:
    """Cumulative classic buckets at the exponential bucket boundaries (positive values
    only: nothing the daemon measures is negative)."""
    from prometheus_client.utils import floatToGoString

    base = 2.0 ** (2.0 ** -p.scale)
    running = p.zero_count
    out = [("0.0", running)]
    offset = p.positive.offset
    for i, count in enumerate(p.positive.bucket_counts):
        running += count
        try:
            upper = base ** (offset + i + 1)
        except OverflowError:
            upper = math.inf
        if math.isinf(upper):
            break
        out.append((floatToGoString(upper), running))
    out.append(("+Inf", p.count))
    return out


# ---------------------------------------------------------------- the endpoint

class _OtlpCollector:
    """prometheus_client Collector: the daemon's metrics request, translated per scrape."""

    def __init__(self, fetch: Callable[[], bytes]) -> None:
        self._fetch = fetch

    def describe(self) -> list[Metric]:
        return []  # registering must not scrape (the daemon loop is not running yet)

    def collect(self) -> Iterator[Metric]:
        return iter(families(self._fetch()))


class PrometheusEndpoint:
    """`/metrics` on `listen`, served from daemon threads; the daemon loop calls
    `serve_scrapes()` every pass and `close()` at shutdown."""

    def __init__(self, listen: str, build_request: Callable[[], bytes],
                 wait_s: float = SCRAPE_WAIT_S) -> None:
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client import CollectorRegistry, make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass  # one line per scrape would flood the daemon's log

        host, port = parse_listen(listen)
        self.bridge = MetricsBridge(build_request, wait_s)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_OtlpCollector(self.bridge.fetch))  # type: ignore[arg-type]
        server_cls = type("PrometheusServer", (ThreadingWSGIServer,), {
            "address_family": socket.AF_INET6 if ":" in host else socket.AF_INET})
        try:
            self._server = make_server(host, port, make_wsgi_app(registry), server_cls,
                                       handler_class=QuietHandler)
        except OSError as exc:
            raise PrometheusError(
                "%s: cannot listen on %s:%d: %s; choose a free address (%s)"
                % (LISTEN_KEY, host, port, exc.strerror or exc, LISTEN_FLAG)) from None
        self.address: tuple[str, int] = self._server.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="otel-ebpf-prometheus", daemon=True)
        self._thread.start()
        log.info("Prometheus metrics on http://%s:%d/metrics", host, self.address[1])

    def serve_scrapes(self) -> None:
        self.bridge.serve()

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()  # returns within one poll_interval
        self._server.server_close()


class NoExport:
    """The Telemetry sink when metrics are only scraped (no OTLP exporter)."""

    def export_traces(self, payload: bytes, spans: int = 1) -> None:
        pass

    def export_metrics(self, payload: bytes, points: int = 1) -> None:
        pass
