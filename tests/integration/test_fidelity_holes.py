"""The small fidelity holes, each against real programs through the whole daemon
(`otel-ebpf run --exporter jsonl`, real eBPF; needs root), with the kernel fast path on
and off (one daemon per mode for the module, traced ports only):

- HTTPS one byte at a time: a Python ssl client writes each request one byte per
  SSL_write (nginx's SSL_read then gets one byte per record), or reads each response
  one byte per SSL_read. Both sides reported, exactly N each. The OpenSSL gate must
  gather a stream's first bytes across calls (bpf/openssl.h tls_gate), not give the
  stream up after four 1-byte chunks that do not look like HTTP on their own.
- Long unknown methods: PROPFIND and PROPPATCH (8 and 9 letters, longer than the
  kernel's 8-byte inference can name) from curl -X against a Python server, one
  keep-alive connection each: N sent, N reported on both sides.
- Short-lived processes: a few hundred curl processes, each exiting right after its
  request, and Python clients that exit with os._exit at once, paced over more than one
  of the daemon's process sweeps (every 10 s): every exchange names its process (the
  kernel's task name when /proc is gone), and no jsonl key has a null value.

CONNECTION_RESET (a server resetting with SO_LINGER 0) is tests/integration/test_reset.py.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.integration.peers import (
    Daemon,
    Nginx,
    free_port,
    process,
    self_signed_certificate,
    settle,
)

pytestmark = pytest.mark.usefixtures("bpf_available")

N = 23  # counting tests send a prime number of requests


class Traced:
    """One daemon tracing the module's ports, with the servers it watches."""

    def __init__(self, workdir: Path, fast_path: bool) -> None:
        self.workdir = workdir
        self.fast_path = fast_path
        self.tls_port, self.dav_port, self.plain_port = free_port(), free_port(), free_port()
        self.certs = self_signed_certificate(workdir / "certs")

    def exchanges(self) -> list[dict]:
        """The daemon's jsonl records so far (of the module's ports only: it traces no
        other), once it has written what the kernel reported."""
        settle()
        return self.daemon.exchanges()


@pytest.fixture(scope="module", params=[True, False], ids=["fast_path", "chunk_stream"])
def traced(request, tmp_path_factory):
    t = Traced(tmp_path_factory.mktemp("fidelity"), request.param)
    args = ["--port", str(t.tls_port), "--port", str(t.dav_port), "--port", str(t.plain_port)]
    if not t.fast_path:
        args.append("--no-fast-path")
    with Daemon(t.workdir, *args) as daemon:
        t.daemon = daemon
        yield t
        assert daemon.proc.poll() is None, daemon.log[-3000:]


# ---------------------------------------------------------------------------------------
# HTTPS one byte at a time

TLS_CLIENT = textwrap.dedent('''
    import socket, ssl, sys
    port, n, cafile, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    ctx = ssl.create_default_context(cafile=cafile)
    s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=20),
                        server_hostname="localhost")
    statuses = []
    for i in range(n):
        req = b"GET /index.html?mode=%s&i=%d HTTP/1.1\\r\\nHost: localhost:%d\\r\\n\\r\\n" % (
            mode.encode(), i, port)
        if mode == "write1":
            for b in req:  # one SSL_write per byte
                s.write(bytes([b]))
        else:
            s.write(req)
        resp = b""
        while True:
            head, sep, body = resp.partition(b"\\r\\n\\r\\n")
            if sep:
                length = [int(line.split(b":")[1]) for line in head.split(b"\\r\\n")
                          if line.lower().startswith(b"content-length:")][0]
                if len(body) >= length:
                    break
            got = s.read(1 if mode == "read1" else 65536)  # read1: one SSL_read per byte
            if not got:
                break
            resp += got
        statuses.append(resp.split(b" ", 2)[1].decode())
    s.close()
    print(" ".join(statuses))
''')

TLS_INDEX = b"<html>hello, one byte at a time</html>\n"


@pytest.fixture(scope="module")
def nginx_tls(traced):
    with Nginx(traced.workdir, traced.tls_port, certs=traced.certs, index=TLS_INDEX) as nginx:
        yield nginx


@pytest.mark.parametrize("mode", ["write1", "read1"])
def test_https_one_byte_per_ssl_call_is_reported_by_both_sides(traced, nginx_tls, mode):
    script = traced.workdir / "tls_client.py"
    script.write_text(TLS_CLIENT)
    client = subprocess.run([sys.executable, str(script), str(traced.tls_port), str(N),
                             str(traced.certs[0]), mode],
                            capture_output=True, text=True, timeout=120)
    assert client.returncode == 0, client.stderr
    assert client.stdout.split() == ["200"] * N  # the premise: nginx answered them all
    got = [e for e in traced.exchanges()
           if "mode=%s&" % mode in (e.get("url.query") or "")]
    kinds = collections.Counter(e["kind"] for e in got)
    assert kinds == {"SERVER": N, "CLIENT": N}, (kinds, traced.daemon.log[-3000:])
    for kind in ("SERVER", "CLIENT"):
        queries = sorted(e["url.query"] for e in got if e["kind"] == kind)
        assert queries == sorted("mode=%s&i=%d" % (mode, i) for i in range(N))
    for e in got:
        assert e["url.scheme"] == "https"
        assert e["http.request.method"] == "GET"
        assert e["http.response.status_code"] == 200
        assert e["http.response.body.size"] == len(TLS_INDEX)
        assert "otel_ebpf.outcome" not in e


# ---------------------------------------------------------------------------------------
# Long unknown methods

DAV_SERVER = textwrap.dedent('''
    import sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        def log_message(self, *a): pass
        def _dav(self):
            n = int(self.headers.get("Content-Length") or 0)
            if n:
                self.rfile.read(n)
            body = b"<multistatus>%s %s</multistatus>" % (self.command.encode(),
                                                          self.path.encode())
            self.send_response(207)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        do_PROPFIND = do_PROPPATCH = _dav

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
''')


@pytest.mark.parametrize("method", ["PROPFIND", "PROPPATCH"])
def test_long_unknown_methods_from_curl_are_reported_by_both_sides(traced, method):
    script = traced.workdir / "dav_server.py"
    script.write_text(DAV_SERVER)
    port = traced.dav_port
    urls = ["http://127.0.0.1:%d/dav/%s/%d" % (port, method.lower(), i) for i in range(N)]
    with process([sys.executable, str(script), str(port)], port=port) as server:
        args = ["curl", "-sS", "-X", method, "-w", "%{http_code}\\n"]
        for url in urls:
            args += ["-o", "/dev/null", url]
        out = subprocess.run(args, capture_output=True, text=True, timeout=60, check=True)
        assert out.stdout.split() == ["207"] * N  # one keep-alive connection, N requests
        got = [e for e in traced.exchanges()
               if (e.get("url.path") or "").startswith("/dav/%s/" % method.lower())]
    by_side = {kind: [e for e in got if e["kind"] == kind] for kind in ("SERVER", "CLIENT")}
    assert {k: len(v) for k, v in by_side.items()} == {"SERVER": N, "CLIENT": N}, (
        collections.Counter(e["kind"] for e in got), traced.daemon.log[-3000:])
    assert {e["process.pid"] for e in by_side["SERVER"]} == {server.pid}
    for side in by_side.values():
        assert sorted(e["url.path"] for e in side) == sorted(
            "/dav/%s/%d" % (method.lower(), i) for i in range(N))
    for e in got:
        # not one of the methods the semantic conventions know: _OTHER and the original
        assert e["http.request.method"] == "_OTHER", e
        assert e["http.request.method_original"] == method, e
        assert e["http.response.status_code"] == 207
        assert "otel_ebpf.outcome" not in e


# ---------------------------------------------------------------------------------------
# Short-lived processes keep their names

CURLS = 331
PY_CLIENTS = 31
SPAN_S = 12.0  # longer than the daemon's process sweep interval (10 s)

EXITING_CLIENT = textwrap.dedent('''
    import os, socket, sys
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.sendall(b"GET /index.html?py=%s HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n"
              % sys.argv[2].encode())
    got = b""
    while b"</html>" not in got:
        part = s.recv(65536)
        if not part:
            break
        got += part
    os.write(1, got.split(b" ", 2)[1] + b"\\n")
    os._exit(0)  # no close, no interpreter teardown: the kernel closes the socket
''')


def test_short_lived_clients_keep_their_process_name(traced):
    port = traced.plain_port
    script = traced.workdir / "exiting_client.py"
    script.write_text(EXITING_CLIENT)
    url = "http://127.0.0.1:%d/index.html?curl=%d"
    jobs = [["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url % (port, i)]
            for i in range(CURLS)]
    jobs += [[sys.executable, str(script), str(port), str(i)] for i in range(PY_CLIENTS)]
    pace = SPAN_S / len(jobs)

    def run(args: list[str]) -> str:
        return subprocess.run(args, capture_output=True, text=True, timeout=60,
                              check=True).stdout.strip()

    with Nginx(traced.workdir / "short", port), \
            concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = []
        for args in jobs:  # paced: the runs straddle at least one sweep
            futures.append(pool.submit(run, args))
            time.sleep(pace)
        codes = [f.result() for f in futures]
        assert codes == ["200"] * len(jobs)
        got = traced.exchanges()
    got = [e for e in got if (e.get("url.query") or "").startswith(("curl=", "py="))]
    clients = [e for e in got if e["kind"] == "CLIENT"]
    curl = [e for e in clients if e["url.query"].startswith("curl=")]
    py = [e for e in clients if e["url.query"].startswith("py=")]
    servers = [e for e in got if e["kind"] == "SERVER"]
    assert (len(curl), len(py), len(servers)) == (CURLS, PY_CLIENTS, CURLS + PY_CLIENTS), (
        traced.daemon.log[-3000:])
    assert len({e["process.pid"] for e in curl + py}) == CURLS + PY_CLIENTS
    assert {e.get("process.executable.name") for e in servers} == {"nginx"}
    names = collections.Counter(e.get("process.executable.name") for e in clients)
    # from /proc (the executable's name) or, once it is gone, the kernel's task name
    python_names = {os.path.basename(os.path.realpath(sys.executable)),
                    os.path.basename(sys.executable)[:15]}
    assert names["curl"] == CURLS, names
    assert sum(names[n] for n in python_names) == PY_CLIENTS, names
    for e in got:
        nulls = sorted(k for k, v in e.items() if v is None)
        assert not nulls, (nulls, e)
        assert e["process.executable.name"], e
