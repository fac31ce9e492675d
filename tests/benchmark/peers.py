"""The real programs the benchmark drives: nginx, a 1 ms-CPU Node.js server, wrk, the
rotel OTLP receiver, and a client that holds thousands of keep-alive connections open.

Contract: each peer is a context manager that starts a real process on loopback in the
run's temp dir and stops it on exit. wrk results come from a Lua `done()` hook that
prints exact counts and percentiles (microseconds) as one JSON line, so nothing is
scraped from wrk's human-readable, unit-rounded table. The receiver counts the spans
and metric data points it received from its own log lines, and in `detailed` mode
timestamps every span's arrival for the freshness measurement.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.benchmark.proc import BenchmarkError, Proc, free_port, wait_port
from tests.receiver import rotel_binary

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------- nginx

NGINX_CONF = """\
user root;
worker_processes {workers};
worker_rlimit_nofile 65536;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    # wrk's connections stay up for the whole run (no reconnect every 1000 requests).
    keepalive_requests 100000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/www;
        location / {{ }}
        # Requests served so far, read while wrk runs (independent of the daemon).
        location = /nginx_status {{ stub_status; }}
    }}
}}
"""

# The size of nginx's stock index.html: a small static file, the worst case for
# relative overhead (nginx does almost nothing per request).
INDEX_HTML = b"<!DOCTYPE html>\n<html><head><title>bench</title></head><body>" + b"x" * 540 + \
    b"</body></html>\n"


class Nginx:
    def __init__(self, workdir: Path, workers: int | str = "auto",
                 cpus: set[int] | None = None) -> None:
        self.dir = workdir / ("nginx-%d" % free_port())
        (self.dir / "www").mkdir(parents=True)
        self.port = free_port()
        (self.dir / "nginx.conf").write_text(
            NGINX_CONF.format(dir=self.dir, port=self.port, workers=workers))
        (self.dir / "www" / "index.html").write_bytes(INDEX_HTML)
        exe = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = Proc("nginx", [exe, "-c", str(self.dir / "nginx.conf"), "-p", str(self.dir),
                                   "-g", "daemon off;"], workdir, cpus=cpus)
        self.url = "http://127.0.0.1:%d/index.html" % self.port
        self.workers = (os.cpu_count() or 1) if workers == "auto" else int(workers)

    def __enter__(self) -> Nginx:
        self.proc.start()
        wait_port(self.port, proc=self.proc.proc, what="nginx")
        # The daemon is told the workers' pids: all of them must exist first.
        deadline = time.monotonic() + 10
        while len(children(self.proc.pid)) < self.workers:
            if time.monotonic() > deadline:
                raise BenchmarkError("nginx started %d of %d workers in 10s: %s"
                                     % (len(children(self.proc.pid)), self.workers,
                                        self.proc.tail(500)))
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stop(timeout=15)

    def requests(self) -> int:
        """Requests nginx has served (stub_status; this read itself counts as one)."""
        import urllib.request
        url = "http://127.0.0.1:%d/nginx_status" % self.port
        with urllib.request.urlopen(url, timeout=5) as resp:
            lines = resp.read().decode().splitlines()
        # "server accepts handled requests" / " 16 16 31070"
        return int(lines[2].split()[2])

    def pids(self) -> list[int]:
        """The master and its workers (the processes that serve requests)."""
        return [self.proc.pid, *children(self.proc.pid)]


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir("/proc/%d/task" % pid):
            with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


# ---------------------------------------------------------------- 1 ms CPU server

BUSY_JS = HERE / "busy_server.js"


class BusyServer:
    """Node.js `http` doing ~1 ms of CPU work per request (single-threaded, libuv)."""

    def __init__(self, workdir: Path, work_us: int = 1000, cpus: set[int] | None = None) -> None:
        self.port = free_port()
        node = shutil.which("node") or shutil.which("nodejs")
        if not node:
            raise BenchmarkError("node is not installed: run scripts/bootstrap.sh --test-peers")
        self.proc = Proc("busy-server", [node, str(BUSY_JS), str(self.port), str(work_us)],
                         workdir, cpus=cpus)
        self.url = "http://127.0.0.1:%d/work" % self.port

    def __enter__(self) -> BusyServer:
        self.proc.start()
        wait_port(self.port, proc=self.proc.proc, what="node busy server")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stop(timeout=15)

    def pids(self) -> list[int]:
        return [self.proc.pid]


# ---------------------------------------------------------------- wrk

WRK_LUA = HERE / "wrk_report.lua"


@dataclass(frozen=True)
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_us: float
    p99_us: float
    mean_us: float
    errors: int           # socket errors of any kind
    bad_status: int       # non-2xx/3xx

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def run_wrk(url: str, duration_s: float, connections: int = 16, threads: int = 2,
            delay_ms: int = 0, cpus: set[int] | None = None, logdir: Path | None = None,
            timeout_s: float = 5.0) -> WrkResult:
    """wrk --latency for `duration_s`; `delay_ms` paces each connection (wrk has no -R)."""
    exe = shutil.which("wrk")
    if not exe:
        raise BenchmarkError("wrk is not installed: run scripts/bootstrap.sh --test-peers")
    threads = max(1, min(threads, connections))
    argv = [exe, "-t%d" % threads, "-c%d" % connections, "-d%ds" % max(1, round(duration_s)),
            "--timeout", "%ds" % timeout_s, "--latency", "-s", str(WRK_LUA), url]
    env = {**os.environ, "BENCH_DELAY_MS": str(delay_ms)}
    preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    res = subprocess.run(argv, capture_output=True, text=True, env=env, preexec_fn=preexec,
                         timeout=duration_s + 60)
    if logdir is not None:
        with open(logdir / "wrk.log", "a") as f:
            f.write(" ".join(argv) + "\n" + res.stdout + res.stderr + "\n")
    for line in res.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            d = json.loads(line[len("BENCH_JSON "):])
            dur = d["duration_us"] / 1e6
            return WrkResult(
                requests=d["requests"], duration_s=dur,
                rps=d["requests"] / dur if dur > 0 else 0.0,
                p50_us=d["p50_us"], p99_us=d["p99_us"], mean_us=d["mean_us"],
                errors=d["connect"] + d["read"] + d["write"] + d["timeout"],
                bad_status=d["status"])
    raise BenchmarkError("wrk against %s printed no result (exit %s): %s"
                         % (url, res.returncode, (res.stderr or res.stdout)[-500:]))


def start_wrk(url: str, duration_s: float, connections: int, threads: int, workdir: Path,
              delay_ms: int = 0, cpus: set[int] | None = None) -> Proc:
    """wrk in the background (for runs stopped early, e.g. once 1M exchanges were seen)."""
    exe = shutil.which("wrk") or "wrk"
    return Proc("wrk-bg", [exe, "-t%d" % threads, "-c%d" % connections,
                           "-d%ds" % max(1, round(duration_s)), "-s", str(WRK_LUA), url],
                workdir, cpus=cpus, env={"BENCH_DELAY_MS": str(delay_ms)}).start()


# ---------------------------------------------------------------- rotel receiver

ANSI = re.compile(r"\x1b\[[0-9;]*m")
RECEIVED = re.compile(r"Received (traces|metrics)\..*?\b(spans|metrics|data_points)=(\d+)")
END_TIME = re.compile(r"^\s*End time\s*:\s*(\d+)")


class Receiver:
    """rotel-agent with the blackhole exporter; counts what arrives from its debug log.

    mode="count": one log line per OTLP request ("Received traces ... spans=N").
    mode="detailed": every span dumped; each "End time" line is timestamped on arrival
    (rotel's stdout is line-buffered, read by a thread here) for freshness.
    """

    def __init__(self, workdir: Path, mode: str = "count", cpus: set[int] | None = None) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.mode = mode
        self.spans = 0
        self.requests = 0
        self.metric_requests = 0
        self.arrivals: list[tuple[int, int]] = []   # (span end ns, arrival ns), wall clock
        self._lock = threading.Lock()
        tag = "rotel-%d" % self.grpc_port
        argv = [rotel_binary(), "start",
                "--otlp-grpc-endpoint", "127.0.0.1:%d" % self.grpc_port,
                "--otlp-http-endpoint", "127.0.0.1:%d" % self.http_port,
                "--exporter", "blackhole",
                "--debug-log", "traces", "--debug-log", "metrics",
                "--debug-log-verbosity", "detailed" if mode == "detailed" else "basic",
                "--pid-file", str(workdir / (tag + ".pid")),
                "--log-file", str(workdir / (tag + ".log"))]
        self.proc = Proc(tag, argv, workdir, cpus=cpus, stdout=subprocess.PIPE,
                         env={"NO_COLOR": "1", "RUST_LOG": "info"})
        self.grpc_endpoint = "http://127.0.0.1:%d" % self.grpc_port
        self.http_endpoint = "http://127.0.0.1:%d" % self.http_port

    def __enter__(self) -> Receiver:
        self.proc.start()
        self._reader = threading.Thread(target=self._read, name="rotel-reader", daemon=True)
        self._reader.start()
        wait_port(self.grpc_port, proc=self.proc.proc, what="rotel-agent")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stop(timeout=15)
        self._reader.join(5)

    def _read(self) -> None:
        assert self.proc.proc is not None and self.proc.proc.stdout is not None
        detailed = self.mode == "detailed"
        for raw in self.proc.proc.stdout:
            now = time.time_ns()
            line = ANSI.sub("", raw.decode(errors="replace"))
            if detailed:
                m = END_TIME.match(line)
                if m:
                    with self._lock:
                        self.arrivals.append((int(m.group(1)), now))
                        self.spans += 1
                    continue
            m = RECEIVED.search(line)
            if m:
                with self._lock:
                    if m.group(1) == "traces":
                        self.requests += 1
                        if not detailed:
                            self.spans += int(m.group(3))
                    else:
                        self.metric_requests += 1

    def span_count(self) -> int:
        with self._lock:
            return self.spans

    def settle(self, quiet_s: float = 0.5, timeout_s: float = 10.0) -> int:
        """Span count once it stopped moving (our reader may trail rotel's output)."""
        deadline = time.monotonic() + timeout_s
        last = self.span_count()
        while time.monotonic() < deadline:
            time.sleep(quiet_s)
            now = self.span_count()
            if now == last:
                break
            last = now
        return last

    def take_arrivals(self) -> list[tuple[int, int]]:
        with self._lock:
            out, self.arrivals = self.arrivals, []
            return out


# ---------------------------------------------------------------- held connections

HOLD_SCRIPT = HERE / "hold_conns.py"


class HeldConnections:
    """A separate Python process that opens N keep-alive connections, sends one request
    on each, and keeps them all open until stopped."""

    def __init__(self, workdir: Path, port: int, count: int,
                 cpus: set[int] | None = None) -> None:
        self.count = count
        self.proc = Proc("hold-conns", [sys.executable, str(HOLD_SCRIPT), str(port), str(count)],
                         workdir, cpus=cpus, stdout=subprocess.PIPE)
        self.held = 0

    def __enter__(self) -> HeldConnections:
        self.proc.start()
        assert self.proc.proc is not None and self.proc.proc.stdout is not None
        line = self.proc.proc.stdout.readline().decode().strip()   # blocks until all are open
        if not line.startswith("HELD "):
            self.proc.stop()
            raise BenchmarkError("could not open %d connections: %s %s"
                                 % (self.count, line, self.proc.tail(800)))
        self.held = int(line.split()[1])
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stop(timeout=30)
