"""TLS capture end to end: real OpenSSL programs, real uprobes, real certificates.

Every test runs the real kernel side (bpf/syscalls.c with -DWITH_OPENSSL through
otel_ebpf.capture.loader.Capture), attaches the OpenSSL uprobes with TlsAttacher, drives
real TLS peers on loopback with a certificate generated here, and checks what came out:
the raw DataEvents (plaintext with source OPENSSL, no ciphertext from the syscall
path) and the HttpExchange records built from them by conntrack + http1, with exact
methods, paths, status codes, body sizes and counts (23 requests, 23 exchanges).

Programs: nginx (system libssl.so.3, SSL_read/SSL_write), a Python ssl server and
client (libssl.so.3 through _ssl, SSL_read_ex/SSL_write_ex), curl (libcurl's libssl),
a Node.js https server (OpenSSL linked statically into `node`, memory BIOs: no fd).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.capture.events import ConnOpenEvent, DataEvent, Direction, Role, Source
from otel_ebpf.stats import Stats

from .peers import Nginx, free_port, process, self_signed_certificate

N = 23  # counting tests send a prime number of requests


# ---------------------------------------------------------------------------------------
# Certificates and peers


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    return self_signed_certificate(tmp_path_factory.mktemp("certs"))


INDEX = b"<html>hello from nginx over TLS</html>\n"
BIG = 1 << 20


@contextlib.contextmanager
def nginx_tls(workdir: Path, certs: tuple[Path, Path]) -> Iterator[tuple[int, Path]]:
    port = free_port()
    with Nginx(workdir, port, certs=certs, index=INDEX) as nginx:
        yield port, nginx.dir
        assert nginx.proc.poll() is None, (nginx.dir / "error.log").read_text()


PY_TLS_SERVER = textwrap.dedent('''
    import ssl, sys
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive
        def log_message(self, *a): pass
        def do_GET(self):
            if self.path.startswith("/bytes/"):
                body = b"y" * int(self.path.split("/")[2].split("?")[0])
            else:
                body = b"hello over tls"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            data = self.rfile.read(n)
            reply = b"got %d" % len(data)
            self.send_response(201)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

    port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
    srv.serve_forever()
''')

PY_TLS_CLIENT = textwrap.dedent('''
    import http.client, json, ssl, sys
    port, cert, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    ctx = ssl.create_default_context(cafile=cert)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx)
    done = []
    for i in range(n):
        if i % 2:
            body = b"p" * (100 + i)
            conn.request("POST", "/submit/%d" % i, body=body)
        else:
            conn.request("GET", "/bytes/%d?i=%d" % (1000 + i, i))
        r = conn.getresponse()
        data = r.read()
        done.append([r.status, len(data)])
    conn.close()
    print(json.dumps(done))
''')


@contextlib.contextmanager
def python_tls_server(workdir: Path, certs: tuple[Path, Path]) -> Iterator[tuple[int, subprocess.Popen]]:
    script = workdir / "py_tls_server.py"
    script.write_text(PY_TLS_SERVER)
    port = free_port()
    with process([sys.executable, str(script), str(port), str(certs[0]), str(certs[1])],
                 port=port, log_path=workdir / "py_tls_server.log") as proc:
        yield port, proc


def run_traced(recorder, args: list[str], timeout: float = 120.0) -> tuple[int, str]:
    """Run a client to completion with its pid in the capture's pid filter from its very
    first instruction: a shell waits on stdin, the pid is added, then it execs the client
    (exec keeps the pid). Returns (pid, stdout)."""
    proc = subprocess.Popen(["sh", "-c", 'read _ && exec "$@"', "gate", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    recorder.trace({proc.pid})
    out, err = proc.communicate("go\n", timeout=timeout)
    assert proc.returncode == 0, err
    return proc.pid, out


def python_tls_client(recorder, workdir: Path, port: int, cert: Path, n: int) -> tuple[int, list]:
    """Runs the client to completion; returns (its pid, [[status, body length], ...])."""
    script = workdir / "py_tls_client.py"
    script.write_text(PY_TLS_CLIENT)
    pid, out = run_traced(recorder, [sys.executable, str(script), str(port), str(cert), str(n)])
    return pid, json.loads(out)


NODE_TLS_SERVER = textwrap.dedent('''
    const https = require("https");
    const fs = require("fs");
    const [port, cert, key] = [parseInt(process.argv[2]), process.argv[3], process.argv[4]];
    https.createServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)}, (req, res) => {
      let received = 0;
      req.on("data", (c) => { received += c.length; });
      req.on("end", () => {
        const body = "node says " + req.url + " after " + received;
        res.writeHead(200, {"Content-Length": Buffer.byteLength(body)});
        res.end(body);
      });
    }).listen(port, "127.0.0.1");
''')


@contextlib.contextmanager
def node_tls_server(workdir: Path, certs: tuple[Path, Path]) -> Iterator[tuple[int, subprocess.Popen]]:
    script = workdir / "node_tls_server.js"
    script.write_text(NODE_TLS_SERVER)
    port = free_port()
    with process(["node", str(script), str(port), str(certs[0]), str(certs[1])], port=port,
                 log_path=workdir / "node_tls_server.log") as proc:
        yield port, proc


def curl_https(recorder, urls: list[str], cert: Path, *extra: str) -> tuple[int, list[str]]:
    """One curl process fetching `urls` over one kept-alive TLS connection (HTTP/1.1)."""
    args = ["curl", "--http1.1", "-sS", "--cacert", str(cert), *extra]
    for url in urls:
        args += ["-o", "/dev/null", "-w", "%{http_code} %{size_download}\\n", url]
    pid, out = run_traced(recorder, args)
    return pid, out.split("\n")[:-1]



def node_exports_openssl() -> bool:
    """NodeSource/official node links OpenSSL in and exports it; Debian's uses libssl."""
    from otel_ebpf.capture.tls import read_elf_info

    node = shutil.which("node")
    return node is not None and "SSL_read" in read_elf_info(os.path.realpath(node)).defined


def tree_pids(pid: int) -> set[int]:
    import psutil

    p = psutil.Process(pid)
    return {pid} | {c.pid for c in p.children(recursive=True)}


# ---------------------------------------------------------------------------------------
# The capture under test: one BPF object for the module, drained by a background thread
# into a list of events and, through a live ConnectionTable, a list of exchanges. The
# kernel fast path is off: these tests look at the OpenSSL plaintext chunk stream itself
# (test_tls_daemon.py and test_fast_path.py run HTTPS through the fast path).


class Recorder:
    def __init__(self) -> None:
        from otel_ebpf.capture.loader import Capture, CaptureOptions
        from otel_ebpf.capture.tls import TlsAttacher
        from otel_ebpf.conntrack import ConnectionTable, ConntrackOptions

        self.stats = Stats()
        self.events: list = []
        self.exchanges: list = []
        self._lock = threading.Lock()
        self.table = ConnectionTable(ConntrackOptions(request_timeout_s=30.0), self.stats)
        self.capture = Capture(CaptureOptions(tls=True, fast_path=False), self.stats)
        self.capture.start(self._on_event)
        # The daemon's own pid is never traced: filtering on it alone traces nothing.
        self._traced = {os.getpid()}
        self.capture.set_pid_filter(self._traced)
        self.tls = TlsAttacher(self.capture, self.stats)
        self.tls.scan()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tls-test-poll", daemon=True)
        self._thread.start()

    def trace(self, pids: set[int]) -> None:
        """Add processes to the kernel pid filter. Only the test's own peers are traced,
        so other work on the machine cannot fill the ring buffer under our counts."""
        self._traced |= pids
        self.capture.set_pid_filter(self._traced)

    def _on_event(self, event) -> None:
        out = self.table.handle(event)
        with self._lock:
            self.events.append(event)
            self.exchanges.extend(out)

    def _run(self) -> None:
        # What the daemon loop does: poll, tick() every iteration, scan() every 2 s.
        next_scan = time.monotonic() + 2.0
        while not self._stop.is_set():
            self.capture.poll(50)
            self.tls.tick()
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + 2.0
                self.tls.scan()

    def wait_attached(self, path: str, timeout: float = 5.0) -> float:
        """Seconds until `path` shows up in attached() (fails after `timeout`)."""
        start = time.monotonic()
        real = os.path.realpath(path)
        while time.monotonic() - start < timeout:
            if any(os.path.realpath(p) == real for p, _ in self.tls.attached()):
                return time.monotonic() - start
            time.sleep(0.01)
        pytest.fail("%s not attached within %ss; attached: %s"
                    % (real, timeout, self.tls.attached()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.tls.close()
        self.capture.detach()
        self.capture.close()

    def events_of(self, pids: set[int]) -> list:
        with self._lock:
            return [e for e in self.events if e.tgid in pids]

    def exchanges_of(self, pids: set[int]) -> list:
        with self._lock:
            return [x for x in self.exchanges if x.pid in pids]

    def wait_exchanges(self, pids: set[int], count: int, timeout: float = 15.0) -> list:
        """The exchanges of `pids` once `count` arrived (or what there is at the timeout,
        after one more second to catch extras that should not be there)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.exchanges_of(pids)) < count:
            time.sleep(0.05)
        time.sleep(1.0)  # duplicates or phantoms would show up in this second
        found = sorted(self.exchanges_of(pids), key=lambda x: x.start_time_unix_nano)
        if len(found) != count:
            print("MISMATCH pids %s: %d exchanges, expected %d; kernel %s; stats %s" % (
                pids, len(found), count, self.capture.loss_counters(),
                {k: v for k, v in self.stats.snapshot().items() if v}))
            for x in found:
                print("  ", x.role.name, x.method, x.target, x.status_code, x.outcome.value)
        return found


@pytest.fixture(scope="module")
def recorder(bpf_available) -> Iterator[Recorder]:
    rec = Recorder()
    try:
        yield rec
    finally:
        rec.close()


def plaintext(events: list, direction: Direction) -> bytes:
    """OPENSSL plaintext per direction, concatenated in stream order per connection."""
    chunks = [e for e in events if isinstance(e, DataEvent) and e.source == Source.OPENSSL
              and e.direction == direction]
    chunks.sort(key=lambda e: (e.key, e.position))
    return b"".join(e.data for e in chunks)


def assert_no_ciphertext_events(events: list) -> None:
    """The syscall path must not emit what it saw of a TLS connection: those bytes are
    ciphertext (the hook swallows them inside SSL calls, inference rejects the rest)."""
    syscall_data = [e for e in events if isinstance(e, DataEvent) and e.source == Source.SYSCALL]
    assert syscall_data == [], [(e.fd, e.direction, e.data[:16]) for e in syscall_data][:5]


def by_direction_sizes(events: list, direction: Direction) -> int:
    return sum(e.size for e in events if isinstance(e, DataEvent)
               and e.source == Source.OPENSSL and e.direction == direction)


# ---------------------------------------------------------------------------------------
# Tests


def test_system_libssl_attached_once(recorder: Recorder) -> None:
    paths = [p for p, _ in recorder.tls.attached()]
    real = [os.path.realpath(p) for p in paths]
    assert len(real) == len(set(real)), paths
    libssl = [p for p, syms in recorder.tls.attached() if "libssl.so" in p]
    assert libssl, "system libssl not attached: %s" % paths
    assert recorder.stats.get("tls.libraries_attached") == len(paths)


def test_nginx_https_server_and_curl_client_keepalive_count(recorder, certs, tmp_path):
    """23 GETs over ONE kept-alive TLS connection: nginx (server side, SSL_read/SSL_write,
    fd tied) reports 23 server exchanges, curl (client side, libcurl's libssl) 23 client
    exchanges, with exact paths, statuses and body sizes."""
    with nginx_tls(tmp_path, certs) as (port, ndir):
        nginx_pids = tree_pids(int((ndir / "nginx.pid").read_text()))
        recorder.trace(nginx_pids)
        urls = ["https://127.0.0.1:%d/index.html?n=%d" % (port, i) for i in range(N)]
        curl_pid, results = curl_https(recorder, urls, certs[0])
        assert results == ["200 %d" % len(INDEX)] * N
        server = recorder.wait_exchanges(nginx_pids, N)
        client = recorder.wait_exchanges({curl_pid}, N)
        access = [json.loads(x) for x in (ndir / "access.jsonl").read_text().splitlines()]
    assert len(access) == N
    print("nginx server exchanges: reported %d, sent %d" % (len(server), N))
    print("curl client exchanges: reported %d, sent %d" % (len(client), N))
    assert len(server) == N
    assert len(client) == N
    for i, (s, c) in enumerate(zip(server, client)):
        for x, role in ((s, Role.SERVER), (c, Role.CLIENT)):
            assert x.role == role
            assert x.scheme == "https"
            assert x.method == "GET"
            assert x.target == "/index.html?n=%d" % i
            assert x.status_code == 200
            assert x.response_body_size == len(INDEX)
            assert x.request_body_size == 0
            assert x.protocol_version == "1.1"
            assert x.outcome.value == "ok"
        assert s.local_port == port and s.remote_port == c.local_port
        assert c.remote_port == port and c.remote_address == "127.0.0.1"
    # one TLS connection each side: one key
    assert len({(x.pid, x.local_port, x.remote_port) for x in server}) == 1
    assert_no_ciphertext_events(recorder.events_of(nginx_pids | {curl_pid}))


def test_nginx_large_response(recorder, certs, tmp_path):
    with nginx_tls(tmp_path, certs) as (port, ndir):
        nginx_pids = tree_pids(int((ndir / "nginx.pid").read_text()))
        recorder.trace(nginx_pids)
        curl_pid, results = curl_https(recorder, ["https://127.0.0.1:%d/big.bin" % port], certs[0])
        assert results == ["200 %d" % BIG]
        server = recorder.wait_exchanges(nginx_pids, 1)
        client = recorder.wait_exchanges({curl_pid}, 1)
    assert [(x.method, x.target, x.status_code, x.response_body_size) for x in server] == [
        ("GET", "/big.bin", 200, BIG)]
    assert [(x.method, x.target, x.status_code, x.response_body_size) for x in client] == [
        ("GET", "/big.bin", 200, BIG)]
    events = recorder.events_of(nginx_pids)
    # every plaintext byte is accounted (positions/sizes), even those not captured
    header_and_body = by_direction_sizes(events, Direction.EGRESS)
    assert BIG < header_and_body < BIG + 1024
    assert_no_ciphertext_events(events + recorder.events_of({curl_pid}))


def test_python_ssl_server_and_client(recorder, certs, tmp_path):
    """Python's _ssl uses SSL_read_ex/SSL_write_ex: 23 requests (GETs and POSTs with
    bodies) on one connection, seen from both ends."""
    with python_tls_server(tmp_path, certs) as (port, srv):
        recorder.trace({srv.pid})
        client_pid, results = python_tls_client(recorder, tmp_path, port, certs[0], N)
        server = recorder.wait_exchanges({srv.pid}, N)
        client = recorder.wait_exchanges({client_pid}, N)
    print("python server exchanges: reported %d, sent %d" % (len(server), N))
    print("python client exchanges: reported %d, sent %d" % (len(client), N))
    assert len(server) == N and len(client) == N
    for i in range(N):
        if i % 2:
            want = ("POST", "/submit/%d" % i, 201, 100 + i, len(b"got %d" % (100 + i)))
        else:
            want = ("GET", "/bytes/%d?i=%d" % (1000 + i, i), 200, 0, 1000 + i)
        assert results[i] == [want[2], want[4]]
        for x, role in ((server[i], Role.SERVER), (client[i], Role.CLIENT)):
            got = (x.method, x.target, x.status_code, x.request_body_size, x.response_body_size)
            assert got == want, (role, i)
            assert x.role == role and x.scheme == "https"
    assert server[0].local_port == port and client[0].remote_port == port
    assert_no_ciphertext_events(recorder.events_of({srv.pid, client_pid}))


def test_python_raw_events_are_plaintext_with_exact_sizes(recorder, certs, tmp_path):
    """Raw DataEvents for one request: the plaintext really moved, with source OPENSSL,
    positions contiguous, sizes matching the bytes on the wire of the HTTP layer."""
    with python_tls_server(tmp_path, certs) as (port, srv):
        recorder.trace({srv.pid})
        _, results = python_tls_client(recorder, tmp_path, port, certs[0], 1)
        assert results == [[200, 1000]]
        recorder.wait_exchanges({srv.pid}, 1)
    events = recorder.events_of({srv.pid})
    request = plaintext(events, Direction.INGRESS)
    response = plaintext(events, Direction.EGRESS)
    assert request.startswith(b"GET /bytes/1000?i=0 HTTP/1.1\r\n")
    assert request.endswith(b"\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"y" * 1000)
    data = [e for e in events if isinstance(e, DataEvent)]
    assert {e.source for e in data} == {Source.OPENSSL}
    for direction in Direction:
        chunks = sorted((e for e in data if e.direction == direction), key=lambda e: e.position)
        pos = 0
        for e in chunks:
            assert e.position == pos
            pos += e.size
    assert by_direction_sizes(events, Direction.INGRESS) == len(request)
    opens = [e for e in events if isinstance(e, ConnOpenEvent)]
    assert len(opens) == 1 and opens[0].fd >= 0 and opens[0].role == Role.SERVER


def test_node_https_server_static_openssl(recorder, certs, tmp_path):
    """node exports OpenSSL statically and drives it through memory BIOs: no fd can be
    tied, the stream gets a synthetic key, the exchanges are still all reported."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (scripts/bootstrap.sh --test-peers installs it)")
    with node_tls_server(tmp_path, certs) as (port, srv):
        recorder.trace({srv.pid})
        if node_exports_openssl():
            # exec'd after the capture started: tick() (exec tracepoint) finds it
            latency = recorder.wait_attached(node)
            print("node attached %.0f ms after it listened" % (latency * 1e3))
        # else Debian's nodejs: OpenSSL comes from the system libssl, attached at start
        urls = ["https://127.0.0.1:%d/node/%d" % (port, i) for i in range(N)]
        curl_pid, results = curl_https(recorder, urls, certs[0])
        assert results == ["200 %d" % len("node says /node/%d after 0" % i) for i in range(N)]
        server = recorder.wait_exchanges({srv.pid}, N)
        client = recorder.wait_exchanges({curl_pid}, N)
    print("node server exchanges: reported %d, sent %d" % (len(server), N))
    assert len(client) == N and all(x.scheme == "https" for x in client)
    assert len(server) == N
    for i, x in enumerate(server):
        body = "node says /node/%d after 0" % i
        assert (x.method, x.target, x.status_code, x.response_body_size) == (
            "GET", "/node/%d" % i, 200, len(body))
        assert x.scheme == "https"
        assert x.role == Role.SERVER  # inferred from the bytes: it read the request
        # nothing invented: no fd, so no addresses unless the daemon could establish them
        assert x.local_port in (None, port)
    events = recorder.events_of({srv.pid})
    assert all(e.fd < 0 for e in events if isinstance(e, DataEvent))
    assert_no_ciphertext_events(events)


def test_node_separate_connections_count(recorder, certs, tmp_path):
    """23 TLS connections, one request each: node frees and reuses SSL* addresses, each
    stream must still be its own (SSL_free closes it, the generation differs)."""
    if shutil.which("node") is None:
        pytest.fail("node is not installed (scripts/bootstrap.sh --test-peers installs it)")
    with node_tls_server(tmp_path, certs) as (port, srv):
        recorder.trace({srv.pid})
        if node_exports_openssl():
            recorder.wait_attached(shutil.which("node"))
        for i in range(N):
            _, results = curl_https(recorder, ["https://127.0.0.1:%d/conn/%d" % (port, i)], certs[0])
            assert results == ["200 %d" % len("node says /conn/%d after 0" % i)]
        server = recorder.wait_exchanges({srv.pid}, N)
    print("node server exchanges (separate connections): reported %d, sent %d" % (len(server), N))
    assert sorted(x.target for x in server) == sorted("/conn/%d" % i for i in range(N))
    assert all(x.status_code == 200 and x.outcome.value == "ok" for x in server)
    keys = {(e.fd, e.generation) for e in recorder.events_of({srv.pid}) if isinstance(e, DataEvent)}
    assert len(keys) == N


def test_python_server_post_bodies_separate_connections(recorder, certs, tmp_path):
    """23 connections from curl, each a POST with a body: the server reports 23 with exact
    request and response body sizes."""
    with python_tls_server(tmp_path, certs) as (port, srv):
        recorder.trace({srv.pid})
        for i in range(N):
            _, results = curl_https(recorder, ["https://127.0.0.1:%d/post/%d" % (port, i)], certs[0],
                                    "--data-binary", "z" * (500 + i))
            assert results == ["201 %d" % len(b"got %d" % (500 + i))]
        server = recorder.wait_exchanges({srv.pid}, N)
    print("python server exchanges (separate connections): reported %d, sent %d" % (len(server), N))
    assert len(server) == N
    for i, x in enumerate(server):
        assert (x.method, x.target, x.status_code, x.request_body_size, x.response_body_size) == (
            "POST", "/post/%d" % i, 201, 500 + i, len(b"got %d" % (500 + i)))
        assert x.role == Role.SERVER and x.local_port == port and x.remote_address == "127.0.0.1"
    assert_no_ciphertext_events(recorder.events_of({srv.pid}))


def test_discovery_in_real_proc(certs, tmp_path):
    """discover_tls_libraries() (what `otel-ebpf check` prints) finds the system libssl in
    a running Python TLS server and, when node exports OpenSSL, node itself."""
    from otel_ebpf.capture.tls import Kind, coverage_report, discover_tls_libraries

    with python_tls_server(tmp_path, certs) as (_, srv):
        ctx = node_tls_server(tmp_path, certs) if shutil.which("node") else contextlib.nullcontext((None, None))
        with ctx as (_, node):
            libs = discover_tls_libraries()
            report = "\n".join(coverage_report())
    shared = [lib for lib in libs if lib.kind == Kind.OPENSSL_SHARED]
    assert any(srv.pid in lib.pids for lib in shared), libs
    if node is not None and node_exports_openssl():
        static = [lib for lib in libs if lib.kind == Kind.OPENSSL_STATIC]
        assert any(node.pid in lib.pids for lib in static), libs
    assert "Go crypto/tls" in report and "[ok ] tls" in report


def test_python_one_mebibyte_in_one_ssl_write(recorder, certs, tmp_path):
    """Python writes a 1 MiB body with ONE SSL_write_ex: one event of size 1 MiB whose
    capture is truncated (counted), and the exchange still has the exact body size."""
    with python_tls_server(tmp_path, certs) as (port, srv):
        recorder.trace({srv.pid})
        before = recorder.capture.loss_counters()["truncated_bytes"]
        client_pid, _ = curl_https(recorder, ["https://127.0.0.1:%d/bytes/%d" % (port, BIG)],
                                   certs[0])
        server = recorder.wait_exchanges({srv.pid}, 1)
        client = recorder.wait_exchanges({client_pid}, 1)
        after = recorder.capture.loss_counters()["truncated_bytes"]
    for x in server + client:
        assert (x.method, x.target, x.status_code, x.response_body_size, x.scheme) == (
            "GET", "/bytes/%d" % BIG, 200, BIG, "https")
    assert len(server) == 1 and len(client) == 1
    big = [e for e in recorder.events_of({srv.pid})
           if isinstance(e, DataEvent) and e.direction == Direction.EGRESS and e.size == BIG]
    assert len(big) == 1 and big[0].truncated and big[0].data == b"y" * len(big[0].data)
    assert after - before >= BIG - len(big[0].data)


GO_TLS_SERVER = (
    'package main\nimport ("fmt"; "net/http"; "os")\n'
    'func main() { http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {'
    ' fmt.Fprintf(w, "go %s", r.URL.Path) });'
    ' http.ListenAndServeTLS("127.0.0.1:"+os.Args[1], os.Args[2], os.Args[3], nil) }\n')


def test_go_crypto_tls_is_not_covered_and_makes_no_noise(recorder, certs, tmp_path):
    """What the daemon does with a TLS stack it cannot decrypt (Go crypto/tls): `check`
    says so, the Go server yields no exchange and no syscall data (its ciphertext is
    rejected by inference, never parsed), while the curl client talking to it is still
    reported through libssl."""
    from otel_ebpf.capture.tls import Kind, discover_tls_libraries

    if shutil.which("go") is None:
        pytest.fail("go is not installed (scripts/bootstrap.sh --test-peers installs golang-go)")
    src = tmp_path / "main.go"
    src.write_text(GO_TLS_SERVER)
    binary = tmp_path / "gotls"
    subprocess.run(["go", "build", "-o", str(binary), str(src)], check=True, timeout=300,
                   env={"GOCACHE": str(tmp_path / "gocache"), "HOME": str(tmp_path),
                        "PATH": "/usr/bin:/bin", "GO111MODULE": "off"})
    port = free_port()
    with process([str(binary), str(port), str(certs[0]), str(certs[1])], port=port) as srv:
        recorder.trace({srv.pid})
        libs = discover_tls_libraries()
        urls = ["https://127.0.0.1:%d/go/%d" % (port, i) for i in range(N)]
        curl_pid, results = curl_https(recorder, urls, certs[0])
        assert results == ["200 %d" % len("go /go/%d" % i) for i in range(N)]
        client = recorder.wait_exchanges({curl_pid}, N)
        server = recorder.exchanges_of({srv.pid})
    go = [lib for lib in libs if srv.pid in lib.pids]
    assert [(lib.kind, lib.covered) for lib in go] == [(Kind.GO, False)]
    assert "not covered" in go[0].note
    print("go server exchanges: reported %d, sent %d (not covered); curl client: %d/%d"
          % (len(server), N, len(client), N))
    assert server == []
    assert [e for e in recorder.events_of({srv.pid}) if isinstance(e, DataEvent)] == []
    assert len(client) == N and all(x.scheme == "https" and x.status_code == 200 for x in client)
