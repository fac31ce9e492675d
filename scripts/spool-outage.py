#!/usr/bin/env python3
"""A collector outage, measured: the long version of tests/integration/test_spool.py.

    sudo .venv/bin/python scripts/spool-outage.py                  # 10 min at 1,500 req/s
    sudo .venv/bin/python scripts/spool-outage.py --outage-s 120 --restart

Real eBPF, nginx, a paced keep-alive client requesting a distinct path each time, and
the daemon exporting OTLP/HTTP to a collector that is down for `--outage-s`. Then a
counting OTLP receiver starts on that port, and the script waits until every path the
client requested has arrived as a span. With `--restart`, the daemon is SIGTERM'd halfway
through the outage and started again on the same spool. The load pauses meanwhile:
requests made while no daemon runs cannot be seen by anyone.

It prints what was sent, what arrived (unique paths, duplicates), the daemon's RSS
before and at most during the outage, the spool at its largest, the exit time of the
SIGTERM, and how long delivery took. It exits 1 when a span is missing.

The receiver here only counts: it decodes each ExportTraceServiceRequest with
opentelemetry-proto and keeps url.path. rotel's detailed debug output, as the
integration tests use it, would take longer to parse than the outage lasts at this
volume.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.peers import Daemon, Nginx, free_port  # noqa: E402

PATH_PREFIX = "/o/"
SERVER = 2  # Span.SpanKind.SPAN_KIND_SERVER: nginx's side (the client is traced too)


class CountingReceiver:
    """OTLP/HTTP on 127.0.0.1:port: counts url.path of every SERVER span it is sent."""

    def __init__(self, port: int) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        self.port = port
        self.paths: collections.Counter[str] = collections.Counter()
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                if self.path == "/v1/traces":
                    request = ExportTraceServiceRequest.FromString(body)
                    found = []
                    for rs in request.resource_spans:
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                if span.kind != SERVER:  # the client's own span too
                                    continue
                                for kv in span.attributes:
                                    if kv.key == "url.path":
                                        found.append(kv.value.string_value)
                    outer.paths.update(found)
                outer.requests += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ours(self) -> collections.Counter[str]:
        return collections.Counter({p: n for p, n in list(self.paths.items())
                                    if p.startswith(PATH_PREFIX)})


def load(port: int, first: int, count: int, rate: float, stop: threading.Event) -> int:
    """GET /o/<k> for k in [first, first+count) over keep-alive connections, paced to
    `rate`; returns how many were answered."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    started = time.monotonic()
    done = 0
    for i in range(count):
        if stop.is_set():
            break
        conn.request("GET", "%s%d" % (PATH_PREFIX, first + i))
        conn.getresponse().read()
        done += 1
        ahead = started + (i + 1) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    conn.close()
    return done


def rss_mib(pid: int) -> float:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stats(health_port: int) -> dict:
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/stats" % health_port, timeout=5) as r:
            return json.loads(r.read())
    except OSError:
        return {}


class Phase:
    """Load for `seconds` while sampling the daemon's RSS and spool every second."""

    def __init__(self, daemon: Daemon, health_port: int, nginx_port: int) -> None:
        self.daemon, self.health_port, self.nginx_port = daemon, health_port, nginx_port

    def run(self, first: int, seconds: float, rate: float, samples: list) -> int:
        stop = threading.Event()
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault(
            "n", load(self.nginx_port, first, int(seconds * rate), rate, stop)))
        worker.start()
        while worker.is_alive():
            s = stats(self.health_port)
            samples.append((rss_mib(self.daemon.proc.pid), s.get("export.spool.bytes", 0),
                            s.get("export.spool.payloads", 0)))
            worker.join(1.0)
        return result["n"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage-s", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=1500.0, help="requests per second")
    parser.add_argument("--restart", action="store_true",
                        help="SIGTERM the daemon halfway through the outage, start it again")
    parser.add_argument("--drain-timeout-s", type=float, default=900.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("run as root (eBPF)", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="spool-outage-"))
    nginx_port, rx_port, health_port = free_port(), free_port(), free_port()
    env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:%d" % rx_port,
           "OTEL_EBPF_EXPORT_OTLP_RETRY_MAX_BACKOFF_S": "1"}
    daemon_args = ("--port", str(nginx_port), "--health-listen", "127.0.0.1:%d" % health_port)
    samples: list[tuple[float, int, int]] = []
    sent = 0
    stop_s = None
    with Nginx(work, nginx_port) as nginx:
        daemon = Daemon(work, *daemon_args, env=env, exporter="otlp")
        daemon.start()
        time.sleep(2.0)
        rss_before = rss_mib(daemon.proc.pid)
        print("collector down; %g s at %g req/s%s" % (
            args.outage_s, args.rate, ", daemon restarted halfway" if args.restart else ""),
            flush=True)
        started = time.monotonic()
        halves = [args.outage_s / 2] * 2 if args.restart else [args.outage_s]
        for n, seconds in enumerate(halves):
            sent += Phase(daemon, health_port, nginx_port).run(sent, seconds, args.rate, samples)
            if args.restart and n == 0:
                time.sleep(1.0)  # the last batch leaves the telemetry stage
                t = time.monotonic()
                rc = daemon.stop()
                stop_s = time.monotonic() - t
                print("SIGTERM: exited %d in %.2f s; %s" % (
                    rc, stop_s, daemon.log.strip().splitlines()[-1]), flush=True)
                daemon = Daemon(work, *daemon_args, env=env, exporter="otlp")
                daemon.start()
        outage_s = time.monotonic() - started
        time.sleep(2.0)
        during = stats(health_port)
        samples.append((rss_mib(daemon.proc.pid), during.get("export.spool.bytes", 0),
                        during.get("export.spool.payloads", 0)))
        print("collector up after %.0f s; %d requests sent" % (outage_s, sent), flush=True)
        rx = CountingReceiver(rx_port)
        t = time.monotonic()
        deadline = t + args.drain_timeout_s
        while time.monotonic() < deadline and len(rx.ours()) < sent:
            time.sleep(1.0)
        drain_s = time.monotonic() - t
        time.sleep(3.0)  # duplicates would show
        after = stats(health_port)
        daemon.stop()
        served = sum(1 for e in nginx.access_log() if e["uri"].startswith(PATH_PREFIX))
    got = rx.ours()
    missing = sent - len(got)
    duplicates = sum(n - 1 for n in got.values() if n > 1)
    peak_rss = max(s[0] for s in samples)
    print(json.dumps({
        "outage_s": round(outage_s, 1), "rate_per_s": args.rate, "restart": args.restart,
        "requests_sent": sent, "nginx_served": served, "spans_received_unique": len(got),
        "missing": missing, "duplicates": duplicates,
        "daemon_rss_before_mib": round(rss_before, 1), "daemon_rss_max_mib": round(peak_rss, 1),
        "daemon_rss_growth_mib": round(peak_rss - rss_before, 1),
        "spool_max_bytes": max(s[1] for s in samples),
        "spool_max_payloads": max(s[2] for s in samples),
        "sigterm_exit_s": None if stop_s is None else round(stop_s, 2),
        "delivery_s": round(drain_s, 1),
        "delivered_from_spool": after.get("export.spool.delivered"),
        "spans_dropped": after.get("export.spans_dropped", 0),
        "capture_lost": sum(v for k, v in after.items() if k.startswith("capture.lost.")),
    }, indent=2))
    return 0 if missing == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
