"""Wiring, the capture loop, signals and ordered shutdown.

One thread does the per-exchange work, in pipeline order:

    capture (ring buffer poll) -> conntrack/http1 (ConnectionTable.handle)
        -> sinks (console | jsonl | telemetry -> OTLP exporter | the caller's
           ExchangeSink: the live table of `otel-ebpf top`)
    capture -> http1 KernelExchangeDecoder (one record per exchange: the kernel
        fast path) -> the same sinks

Between polls the same loop does the periodic work: request timeouts and idle expiry,
TLS library rescans, span batch and metric flushes, the stats line, the liveness mark.
Network I/O to the collector happens on the exporter's own thread behind a bounded
queue, so a slow or absent collector never stalls capture.

Shutdown order (SIGINT/SIGTERM): detach every probe first (no new events), drain what
the ring buffer still holds, close the connection table (pending requests become
exchanges with their outcome), then flush telemetry and the exporter, then health.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Protocol

from otel_ebpf.capture.events import ConnOpenEvent, EventKind
from otel_ebpf.capture.loader import Capture
from otel_ebpf.config import Config
from otel_ebpf.discovery import Discovery
from otel_ebpf.conntrack import ConnectionTable, procfs
from otel_ebpf.exchange import HttpExchange
from otel_ebpf.process import ProcessResolver
from otel_ebpf.protocols.http1.kernel_exchange import KernelExchangeDecoder
from otel_ebpf.sinks import ConsoleSink, JsonlSink
from otel_ebpf.stats import Stats
from otel_ebpf.telemetry.redact import QueryRedactor

log = logging.getLogger(__name__)

POLL_TIMEOUT_MS = 100
EXPIRE_INTERVAL_S = 1.0
TLS_RESCAN_INTERVAL_S = 2.0
PROCESS_SWEEP_INTERVAL_S = 10.0
# At shutdown, longest the daemon keeps draining what the kernel queued before the detach.
SHUTDOWN_DRAIN_S = 0.5


class LoopWatch:
    """Where the capture loop's time goes between two drains of the ring buffer.

    The kernel keeps writing while the loop does its periodic work after a drain; work
    that takes longer than the ring buffer's slack loses records (counted in the kernel,
    but lost). Each pass's work is timed per job (a few clock reads per pass, not per
    exchange); the longest is published as `daemon.loop_max_ms`, and one over STALL_S
    is logged with the job that took the time.
    """

    STALL_S = 0.25

    __slots__ = ("_stats", "_t0", "_last", "_slowest", "_max_s", "_warned")

    def __init__(self, stats: Stats) -> None:
        self._stats = stats
        self._t0 = self._last = time.monotonic()
        self._slowest = ("", 0.0)
        self._max_s = 0.0
        self._warned = 0.0
        stats.gauge("daemon.loop_max_ms", lambda: round(self._max_s * 1000, 1))

    def start(self) -> None:
        self._t0 = self._last = time.monotonic()
        self._slowest = ("", 0.0)

    def lap(self, job: str) -> None:
        now = time.monotonic()
        if now - self._last > self._slowest[1]:
            self._slowest = (job, now - self._last)
        self._last = now

    def end(self) -> None:
        took = time.monotonic() - self._t0
        if took > self._max_s:
            self._max_s = took
        if took > self.STALL_S and self._t0 - self._warned > 10.0:
            self._warned = self._t0
            log.warning("capture loop pass took %.0f ms (%s: %.0f ms); records wait in the "
                        "ring buffer meanwhile", took * 1000, self._slowest[0],
                        self._slowest[1] * 1000)


class ExchangeSink(Protocol):
    """An in-process consumer that takes the place of the configured exporter (the
    table of `otel-ebpf top`). Called from the capture loop's thread only."""

    def handle(self, exchange: HttpExchange) -> None: ...

    def flush(self) -> None: ...  # after each ring-buffer poll that drained records

    def tick(self, now: float) -> bool: ...  # every loop pass (<= 100 ms); False: stop

    def close(self) -> None: ...  # at shutdown, after the last exchange


def reported_only(emit: Callable[[HttpExchange], None], processes: ProcessResolver,
                  discovery: Discovery, stats: Stats) -> Callable[[HttpExchange], None]:
    """emit, for the exchanges of processes discovery selects (the verdict cached in
    their ProcessInfo); the others are counted as discovery.dropped_exchanges. Its
    `reported_only` attribute gives the same filter in parts, for a caller that keeps
    the verdict per connection (KernelExchangeDecoder)."""
    get = processes.get
    report_unknown = discovery.decide_unknown()

    def emit_reported(exchange: HttpExchange) -> None:
        info = get(exchange.pid)
        if info.selected if info is not None else report_unknown:
            emit(exchange)
        else:
            stats.add("discovery.dropped_exchanges")

    def verdict(pid: int) -> tuple[object, bool]:
        """(what the verdict rests on, reported?): it holds for as long as the
        resolver's cache holds that same ProcessInfo for pid (frozen: a re-judged,
        swept or evicted pid gets a new one, or none). None: nothing to rest on, ask
        again next time."""
        info = get(pid)
        if info is None:
            return None, report_unknown
        return info, info.selected

    def drop() -> None:
        stats.add("discovery.dropped_exchanges")

    # For a caller that keeps the verdict per connection (KernelExchangeDecoder): the
    # unfiltered output, verdict(), the resolver's own cache lookup (one dict lookup per
    # exchange tells whether a kept verdict still holds) and the drop count.
    lookup = getattr(processes, "cached_lookup", None)  # a stand-in resolver may have none
    if lookup is not None:
        emit_reported.reported_only = (  # type: ignore[attr-defined]
            emit, verdict, lookup, drop)
    return emit_reported


class Daemon:
    def __init__(self, config: Config, stats: Stats | None = None,
                 sink_factory: Callable[[ProcessResolver], ExchangeSink] | None = None
                 ) -> None:
        """`sink_factory`, when given, builds the one output from the process resolver
        instead of config.output.exporter (`otel-ebpf top` reuses the whole pipeline)."""
        self.config = config
        self.stats = stats or Stats()
        self._sink_factory = sink_factory
        self._sink: ExchangeSink | None = None
        self._stop = threading.Event()
        self._closers: list[Callable[[], None]] = []  # run in reverse order at shutdown
        self._flushers: list[Callable[[], None]] = []  # after every ring-buffer poll

    def stop(self) -> None:
        self._stop.set()

    def run(self) -> int:
        """Capture until SIGINT/SIGTERM (or `stop()`); returns the process exit code."""
        self._install_signal_handlers()
        try:
            self._run()
        finally:
            self._shutdown()
        return 0

    # -- set-up -------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # embedded (tests): the caller uses stop()

        def on_signal(signum: int, _frame: object) -> None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGINT, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    def _build_outputs(self, processes: ProcessResolver) -> list[Callable[[HttpExchange], None]]:
        """The exchange consumers for the configured exporter."""
        output = self.config.output
        stats = self.stats

        def process_name(pid: int) -> str | None:
            info = processes.get(pid)
            return info.executable_name if info else None

        if self._sink_factory is not None:
            self._sink = self._sink_factory(processes)
            self._closers.append(self._sink.close)
            self._flushers.append(self._sink.flush)
            return [self._sink.handle]
        if output.exporter == "console":
            self._console = ConsoleSink(process_name, stats, redact=self._redact)
            self._closers.append(self._console.close)
            self._flushers.append(self._console.flush)
            return [self._console.handle]
        if output.exporter == "jsonl":
            sink = JsonlSink(output.path, process_name, stats, redact=self._redact)
            self._closers.append(sink.close)
            self._flushers.append(sink.flush)
            return [sink.handle]
        if output.exporter == "otlp":
            from otel_ebpf.export import OtlpExporter
            from otel_ebpf.process import daemon_resource_attributes
            from otel_ebpf.telemetry import Telemetry

            exporter = OtlpExporter(self.config.otlp, stats, spool=self.config.spool)
            self._closers.append(lambda: exporter.shutdown(self.config.otlp.timeout_s))

            def resource_for_pid(pid: int):
                info = processes.get(pid)
                return info.resource_attributes if info else None

            telemetry = Telemetry(
                self.config.telemetry,
                resource_for_pid=resource_for_pid,
                daemon_resource=daemon_resource_attributes(),
                sink=exporter,
                stats=stats,
                active_server_requests=self._table.active_server_requests,
            )
            self._telemetry = telemetry
            self._closers.append(telemetry.shutdown)
            return [telemetry.record]
        return []  # "none": capture and count only (benchmarks, dry runs)

    def _start_prometheus(self, processes: ProcessResolver
                          ) -> list[Callable[[HttpExchange], None]]:
        """/metrics for Prometheus (export.prometheus.listen), rendered on each scrape from
        the telemetry's aggregator (the one the OTLP export reads). Without the otlp
        exporter a Telemetry that only aggregates metrics is built for it and returned as
        an extra output. Raises PrometheusError when the address cannot be served."""
        self._prometheus = None
        listen = self.config.prometheus.listen
        if not listen:
            return []
        from otel_ebpf.telemetry.prometheus import NoExport, PrometheusEndpoint

        outputs: list[Callable[[HttpExchange], None]] = []
        if self._telemetry is None:
            from otel_ebpf.process import daemon_resource_attributes
            from otel_ebpf.telemetry import Telemetry

            def resource_for_pid(pid: int):
                info = processes.get(pid)
                return info.resource_attributes if info else None

            # Scraped, never pushed: no spans, and cumulative series (nothing resets them).
            options = dataclasses.replace(self.config.telemetry, spans_enabled=False,
                                          metrics_temporality="cumulative")
            self._telemetry = Telemetry(
                options, resource_for_pid=resource_for_pid,
                daemon_resource=daemon_resource_attributes(), sink=NoExport(),
                stats=self.stats, active_server_requests=self._table.active_server_requests)
            outputs.append(self._telemetry.record)
        endpoint = PrometheusEndpoint(listen, self._telemetry.metrics_request)
        self._closers.append(endpoint.close)
        self._prometheus = endpoint
        return outputs

    def _run(self) -> None:
        config = self.config
        stats = self.stats
        self._console: ConsoleSink | None = None
        self._telemetry = None

        # One redactor, the configured sensitive names, for every output and for command
        # lines in process attributes.
        self._redact = QueryRedactor(config.telemetry.redacted_query_params)
        k8s = self._start_kubernetes()
        discovery = Discovery(config.discovery)
        processes = ProcessResolver(stats, container_attributes=k8s.lookup if k8s else None,
                                    redact=self._redact, discovery=discovery,
                                    pod_labels=k8s.labels if k8s else None)
        self._processes = processes
        self._table = ConnectionTable(config.conntrack, stats)
        stats.gauge("conntrack.connections", self._table.__len__)  # the stats line's conns=
        outputs = self._build_outputs(processes)
        outputs += self._start_prometheus(processes)
        table = self._table

        if len(outputs) == 1:
            emit = outputs[0]
        else:
            def emit(exchange: HttpExchange) -> None:
                for output in outputs:
                    output(exchange)
        if discovery.active:
            log.info("discovery: %s", discovery.summary())
            emit = reported_only(emit, processes, discovery, stats)

        warm_process = processes.get
        note_name = processes.note_name

        def on_event(event) -> None:
            # The hot path: one call per kernel event.
            if type(event) is ConnOpenEvent:
                # Resolve the process while it most likely exists: a short-lived
                # client (curl) has often exited by the time its exchange is emitted;
                # if it is already gone, the kernel's task name stands in.
                note_name(event.tgid, event.comm)
                warm_process(event.tgid)
            for exchange in table.handle(event):
                stats.add("http.exchanges")
                stats.add("http.exchanges.slow_path")
                emit(exchange)

        def note_process(pid: int, comm: str | None) -> None:
            note_name(pid, comm)
            warm_process(pid)

        conntrack = config.conntrack
        fast = KernelExchangeDecoder(emit, stats, table.clock_offset_ns, conntrack.ports,
                                     conntrack.capture_request_headers, note_process,
                                     procfs.resolve)

        pushed = [0]

        def push_fast_stats() -> None:  # plain ints on the hot path, pushed here
            stats.add("http.exchanges", fast.exchanges - pushed[0])
            pushed[0] = fast.exchanges
            stats.set_total("http.exchanges.fast_path", fast.exchanges)
            stats.set_total("conntrack.filtered_exchanges", fast.filtered)

        self._flushers.append(push_fast_stats)
        self._closers.append(push_fast_stats)

        self._emit = emit
        health = self._start_health()

        capture_options = self._capture_options()
        fast_path = capture_options.fast_path
        timeout_ns = int(conntrack.request_timeout_s * 1e9)
        capture = Capture(capture_options, stats)
        self._capture = capture
        capture.start(on_event, {EventKind.EXCHANGE: fast.on_record})
        if discovery.active:
            # From now on a process judged not reported is silenced in the kernel.
            processes.on_excluded = lambda info: self._silence(capture, processes, info)
        tls = self._start_tls(capture)
        if health is not None:
            health.set_ready(True)
        log.info("capturing; exporter=%s", config.output.exporter)

        now = time.monotonic()
        next_expire = now + EXPIRE_INTERVAL_S
        next_tls = now + TLS_RESCAN_INTERVAL_S
        next_sweep = now + PROCESS_SWEEP_INTERVAL_S
        stats_interval = config.output.stats_interval_s
        next_stats = now + stats_interval if stats_interval > 0 else float("inf")
        telemetry = self._telemetry
        prometheus = self._prometheus
        sink = self._sink

        flushers = self._flushers
        watch = LoopWatch(stats)
        lap = watch.lap
        while not self._stop.is_set():
            drained = capture.poll(POLL_TIMEOUT_MS)  # waits, then drains for <= 50 ms
            watch.start()
            if drained:
                for flush in flushers:
                    flush()
                lap("flush")
            now = time.monotonic()
            if now >= next_expire:
                next_expire = now + EXPIRE_INTERVAL_S
                self._deliver(table.expire(time.monotonic_ns()))
                if fast_path:
                    for tgid, fd in fast.expire(capture.pending_exchanges(), time.monotonic_ns(),
                                                timeout_ns):
                        capture.forget_pending(tgid, fd)
                    push_fast_stats()
                if health is not None:
                    health.mark_alive()
                lap("expire")
            if discovery.active:
                self._rejudge_execs(capture, processes)  # one map walk when none exec'd
                lap("discovery_execs")
            if tls is not None:
                tls.tick()  # probes programs exec'd since the last pass (cheap: ~4 us idle)
                lap("tls_tick")
                if now >= next_tls:
                    next_tls = now + TLS_RESCAN_INTERVAL_S
                    tls.scan()
                    lap("tls_scan")
            if now >= next_sweep:
                next_sweep = now + PROCESS_SWEEP_INTERVAL_S
                for pid in processes.sweep():
                    if telemetry is not None:
                        telemetry.forget(pid)
                lap("process_sweep")
            if telemetry is not None:
                telemetry.tick(time.time())
                lap("telemetry")
            if prometheus is not None:
                prometheus.serve_scrapes()  # builds the metrics only when a scrape waits
                lap("prometheus")
            if now >= next_stats:
                next_stats = now + stats_interval
                self._report_stats()
            if sink is not None and not sink.tick(now):
                self._stop.set()
            watch.end()

    def _capture_options(self):
        """The capture settings, with the fast path off where it cannot serve."""
        options = self.config.capture
        conntrack = self.config.conntrack
        if options.fast_path and (conntrack.capture_response_headers or conntrack.body_prefix_bytes):
            # A fast-path record carries the request head only: no response headers, no
            # body bytes. Those settings need the chunk stream for every connection.
            log.info("kernel fast path off: conntrack.capture_response_headers / "
                     "body_prefix_bytes need the chunk stream")
            options = dataclasses.replace(options, fast_path=False)
        return options

    def _deliver(self, exchanges: list[HttpExchange]) -> None:
        """Count and emit exchanges found off the per-event path (timeouts, shutdown);
        on_event does the same inline, one call per kernel event."""
        for exchange in exchanges:
            self.stats.add("http.exchanges")
            self._emit(exchange)

    def _silence(self, capture: Capture, processes: ProcessResolver, info) -> None:
        """A process discovery does not report: the kernel stops tracing it (its exec or
        exit lifts that). If it exited before the entry went in (the exit probe ran
        first), the entry is taken out again: its pid may be reused."""
        if info.start_ticks < 0:  # known by its kernel name only: already gone
            return
        if capture.ignore_pid(info.pid) and processes.start_ticks(info.pid) != info.start_ticks:
            capture.unignore_pid(info.pid)

    def _rejudge_execs(self, capture: Capture, processes: ProcessResolver) -> None:
        """Processes that exec'd: judged again if they now run another program (their
        first event after the exec may have been resolved already: then nothing to do)."""
        for pid in capture.take_execs():
            info = processes.cached(pid)
            if info is None:
                continue
            if processes.program_changed(pid):
                self.stats.add("discovery.rejudged_execs")
                processes.forget(pid)
                capture.unignore_pid(pid)  # until judged again, at its next event
                if self._telemetry is not None:
                    self._telemetry.forget(pid)  # its resource changes
            elif not info.selected:
                self._silence(capture, processes, info)  # the exec probe lifted it

    def _start_kubernetes(self):
        """The pod index (k8s.* attributes and labels by container id), when running in
        a pod set up for it."""
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            # Not in a pod: skip the module, whose ssl + urllib.request cost ~5 MB resident.
            return None
        from otel_ebpf.kubernetes_metadata import KubernetesMetadata

        k8s = KubernetesMetadata.from_environment()
        if k8s is None:
            return None
        k8s.start()
        self._closers.append(k8s.close)
        return k8s

    def _start_tls(self, capture: Capture):
        if not self.config.capture.tls:
            return None
        try:
            from otel_ebpf.capture.tls import TlsAttacher
        except ImportError:
            return None
        tls = TlsAttacher(capture, self.stats)
        self._closers.append(tls.close)
        tls.scan()
        return tls

    def _start_health(self):
        health_config = self.config.health
        if not (health_config.file or health_config.listen):
            return None
        from otel_ebpf.health import Health

        health = Health(health_config.file, health_config.listen, self.stats.snapshot)
        self._closers.append(health.close)
        return health

    def _report_stats(self) -> None:
        snapshot = self.stats.snapshot()
        if self._console is not None:
            self._console.stats_line(snapshot)
        else:
            from otel_ebpf.sinks import format_stats

            log.info("%s", format_stats(snapshot))

    # -- shutdown -----------------------------------------------------------------

    def _shutdown(self) -> None:
        started = time.monotonic()
        capture = getattr(self, "_capture", None)
        if capture is not None and capture.started:
            try:
                capture.detach()
                # What the kernel queued before the detach: every record, not one poll's
                # budget of them, within a bound so a stuck sink cannot hold the exit.
                deadline = started + SHUTDOWN_DRAIN_S
                while capture.poll(0) and time.monotonic() < deadline:
                    pass
            except Exception:
                log.exception("error while detaching probes")
        drained = time.monotonic()
        table = getattr(self, "_table", None)
        emit = getattr(self, "_emit", None)
        if table is not None and emit is not None:
            self._deliver(table.close_all())
        for close in reversed(self._closers):
            try:
                close()
            except Exception:
                log.exception("error during shutdown")
        if capture is not None:
            capture.close()
        log.info("shut down in %.0f ms: probes detached and ring buffer drained in %.0f ms, "
                 "then pending requests reported and telemetry flushed",
                 (time.monotonic() - started) * 1000, (drained - started) * 1000)
        self._report_stats_final()

    def _report_stats_final(self) -> None:
        from otel_ebpf.sinks import format_stats

        log.info("final %s", format_stats(self.stats.snapshot()))
