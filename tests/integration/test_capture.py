"""Kernel capture against real servers and clients (real eBPF; needs root).

One Capture per module (compiling and verifying takes seconds); each test starts its
own peers on free loopback ports and looks only at events of those peers' pids (other
processes on the host are captured too, and ignored here).

These tests hold the kernel to the chunk stream's contract (DATA records, positions,
sizes), so they run with the kernel fast path off: that stream is what every connection
the fast path hands over gets. tests/integration/test_fast_path.py covers the fast path
and its hand-over; the daemon tests (test_end_to_end.py) run with it on.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import defaultdict

import pytest

from otel_ebpf.capture.events import ConnCloseEvent, ConnOpenEvent, DataEvent, Direction, Role
from otel_ebpf.capture.loader import LOSS_COUNTERS, Capture, CaptureOptions
from otel_ebpf.stats import Stats

from .peers import free_port, poll_until_quiet, wait_for_port

N = 23  # prime: off-by-one and duplicates show


@pytest.fixture(scope="module")
def capture(bpf_available):
    events: list = []
    cap = Capture(CaptureOptions(tls=False, fast_path=False), Stats())
    cap.start(events.append)
    cap.events = events  # type: ignore[attr-defined]
    yield cap
    cap.close()


def drain(cap: Capture, quiet_s: float = 0.3, limit_s: float = 10.0) -> list:
    """Poll until no event arrived for quiet_s; return (and forget) what came."""
    poll_until_quiet(cap, quiet_s, limit_s)
    out = list(cap.events)
    cap.events.clear()
    return out


def of_pid(events: list, pid: int) -> list:
    return [e for e in events if e.tgid == pid]


def data(events: list, direction: Direction | None = None) -> list[DataEvent]:
    return [e for e in events if isinstance(e, DataEvent)
            and (direction is None or e.direction is direction)]


def assert_positions_contiguous(events: list) -> None:
    """Per connection and direction: positions start where the previous chunk ended."""
    streams: dict = defaultdict(list)
    for e in data(events):
        streams[(e.key, e.direction)].append(e)
    assert streams
    for chunks in streams.values():
        for prev, cur in zip(chunks, chunks[1:]):
            assert cur.position == prev.position + prev.size, (prev, cur)


@pytest.fixture
def http_server(tmp_path, capture):
    port = free_port()
    (tmp_path / "big.bin").write_bytes(os.urandom(1 << 20))
    (tmp_path / "index.html").write_text("hello\n")
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                             "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=10.0)
        drain(capture, quiet_s=0.1)
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def node_script(tmp_path, name: str, source: str):
    """Run a Node.js script serving on a free port; yield (process, port); kill it after."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed (scripts/bootstrap.sh --test-peers installs nodejs)")
    script = tmp_path / name
    script.write_text(source)
    port = free_port()
    proc = subprocess.Popen([node, str(script), str(port)])
    try:
        wait_for_port(port, timeout=10.0)
        yield proc, port
    finally:
        proc.kill()
        proc.wait()


def run_curl(port: int, path: str, count: int = 1) -> tuple[int, list[str]]:
    """curl in the background so its pid is known; returns (pid, output lines)."""
    urls = ["http://127.0.0.1:%d%s" % (port, path)] * count
    outputs = ["-o", "/dev/null"] * count  # one -o per URL
    proc = subprocess.Popen(["curl", "-sS", "-w",
                             "%{http_code} %{size_header} %{size_download}\\n"] + outputs + urls,
                            stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return proc.pid, out.split("\n")[:-1]


def test_23_requests_roles_addresses_positions(capture, http_server):
    server, port = http_server
    curl_pid, lines = run_curl(port, "/index.html", N)
    assert lines == [lines[0]] * N and lines[0].startswith("200 ")
    events = drain(capture)
    srv = of_pid(events, server.pid)
    cli = of_pid(events, curl_pid)

    requests = [e for e in data(srv, Direction.INGRESS) if e.data.startswith(b"GET /index.html ")]
    assert len(requests) == N
    responses = [e for e in data(cli, Direction.INGRESS) if e.data.startswith(b"HTTP/1.0 200")]
    assert len(responses) == N
    sent = [e for e in data(cli, Direction.EGRESS) if e.data.startswith(b"GET /index.html ")]
    assert len(sent) == N

    # http.server answers HTTP/1.0 and closes: N connections on each side.
    srv_opens = [e for e in srv if isinstance(e, ConnOpenEvent)]
    cli_opens = [e for e in cli if isinstance(e, ConnOpenEvent)]
    assert len(srv_opens) == N and len(cli_opens) == N
    assert {e.role for e in srv_opens} == {Role.SERVER}
    assert {e.role for e in cli_opens} == {Role.CLIENT}
    assert {e.comm for e in cli_opens} == {"curl"}  # named even after curl exited
    # Full 4-tuples from the kernel on both sides, and they mirror each other.
    client_ports = {e.local_port for e in cli_opens}
    assert len(client_ports) == N
    for e in srv_opens:
        assert (e.local_address, e.local_port, e.remote_address) == ("127.0.0.1", port, "127.0.0.1")
        assert e.remote_port in client_ports
    for e in cli_opens:
        assert (e.remote_address, e.remote_port, e.local_address) == ("127.0.0.1", port, "127.0.0.1")
    # Every connection that was opened is closed, once, with the same key.
    for side in (srv, cli):
        opens = {e.key for e in side if isinstance(e, ConnOpenEvent)}
        closes = [e.key for e in side if isinstance(e, ConnCloseEvent)]
        assert sorted(closes) == sorted(opens)
        # Data of a connection only after its open event.
        opened = set()
        for e in side:
            if isinstance(e, ConnOpenEvent):
                opened.add(e.key)
            elif isinstance(e, DataEvent):
                assert e.key in opened
    assert_positions_contiguous(srv)
    assert_positions_contiguous(cli)


def test_large_response_sizes_exact_and_truncation_visible(capture, http_server):
    server, port = http_server
    before = capture.loss_counters()
    curl_pid, lines = run_curl(port, "/big.bin")
    code, header_bytes, body_bytes = map(int, lines[0].split())
    assert code == 200 and body_bytes == 1 << 20
    events = drain(capture)
    total = header_bytes + body_bytes
    srv_out = data(of_pid(events, server.pid), Direction.EGRESS)
    cli_in = data(of_pid(events, curl_pid), Direction.INGRESS)
    assert sum(e.size for e in srv_out) == total
    assert sum(e.size for e in cli_in) == total
    assert any(e.truncated for e in srv_out)
    assert all(len(e.data) <= capture.options.max_capture_bytes for e in srv_out + cli_in)
    assert srv_out[0].position == 0 and srv_out[0].data.startswith(b"HTTP/1.0 200")
    assert_positions_contiguous(srv_out)
    assert_positions_contiguous(cli_in)
    after = capture.loss_counters()
    not_captured = sum(e.size - len(e.data) for e in srv_out + cli_in)
    assert after["truncated_bytes"] - before["truncated_bytes"] >= not_captured


NODE_SERVER = textwrap.dedent("""
    const http = require('http');
    http.createServer((req, res) => {
      res.writeHead(200, {'Content-Type': 'text/plain'});
      res.write('hello ');
      setImmediate(() => { res.write('chunked '); res.end('world\\n'); });
    }).listen(parseInt(process.argv[2]), '127.0.0.1');
""")


def test_node_writev_one_event_per_call(capture, tmp_path):
    with node_script(tmp_path, "server.js", NODE_SERVER) as (proc, port):
        drain(capture, quiet_s=0.1)
        curl_pid, lines = run_curl(port, "/", N)
        assert all(line.startswith("200 ") for line in lines) and len(lines) == N
        events = drain(capture)
    out = data(of_pid(events, proc.pid), Direction.EGRESS)
    # Node writes "8", "\r\n", "chunked ", "\r\n", ..., "0\r\n\r\n" as separate iovecs
    # of one writev: the kernel hands over the call's bytes concatenated, one record.
    payloads = [e.data for e in out]
    assert payloads.count(b"8\r\nchunked \r\n6\r\nworld\n\r\n0\r\n\r\n") == N
    assert all(e.size == len(e.data) for e in out)  # small segments: nothing truncated
    assert_positions_contiguous(out)
    # Reassembled per connection, the stream is the exact chunked response.
    streams: dict = defaultdict(bytes)
    for e in out:
        streams[e.key] += e.data
    assert len(streams) == 1  # curl keeps the connection alive across the 23 requests
    (stream,) = streams.values()
    assert stream.count(b"\r\n\r\n6\r\nhello \r\n8\r\nchunked \r\n6\r\nworld\n\r\n0\r\n\r\n") == N


def test_byte_at_a_time_client_is_captured(capture, http_server):
    server, port = http_server
    request = b"GET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    client = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import socket, sys, time
        s = socket.create_connection(("127.0.0.1", %d))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in %r:
            s.send(bytes([b])); time.sleep(0.002)
        while s.recv(65536): pass
    """) % (port, request)])
    assert client.wait(timeout=30) == 0
    events = drain(capture)
    sent = data(of_pid(events, client.pid), Direction.EGRESS)
    assert b"".join(e.data for e in sent) == request
    assert len(sent) == len(request)
    got = data(of_pid(events, server.pid), Direction.INGRESS)
    assert b"".join(e.data for e in got) == request
    assert_positions_contiguous(sent)


def test_pid_filter_and_self_exclusion(capture, http_server):
    server, port = http_server
    capture.set_pid_filter([server.pid])
    try:
        curl_pid, _ = run_curl(port, "/index.html", N)
        events = drain(capture)
    finally:
        capture.set_pid_filter(None)
    assert len([e for e in data(of_pid(events, server.pid), Direction.INGRESS)
                if e.data.startswith(b"GET ")]) == N
    assert of_pid(events, curl_pid) == []
    assert {e.tgid for e in events} <= {server.pid}

    # The daemon (this process) never traces itself, even without a filter.
    for _ in range(N):
        with urllib.request.urlopen("http://127.0.0.1:%d/index.html" % port) as resp:
            assert resp.status == 200
    events = drain(capture)
    assert of_pid(events, os.getpid()) == []
    assert len([e for e in data(of_pid(events, server.pid), Direction.INGRESS)
                if e.data.startswith(b"GET ")]) == N


ECHO_SERVER = textwrap.dedent("""
    import socket, sys
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0)); srv.listen()
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    while True:
        b = conn.recv(65536)
        if not b: break
        conn.sendall(b)
""")


def test_non_http_tcp_is_silent(capture):
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(echo.stdout.readline())
        before = capture.loss_counters()["not_http"]
        client = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
            import os, socket
            s = socket.create_connection(("127.0.0.1", %d))
            for i in range(%d):
                s.sendall(bytes([0, 1, 2, 0xff]) + os.urandom(200)); s.recv(65536)
            s.close()
        """) % (port, N)])
        assert client.wait(timeout=30) == 0
        echo.wait(timeout=10)
    finally:
        echo.kill()
        echo.wait()
    events = drain(capture)
    assert [e for e in events if e.tgid in (client.pid, echo.pid)] == []
    assert capture.loss_counters()["not_http"] - before >= 2  # both ends gave up


def test_loss_counters_readable(capture, http_server):
    _, port = http_server
    run_curl(port, "/big.bin")  # truncated chunks on both sides
    drain(capture)
    counters = capture.loss_counters()
    assert list(counters) == list(LOSS_COUNTERS)
    assert all(isinstance(v, int) and v >= 0 for v in counters.values())
    assert counters["ringbuf_full"] == 0
    assert counters["conn_table_full"] == 0
    capture.flush_stats()
    assert capture.stats.get("capture.events") > 0
    snapshot = capture.stats.snapshot()
    assert snapshot["capture.truncated_bytes"] == counters["truncated_bytes"]
    assert snapshot["capture.lost.ringbuf_full"] == counters["ringbuf_full"]


KEEPALIVE_PAIR = textwrap.dedent("""
    # A server and a client in one process, connected before the capture starts; each
    # line on stdin makes the client send one request and read the response.
    import socket, sys, threading
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    port = srv.getsockname()[1]
    cli = socket.create_connection(("127.0.0.1", port))
    conn, _ = srv.accept()
    def serve():
        while True:
            req = conn.recv(65536)
            if not req: return
            conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\nok")
    threading.Thread(target=serve, daemon=True).start()
    print(port, cli.getsockname()[1], flush=True)
    for line in sys.stdin:
        cli.sendall(b"GET /old HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        assert cli.recv(65536).endswith(b"ok")
        print("done", flush=True)
""")


def test_connection_older_than_capture(bpf_available):
    """Sockets that existed before attach: lazily tracked, ROLE_UNKNOWN, and the server
    side (whose first call is a read) gets its 4-tuple from tcp:tcp_rcv_space_adjust."""
    pair = subprocess.Popen([sys.executable, "-c", KEEPALIVE_PAIR], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    events: list = []
    cap = Capture(CaptureOptions(tls=False, fast_path=False, pids=(pair.pid,)), Stats())
    try:
        server_port, client_port = map(int, pair.stdout.readline().split())
        cap.start(events.append)
        cap.events = events  # type: ignore[attr-defined]
        # The server thread sits in recv() since before the attach: that call's entry
        # was never seen; its arguments come from the saved registers at its exit.
        warmup: list = []
        for _ in range(N):
            pair.stdin.write("go\n")
            pair.stdin.flush()
            assert pair.stdout.readline() == "done\n"
        got = drain(cap)
    finally:
        pair.kill()
        pair.wait()
        cap.close()
    # The capture was filtered to this pid from its very first event.
    assert {e.tgid for e in warmup + got} == {pair.pid}
    assert cap.features["OTEL_REGS_FALLBACK"]
    opens = [e for e in warmup + got if isinstance(e, ConnOpenEvent)]
    assert len(opens) == 2 and {e.role for e in opens} == {Role.UNKNOWN}
    requests = [e for e in data(got, Direction.INGRESS) if e.data.startswith(b"GET /old ")]
    responses = [e for e in data(got, Direction.INGRESS) if e.data.startswith(b"HTTP/1.1 200")]
    assert len(requests) == N and len(responses) == N
    server_key = requests[0].key
    (server_open,) = [e for e in opens if e.key == server_key]
    assert (server_open.local_address, server_open.local_port) == ("127.0.0.1", server_port)
    assert (server_open.remote_address, server_open.remote_port) == ("127.0.0.1", client_port)
    assert_positions_contiguous(got)


FILE_READER = textwrap.dedent("""
    import os, sys
    path = sys.argv[1]
    with open(path, "wb") as f:
        f.write(b"GET / HTTP/1.1\\r\\nHost: not-a-socket\\r\\n\\r\\n")
    for _ in range(%d):
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
    r, w = os.pipe()
    os.write(w, b"HTTP/1.1 200 OK\\r\\n\\r\\n"); os.read(r, 100)
""" % N)


def test_files_and_pipes_with_http_bytes_are_not_captured(capture, tmp_path):
    proc = subprocess.run([sys.executable, "-c", FILE_READER, str(tmp_path / "req.txt")],
                          timeout=30, check=True)
    assert proc.returncode == 0
    events = drain(capture)
    pids = {e.tgid for e in events}
    assert capture.features.get("HAVE_SOCK_LENGTH"), "sock:sock_*_length missing on this kernel"
    # The child's pid is gone; no event may carry HTTP-looking bytes from a file read.
    assert not [e for e in data(events) if b"not-a-socket" in e.data], pids


SENDFILE_SERVER = textwrap.dedent("""
    # Headers with sendmsg (three buffers = three iovecs), the body with sendfile.
    import os, socket, sys
    body_path = sys.argv[1]
    size = os.path.getsize(body_path)
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    print(srv.getsockname()[1], flush=True)
    for _ in range(%d):
        conn, _ = srv.accept()
        buf = b""
        while b"\\r\\n\\r\\n" not in buf:
            buf += conn.recv(65536)
        conn.sendmsg([b"HTTP/1.1 200 OK\\r\\n", b"Content-Length: %%d\\r\\n" %% size, b"\\r\\n"])
        with open(body_path, "rb") as f:
            sent = 0
            while sent < size:
                sent += os.sendfile(conn.fileno(), f.fileno(), sent, size - sent)
        conn.close()
""" % N)


def test_sendmsg_iovecs_and_sendfile_sizes(capture, tmp_path):
    body = tmp_path / "body.bin"
    body.write_bytes(os.urandom(300_000))
    server = subprocess.Popen([sys.executable, "-c", SENDFILE_SERVER, str(body)],
                              stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        curl_pid, lines = run_curl(port, "/file", N)
        server.wait(timeout=30)
    finally:
        server.kill()
        server.wait()
    assert all(line.split()[0] == "200" for line in lines) and len(lines) == N
    header_bytes = int(lines[0].split()[1])
    events = drain(capture)
    out = data(of_pid(events, server.pid), Direction.EGRESS)
    by_conn: dict = defaultdict(list)
    for e in out:
        by_conn[e.key].append(e)
    assert len(by_conn) == N
    for chunks in by_conn.values():
        # the three buffers of one sendmsg: one record of their bytes
        assert chunks[0].data == b"HTTP/1.1 200 OK\r\nContent-Length: 300000\r\n\r\n"
        assert chunks[0].size == len(chunks[0].data)
        assert sum(c.size for c in chunks) == header_bytes + 300_000
        assert all(c.data == b"" for c in chunks[1:])  # sendfile bytes are not visible
        assert sum(c.size for c in chunks[1:]) == 300_000
    assert_positions_contiguous(out)


def test_ring_buffer_overflow_is_counted_and_positions_stay_exact(bpf_available, tmp_path):
    """A 64 KiB ring buffer nobody drains during a 1 MiB download: records are lost,
    the kernel counts each one, and the positions of what did arrive stay exact."""
    (tmp_path / "big.bin").write_bytes(os.urandom(1 << 20))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                               "127.0.0.1"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    events: list = []
    cap = Capture(CaptureOptions(tls=False, fast_path=False, ringbuf_kib=64,
                                 max_capture_bytes=16384, pids=(server.pid,)), Stats())
    try:
        wait_for_port(port, timeout=10.0)
        cap.start(events.append)
        cap.events = events  # type: ignore[attr-defined]
        _, lines = run_curl(port, "/big.bin")  # no poll meanwhile: the ring fills up
        header_bytes, body_bytes = map(int, lines[0].split()[1:])
        got = drain(cap)
        lost = cap.loss_counters()["ringbuf_full"]
    finally:
        server.kill()
        server.wait()
        cap.close()
    out = data(got, Direction.EGRESS)
    assert lost > 0
    assert out, "some records must have fit"
    assert max(e.position + e.size for e in out) <= header_bytes + body_bytes
    assert sum(e.size for e in out) < header_bytes + body_bytes  # the loss shows as gaps
    for e in out:
        assert e.position + e.size <= header_bytes + body_bytes


PEEKING_SERVER = textwrap.dedent("""
    # Peeks at every request before reading it (as protocol sniffers do).
    import socket
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    while True:
        head = conn.recv(8, socket.MSG_PEEK)
        if not head: break
        req = conn.recv(65536)
        conn.sendall(b"HTTP/1.1 204 No Content\\r\\n\\r\\n")
""")


def test_msg_peek_is_not_counted_twice(capture):
    server = subprocess.Popen([sys.executable, "-c", PEEKING_SERVER], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(server.stdout.readline())
        client = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import socket
            s = socket.create_connection(("127.0.0.1", %d))
            for _ in range(%d):
                s.sendall(b"GET /peek HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
                assert s.recv(65536).startswith(b"HTTP/1.1 204")
        """) % (port, N)], timeout=30, check=True)
        assert client.returncode == 0
        server.wait(timeout=10)
    finally:
        server.kill()
        server.wait()
    events = drain(capture)
    got = data(of_pid(events, server.pid), Direction.INGRESS)
    assert [e.data for e in got] == [b"GET /peek HTTP/1.1\r\nHost: x\r\n\r\n"] * N, (
        got, capture.loss_counters())
    assert_positions_contiguous(got)


BLOCKING_ACCEPT_SERVER = textwrap.dedent("""
    import socket
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()  # the first call is already blocked when capture starts
        buf = b""
        while b"\\r\\n\\r\\n" not in buf:
            buf += conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n")
        conn.close()
""")


def test_accept_in_flight_at_attach_is_a_server(bpf_available):
    server = subprocess.Popen([sys.executable, "-c", BLOCKING_ACCEPT_SERVER],
                              stdout=subprocess.PIPE, text=True)
    events: list = []
    cap = Capture(CaptureOptions(tls=False, fast_path=False, pids=(server.pid,)), Stats())
    try:
        port = int(server.stdout.readline())
        time.sleep(0.2)  # let it block in accept()
        cap.start(events.append)
        cap.events = events  # type: ignore[attr-defined]
        run_curl(port, "/", N)
        got = drain(cap)
    finally:
        server.kill()
        server.wait()
        cap.close()
    opens = [e for e in got if isinstance(e, ConnOpenEvent)]
    assert len(opens) == N
    assert {e.role for e in opens} == {Role.SERVER}
    assert len([e for e in data(got, Direction.INGRESS) if e.data.startswith(b"GET / ")]) == N


NODE_BIG_CHUNKED = textwrap.dedent("""
    const http = require('http');
    http.createServer((req, res) => {
      const total = parseInt(req.url.split('/')[2]);
      const piece = Buffer.alloc(16384, 0x61);
      res.writeHead(200, {'Content-Type': 'application/octet-stream'});
      let left = total;
      while (left > 0) { const n = Math.min(left, piece.length); res.write(piece.subarray(0, n)); left -= n; }
      res.end();
    }).listen(parseInt(process.argv[2]), '127.0.0.1');
""")


@pytest.mark.parametrize("total", [100_000, 3_000_000])
def test_writev_with_hundreds_of_iovecs_keeps_every_segment(capture, tmp_path, total):
    """Node queues all chunks and writes them with one writev of 4 iovecs per chunk
    (29 for 100 kB, hundreds for 3 MB): every segment is walked (tail calls), so the
    chunk-size lines are all visible, the small segments between two data pieces in one
    record."""
    with node_script(tmp_path, "big.js", NODE_BIG_CHUNKED) as (proc, port):
        drain(capture, quiet_s=0.1)
        before = capture.loss_counters()
        _, lines = run_curl(port, "/chunked/%d" % total)
        events = drain(capture)
        after = capture.loss_counters()
    code, header_bytes, body_bytes = map(int, lines[0].split())
    assert code == 200 and body_bytes == total
    out = data(of_pid(events, proc.pid), Direction.EGRESS)
    assert_positions_contiguous(out)
    full_pieces = total // 16384
    # "\r\n", "4000", "\r\n" (three iovecs) are one record between two data segments,
    # each of those captured as before (its first max_capture_bytes)
    assert [e.data for e in out].count(b"\r\n4000\r\n") == full_pieces - 1  # 1st: the head's
    assert sum(e.data.count(b"4000\r\n") for e in out) == full_pieces
    assert [e.size for e in out].count(16384) == full_pieces
    assert all(len(e.data) == 4096 for e in out if e.size == 16384)
    assert sum(e.size for e in out) > total
    assert after["iovec_skipped"] == before["iovec_skipped"]


def test_entries_of_exited_processes_are_pruned(capture, http_server):
    """A process that exits without close(2) leaves kernel entries; prune drops them."""
    _, port = http_server
    client = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, socket
        socks = []
        for _ in range(%d):
            s = socket.create_connection(("127.0.0.1", %d))
            s.sendall(b"GET /index.html HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
            s.recv(65536)
            socks.append(s)
        print(os.getpid(), flush=True)
        os._exit(0)  # the kernel closes the fds: no close(2) for the tracepoints to see
    """) % (N, port)], capture_output=True, text=True, timeout=30, check=True)
    pid = int(client.stdout)
    drain(capture)
    assert len([k for k in capture.connection_keys() if k[0] == pid]) == N
    assert capture.prune_connections() >= N
    assert [k for k in capture.connection_keys() if k[0] == pid] == []


INFERENCE_SERVER = textwrap.dedent("""
    # Answers every connection's first bytes with a fixed response, then closes.
    import socket
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(64)
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        if not conn.recv(65536):
            conn.close(); continue
        conn.sendall(b"ok"); conn.close()
""")
HTTP_STARTS = [b"GET / ", b"HEAD / ", b"POST /a ", b"PUT /a ", b"DELETE /a ", b"CONNECT h:1 ",
               b"OPTIONS * ", b"TRACE / ", b"PATCH /a ", b"PURGE /cache ", b"HTTP/1.1 200 OK"]
NOT_HTTP_STARTS = [b"get / lowercase", b"\x16\x03\x01\x02\x00\x01\x00\x01", b"SSH-2.0-OpenSSH_9",
                   b"HELLO world", b"\x00\x00\x00\x08GET / ", b"*1\r\n$4\r\nPING\r\n"]


def test_inference_accepts_every_method_and_rejects_the_rest(capture):
    server = subprocess.Popen([sys.executable, "-c", INFERENCE_SERVER], stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(server.stdout.readline())
        client = subprocess.run([sys.executable, "-c", textwrap.dedent("""
            import socket, sys
            for start in %r:
                s = socket.create_connection(("127.0.0.1", %d))
                s.sendall(start + b"\\r\\nHost: x\\r\\n\\r\\n")
                s.recv(100)
                s.close()
        """) % (HTTP_STARTS + NOT_HTTP_STARTS, port)], timeout=30, check=True)
        assert client.returncode == 0
        events = drain(capture)
    finally:
        server.kill()
        server.wait()
    got = [e.data for e in data(of_pid(events, server.pid), Direction.INGRESS)]
    assert sorted(got) == sorted(start + b"\r\nHost: x\r\n\r\n" for start in HTTP_STARTS)
    # The response "ok" is not HTTP either, but it is on an HTTP connection: emitted.
    out = data(of_pid(events, server.pid), Direction.EGRESS)
    assert len(out) == len(HTTP_STARTS)


def test_ipv6_addresses(capture, tmp_path):
    (tmp_path / "index.html").write_text("hello\n")
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "::1"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("::1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "IPv6 server did not start"
                time.sleep(0.05)
        drain(capture, quiet_s=0.1)
        proc = subprocess.run(["curl", "-sS", "-g", "-o", "/dev/null", "-w", "%{http_code}",
                               "http://[::1]:%d/index.html" % port], capture_output=True,
                              text=True, timeout=30, check=True)
        assert proc.stdout == "200"
        events = drain(capture)
    finally:
        server.kill()
        server.wait()
    opens = [e for e in of_pid(events, server.pid) if isinstance(e, ConnOpenEvent)]
    assert len(opens) == 1 and opens[0].role is Role.SERVER
    assert (opens[0].local_address, opens[0].local_port, opens[0].remote_address) == (
        "::1", port, "::1")


def test_fd_reused_without_close_is_a_new_connection(capture, http_server, tmp_path):
    """dup2() replaces a traced socket's fd without close(2): the kernel entry must not
    carry the old connection's identity to the new file or socket."""
    server, port = http_server
    client = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, socket, sys
        a = socket.create_connection(("127.0.0.1", %d))
        a.sendall(b"GET /index.html HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"); a.recv(65536)
        fd = a.fileno()
        # a regular file holding HTTP-looking bytes takes over the socket's fd number
        path = sys.argv[1]
        with open(path, "wb") as f:
            f.write(b"GET /from-a-file HTTP/1.1\\r\\n\\r\\n")
        tmp = os.open(path, os.O_RDONLY)
        os.dup2(tmp, fd)
        os.read(fd, 100)
        # and a new socket takes it over again
        b = socket.create_connection(("127.0.0.1", %d))
        os.dup2(b.fileno(), fd)
        os.write(fd, b"GET /index.html?second HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n"); os.read(fd, 65536)
        print(os.getpid(), fd, flush=True)
    """) % (port, port), str(tmp_path / "request.txt")],
        capture_output=True, text=True, timeout=30, check=True)
    pid, fd = map(int, client.stdout.split())
    events = of_pid(drain(capture), pid)
    assert not [e for e in data(events) if b"/from-a-file" in e.data]
    on_fd = [e for e in events if e.fd == fd]
    opens = [e for e in on_fd if isinstance(e, ConnOpenEvent)]
    assert len(opens) == 2 and opens[0].generation != opens[1].generation
    second = [e for e in data(on_fd, Direction.EGRESS) if b"?second" in e.data]
    assert len(second) == 1 and second[0].generation == opens[1].generation
    assert second[0].position == 0  # a fresh stream, not the old connection's positions
