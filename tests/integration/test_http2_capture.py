"""HTTP/2 at the kernel capture and through the daemon: real peers, real eBPF (root).

What the kernel must hand user space for an HTTP/2 connection (bpf/protocol_infer.h):
its CONN_OPEN says Protocol.HTTP2, and its DATA records carry both directions whole
from the first byte (position 0, contiguous, every byte counted up to the close), so a
session can decode HPACK from the connection's start. It must never take the HTTP/1
kernel fast path (no EXCHANGE record, nothing swallowed), so the capture here runs with
the fast path ON, as the daemon does. The client's egress and the server's ingress
start with the connection preface; a server's egress starts with its SETTINGS frame
(Go and nghttpd write it before they read the preface: the kernel recognises it there).

Peers: nghttpd (h2c) driven by nghttp and by `curl --http2-prior-knowledge`, grpcio's
server and client (tests/integration/grpc_greeter.py; C-core writes with sendmsg, so
the vectored path), nginx with http2 on TLS driven by `curl --http2` (OpenSSL with the
fd tied to the SSL*), Node.js http2 over TLS (memory BIOs: fd-less OpenSSL streams),
grpc-go (tests/peers/go-grpc, built by bootstrap: SETTINGS before the preface).
Every peer runs under the kernel pid filter from its first instruction (gate()), so
other work on the host cannot disturb the counts.

Then the daemon (`otel-ebpf run`, jsonl output): N requests sent by each real client
(nghttp, curl h2c and TLS, grpcio unary/streaming/error/deadline, Node h2c and TLS,
grpc-go unary),
exactly N records reported on each side with the right attributes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from otel_ebpf.capture import reader
from otel_ebpf.capture.events import (
    ConnCloseEvent,
    ConnOpenEvent,
    DataEvent,
    Direction,
    EventKind,
    Protocol,
    Role,
    Source,
)
from otel_ebpf.stats import Stats

from .peers import REPO, free_port, self_signed_certificate, wait_for_port

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
N = 13  # requests per client: prime, so off-by-one and duplicates show
GREETER = REPO / "tests" / "integration" / "grpc_greeter.py"
HEADERS, SETTINGS = 0x1, 0x4


class H2Recorder:
    """One Capture (fast path on, OpenSSL uprobes on) polled by a thread, as the daemon
    runs it; chunk-stream events and the tgids of EXCHANGE records are kept."""

    def __init__(self) -> None:
        from otel_ebpf.capture.loader import Capture, CaptureOptions
        from otel_ebpf.capture.tls import TlsAttacher

        self.stats = Stats()
        self.events: list = []
        self.exchange_tgids: list[int] = []
        self._lock = threading.Lock()
        self.capture = Capture(CaptureOptions(tls=True, fast_path=True), self.stats)
        self.capture.start(self._on_event, {int(EventKind.EXCHANGE): self._on_exchange})
        self._traced = {os.getpid()}  # the daemon's own pid alone traces nothing
        self.capture.set_pid_filter(self._traced)
        self.tls = TlsAttacher(self.capture, self.stats)
        self.tls.scan()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="h2-test-poll", daemon=True)
        self._thread.start()

    def trace(self, pid: int) -> None:
        self._traced.add(pid)
        self.capture.set_pid_filter(self._traced)

    def _on_event(self, event) -> None:
        with self._lock:
            self.events.append(event)

    def _on_exchange(self, buf, offset: int, size: int) -> None:
        hdr = reader.EXCHANGE_HDR.unpack_from(bytes(buf[offset:offset + reader.EXCHANGE_HDR.size]))
        with self._lock:
            self.exchange_tgids.append(hdr[4])

    def _run(self) -> None:
        next_scan = time.monotonic() + 2.0
        while not self._stop.is_set():
            self.capture.poll(50)
            self.tls.tick()
            if time.monotonic() >= next_scan:
                next_scan = time.monotonic() + 2.0
                self.tls.scan()

    def attach_libraries_of(self, pid: int, timeout: float = 10.0) -> None:
        """Wait until every libssl/OpenSSL-exporting file `pid` maps is probed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tls.scan()
            wanted = {os.path.realpath(line.split()[-1])
                      for line in Path("/proc/%d/maps" % pid).read_text().splitlines()
                      if "libssl.so" in line or line.split()[-1].endswith("/node")}
            attached = {os.path.realpath(p) for p, _ in self.tls.attached()}
            if wanted and wanted <= attached:
                return
            time.sleep(0.1)
        pytest.fail("OpenSSL of pid %d not attached: wanted %s, attached %s"
                    % (pid, wanted, self.tls.attached()))

    def settle(self, quiet_s: float = 0.5, limit_s: float = 10.0) -> None:
        """Wait until no event arrived for quiet_s."""
        deadline = time.monotonic() + limit_s
        seen, last = -1, time.monotonic()
        while time.monotonic() < deadline:
            with self._lock:
                n = len(self.events)
            if n != seen:
                seen, last = n, time.monotonic()
            elif time.monotonic() - last > quiet_s:
                return
            time.sleep(0.05)

    def of(self, pids: set[int]) -> tuple[list, list[int]]:
        with self._lock:
            return ([e for e in self.events if e.tgid in pids],
                    [t for t in self.exchange_tgids if t in pids])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.tls.close()
        self.capture.detach()
        self.capture.close()


@pytest.fixture(scope="module")
def recorder(bpf_available) -> Iterator[H2Recorder]:
    rec = H2Recorder()
    try:
        yield rec
    finally:
        rec.close()


def gate(recorder: H2Recorder, args: list[str], **kw) -> subprocess.Popen:
    """Start `args` with its pid in the kernel pid filter from its first instruction: a
    shell waits on stdin, the pid is added, then it execs the program (same pid)."""
    proc = subprocess.Popen(["sh", "-c", 'read _ && exec "$@"', "gate", *args],
                            stdin=subprocess.PIPE, **kw)
    recorder.trace(proc.pid)
    proc.stdin.write(b"go\n")
    proc.stdin.close()
    proc.stdin = None  # communicate() must not touch it again
    return proc


def run_client(recorder: H2Recorder, args: list[str], timeout: float = 60.0) -> tuple[int, str]:
    proc = gate(recorder, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, (args, err.decode(errors="replace")[-2000:])
    return proc.pid, out.decode(errors="replace")


@contextlib.contextmanager
def server(recorder: H2Recorder, args: list[str], port: int, log: Path) -> Iterator[int]:
    with open(log, "wb") as out:
        proc = gate(recorder, args, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, timeout=20.0)
            yield proc.pid
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def need(tool: str) -> str:
    path = shutil.which(tool) or (shutil.which(tool, path="/usr/sbin:/usr/bin") or None)
    if path is None:
        pytest.fail("%s is needed (scripts/bootstrap.sh --test-peers installs it)" % tool)
    return path


# ---- the checks ---------------------------------------------------------------------

def frames(stream: bytes) -> list[tuple[int, int, int]]:
    """(type, flags, stream id) of each frame of a whole HTTP/2 byte stream (preface
    skipped); fails unless the frames tile the stream exactly."""
    pos = len(PREFACE) if stream.startswith(PREFACE) else 0
    out = []
    while pos < len(stream):
        assert pos + 9 <= len(stream), "a frame header cut at %d of %d" % (pos, len(stream))
        length = int.from_bytes(stream[pos:pos + 3], "big")
        out.append((stream[pos + 3], stream[pos + 4],
                    int.from_bytes(stream[pos + 5:pos + 9], "big") & 0x7fffffff))
        pos += 9 + length
    assert pos == len(stream), "frames overrun the stream: %d > %d" % (pos, len(stream))
    return out


def whole_streams(events: list, source: Source, protocol: Protocol = Protocol.HTTP2) -> dict:
    """key -> (open, {direction: bytes}) of every connection of `source` in events,
    after checking the kernel's promise: PROTO_HTTP2 in the open, streams from 0 and
    contiguous, nothing truncated here (small messages), and closed."""
    opens = {e.key: e for e in events if isinstance(e, ConnOpenEvent) and e.source is source}
    closes = {e.key: e for e in events if isinstance(e, ConnCloseEvent)}
    chunks: dict = defaultdict(list)
    for e in events:
        if isinstance(e, DataEvent) and e.source is source:
            chunks[(e.key, e.direction)].append(e)
    assert opens, "no %s connection was opened" % source.name
    out = {}
    for key, op in opens.items():
        assert op.protocol is protocol, op
        assert op.stream_start == (0, 0), op
        streams = {}
        for direction in Direction:
            at = 0
            data = b""
            for c in chunks[(key, direction)]:
                assert c.position == at, ("gap or overlap", key, direction, at, c)
                assert not c.truncated, c
                at += c.size
                data += c.data
            streams[direction] = data
        assert key in closes, ("no close", op)
        out[key] = (op, streams)
    return out


def assert_read_as_written(written: bytes, read: bytes) -> None:
    """What one end read is exactly what the other wrote, except that an end closing
    the connection need not read the peer's last connection-level control frames (a
    grpc-go client exits without reading the PING ACK its server wrote last): any tail
    left unread must be whole stream-0 frames."""
    assert written.startswith(read), "the reader's bytes are not the writer's"
    tail = written[len(read):]
    if tail:
        assert read, "nothing read of %d bytes written" % len(tail)
        assert all(stream == 0 for _, _, stream in frames(tail)), frames(tail)


def check_pair(client: dict, server: dict, n_requests: int, n_response_headers: int):
    """One connection seen from both ends: the same bytes, HTTP/2 from the first one,
    frames tiling both streams, exactly n_requests request HEADERS frames (one stream
    each) and n_response_headers HEADERS frames back (gRPC: headers and trailers)."""
    assert len(client) == 1, list(client)
    (c_open, c), = client.values()
    # the server has other connections (wait_for_port's probe got the SETTINGS only):
    # its end of this one has the client's port as remote port
    pair = [(o, st) for o, st in server.values() if o.remote_port == c_open.local_port]
    assert len(pair) == 1, (c_open, list(server))
    (s_open, s), = pair
    assert_read_as_written(c[Direction.EGRESS], s[Direction.INGRESS])
    assert_read_as_written(s[Direction.EGRESS], c[Direction.INGRESS])
    assert c[Direction.EGRESS].startswith(PREFACE)
    out_frames = frames(c[Direction.EGRESS])
    in_frames = frames(c[Direction.INGRESS])
    assert in_frames[0][:2] == (SETTINGS, 0), in_frames[0]  # the server's first bytes
    assert out_frames[0][:2] == (SETTINGS, 0), out_frames[0]  # right after the preface
    requests = [f for f in out_frames if f[0] == HEADERS]
    assert len(requests) == n_requests, out_frames
    assert len({f[2] for f in requests}) == n_requests  # one stream each
    assert len([f for f in in_frames if f[0] == HEADERS]) == n_response_headers, in_frames
    return c_open, s_open


def assert_no_fast_path(exchange_tgids: list[int]) -> None:
    assert exchange_tgids == [], "HTTP/2 took the HTTP/1 fast path: %s" % exchange_tgids


# ---- peers ----------------------------------------------------------------------------

@contextlib.contextmanager
def nghttpd(recorder, tmp_path: Path, tls: tuple[Path, Path] | None = None) -> Iterator[tuple[int, int]]:
    www = tmp_path / "www"
    www.mkdir(exist_ok=True)
    (www / "index.html").write_bytes(b"hello over h2\n")
    port = free_port()
    args = [need("nghttpd"), "-a", "127.0.0.1", "-d", str(www)]
    args += [str(port), str(tls[1]), str(tls[0])] if tls else ["--no-tls", str(port)]
    with server(recorder, args, port, tmp_path / "nghttpd.log") as pid:
        yield pid, port


def test_nghttp_prior_knowledge(recorder, tmp_path):
    with nghttpd(recorder, tmp_path) as (spid, port):
        # distinct URIs: nghttp fetches a repeated one once
        cpid, out = run_client(recorder, [need("nghttp"), "-n"]
                               + ["http://127.0.0.1:%d/index.html?%d" % (port, i) for i in range(N)])
        recorder.settle()
        events, fast = recorder.of({spid, cpid})
    assert_no_fast_path(fast)
    client = whole_streams([e for e in events if e.tgid == cpid], Source.SYSCALL)
    server_ = whole_streams([e for e in events if e.tgid == spid], Source.SYSCALL)
    c_open, s_open = check_pair(client, server_, N, N)
    assert (c_open.role, s_open.role) == (Role.CLIENT, Role.SERVER)


def test_curl_http2_prior_knowledge(recorder, tmp_path):
    """curl against nginx h2c, one connection per curl: curl 7.88 cannot reuse a
    prior-knowledge connection ("Error in the HTTP2 framing layer" on the second URL,
    with or without us)."""
    with nginx_h2(recorder, tmp_path, None) as (spid, port):
        cpids = []
        for i in range(5):
            cpid, out = run_client(recorder, [
                need("curl"), "-sS", "--http2-prior-knowledge", "-o", "/dev/null", "-w",
                "%{http_version} %{http_code}", "http://127.0.0.1:%d/index.html?%d" % (port, i)])
            assert out == "2 200"
            cpids.append(cpid)
        recorder.settle()
        events, fast = recorder.of({spid, *cpids})
    assert_no_fast_path(fast)
    server_ = whole_streams([e for e in events if e.tgid == spid], Source.SYSCALL)
    for cpid in cpids:
        check_pair(whole_streams([e for e in events if e.tgid == cpid], Source.SYSCALL),
                   server_, 1, 1)


def test_grpcio_unary_and_streaming(recorder, tmp_path):
    """grpcio (C-core: sendmsg/recvmsg, the vectored path) on one h2c connection."""
    port = free_port()
    plan = "SayHello:%d,ListFeatures:2,RecordRoute:2,Lookup:1" % N
    with server(recorder, [sys.executable, str(GREETER), "serve", str(port)], port,
                tmp_path / "greeter.log") as spid:
        # wait_for_port's probe connection is not HTTP/2: silent, and not in these counts
        recorder.settle(quiet_s=0.3)
        cpid, out = run_client(recorder, [sys.executable, str(GREETER), "call", str(port), plan])
        recorder.settle()
        events, fast = recorder.of({spid, cpid})
    assert out.count('"code": "OK"') == N + 4 and out.count("NOT_FOUND") == 1
    assert_no_fast_path(fast)
    client = whole_streams([e for e in events if e.tgid == cpid], Source.SYSCALL)
    server_ = whole_streams([e for e in events if e.tgid == spid], Source.SYSCALL)
    # headers + trailers per call; Lookup's NOT_FOUND is trailers-only
    check_pair(client, server_, N + 5, 2 * (N + 4) + 1)


def go_greeter() -> str:
    from .peers import go_grpc_greeter

    try:
        return str(go_grpc_greeter())
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


def test_go_grpc(recorder, tmp_path):
    """grpc-go writes its SETTINGS before it reads the preface, on both ends."""
    greeter = go_greeter()
    port = free_port()
    with server(recorder, [greeter, "serve", str(port)], port, tmp_path / "go.log") as spid:
        cpid, out = run_client(recorder, [greeter, "call", str(port), str(N)])
        recorder.settle()
        events, fast = recorder.of({spid, cpid})
    assert out.split("\n")[:-1] == ["hello world %d" % i for i in range(N)]
    assert_no_fast_path(fast)
    check_pair(whole_streams([e for e in events if e.tgid == cpid], Source.SYSCALL),
               whole_streams([e for e in events if e.tgid == spid], Source.SYSCALL), N, 2 * N)


BINARY_PEER = textwrap.dedent('''
    import socket, sys
    # near misses of the HTTP/2 patterns, as a binary protocol might send them
    SERVER_FIRST = bytes.fromhex("000007040000000000") + b"x" * 7  # length 7: no SETTINGS
    CLIENT_FIRST = bytes.fromhex("000006040000000000") + bytes(6)  # SETTINGS, but a client's
    if sys.argv[1] == "serve":
        s = socket.create_server(("127.0.0.1", int(sys.argv[2])))
        while True:
            c, _ = s.accept()
            c.sendall(SERVER_FIRST)
            while (data := c.recv(65536)):
                c.sendall(b"PRI * HX" + data)  # not the preface either
            c.close()
    else:
        for _ in range(3):
            c = socket.create_connection(("127.0.0.1", int(sys.argv[2])))
            assert c.recv(16) == SERVER_FIRST
            for i in range(6):
                c.sendall(CLIENT_FIRST if i == 0 else b"\\x00\\x01binary%d" % i)
                c.recv(65536)
            c.close()
''')


def test_near_misses_stay_silent(recorder, tmp_path):
    """A binary protocol whose first bytes come close to HTTP/2's (a SETTINGS-like
    header of a bad length from the server, a real SETTINGS header from a client,
    "PRI * HX") is given up by the kernel: not one record of it reaches user space."""
    script = tmp_path / "binary_peer.py"
    script.write_text(BINARY_PEER)
    port = free_port()
    with server(recorder, [sys.executable, str(script), "serve", str(port)], port,
                tmp_path / "binary.log") as spid:
        cpid, _ = run_client(recorder, [sys.executable, str(script), "call", str(port)])
        recorder.settle()
        events, fast = recorder.of({spid, cpid})
    assert events == [] and fast == [], events[:5]


def test_h2c_upgrade_through_the_fast_path(recorder, tmp_path):
    """curl --http2 on http:// asks for `Upgrade: h2c` (grpc-go's x/net h2c server
    grants it): the kernel's fast path takes the request head, hands the connection over
    at the 101 (a 1xx never completes an exchange) with stream_start where the request
    began, and the HTTP/2 that follows is on the chunk stream, whole. The open says
    HTTP1: user space switches at the 101."""
    greeter = go_greeter()
    port = free_port()
    with server(recorder, [greeter, "h2c", str(port)], port, tmp_path / "h2c.log") as spid:
        args = [need("curl"), "-sS", "--http2"]
        for i in range(N):
            args += ["-o", "/dev/null", "-w", "%{http_version} %{http_code}\\n",
                     "http://127.0.0.1:%d/?%d" % (port, i)]
        cpid, out = run_client(recorder, args)
        recorder.settle()
        events, fast = recorder.of({spid, cpid})
    assert out.split("\n")[:-1] == ["2 200"] * N
    assert_no_fast_path(fast)  # the only HTTP/1 exchange never completed as HTTP/1
    client = whole_streams([e for e in events if e.tgid == cpid], Source.SYSCALL, Protocol.HTTP1)
    server_ = whole_streams([e for e in events if e.tgid == spid], Source.SYSCALL, Protocol.HTTP1)
    assert len(client) == 1
    (c_open, c), = client.values()
    (s_open, s), = [v for v in server_.values() if v[0].remote_port == c_open.local_port]
    assert_read_as_written(c[Direction.EGRESS], s[Direction.INGRESS])
    assert_read_as_written(s[Direction.EGRESS], c[Direction.INGRESS])
    request_head, _, h2_out = c[Direction.EGRESS].partition(b"\r\n\r\n")
    assert request_head.startswith(b"GET /?0 HTTP/1.1\r\n") and b"h2c" in request_head.lower()
    response_head, _, h2_in = c[Direction.INGRESS].partition(b"\r\n\r\n")
    assert response_head.startswith(b"HTTP/1.1 101 ")
    assert h2_out.startswith(PREFACE)
    out_frames, in_frames = frames(h2_out), frames(h2_in)
    assert in_frames[0][:2] == (SETTINGS, 0)
    # the first request went as HTTP/1.1 (stream 1); the rest are HTTP/2 streams 3, 5, ...
    assert sorted({f[2] for f in out_frames if f[0] == HEADERS}) == list(range(3, 2 * N + 1, 2))
    assert sorted({f[2] for f in in_frames if f[0] == HEADERS}) == list(range(1, 2 * N + 1, 2))


@contextlib.contextmanager
def nginx_h2(recorder, tmp_path: Path, certs, gated: bool = True) -> Iterator[tuple[int, int]]:
    """nginx with http2: over TLS with certs (ALPN h2), else h2c with prior knowledge;
    gated=False: a plain process (the daemon traces every process)."""
    port = free_port()
    ndir = tmp_path / "nginx"
    (ndir / "www").mkdir(parents=True)
    (ndir / "www" / "index.html").write_bytes(b"hello from nginx over h2\n")
    conf = ndir / "nginx.conf"
    conf.write_text(textwrap.dedent('''
        user root;
        worker_processes 1;
        master_process off;
        pid {d}/nginx.pid;
        error_log {d}/error.log warn;
        events {{ worker_connections 256; }}
        http {{
            access_log off;
            client_body_temp_path {d}/body;
            proxy_temp_path {d}/proxy;
            fastcgi_temp_path {d}/fastcgi;
            uwsgi_temp_path {d}/uwsgi;
            scgi_temp_path {d}/scgi;
            server {{
                listen 127.0.0.1:{port}{ssl} http2;
                {certs}
                root {d}/www;
            }}
        }}
    ''').format(d=ndir, port=port, ssl=" ssl" if certs else "",
                certs="ssl_certificate %s; ssl_certificate_key %s;" % certs if certs else ""))
    args = [need("nginx"), "-c", str(conf), "-p", str(ndir), "-g", "daemon off;"]
    if not gated:
        with plain_server(tmp_path, args, port) as proc:
            yield proc.pid, port
        return
    with server(recorder, args, port, tmp_path / "nginx.log") as pid:
        yield pid, port


def test_curl_http2_over_tls_to_nginx(recorder, tmp_path):
    """ALPN h2 through OpenSSL with the socket tied to the SSL* (curl and nginx both):
    the plaintext stream's CONN_OPEN says HTTP2, the ciphertext stays silent."""
    certs = self_signed_certificate(tmp_path / "certs")
    with nginx_h2(recorder, tmp_path, certs) as (spid, port):
        recorder.attach_libraries_of(spid)
        args = [need("curl"), "-sS", "--http2", "--cacert", str(certs[0])]
        for _ in range(N):
            args += ["-o", "/dev/null", "-w", "%{http_version} %{http_code}\\n",
                     "https://127.0.0.1:%d/index.html" % port]
        cpid, out = run_client(recorder, args)
        recorder.settle()
        events, fast = recorder.of({spid, cpid})
    assert out.split("\n")[:-1] == ["2 200"] * N
    assert_no_fast_path(fast)
    syscall_opens = [e for e in events if isinstance(e, ConnOpenEvent) and e.source is Source.SYSCALL]
    assert syscall_opens == [], "ciphertext reached the ring: %s" % syscall_opens
    check_pair(whole_streams([e for e in events if e.tgid == cpid], Source.OPENSSL),
               whole_streams([e for e in events if e.tgid == spid], Source.OPENSSL), N, N)


NODE_H2_TLS = textwrap.dedent('''
    const http2 = require("http2");
    const fs = require("fs");
    const [mode, port, cert, key, n] = [process.argv[2], parseInt(process.argv[3]),
                                        process.argv[4], process.argv[5], parseInt(process.argv[6])];
    if (mode === "serve") {
      http2.createSecureServer({cert: fs.readFileSync(cert), key: fs.readFileSync(key)},
        (req, res) => { res.end("hello over node h2 " + req.url); }).listen(port, "127.0.0.1");
    } else {
      const session = http2.connect("https://127.0.0.1:" + port, {ca: fs.readFileSync(cert)});
      let i = 0;
      const next = () => {
        if (i === n) { session.close(); return; }
        const req = session.request({":path": "/r" + i++});
        req.on("response", (h) => process.stdout.write(h[":status"] + "\\n"));
        req.on("data", () => {});
        req.on("end", next);
        req.end();
      };
      next();
    }
''')


def test_node_http2_over_tls(recorder, tmp_path):
    """Node's TLS runs on memory BIOs: fd-less OpenSSL streams (ROLE_UNKNOWN) whose
    protocol the plaintext inference decides alone."""
    certs = self_signed_certificate(tmp_path / "certs")
    script = tmp_path / "h2.js"
    script.write_text(NODE_H2_TLS)
    node = need("node")
    port = free_port()
    with server(recorder, [node, str(script), "serve", str(port), str(certs[0]), str(certs[1]), "0"],
                port, tmp_path / "node.log") as spid:
        recorder.attach_libraries_of(spid)
        cpid, out = run_client(recorder, [node, str(script), "call", str(port), str(certs[0]),
                                          str(certs[1]), str(N)])
        recorder.settle()
        events, fast = recorder.of({spid, cpid})
    assert out.split("\n")[:-1] == ["200"] * N
    assert_no_fast_path(fast)
    client = whole_streams([e for e in events if e.tgid == cpid], Source.OPENSSL)
    server_ = whole_streams([e for e in events if e.tgid == spid], Source.OPENSSL)
    check_pair(client, server_, N, N)


# ---- the daemon: N sent, N reported ------------------------------------------------------
# `otel-ebpf run` as users run it (fast path on, TLS on, jsonl output); each test sends N
# requests with one real client and counts the records of its own peers' pids.

@pytest.fixture(scope="module")
def daemon(bpf_available, tmp_path_factory) -> Iterator:
    from .peers import Daemon

    with Daemon(tmp_path_factory.mktemp("h2daemon")) as d:
        yield d


def reported(daemon, pids: set[int], kind: str, count: int, timeout: float = 20.0) -> list[dict]:
    """The daemon's records of `pids` of this kind once `count` arrived, plus one more
    second for duplicates or phantoms that must not be there."""
    deadline = time.monotonic() + timeout
    def mine():
        return [x for x in daemon.exchanges() if x["process.pid"] in pids and x["kind"] == kind]
    while time.monotonic() < deadline and len(mine()) < count:
        time.sleep(0.1)
    time.sleep(1.0)
    found = mine()
    if len(found) != count:
        print("MISMATCH %s %s: %d of %d\n%s" % (kind, pids, len(found), count,
                                               "\n".join(map(str, found))))
        print(daemon.log[-3000:])
    return found


def plain_server(tmp_path: Path, args: list[str], port: int) -> contextlib.AbstractContextManager:
    from .peers import process

    return process(args, port=port, log_path=tmp_path / "server.log")


def check_http(records: list[dict], n: int, port: int, scheme: str, user_agent: str | None,
               body: int) -> None:
    assert len(records) == n
    assert sorted(int(x["url.query"]) for x in records) == list(range(n))
    for x in records:
        assert (x["http.request.method"], x["url.path"], x["http.response.status_code"],
                x["network.protocol.version"], x["url.scheme"]) == (
            "GET", "/index.html", 200, "2", scheme), x
        assert port is None or x["server.port"] == port, x
        assert x["http.response.body.size"] == body and x["http.request.body.size"] == 0, x
        if user_agent:
            assert x["user_agent.original"].startswith(user_agent), x
        assert "otel_ebpf.outcome" not in x, x
    # one record per stream: (process, connection's client port, stream id) all distinct
    assert len({(x["process.pid"], x.get("client.port"), x["otel_ebpf.stream_id"])
                for x in records}) == n


def test_daemon_counts_nghttp(daemon, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_bytes(b"hello over h2\n")
    port = free_port()
    with plain_server(tmp_path, [need("nghttpd"), "--no-tls", "-a", "127.0.0.1", "-d", str(www),
                                 str(port)], port) as srv:
        client = subprocess.run([need("nghttp"), "-n"] + ["http://127.0.0.1:%d/index.html?%d"
                                                          % (port, i) for i in range(N)],
                                capture_output=True, timeout=60)
        assert client.returncode == 0, client.stderr
        # nghttp has exited: its pid is the one on its records
        servers = reported(daemon, {srv.pid}, "SERVER", N)
        clients = [x for x in daemon.exchanges()
                   if x["kind"] == "CLIENT" and x.get("server.port") == port]
    check_http(servers, N, port, "http", "nghttp2/", len(b"hello over h2\n"))
    check_http(clients, N, port, "http", "nghttp2/", len(b"hello over h2\n"))
    assert {x["process.executable.name"] for x in clients} == {"nghttp"}


def test_daemon_counts_curl_h2c_and_tls_to_nginx(daemon, tmp_path):
    certs = self_signed_certificate(tmp_path / "certs")
    body = len(b"hello from nginx over h2\n")
    for tls in (False, True):
        with nginx_h2(None, tmp_path / ("tls" if tls else "h2c"), certs if tls else None,
                      gated=False) as (spid, port):
            n = N if tls else 5  # curl 7.88 cannot reuse a prior-knowledge connection
            scheme = "https" if tls else "http"
            calls = ([["--http2", "--cacert", str(certs[0])] + sum(
                [["-o", "/dev/null", "https://127.0.0.1:%d/index.html?%d" % (port, i)]
                 for i in range(n)], [])] if tls else
                [["--http2-prior-knowledge", "-o", "/dev/null",
                  "http://127.0.0.1:%d/index.html?%d" % (port, i)] for i in range(n)])
            for extra in calls:
                subprocess.run([need("curl"), "-sS", *extra], check=True, timeout=60)
            servers = reported(daemon, {spid}, "SERVER", n)
            clients = [x for x in daemon.exchanges()
                       if x["kind"] == "CLIENT" and x.get("server.port") == port]
        check_http(servers, n, port, scheme, "curl/", body)
        check_http(clients, n, port, scheme, "curl/", body)


def test_daemon_counts_grpcio(daemon, tmp_path):
    """Unary, server- and client-streaming, an error status, an expiring deadline: one
    SERVER and one CLIENT record per call, with the call's rpc.* attributes."""
    port = free_port()
    plan = {"SayHello": N, "ListFeatures": 2, "RecordRoute": 3, "Lookup": 1, "Crash": 1,
            "Slow": 1}
    with plain_server(tmp_path, [sys.executable, str(GREETER), "serve", str(port)], port) as srv:
        client = subprocess.Popen([sys.executable, str(GREETER), "call", str(port),
                                   ",".join("%s:%d" % kv for kv in plan.items())],
                                  stdout=subprocess.PIPE, text=True)
        out, _ = client.communicate(timeout=60)
        assert client.returncode == 0
        total = sum(plan.values())
        servers = reported(daemon, {srv.pid}, "SERVER", total, timeout=30.0)
        clients = reported(daemon, {client.pid}, "CLIENT", total)
    assert out.count('"OK"') == N + 5 and "NOT_FOUND" in out and "INTERNAL" in out \
        and "DEADLINE_EXCEEDED" in out
    for records in (servers, clients):
        assert len(records) == total
        by_method: dict = defaultdict(list)
        for x in records:
            assert (x["rpc.system"], x["rpc.service"], x["network.protocol.version"]) == (
                "grpc", "helloworld.Greeter", "2"), x
            by_method[x["rpc.method"]].append(x)
        assert {m: len(v) for m, v in by_method.items()} == plan
        for x in by_method["SayHello"]:
            assert x["rpc.grpc.status_code"] == 0 and x["otel_ebpf.rpc.response_messages"] == 1
        for x in by_method["ListFeatures"]:
            assert x["rpc.grpc.status_code"] == 0 and x["otel_ebpf.rpc.response_messages"] == 5
        for x in by_method["RecordRoute"]:
            assert x["rpc.grpc.status_code"] == 0 and x["otel_ebpf.rpc.request_messages"] == 7
        assert by_method["Lookup"][0]["rpc.grpc.status_code"] == 5  # NOT_FOUND
        assert by_method["Crash"][0]["rpc.grpc.status_code"] == 13  # INTERNAL
    # the deadline (grpc-timeout 0.3 s on both ends): each side's record says either
    # DEADLINE_EXCEEDED from trailers or that the stream was reset (the client cancels
    # with RST_STREAM; whether the server's trailers go out first is a race)
    for records in (servers, clients):
        slow, = [x for x in records if x["rpc.method"] == "Slow"]
        assert slow.get("rpc.grpc.status_code") == 4 or (
            "rpc.grpc.status_code" not in slow
            and slow.get("otel_ebpf.outcome") == "stream_reset"), slow


NODE_H2 = textwrap.dedent('''
    const http2 = require("http2");
    const fs = require("fs");
    const [mode, tls, port, cert, key, n] = process.argv.slice(2);
    const opts = tls === "tls" ? {cert: fs.readFileSync(cert), key: fs.readFileSync(key)} : {};
    if (mode === "serve") {
      const make = tls === "tls" ? http2.createSecureServer : http2.createServer;
      make(opts, (req, res) => { res.end("hello over node h2"); }).listen(parseInt(port), "127.0.0.1");
    } else {
      const url = (tls === "tls" ? "https" : "http") + "://127.0.0.1:" + port;
      const session = http2.connect(url, tls === "tls" ? {ca: fs.readFileSync(cert)} : {});
      let i = 0;
      const next = () => {
        if (i === parseInt(n)) { session.close(); return; }
        const req = session.request({":path": "/index.html?" + i++});
        req.on("data", () => {});
        req.on("end", next);
        req.end();
      };
      next();
    }
''')


@pytest.mark.parametrize("tls", ["h2c", "tls"])
def test_daemon_counts_node_http2(daemon, tmp_path, tls):
    certs = self_signed_certificate(tmp_path / "certs")
    script = tmp_path / "node_h2.js"
    script.write_text(NODE_H2)
    node = need("node")
    port = free_port()
    common = [tls, str(port), str(certs[0]), str(certs[1])]
    with plain_server(tmp_path, [node, str(script), "serve", *common, "0"], port) as srv:
        time.sleep(1.0)  # the daemon probes node's OpenSSL within ~100 ms of its exec
        client = subprocess.Popen([node, str(script), "call", *common, str(N)])
        assert client.wait(60) == 0
        servers = reported(daemon, {srv.pid}, "SERVER", N)
        clients = reported(daemon, {client.pid}, "CLIENT", N)
    scheme = "https" if tls == "tls" else "http"
    body = len(b"hello over node h2")
    check_http(servers, N, port if tls == "h2c" else None, scheme, None, body)
    # Node's TLS runs on memory BIOs: its fd-less streams have no addresses
    check_http(clients, N, port if tls == "h2c" else None, scheme, None, body)


def test_daemon_counts_go_grpc(daemon, tmp_path):
    greeter = go_greeter()
    port = free_port()
    with plain_server(tmp_path, [greeter, "serve", str(port)], port) as srv:
        client = subprocess.Popen([greeter, "call", str(port), str(N)], stdout=subprocess.DEVNULL)
        assert client.wait(60) == 0
        servers = reported(daemon, {srv.pid}, "SERVER", N)
        clients = reported(daemon, {client.pid}, "CLIENT", N)
    for records in (servers, clients):
        assert len(records) == N
        for x in records:
            assert (x["rpc.system"], x["rpc.service"], x["rpc.method"], x["rpc.grpc.status_code"],
                    x["network.protocol.version"], x["server.port"]) == (
                "grpc", "helloworld.Greeter", "SayHello", 0, "2", port), x
            assert (x["otel_ebpf.rpc.request_messages"], x["otel_ebpf.rpc.response_messages"]) == (1, 1)
        assert len({x["otel_ebpf.stream_id"] for x in records}) == N


def test_daemon_counts_h2c_upgrade(daemon, tmp_path):
    """curl --http2 on http://: the first request upgrades (101, then stream 1), the
    others are HTTP/2 streams on the same connection. N sent, N reported on each side."""
    greeter = go_greeter()
    port = free_port()
    with plain_server(tmp_path, [greeter, "h2c", str(port)], port) as srv:
        args = [need("curl"), "-sS", "--http2"]
        for i in range(N):
            args += ["-o", "/dev/null", "http://127.0.0.1:%d/index.html?%d" % (port, i)]
        client = subprocess.Popen(args)
        assert client.wait(60) == 0
        servers = reported(daemon, {srv.pid}, "SERVER", N)
        clients = reported(daemon, {client.pid}, "CLIENT", N)
    check_http(servers, N, port, "http", "curl/", len(b"hello h2c"))
    check_http(clients, N, port, "http", "curl/", len(b"hello h2c"))
