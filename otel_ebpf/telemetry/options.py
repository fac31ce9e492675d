"""TelemetryOptions: every knob of the telemetry stage, with its default, in one place.

config.py maps YAML keys / OTEL_* variables onto these fields (precedence is config.py's
business); this class only holds already-validated values in the units stated here
(seconds, not the milliseconds some OTEL_* variables use).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from otel_ebpf.telemetry.redact import DEFAULT_REDACTED_QUERY_PARAMS

Temporality = Literal["cumulative", "delta", "lowmemory"]
HistogramAggregation = Literal["explicit_bucket_histogram", "base2_exponential_bucket_histogram"]

TEMPORALITIES: tuple[str, ...] = ("cumulative", "delta", "lowmemory")
HISTOGRAM_AGGREGATIONS: tuple[str, ...] = (
    "explicit_bucket_histogram",
    "base2_exponential_bucket_histogram",
)


@dataclass(frozen=True, slots=True)
class TelemetryOptions:
    # Emit one span per exchange / aggregate RED metrics (metrics off also turns off
    # the daemon's own health metrics, which ride on the same export).
    spans_enabled: bool = True
    metrics_enabled: bool = True
    # http.route templates, tried in order: "/users/{id}" ({name} = one segment),
    # "/static/*" (prefix wildcard: any rest of the path). Unmatched paths get the
    # default templating of routes.py.
    route_patterns: tuple[str, ...] = ()
    # Distinct default-templated routes kept per service before the rest fold into
    # routes.OVERFLOW_ROUTE.
    max_routes: int = 200
    # Raw path -> route results cached (LRU), per Telemetry instance.
    route_cache_size: int = 4096
    # url.query parameters whose values become "REDACTED" (case-insensitive names).
    redacted_query_params: tuple[str, ...] = DEFAULT_REDACTED_QUERY_PARAMS
    # Batch span export (the OTEL_BSP_* semantics of the SDK's BatchSpanProcessor).
    span_batch_size: int = 512  # OTEL_BSP_MAX_EXPORT_BATCH_SIZE
    span_schedule_delay_s: float = 5.0  # OTEL_BSP_SCHEDULE_DELAY (env is in ms)
    span_queue_size: int = 2048  # OTEL_BSP_MAX_QUEUE_SIZE: spans held before drops
    # Metrics.
    metric_export_interval_s: float = 60.0  # OTEL_METRIC_EXPORT_INTERVAL (env is in ms)
    # OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE (lower-cased).
    metrics_temporality: Temporality = "cumulative"
    # OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION (lower-cased).
    histogram_aggregation: HistogramAggregation = "explicit_bucket_histogram"
    # base2 exponential histogram limits (the SDK's defaults).
    exponential_max_size: int = 160
    exponential_max_scale: int = 20
    # Attribute sets per (pid, instrument) before the rest go to the
    # otel.metric.overflow=true series (the SDK's default cardinality limit).
    metric_cardinality_limit: int = 2000
    # server.address on http.client.* metrics: semconv allows it, but a client that
    # talks to many hosts makes it high-cardinality; off by default.
    client_metrics_server_address: bool = False

    def __post_init__(self) -> None:
        # config.py validates user input with key names; these are programming errors.
        if self.metrics_temporality not in TEMPORALITIES:
            raise ValueError(
                "metrics_temporality must be one of %s, got %r"
                % (", ".join(TEMPORALITIES), self.metrics_temporality)
            )
        if self.histogram_aggregation not in HISTOGRAM_AGGREGATIONS:
            raise ValueError(
                "histogram_aggregation must be one of %s, got %r"
                % (", ".join(HISTOGRAM_AGGREGATIONS), self.histogram_aggregation)
            )
        for name in ("max_routes", "route_cache_size", "span_batch_size", "span_queue_size",
                     "metric_cardinality_limit", "exponential_max_size"):
            if getattr(self, name) < 1:
                raise ValueError("%s must be >= 1, got %r" % (name, getattr(self, name)))
        if not -10 <= self.exponential_max_scale <= 20:
            raise ValueError("exponential_max_scale must be in [-10, 20]")
        if self.span_schedule_delay_s <= 0 or self.metric_export_interval_s <= 0:
            raise ValueError("span_schedule_delay_s and metric_export_interval_s must be > 0")
