"""Jaeger v2 as a real test peer, and the two-tier flow it is shown.

Jaeger v2 is an OpenTelemetry Collector distribution: OTLP receivers in, an in-memory
trace store, and the query service (HTTP JSON API and UI) out. scripts/bootstrap.sh
--test-peers builds it from the Go module proxy into JAEGER_BIN; `Jaeger` runs it with
a config written here (the all-in-one pipeline, memory storage, every port free and on
loopback) and reads traces back through the query API, as the Jaeger UI does.

The flow is what a user points otel-ebpf at: curl -> a front service (Python, its own
`OTEL_SERVICE_NAME`) -> nginx. The front service knows nothing of OpenTelemetry; like
many proxies it forwards the caller's `traceparent` header on its outgoing call, so
the daemon can put all four spans (curl CLIENT, front SERVER, front CLIENT, nginx
SERVER) in the caller's trace. Used by tests/integration/test_jaeger.py and by
scripts/jaeger-screenshot.py, which takes the README's picture of the same trace.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import textwrap
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.integration.peers import curl, free_port, process, wait_for_port

JAEGER_VERSION = "v1.75.0"  # the Go module tag; the binary reports itself as Jaeger v2
CACHE = Path(os.environ.get("OTEL_EBPF_CACHE", "/var/cache/otel-ebpf"))
JAEGER_BIN = Path(os.environ.get("OTEL_EBPF_JAEGER_BIN",
                                 CACHE / ("jaeger-" + JAEGER_VERSION) / "jaeger"))
FRONT_SERVICE = "checkout-front"

JAEGER_CONFIG = textwrap.dedent('''
    # Jaeger v2 all-in-one with in-memory storage, every endpoint on loopback.
    service:
      extensions: [jaeger_storage, jaeger_query, healthcheckv2]
      pipelines:
        traces:
          receivers: [otlp]
          processors: [batch]
          exporters: [jaeger_storage_exporter]
      telemetry:
        resource:
          service.name: jaeger
        metrics:
          level: none
        logs:
          level: info
    extensions:
      healthcheckv2:
        use_v2: true
        http:
          endpoint: 127.0.0.1:{health_port}
      jaeger_query:
        storage:
          traces: memstore
        http:
          endpoint: 127.0.0.1:{query_port}
        grpc:
          endpoint: 127.0.0.1:{query_grpc_port}
        {ui}
      jaeger_storage:
        backends:
          memstore:
            memory:
              max_traces: 100000
    receivers:
      otlp:
        protocols:
          grpc:
            endpoint: 127.0.0.1:{otlp_grpc_port}
          http:
            endpoint: 127.0.0.1:{otlp_http_port}
    processors:
      batch:
        timeout: 200ms
    exporters:
      jaeger_storage_exporter:
        trace_storage: memstore
''')


class Jaeger:
    """`jaeger --config FILE` in a subprocess; ready once its query API answers."""

    def __init__(self, workdir: Path, ui_assets: Path | None = None,
                 binary: Path = JAEGER_BIN) -> None:
        self.workdir = workdir
        self.binary = binary
        self.otlp_grpc_port, self.otlp_http_port = free_port(), free_port()
        self.query_port, self.query_grpc_port = free_port(), free_port()
        self.health_port = free_port()
        self.config = workdir / "jaeger.yaml"
        ui = "ui:\n          assets_path: %s" % ui_assets if ui_assets else ""
        self.config.write_text(JAEGER_CONFIG.format(
            health_port=self.health_port, query_port=self.query_port,
            query_grpc_port=self.query_grpc_port, otlp_grpc_port=self.otlp_grpc_port,
            otlp_http_port=self.otlp_http_port, ui=ui))
        self.log_path = workdir / "jaeger.log"
        self.proc: subprocess.Popen | None = None

    @property
    def otlp_grpc_endpoint(self) -> str:
        return "http://127.0.0.1:%d" % self.otlp_grpc_port

    @property
    def otlp_http_endpoint(self) -> str:
        return "http://127.0.0.1:%d" % self.otlp_http_port

    @property
    def ui_url(self) -> str:
        return "http://127.0.0.1:%d" % self.query_port

    def __enter__(self) -> Jaeger:
        self._log = open(self.log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen([str(self.binary), "--config", str(self.config)],
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        try:
            for port in (self.otlp_grpc_port, self.otlp_http_port, self.query_port):
                wait_for_port(port, timeout=60)
        except TimeoutError as e:
            self.__exit__()
            raise RuntimeError("Jaeger did not start (%s); its log:\n%s"
                               % (e, self.log_path.read_text()[-4000:])) from None
        return self

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def api(self, path: str, **params) -> dict:
        """GET the query service's JSON API (the one the Jaeger UI reads)."""
        url = "%s%s" % (self.ui_url, path)
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def services(self) -> list[str]:
        return sorted(self.api("/api/services")["data"] or [])

    def traces(self, service: str, since_ns: int, limit: int = 1000) -> list[dict]:
        """Every trace holding a span of `service` since `since_ns` (unix ns)."""
        return self.api("/api/traces", service=service, limit=limit,
                        start=since_ns // 1000 - 60_000_000,
                        end=time.time_ns() // 1000 + 60_000_000)["data"] or []

    def trace(self, trace_id: str) -> dict:
        return self.api("/api/traces/%s" % trace_id)["data"][0]


@dataclass
class JaegerSpan:
    """One span as the query API returns it, with its process resolved."""
    trace_id: str
    span_id: str
    parent_id: str | None  # the CHILD_OF reference, when there is one
    name: str
    kind: str  # the `span.kind` tag: server, client
    service: str
    tags: dict
    process_tags: dict


def spans_of(trace: dict) -> list[JaegerSpan]:
    out = []
    for s in trace["spans"]:
        tags = {t["key"]: t["value"] for t in s.get("tags") or []}
        process = trace["processes"][s["processID"]]
        parents = [r["spanID"] for r in s.get("references") or [] if r["refType"] == "CHILD_OF"]
        out.append(JaegerSpan(
            trace_id=s["traceID"], span_id=s["spanID"], parent_id=parents[0] if parents else None,
            name=s["operationName"], kind=tags.get("span.kind", ""),
            service=process["serviceName"],
            tags=tags, process_tags={t["key"]: t["value"] for t in process.get("tags") or []}))
    return out


FRONT_SERVER = textwrap.dedent('''
    """A front service with no tracing code: GET /checkout/N asks nginx for
    /index.html (forwarding the caller's traceparent, as proxies do) and answers 200."""
    import http.client, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    BACKEND = int(sys.argv[2])

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        def log_message(self, *a): pass
        def do_GET(self):
            headers = {}
            if self.headers.get("traceparent"):
                headers["traceparent"] = self.headers["traceparent"]
            backend = http.client.HTTPConnection("127.0.0.1", BACKEND, timeout=10)
            backend.request("GET", "/index.html", headers=headers)
            reply = backend.getresponse()
            page = reply.read()
            backend.close()
            body = b"checkout ok, backend said %d with %d bytes" % (reply.status, len(page))
            self.send_response(200 if reply.status == 200 else 502)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
''')


@contextlib.contextmanager
def front_service(workdir: Path, port: int, backend_port: int) -> Iterator:
    script = workdir / "front.py"
    script.write_text(FRONT_SERVER)
    # The front's own OTEL_SERVICE_NAME, read by the daemon from /proc/PID/environ.
    with process([sys.executable, str(script), str(port), str(backend_port)], port=port,
                 env={"OTEL_SERVICE_NAME": FRONT_SERVICE},
                 log_path=workdir / "front.log") as proc:
        yield proc


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, parent span id) of a fresh sampled W3C context."""
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return "00-%s-%s-01" % (trace_id, parent_id), trace_id, parent_id


def checkout(front_port: int, i: int) -> tuple[str, str]:
    """One request through the flow, as a caller already in a trace would send it;
    (trace id, parent span id) of the caller's context."""
    traceparent, trace_id, parent_id = new_traceparent()
    result = curl("http://127.0.0.1:%d/checkout/%d" % (front_port, i),
                  "-H", "traceparent: " + traceparent)
    assert result.stdout == "200", result
    return trace_id, parent_id


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.25):
    """Poll until predicate() returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("no %s after %ss" % (what, timeout_s))
        time.sleep(interval_s)
