"""OtlpExporter mechanics without a collector: bounded queue, retries, failures, shutdown.

A scripted local HTTP server (a test double, not the "real receiver": that is rotel, in
tests/integration/test_export_otlp.py) answers with the status codes a collector can send.
"""

from __future__ import annotations

import gzip
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from otel_ebpf import __version__, export
from otel_ebpf.export import (
    TRACES,
    OtlpExporter,
    OtlpOptions,
    OtlpSignalOptions,
    RateLimitedLog,
    _parse_retry_after,
)
from otel_ebpf.stats import Stats
from tests.receiver import free_port


class ScriptedCollector:
    """Answers POSTs with the scripted (status, headers, body) list, then 200."""

    def __init__(self, script: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.script = list(script)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                status, headers, payload = outer.script.pop(0) if outer.script else (200, {}, b"")
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/v1/traces" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector():
    made = []

    def make(script=()):
        c = ScriptedCollector(list(script))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def http_options(url: str, compression: str = "gzip", **kw) -> OtlpOptions:
    sig = OtlpSignalOptions(protocol="http/protobuf", endpoint=url, timeout_s=2.0,
                            headers=(("api-key", "s3cret"),), compression=compression)
    return OtlpOptions(traces=sig, metrics=sig, retry_initial_backoff_s=0.01,
                       retry_max_backoff_s=0.05, **kw)


def payload(n_spans: int = 1) -> bytes:
    req = ExportTraceServiceRequest()
    spans = req.resource_spans.add().scope_spans.add()
    for i in range(n_spans):
        s = spans.spans.add()
        s.name = "GET /x"
        s.trace_id = bytes(15) + bytes([i + 1])
        s.span_id = bytes(7) + bytes([i + 1])
    return req.SerializeToString()


def test_http_post_format_headers_and_gzip(collector):
    c = collector()
    stats = Stats()
    ex = OtlpExporter(http_options(c.url), stats)
    body = payload(3)
    ex.export_traces(body, 3)
    assert ex.force_flush(5)
    ex.shutdown(5)
    (headers, sent), = c.requests
    assert headers["Content-Type"] == "application/x-protobuf"
    assert headers["Content-Encoding"] == "gzip"
    assert headers["api-key"] == "s3cret"
    assert headers["User-Agent"] == "otel-ebpf/%s" % __version__
    assert gzip.decompress(sent) == body
    assert stats.get("export.payloads_sent") == 1
    assert stats.get("export.spans_sent") == 3


def test_http_post_uncompressed_by_default(collector):
    """No compression unless configured, as in the OpenTelemetry SDKs: the body is the
    payload itself and no Content-Encoding is sent."""
    assert OtlpSignalOptions().compression == "none"
    c = collector()
    sig = OtlpSignalOptions(protocol="http/protobuf", endpoint=c.url, timeout_s=2.0)
    ex = OtlpExporter(OtlpOptions(traces=sig, metrics=sig), Stats())
    body = payload(2)
    ex.export_traces(body, 2)
    assert ex.force_flush(5)
    ex.shutdown(5)
    (headers, sent), = c.requests
    assert "Content-Encoding" not in headers
    assert sent == body


def test_retryable_statuses_are_retried_honouring_retry_after(collector):
    c = collector([(503, {"Retry-After": "1"}, b""), (429, {}, b""), (502, {}, b""),
                   (504, {}, b"")])
    stats = Stats()
    ex = OtlpExporter(http_options(c.url), stats)
    started = time.monotonic()
    ex.export_traces(payload(), 1)
    assert ex.force_flush(10)
    elapsed = time.monotonic() - started
    ex.shutdown(1)
    assert len(c.requests) == 5
    assert stats.get("export.retries") == 4
    assert stats.get("export.payloads_sent") == 1
    assert stats.get("export.failures") == 0
    assert elapsed >= 1.0  # the server asked for one second


def test_non_retryable_status_is_a_counted_failure(collector, caplog):
    c = collector([(400, {}, b"bad payload")])
    stats = Stats()
    ex = OtlpExporter(http_options(c.url), stats)
    with caplog.at_level(logging.WARNING, logger="otel_ebpf.export"):
        ex.export_traces(payload(), 1)
        assert ex.force_flush(5)
    ex.shutdown(1)
    assert len(c.requests) == 1
    assert stats.get("export.failures") == 1
    assert stats.get("export.retries") == 0
    assert "HTTP 400" in caplog.text and "not retryable" in caplog.text


def test_retry_deadline_gives_up_and_counts(collector):
    c = collector([(503, {}, b"")] * 1000)
    stats = Stats()
    ex = OtlpExporter(http_options(c.url, retry_max_elapsed_s=0.3), stats)
    ex.export_traces(payload(), 1)
    assert ex.force_flush(5)
    ex.shutdown(1)
    assert stats.get("export.failures") == 1
    assert stats.get("export.retries") >= 2
    assert stats.get("export.payloads_sent") == 0


def test_partial_success_is_counted_and_logged(collector, caplog):
    resp = ExportTraceServiceResponse()
    resp.partial_success.rejected_spans = 3
    resp.partial_success.error_message = "3 spans too old"
    c = collector([(200, {"Content-Type": "application/x-protobuf"}, resp.SerializeToString())])
    stats = Stats()
    ex = OtlpExporter(http_options(c.url), stats)
    with caplog.at_level(logging.WARNING, logger="otel_ebpf.export"):
        ex.export_traces(payload(5), 5)
        assert ex.force_flush(5)
    ex.shutdown(1)
    assert stats.get("export.spans_rejected") == 3
    assert "rejected 3 of 5 spans: 3 spans too old" in caplog.text


class BlockingTransport:
    """Holds the first send until released: the queue fills behind it deterministically."""

    endpoint = "test://blocked"

    def __init__(self):
        self.entered = threading.Event()
        self.release = threading.Event()
        self.sent: list[bytes] = []

    def send(self, data: bytes) -> bytes:
        self.entered.set()
        self.release.wait(10)
        self.sent.append(data)
        return b""

    def close(self):
        pass


def test_bounded_queue_drops_oldest_and_counts(caplog):
    stats = Stats()
    ex = OtlpExporter(OtlpOptions(max_queue_payloads=5), stats)
    transport = BlockingTransport()
    ex._transports[TRACES] = transport
    ex.export_traces(b"first", 2)
    assert transport.entered.wait(5)  # "first" is in flight, the queue is empty
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="otel_ebpf.export"):
        for i in range(23):
            ex.export_traces(b"p%02d" % i, 2)
    enqueue_s = time.perf_counter() - start
    assert stats.get("export.payloads_dropped") == 23 - 5
    assert stats.get("export.spans_dropped") == (23 - 5) * 2
    assert stats.snapshot()["export.queue_payloads"] == 5
    assert stats.snapshot()["export.queue_bytes"] == 5 * 3
    # Rate-limited: one warning for 18 drops within 10 s.
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    transport.release.set()
    assert ex.force_flush(5)
    ex.shutdown(1)
    # The newest five survived: a collector that returns gets what is new.
    assert transport.sent == [b"first"] + [b"p%02d" % i for i in range(18, 23)]
    assert stats.get("export.payloads_sent") == 6
    assert enqueue_s < 0.05  # never blocks the caller


def test_queue_is_bounded_in_bytes():
    stats = Stats()
    ex = OtlpExporter(OtlpOptions(max_queue_bytes=1000), stats)
    transport = BlockingTransport()
    ex._transports[TRACES] = transport
    ex.export_traces(b"x", 1)
    assert transport.entered.wait(5)
    for _ in range(23):
        ex.export_traces(b"y" * 300, 1)
    ex.export_traces(b"z" * 2000, 7)  # larger than the whole queue: dropped itself
    assert ex._queued_bytes <= 1000
    assert stats.get("export.payloads_dropped") == 23 - 3 + 1
    assert stats.get("export.spans_dropped") == 23 - 3 + 7
    transport.release.set()
    ex.shutdown(5)


def test_shutdown_is_idempotent_and_later_exports_are_dropped_not_raised():
    stats = Stats()
    ex = OtlpExporter(OtlpOptions(), stats)
    assert ex.shutdown(1) is True
    assert ex.shutdown(1) is True
    ex.export_traces(b"late", 4)
    ex.export_metrics(b"late", 6)
    assert stats.get("export.spans_dropped") == 4
    assert stats.get("export.points_dropped") == 6
    assert stats.get("export.payloads_dropped") == 2


def test_shutdown_with_unreachable_collector_is_bounded_and_counts_leftovers():
    stats = Stats()
    port = free_port()  # nothing listens
    sig = OtlpSignalOptions(protocol="grpc", endpoint="http://127.0.0.1:%d" % port, timeout_s=1)
    ex = OtlpExporter(OtlpOptions(traces=sig, metrics=sig, retry_max_elapsed_s=60), stats)
    for _ in range(23):
        ex.export_traces(b"\x0a\x00", 1)
    started = time.monotonic()
    assert ex.shutdown(1.0) is False
    assert time.monotonic() - started < 3.0
    # One was in flight (given up: a failure), the other 22 were never sent.
    assert stats.get("export.payloads_dropped") + stats.get("export.failures") == 23
    assert stats.get("export.retries") >= 1


def test_grpc_unavailable_is_retryable_until_the_deadline():
    stats = Stats()
    port = free_port()
    sig = OtlpSignalOptions(protocol="grpc", endpoint="http://127.0.0.1:%d" % port, timeout_s=1)
    ex = OtlpExporter(OtlpOptions(traces=sig, metrics=sig, retry_max_elapsed_s=0.5,
                                  retry_initial_backoff_s=0.05), stats)
    ex.export_metrics(b"", 1)
    assert ex.force_flush(5)
    ex.shutdown(1)
    assert stats.get("export.failures") == 1
    assert stats.get("export.retries") >= 1


def test_transport_setup_error_disables_the_signal_with_a_clear_log(tmp_path, caplog):
    stats = Stats()
    sig = OtlpSignalOptions(protocol="grpc", endpoint="https://127.0.0.1:1",
                            certificate=str(tmp_path / "gone.pem"))
    ex = OtlpExporter(OtlpOptions(traces=sig, metrics=sig), stats)
    with caplog.at_level(logging.ERROR, logger="otel_ebpf.export"):
        ex.export_traces(b"", 1)
        assert ex.force_flush(5)
    ex.shutdown(1)
    assert stats.get("export.failures") == 1
    assert "cannot set up the grpc transport" in caplog.text


def test_parse_retry_after():
    assert _parse_retry_after("7") == 7.0
    assert _parse_retry_after(None) is None
    assert _parse_retry_after("soon") is None
    future = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < _parse_retry_after(future) <= 31


def test_rate_limited_log(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(export.time, "monotonic", lambda: now[0])
    rl = RateLimitedLog(logging.getLogger("t.rl"), 10.0)
    with caplog.at_level(logging.WARNING, logger="t.rl"):
        for _ in range(23):
            rl.warning("k", "thing %d", 1)
        now[0] += 10.5
        rl.warning("k", "thing %d", 2)
    assert [r.getMessage() for r in caplog.records] == [
        "thing 1", "thing 2 (22 similar messages suppressed)"]


def test_enqueue_cost():
    """The export call sits on the capture thread (once per batch): it must be cheap."""
    stats = Stats()
    ex = OtlpExporter(OtlpOptions(max_queue_payloads=1_000_000), stats)
    transport = BlockingTransport()
    ex._transports[TRACES] = transport
    n = 20000
    data = b"x" * 300
    start = time.perf_counter()
    for _ in range(n):
        ex.export_traces(data, 1)
    per_call_us = (time.perf_counter() - start) / n * 1e6
    transport.release.set()
    ex.shutdown(5)
    assert per_call_us < 20, per_call_us
