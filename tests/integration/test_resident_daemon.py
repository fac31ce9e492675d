"""The resident daemon holds no compiler: memory, start-up and shutdown (issue 10).

One real `otel-ebpf run --exporter jsonl` (BPF compiled by its short-lived compile
step). Once it is ready:
- no process of the daemon's tree maps libLLVM, libclang or libbcc (/proc/PID/maps),
  and the compile step is gone;
- plaintext capture is exact: 23 curl requests to a Python http.server, 23 server and
  23 client exchanges;
- a TLS library that appears after start (a private copy of libssl: a new inode no
  probe covers yet, loaded by a Python HTTPS server started now) is attached by the
  daemon without BCC and its 23 HTTPS exchanges are reported;
- SIGTERM under load: the daemon exits, having written what it captured.
Printed (pytest -s): time to ready, RSS idle summed over the daemon's processes,
SIGTERM-to-exit under load.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.peers import Daemon, curl, free_port, process, python_http_server, settle
from tests.integration.test_tls import (  # noqa: F401  (certs is a fixture)
    PY_TLS_CLIENT,
    PY_TLS_SERVER,
    certs,
)

pytestmark = pytest.mark.usefixtures("bpf_available")

N = 23
LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
COMPILER = re.compile(r"libLLVM|libclang|libbcc")
# A client that keeps the plaintext server busy until killed: the load under which the
# daemon gets its SIGTERM.
LOAD = textwrap.dedent("""
    import http.client, sys
    port = int(sys.argv[1])
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port)
        for _ in range(50):
            conn.request("GET", "/hello.txt?load=1")
            conn.getresponse().read()
        conn.close()
""")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc/PID/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def compiler_mappings(pid: int) -> list[str]:
    return sorted({line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                   if COMPILER.search(line)})


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(what)


def test_resident_daemon_without_compiler_captures_plaintext_and_late_tls(tmp_path, certs):
    port, tls_port = free_port(), free_port()
    www = tmp_path / "www"
    www.mkdir()
    (www / "hello.txt").write_bytes(b"hello world\n" * 100)
    # A libssl no probe covers yet: its own inode, in no loader cache, mapped by nobody.
    libdir = tmp_path / "late-tls"
    libdir.mkdir()
    shutil.copy2(LIBSSL, libdir / "libssl.so.3")
    late_env = {"LD_LIBRARY_PATH": str(libdir)}

    with python_http_server(www, port) as server:
        daemon = Daemon(tmp_path, "--port", str(port), "--port", str(tls_port))
        started = time.monotonic()
        daemon.start()
        ready_s = time.monotonic() - started
        try:
            time.sleep(2.0)  # idle
            tree = process_tree(daemon.proc.pid)
            assert tree == [daemon.proc.pid], f"compile step still alive: {tree}"
            for pid in tree:
                assert compiler_mappings(pid) == [], f"pid {pid} maps the compiler"
            rss_mb = sum(vm_rss_kib(pid) for pid in tree) / 1024

            for i in range(N):
                assert curl(f"http://127.0.0.1:{port}/hello.txt?i={i}").stdout == "200"

            server_script = tmp_path / "tls_server.py"
            server_script.write_text(PY_TLS_SERVER)
            client_script = tmp_path / "tls_client.py"
            client_script.write_text(PY_TLS_CLIENT)
            with process([sys.executable, str(server_script), str(tls_port), str(certs[0]),
                          str(certs[1])], port=tls_port, env=late_env,
                         log_path=tmp_path / "tls_server.log"):
                late = str(libdir / "libssl.so.3")
                wait_for(lambda: f"attached 10 probes to {late}" in daemon.log, 10.0,
                         f"the daemon never attached {late}:\n{daemon.log[-3000:]}")
                client = subprocess.run(
                    [sys.executable, str(client_script), str(tls_port), str(certs[0]), str(N)],
                    env={**os.environ, **late_env}, capture_output=True, text=True,
                    timeout=60, check=True)
                assert client.stdout.count("[") == N + 1  # N [status, size] pairs
                settle()

            with process([sys.executable, "-c", LOAD, str(port)]):
                time.sleep(1.0)
                assert daemon.proc.poll() is None
                stopping = time.monotonic()
                daemon.proc.send_signal(signal.SIGTERM)
                daemon.proc.wait(30)
                stop_s = time.monotonic() - stopping
        finally:
            if daemon.proc.poll() is None:
                daemon.stop()
        assert daemon.proc.returncode == 0, daemon.log[-3000:]

    got = daemon.exchanges()
    plain = [e for e in got if e["kind"] == "SERVER" and e.get("url.scheme") == "http"
             and "i=" in (e.get("url.query") or "")]
    assert len(plain) == N, daemon.log[-3000:]
    assert sorted(e["url.query"] for e in plain) == sorted(f"i={i}" for i in range(N))
    plain_clients = [e for e in got if e["kind"] == "CLIENT" and e.get("network.peer.port") == port
                     and "i=" in (e.get("url.query") or "")]
    assert len(plain_clients) == N
    tls = [e for e in got if e["kind"] == "SERVER" and e.get("url.scheme") == "https"]
    assert len(tls) == N, daemon.log[-3000:]
    under_load = [e for e in got if "load=1" in (e.get("url.query") or "")]
    assert under_load, "nothing captured under load before the SIGTERM"
    print(f"\nresident daemon: ready in {ready_s:.1f} s; RSS idle {rss_mb:.1f} MB "
          f"(VmRSS summed over {len(tree)} process(es)); SIGTERM to exit under load "
          f"{stop_s * 1000:.0f} ms ({len(under_load)} exchanges under load written)")
