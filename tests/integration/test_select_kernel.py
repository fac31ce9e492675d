"""Selection by port in the kernel: what `--port` excludes costs no ring-buffer record.

The daemon runs with `--port A` while nginx on another port B serves busy HTTPS
traffic (wrk over a few keep-alive connections, plus many short curl connections):
the exchanges on A are exact, none on B are reported, the daemon's ring-buffer record
count stays at what A's own traffic needs, and the kernel's drop counter
(capture.select.dropped_connections) shows B's connections were dropped there, not in
user space.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

from otel_ebpf.capture.events import ConnOpenEvent, DataEvent
from otel_ebpf.capture.loader import Capture, CaptureOptions
from otel_ebpf.stats import Stats
from tests.conftest import require_or_fail
from tests.integration.peers import (
    Daemon,
    Nginx,
    curl,
    free_port,
    python_http_server,
    self_signed_certificate,
    settle,
)

pytestmark = pytest.mark.usefixtures("bpf_available")

N = 23  # exchanges on the selected port, exact
B_CURLS = 200  # short HTTPS connections to the unselected port
WRK_S = 3
# Ring-buffer records the daemon may see beyond A's own (fast path: one per exchange
# and side; the chunk stream a handful more): B's traffic must stay below this.
B_RECORD_BUDGET = 100


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which("/usr/sbin/" + name)
    if path is None:
        require_or_fail("%s is not installed (scripts/bootstrap.sh --test-peers installs it)"
                        % name)
    return path


def _stats(port: int) -> dict:
    with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=5) as resp:
        return _flatten(json.load(resp))


def _flatten(obj: object, prefix: str = "") -> dict:
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = "%s.%s" % (prefix, k) if prefix else str(k)
            out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def _stat(stats: dict, name: str) -> int:
    """A counter from /stats, wherever its JSON nests it."""
    hits = [v for k, v in stats.items() if k == name or k.endswith("." + name)]
    assert hits, "no %s in /stats: %s" % (name, sorted(stats))
    return int(hits[0])


def test_port_selection_drops_other_ports_in_the_kernel(tmp_path):
    wrk, _ = _tool("wrk"), _tool("nginx")
    _tool("openssl")
    port_a, port_b, health = free_port(), free_port(), free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a").write_text("selected\n")
    nginx = Nginx(tmp_path, port_b, certs=self_signed_certificate(tmp_path / "certs"))
    url_b = "https://127.0.0.1:%d/" % port_b
    with python_http_server(tmp_path / "www", port_a), nginx, \
            Daemon(tmp_path, "--port", str(port_a), "--health-listen",
                   "127.0.0.1:%d" % health, "--log-level", "info") as daemon:
        busy = subprocess.Popen([wrk, "-t1", "-c4", "-d%ds" % WRK_S, url_b],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        t0 = time.monotonic()
        for i in range(N):  # while B is busy
            assert curl("http://127.0.0.1:%d/a?i=%d" % (port_a, i)).stdout == "200"
        for _ in range(B_CURLS):
            assert curl(url_b, "-k").stdout == "200"
        wrk_out, _ = busy.communicate(timeout=WRK_S + 60)
        assert busy.returncode == 0, wrk_out
        b_seconds = time.monotonic() - t0
        settle(2.0)
        stats = _stats(health)
        assert daemon.stop() == 0, daemon.log[-3000:]

    served_b = len(nginx.access_log())
    got = daemon.exchanges()
    on_a = [e for e in got if e.get("server.port") == port_a
            or e.get("network.peer.port") == port_a]
    on_b = [e for e in got if port_b in (e.get("server.port"), e.get("network.peer.port"),
                                        e.get("client.port"))]
    events = _stat(stats, "capture.events")
    dropped = _stat(stats, "capture.select.dropped_connections")
    final = re.findall(r"final stats: events=(\d+)", daemon.log)
    summary = ("nginx on B served %d HTTPS requests in %.1f s; exchanges on A: %d SERVER, %d "
               "CLIENT; on B: %d; ring-buffer records %d (final line %s); connections dropped "
               "in the kernel %d; kernel fast-path exchanges %s; conntrack.filtered %s"
               % (served_b, b_seconds, sum(e["kind"] == "SERVER" for e in on_a),
                  sum(e["kind"] == "CLIENT" for e in on_a), len(on_b), events, final, dropped,
                  stats.get("capture.fast.exchanges"), stats.get("conntrack.filtered")))
    print(summary)
    assert served_b >= 1000 + B_CURLS, summary + "\n" + wrk_out
    assert not on_b, summary + " %s" % on_b[:2]
    srv = sorted(e["url.query"] for e in on_a if e["kind"] == "SERVER")
    cli = sorted(e["url.query"] for e in on_a if e["kind"] == "CLIENT")
    want = sorted("i=%d" % i for i in range(N))
    assert srv == want, summary
    assert cli == want, summary
    assert all(e["http.response.status_code"] == 200 for e in on_a), summary
    # B's connections: wrk's 4 and the curls', each seen on both sides (client, nginx).
    assert dropped >= 2 * (B_CURLS + 4), summary
    # A's exchanges need a few records each (one per side on the fast path).
    assert events < 2 * N * 6 + B_RECORD_BUDGET, summary


def _drain(cap: Capture, events: list, quiet_s: float = 0.5, limit_s: float = 10.0) -> list:
    deadline, last = time.monotonic() + limit_s, time.monotonic()
    while time.monotonic() < deadline:
        if cap.poll(50):
            last = time.monotonic()
        elif time.monotonic() - last > quiet_s:
            break
    out = list(events)
    events.clear()
    return out


def test_port_filter_on_the_chunk_stream_and_changed_at_runtime(tmp_path):
    """The chunk stream (no fast path): a deselected connection gets no CONN_OPEN and no
    DATA; set_port_filter() changes the selection for connections opened afterwards."""
    port_a, port_b = free_port(), free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "x").write_text("x\n")
    events: list = []
    cap = Capture(CaptureOptions(tls=False, fast_path=False, ports=frozenset({port_a})), Stats())
    with python_http_server(tmp_path / "www", port_a) as a, \
            python_http_server(tmp_path / "www", port_b) as b:
        cap.start(events.append)
        try:
            def run(selected: int, other: int) -> tuple[list, list, int]:
                before = cap.loss_counters()["select_dropped"]
                for i in range(N):
                    curl("http://127.0.0.1:%d/x?i=%d" % (port_a, i))
                    curl("http://127.0.0.1:%d/x?i=%d" % (port_b, i))
                got = _drain(cap, events)
                ours = [e for e in got if e.tgid in (a.pid, b.pid)]
                return ([e for e in ours if e.tgid == selected], [e for e in ours if e.tgid == other],
                        cap.loss_counters()["select_dropped"] - before)

            for selected, other in ((a.pid, b.pid), (b.pid, a.pid)):
                on, off, dropped = run(selected, other)
                opens = [e for e in on if isinstance(e, ConnOpenEvent)]
                requests = [e for e in on if isinstance(e, DataEvent)
                            and e.data.startswith(b"GET /x?i=")]
                assert len(opens) == N and len(requests) == N, on[:4]
                assert off == [], off[:4]
                # the other server's N connections, and curl's N to it
                assert dropped >= 2 * N
                cap.set_port_filter({port_b})
            cap.set_port_filter(None)
            on, off, dropped = run(a.pid, b.pid)
            assert dropped == 0
            assert len([e for e in on + off if isinstance(e, ConnOpenEvent)]) == 2 * N
        finally:
            cap.close()
