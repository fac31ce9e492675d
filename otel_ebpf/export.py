"""OTLP transport: ships already-serialized OTLP payloads to a collector.

Contract. In: bytes of an `ExportTraceServiceRequest` (`export_traces`) or an
`ExportMetricsServiceRequest` (`export_metrics`), built by otel_ebpf/telemetry (the SDK's
per-span machinery is too slow for the per-exchange budget: ~35 us a span), with the
number of spans / data points they carry. Out: the same bytes, unchanged, POSTed over
HTTP/protobuf or sent as a unary gRPC call to an OTLP endpoint.

The capture loop must never wait for a collector, so the `export_*` calls only append
to a bounded in-memory queue (bounded in payloads and in bytes) and return; they never
raise. A background thread sends, retrying retryable failures (gRPC UNAVAILABLE,
DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, ...; HTTP 429/502/503/504 and
connection errors) with jittered exponential backoff, honouring the server's
Retry-After / RetryInfo, for at most `retry_max_elapsed_s` per payload. When the queue is
full the *oldest* payload is dropped, so that a collector coming back receives what is
new. What is lost is counted in Stats and logged at most once per 10 s:

  export.payloads_dropped / export.spans_dropped / export.points_dropped  queue overflow,
                                                                         or left at shutdown
  export.failures          payloads given up (non-retryable error or retry deadline)
  export.retries           retry attempts
  export.payloads_sent / export.spans_sent / export.points_sent
  export.spans_rejected / export.points_rejected   partial success reported by the server
  export.queue_payloads / export.queue_bytes       gauges: what waits for the collector

With a spool (export.spool.*, otel_ebpf/spool.py; on by default in the daemon) nothing
is given up for a collector that is down or slow, and memory stays flat:

- the in-memory queue shrinks to a buffer of SPOOLED_MEMORY_PAYLOADS / _BYTES;
- the first retryable failure of a payload puts it at the spool's head and starts an
  outage: from then on the export thread moves whatever the capture thread queues to the
  spool's tail (compression and disk writes stay off the capture thread), and sends
  from the spool's head, retrying each payload until it is delivered, refused for good,
  or dropped by the spool's own bounds (max_bytes, max_age_s); a success ends the outage;
- a collector that is merely slow fills the buffer; the capture thread then moves the
  buffer to the spool itself (the only disk write it ever does);
- order holds because the spool only ever holds payloads older than memory's, and the
  spool is sent first;
- shutdown waits at most SPOOL_SHUTDOWN_FLUSH_S for memory to drain, then writes what
  is left (a send still hanging included: at least once, never lost) to the spool for
  the next start, which sends it first. Delivery from the spool is at least once: a
  payload is deleted after the collector acknowledged it.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse

from otel_ebpf import __version__

log = logging.getLogger(__name__)


def _gzip_compress(payload: bytes) -> bytes:
    # Imported here: config imports this module for its options, and a daemon that
    # exports nothing (or without compression) should not carry gzip/zlib.
    import gzip

    return gzip.compress(payload, compresslevel=1)


Protocol = Literal["grpc", "http/protobuf"]
Compression = Literal["gzip", "none"]
PROTOCOLS: tuple[str, ...] = ("grpc", "http/protobuf")
COMPRESSIONS: tuple[str, ...] = ("gzip", "none")

TRACES = "traces"
METRICS = "metrics"

_GRPC_METHODS = {
    TRACES: "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
    METRICS: "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
}
# What the items of a payload are called in Stats.
_ITEM_NAME = {TRACES: "spans", METRICS: "points"}

# Spec: https://opentelemetry.io/docs/specs/otlp/#failures (and #retryable-response-codes)
_RETRYABLE_HTTP = frozenset({429, 502, 503, 504})
_RETRYABLE_GRPC_NAMES = frozenset(
    {"CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE",
     "DATA_LOSS", "RESOURCE_EXHAUSTED"}
)

# The OTLP exporter spec asks exporters to identify themselves (and the collector's
# otelcol_receiver_* metrics show it).
USER_AGENT = "otel-ebpf/%s" % __version__

DEFAULT_GRPC_ENDPOINT = "http://localhost:4317"
DEFAULT_HTTP_ENDPOINT = "http://localhost:4318"


@dataclass(frozen=True, slots=True)
class OtlpSignalOptions:
    """Where and how one signal (traces or metrics) is sent."""

    # The spec's default transport for new SDKs (opentelemetry.io/docs/specs/otel/
    # protocol/exporter/#specify-protocol): http/protobuf.
    protocol: Protocol = "http/protobuf"
    # gRPC: scheme://host:port (path ignored). HTTP: the full URL, used as-is
    # (config appends /v1/traces or /v1/metrics to the generic endpoint, per the spec).
    endpoint: str = DEFAULT_HTTP_ENDPOINT + "/v1/traces"
    headers: tuple[tuple[str, str], ...] = ()
    timeout_s: float = 10.0
    # None by default, as in the OpenTelemetry SDKs: gzip costs the daemon ~3 us of CPU
    # per span over gRPC (grpc's deflate runs at level 6, which no option changes) and
    # ~1.4 us over HTTP (level 1 here), a third of everything else it does per exchange,
    # to save bytes that, to a collector on the same host or node, never cross a wire.
    # Set gzip for a collector across a network you pay for (README, "Sending to a
    # collector").
    compression: Compression = "none"
    certificate: str | None = None  # PEM file: CA bundle to trust for the collector
    client_key: str | None = None  # PEM file: private key for mTLS
    client_certificate: str | None = None  # PEM file: certificate chain for mTLS
    # gRPC only, for endpoints without a scheme: True = plaintext. http:// is always
    # plaintext and https:// always TLS, whatever this says (as the Python SDK does).
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class SpoolOptions:
    """export.spool.*: see otel_ebpf/spool.py."""

    directory: str
    max_bytes: int = 256 * 1024 * 1024
    max_age_s: float = 24 * 3600.0
    directory_source: str = "export.spool.directory"  # for the start-up log line


# With a spool, the in-memory queue is only a small buffer in front of it.
SPOOLED_MEMORY_PAYLOADS = 32
SPOOLED_MEMORY_BYTES = 4 * 1024 * 1024
# With a spool, shutdown waits at most this long for the collector; the rest is spooled
# (a few ms of disk writes), so SIGTERM under load exits within a second (the benchmark's
# target) and nothing is lost: the next start sends it first.
SPOOL_SHUTDOWN_FLUSH_S = 0.25


@dataclass(frozen=True, slots=True)
class OtlpOptions:
    traces: OtlpSignalOptions = field(default_factory=OtlpSignalOptions)
    metrics: OtlpSignalOptions = field(default_factory=lambda: OtlpSignalOptions(
        endpoint=DEFAULT_HTTP_ENDPOINT + "/v1/metrics"))
    max_queue_payloads: int = 256  # payloads waiting to be sent (both signals)
    max_queue_bytes: int = 64 * 1024 * 1024  # and their total size: memory stays bounded
    retry_max_elapsed_s: float = 30.0  # give a payload up after retrying this long
    retry_initial_backoff_s: float = 0.5
    retry_max_backoff_s: float = 8.0

    @property
    def timeout_s(self) -> float:
        """The longest per-request timeout: a fair bound for a final flush."""
        return max(self.traces.timeout_s, self.metrics.timeout_s)


class _Retryable(Exception):
    """A failed attempt worth retrying; `delay_s` is the server's hint, if any."""

    def __init__(self, reason: str, delay_s: float | None = None) -> None:
        super().__init__(reason)
        self.delay_s = delay_s


class _Permanent(Exception):
    """A failed attempt that retrying cannot fix (bad request, auth, TLS set-up...)."""


class RateLimitedLog:
    """At most one warning per `interval_s` per key, carrying how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self._log = logger
        self._interval = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            suppressed = self._suppressed.pop(key, 0)
            self._last[key] = now
        if suppressed:
            self._log.warning(msg + " (%d similar messages suppressed)", *args, suppressed)
        else:
            self._log.warning(msg, *args)


def _read_file(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:  # OSError is turned into a permanent failure by caller
        return f.read()


def _parse_retry_after(value: str | None) -> float | None:
    """HTTP Retry-After: delta-seconds or an HTTP date (RFC 9110 10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        import email.utils  # only for a Retry-After date: ~1 MB resident if imported up front

        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _partial_success(signal: str, body: bytes) -> tuple[int, str]:
    """(rejected items, server message) from an Export*ServiceResponse."""
    if not body:
        return 0, ""
    try:
        if signal == TRACES:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                ExportTraceServiceResponse,
            )

            ps = ExportTraceServiceResponse.FromString(body).partial_success
            return ps.rejected_spans, ps.error_message
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceResponse,
        )

        ps = ExportMetricsServiceResponse.FromString(body).partial_success
        return ps.rejected_data_points, ps.error_message
    except Exception:  # a receiver answering garbage must not stop export
        return 0, ""


class _GrpcTransport:
    def __init__(self, signal: str, options: OtlpSignalOptions) -> None:
        import grpc

        self._grpc = grpc
        self.signal = signal
        self.endpoint = options.endpoint
        self._timeout = options.timeout_s
        parsed = urlparse(options.endpoint if "://" in options.endpoint
                          else "//" + options.endpoint)
        target = parsed.netloc or options.endpoint
        if parsed.scheme == "http":
            secure = False
        elif parsed.scheme == "https":
            secure = True
        else:
            secure = not options.insecure
        # gRPC metadata keys must be lower case.
        self._metadata = tuple((k.lower(), v) for k, v in options.headers)
        self._compression = (
            grpc.Compression.Gzip if options.compression == "gzip" else grpc.Compression.NoCompression
        )
        # A collector that restarts must be reached again within seconds, not after
        # grpc's default reconnect backoff (which grows to 120 s).
        channel_options = [
            ("grpc.primary_user_agent", USER_AGENT),
            ("grpc.initial_reconnect_backoff_ms", 250),
            ("grpc.min_reconnect_backoff_ms", 250),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        if secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_file(options.certificate),
                private_key=_read_file(options.client_key),
                certificate_chain=_read_file(options.client_certificate),
            )
            self._channel = grpc.secure_channel(target, credentials, options=channel_options)
        else:
            self._channel = grpc.insecure_channel(target, options=channel_options)
        # Identity (de)serializers: the payload is already protobuf bytes.
        self._call = self._channel.unary_unary(
            _GRPC_METHODS[signal], request_serializer=None, response_deserializer=None
        )

    def send(self, payload: bytes) -> bytes:
        grpc = self._grpc
        try:
            return self._call(
                payload, timeout=self._timeout, metadata=self._metadata,
                compression=self._compression,
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            reason = "gRPC %s: %s" % (name, details)
            if name in _RETRYABLE_GRPC_NAMES:
                raise _Retryable(reason, self._retry_delay(exc)) from None
            raise _Permanent(reason) from None

    @staticmethod
    def _retry_delay(exc: object) -> float | None:
        try:
            from google.rpc.error_details_pb2 import RetryInfo

            for key, value in exc.trailing_metadata() or ():  # type: ignore[attr-defined]
                if key == "google.rpc.retryinfo-bin":
                    info = RetryInfo.FromString(value)
                    return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
        except Exception:  # the hint is optional: fall back to our own backoff
            return None
        return None

    def close(self) -> None:
        self._channel.close()


class _HttpTransport:
    def __init__(self, signal: str, options: OtlpSignalOptions) -> None:
        import requests

        self._requests = requests
        self.signal = signal
        self.endpoint = options.endpoint
        self._timeout = options.timeout_s
        self._gzip = options.compression == "gzip"
        self._session = requests.Session()
        self._session.headers.update(dict(options.headers))
        self._session.headers["Content-Type"] = "application/x-protobuf"
        self._session.headers["User-Agent"] = USER_AGENT
        if self._gzip:
            self._session.headers["Content-Encoding"] = "gzip"
        # Passed with every request: requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE in
        # the environment override a Session's own `verify`, which would silently ignore
        # the configured certificate.
        self._verify: str | bool = options.certificate or True
        self._cert = None
        if options.client_certificate:
            self._cert = (
                (options.client_certificate, options.client_key)
                if options.client_key else options.client_certificate
            )

    def send(self, payload: bytes) -> bytes:
        requests = self._requests
        # Level 1: measured 255 us vs 1420 us (level 6) for a 250-span, 50 kB payload, i.e.
        # ~1 us instead of ~6 us per span of CPU shared with the capture thread.
        data = _gzip_compress(payload) if self._gzip else payload
        try:
            resp = self._session.post(self.endpoint, data=data, timeout=self._timeout,
                                      verify=self._verify, cert=self._cert)
        except requests.exceptions.SSLError as exc:  # trust/keys: retrying cannot help
            raise _Permanent("HTTPS: %s (check export.otlp certificate / client_certificate "
                             "/ client_key)" % exc) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise _Retryable("HTTP %s: %s" % (type(exc).__name__, exc)) from None
        except requests.RequestException as exc:  # bad URL, TLS files, ...
            raise _Permanent("HTTP %s: %s" % (type(exc).__name__, exc)) from None
        if 200 <= resp.status_code < 300:
            return resp.content
        reason = "HTTP %d %s: %s" % (resp.status_code, resp.reason, resp.text[:200])
        if resp.status_code in _RETRYABLE_HTTP:
            raise _Retryable(reason, _parse_retry_after(resp.headers.get("Retry-After")))
        raise _Permanent(reason)

    def close(self) -> None:
        self._session.close()


def _make_transport(signal: str, options: OtlpSignalOptions) -> _GrpcTransport | _HttpTransport:
    if options.protocol == "grpc":
        return _GrpcTransport(signal, options)
    return _HttpTransport(signal, options)


class OtlpExporter:
    """Non-blocking OTLP sender for serialized payloads; see the module docstring."""

    def __init__(self, options: OtlpOptions, stats,  # stats: otel_ebpf.stats.Stats
                 spool: SpoolOptions | None = None) -> None:  # None: memory only
        self._options = options
        self._stats = stats
        self._signal_options = {TRACES: options.traces, METRICS: options.metrics}
        self._transports: dict[str, _GrpcTransport | _HttpTransport | None] = {}
        # (signal, payload, items, created: unix time) in sending order.
        self._queue: deque[tuple[str, bytes, int, float]] = deque()
        self._queued_bytes = 0
        self._in_flight = 0
        # The in-memory payload being sent, so that shutdown can spool it if the send
        # does not finish in time (None while a spooled one is sent: it is on disk).
        self._sending: tuple[str, bytes, int, float] | None = None
        self._spool_closed = False  # set by shutdown: the worker must not touch the spool
        self._outage = False  # the last send failed: memory goes to the spool as it comes
        # Held across every spool write, taken while holding _cond: writes land in the
        # order their payloads left memory, even when one is done outside _cond.
        self._spool_write = threading.Lock()
        self._cond = threading.Condition()
        self._stop = threading.Event()  # interrupts backoff sleeps at shutdown
        self._closed = False
        self._warn = RateLimitedLog(log, 10.0)
        self._max_payloads = options.max_queue_payloads
        self._max_bytes = options.max_queue_bytes
        self._spool = self._open_spool(spool, stats)
        if self._spool is not None:
            # Beyond a small buffer, payloads wait on disk: memory stays flat in an outage.
            self._max_payloads = min(self._max_payloads, SPOOLED_MEMORY_PAYLOADS)
            self._max_bytes = min(self._max_bytes, SPOOLED_MEMORY_BYTES)
        # Gauges: how far behind the collector is (read at stats time, not per export).
        stats.gauge("export.queue_payloads", lambda: len(self._queue))
        stats.gauge("export.queue_bytes", lambda: self._queued_bytes)
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)
        self._thread.start()

    @staticmethod
    def _open_spool(options: SpoolOptions | None, stats):
        if options is None:
            return None
        from otel_ebpf.spool import Spool, SpoolError

        try:
            spool = Spool(options.directory, options.max_bytes, options.max_age_s, stats)
        except SpoolError as exc:
            log.warning("export spool disabled: %s (export.spool.directory, chosen from %s); "
                        "export continues with the in-memory queue only, so a collector "
                        "outage loses what exceeds export.otlp.max_queue_bytes",
                        exc, options.directory_source)
            return None
        log.info("export spool: %s (from %s; up to %d bytes, %g s)", spool.directory,
                 options.directory_source, options.max_bytes, options.max_age_s)
        return spool

    # ---- caller side: never blocks, never raises ----

    def export_traces(self, payload: bytes, spans: int = 1) -> None:
        self._enqueue(TRACES, payload, spans)

    def export_metrics(self, payload: bytes, points: int = 1) -> None:
        self._enqueue(METRICS, payload, points)

    def _enqueue(self, signal: str, payload: bytes, items: int) -> None:
        dropped: list[tuple[str, bytes, int, float]] = []
        entry = (signal, payload, items, time.time())
        with self._cond:
            spool = self._spool
            if self._closed:
                dropped.append(entry)
            elif spool is not None and (
                    len(self._queue) >= self._max_payloads
                    or self._queued_bytes + len(payload) > self._max_bytes):
                # The memory buffer is full (the export thread did not keep up moving it to
                # disk): it and this payload go to the spool's tail here. Memory is always
                # newer than the spool, so the order holds.
                with self._spool_write:
                    spool.extend([*self._queue, entry])
                self._queue.clear()
                self._queued_bytes = 0
                self._cond.notify_all()
            elif len(payload) > self._max_bytes:
                dropped.append(entry)
            else:
                # Drop the oldest: a collector that comes back should get what is new.
                while self._queue and (
                    len(self._queue) >= self._max_payloads
                    or self._queued_bytes + len(payload) > self._max_bytes
                ):
                    old = self._queue.popleft()
                    self._queued_bytes -= len(old[1])
                    dropped.append(old)
                self._queue.append(entry)
                self._queued_bytes += len(payload)
                self._cond.notify_all()
        if dropped:
            self._count_dropped(dropped, "the export queue is full")

    def _count_dropped(self, dropped: list[tuple[str, bytes, int, float]], why: str) -> None:
        for signal, _payload, items, _created in dropped:
            self._stats.add("export.payloads_dropped")
            self._stats.add("export.%s_dropped" % _ITEM_NAME[signal], items)
        self._warn.warning(
            "drop",
            "OTLP export: dropped %d payload(s) because %s (totals: %d payloads, %d spans, "
            "%d metric points dropped); is the collector at %s slow or down?",
            len(dropped), why, self._stats.get("export.payloads_dropped"),
            self._stats.get("export.spans_dropped"), self._stats.get("export.points_dropped"),
            self._options.traces.endpoint,
        )

    # ---- flush / shutdown ----

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued so far (spooled too) was sent or given up; False on
        timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._in_flight or (self._spool is not None and len(self._spool)):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(min(remaining, 0.1))  # the spool shrinks without a notify
        return True

    def shutdown(self, timeout_s: float = 10.0) -> bool:
        """Flush for at most `timeout_s`, then stop. Idempotent.

        Without a spool, what is left is counted as dropped. With one, the flush is
        bounded by SPOOL_SHUTDOWN_FLUSH_S (a collector that is down must not hold the
        exit) and what is left in memory is written to the spool, ahead of what is there,
        for the next start to send. True when nothing was dropped and nothing is left
        waiting."""
        with self._cond:
            if self._closed:
                return True
            self._closed = True
        spool = self._spool
        if spool is not None:
            timeout_s = min(timeout_s, SPOOL_SHUTDOWN_FLUSH_S)
        deadline = time.monotonic() + timeout_s

        def busy() -> bool:
            # With a spool only memory matters: what is on disk is kept for the next start.
            return bool(self._queue) or (
                self._sending is not None if spool is not None else self._in_flight > 0)

        with self._cond:  # memory drained (to the collector or, failing, to the spool)
            while busy():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    break
                self._cond.wait(remaining)
            flushed = not busy()
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._thread.join(max(0.1, deadline - time.monotonic()))
        with self._cond:
            left = list(self._queue)
            hanging = self._sending  # a send still hanging: keep it (at least once)
            self._sending = None
            if hanging is not None:
                left.insert(0, hanging)
            self._queue.clear()
            self._queued_bytes = 0
            if spool is not None:
                self._spool_write.acquire()  # a write by the export thread finishes first
                self._spool_closed = True
                self._spool_write.release()
                if left:
                    # The hanging payload is older than the spool, memory newer.
                    if hanging is not None:
                        spool.prepend([hanging])
                    spool.extend(left[1:] if hanging is not None else left)
                    log.info("OTLP export: %d payload(s) not sent at shutdown were spooled to "
                             "%s for the next start", len(left), spool.directory)
                    left = []
                waiting = len(spool)
                if waiting:
                    log.info("OTLP export: %d payload(s) (%d bytes) wait in the spool %s for "
                             "the next start", waiting, spool.bytes, spool.directory)
                spool.close()
        if left:
            self._count_dropped(left, "the daemon is shutting down")
        for transport in self._transports.values():
            if transport is not None:
                try:
                    transport.close()
                except Exception:  # closing a broken channel must not fail shutdown
                    log.debug("closing OTLP transport failed", exc_info=True)
        return flushed and not left

    # ---- worker ----

    def _transport(self, signal: str) -> _GrpcTransport | _HttpTransport | None:
        if signal not in self._transports:
            opts = self._signal_options[signal]
            try:
                self._transports[signal] = _make_transport(signal, opts)
            except Exception as exc:  # logged once; the signal is then off, not retried
                log.error(
                    "OTLP %s export to %s disabled: cannot set up the %s transport: %s",
                    signal, opts.endpoint, opts.protocol, exc,
                )
                self._transports[signal] = None
        return self._transports[signal]

    def _run(self) -> None:
        spool = self._spool
        while True:
            spooled = entry = None
            with self._cond:
                while (not self._queue and not self._stop.is_set()
                       and not (spool is not None and len(spool))):
                    self._cond.wait()
                if self._stop.is_set():
                    return
                if self._outage and self._queue:
                    # The collector is failing: memory goes to disk here, on this thread,
                    # so the capture thread only ever appends to memory.
                    self._spool_memory()
                    continue
                self._in_flight += 1
                if not (spool is not None and len(spool)):  # the spool holds the oldest
                    entry = self._queue.popleft()
                    self._queued_bytes -= len(entry[1])
                    self._sending = entry
            try:
                if entry is None:
                    spooled = spool.oldest()  # type: ignore[union-attr]
                    if spooled is not None:
                        self._deliver_spooled(spooled)
                    elif len(spool):  # type: ignore[arg-type]
                        self._stop.wait(1.0)  # the spool cannot be read now: no busy loop
                else:
                    self._deliver(*entry[:3], created=entry[3])
            except Exception:  # the worker must survive anything a transport throws
                log.exception("OTLP export failed unexpectedly; payload dropped")
                self._stats.add("export.failures")
                if spooled is not None and not self._stop.is_set():
                    try:
                        spool.remove(spooled.id)  # type: ignore[union-attr]
                    except Exception:  # the spool's disk failing: keep the thread alive
                        log.exception("export spool: cannot remove payload %d", spooled.id)
                        self._stop.wait(1.0)
            finally:
                with self._cond:
                    self._sending = None
                    self._in_flight -= 1
                    self._cond.notify_all()

    def _spool_memory(self, head: list[tuple[str, bytes, int, float]] = ()) -> None:
        """`head` to the spool's head (older than what is there), memory to its tail
        (newer). Called with _cond held; the disk write (compression, SQLite) is done
        without it, so the capture thread is never held up by it."""
        if (not self._queue and not head) or self._spool_closed:
            return
        tail = list(self._queue)
        self._queue.clear()
        self._queued_bytes = 0
        self._spool_write.acquire()
        self._cond.release()
        try:
            if head:
                self._spool.prepend(head)  # type: ignore[union-attr]
            if tail:
                self._spool.extend(tail)  # type: ignore[union-attr]
        finally:
            self._spool_write.release()
            self._cond.acquire()
            self._cond.notify_all()  # a shutdown may wait for memory to be empty

    def _spill(self, failed: tuple[str, bytes, int, float]) -> None:
        """The collector failed a payload from memory: it goes to the spool's head (it is
        the oldest), so it survives a restart and is retried from there."""
        with self._cond:
            if self._spool_closed:  # shutdown outwaited this send and spooled it already
                return
            self._outage = True
            self._sending = None
            self._spool_memory(head=[failed])
            self._cond.notify_all()

    def _pause(self, delay_s: float) -> bool:
        """Wait before a retry; True when shutdown interrupted it. With a spool, what the
        capture thread queues meanwhile is moved to disk as it comes."""
        if self._spool is None:
            return self._stop.wait(delay_s)
        deadline = time.monotonic() + delay_s
        with self._cond:
            while not self._stop.is_set():
                self._spool_memory()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def _deliver_spooled(self, spooled) -> None:
        """Send the spool's oldest payload until it is delivered: a spooled payload is
        given up only when the collector refuses it for good or the spool drops it (cap,
        max age). A shutdown leaves it where it is, for the next start."""
        spool = self._spool
        outcome = self._deliver(spooled.signal, spooled.payload, spooled.items,
                                created=spooled.created,
                                still_wanted=lambda: spool.contains(spooled.id))
        if outcome == "sent":
            self._stats.add("export.spool.delivered")
        if outcome in ("sent", "failed"):
            spool.remove(spooled.id)

    def _deliver(self, signal: str, payload: bytes, items: int, created: float,
                 still_wanted: Callable[[], bool] | None = None) -> str:
        """One payload, with retries: "sent", "failed" (given up, counted), "spilled" (to
        the spool, sent from there), "stopped" (shutdown), or "gone" (the spool dropped it
        while it was retried)."""
        transport = self._transport(signal)
        if transport is None:
            self._stats.add("export.failures")
            return "failed"
        opts = self._options
        spooled = still_wanted is not None
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                body = transport.send(payload)
            except _Retryable as exc:
                attempt += 1
                backoff = min(opts.retry_max_backoff_s,
                              opts.retry_initial_backoff_s * (2 ** (attempt - 1)))
                delay = exc.delay_s if exc.delay_s is not None else backoff * random.uniform(0.5, 1.0)
                if self._spool is not None and not spooled:
                    self._stats.add("export.retries")
                    self._warn.warning(
                        "spill", "OTLP %s export to %s failed (%s); spooling to %s until the "
                        "collector answers", signal, transport.endpoint, exc,
                        self._spool.directory)
                    self._spill((signal, payload, items, created))
                    self._pause(delay)  # the spooled copy is retried after the backoff
                    return "spilled"
                if spooled and self._stop.is_set():
                    return "stopped"  # it stays in the spool
                if spooled:
                    with self._cond:
                        self._outage = True
                if not spooled and (self._stop.is_set() or time.monotonic() - started + delay
                                    > opts.retry_max_elapsed_s):
                    self._stats.add("export.failures")
                    self._warn.warning(
                        "fail-" + signal,
                        "OTLP %s export to %s failed after %d attempts, payload of %d %s "
                        "given up: %s", signal, transport.endpoint, attempt, items,
                        _ITEM_NAME[signal], exc,
                    )
                    return "failed"
                self._stats.add("export.retries")
                log.debug("OTLP %s export to %s: %s; retrying in %.2f s",
                          signal, transport.endpoint, exc, delay)
                if self._pause(delay):
                    if spooled:
                        return "stopped"
                    self._stats.add("export.failures")
                    return "failed"
                if spooled and not still_wanted():  # type: ignore[misc]
                    return "gone"  # dropped by the spool's cap or max age, and counted
                continue
            except _Permanent as exc:
                self._stats.add("export.failures")
                self._warn.warning(
                    "fail-" + signal,
                    "OTLP %s export to %s failed, payload of %d %s dropped (not retryable): %s",
                    signal, transport.endpoint, items, _ITEM_NAME[signal], exc,
                )
                return "failed"
            break
        self._outage = False
        self._stats.add("export.payloads_sent")
        self._stats.add("export.%s_sent" % _ITEM_NAME[signal], items)
        rejected, message = _partial_success(signal, body)
        if rejected or message:
            self._stats.add("export.%s_rejected" % _ITEM_NAME[signal], rejected)
            self._warn.warning(
                "partial-" + signal,
                "OTLP %s export to %s: the collector rejected %d of %d %s: %s",
                signal, transport.endpoint, rejected, items, _ITEM_NAME[signal],
                message or "(no message)",
            )
        return "sent"
