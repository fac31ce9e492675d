"""Kernel capture against real servers and clients (real eBPF; needs root).

One Capture per module (compiling and verifying takes seconds); each test starts its
own peers on free loopback ports and looks only at events of those peers' pids (other
processes on the host are captured too, and ignored here).
"""

from __future__ import annotations

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

N = 23  # prime: off-by-one and duplicates show


@pytest.fixture(scope="module")
def capture(bpf_available):
    events: list = []
    cap = Capture(CaptureOptions(tls=False), Stats())
    cap.start(events.append)
    cap.events = events  # type: ignore[attr-defined]
    yield cap
    cap.close()


def drain(cap: Capture, quiet_s: float = 0.3, limit_s: float = 10.0) -> list:
    """Poll until no event arrived for quiet_s; return (and forget) what came."""
    deadline = time.monotonic() + limit_s
    last = time.monotonic()
    while time.monotonic() < deadline:
        if cap.poll(50):
            last = time.monotonic()
        elif time.monotonic() - last > quiet_s:
            break
    out = list(cap.events)
    cap.events.clear()
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("server on port %d did not start" % port)


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
        wait_port(port)
        drain(capture, quiet_s=0.1)
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


def test_node_writev_one_event_per_iovec(capture, tmp_path):
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed (scripts/bootstrap.sh --test-peers installs nodejs)")
    script = tmp_path / "server.js"
    script.write_text(NODE_SERVER)
    port = free_port()
    proc = subprocess.Popen([node, str(script), str(port)])
    try:
        wait_port(port)
        drain(capture, quiet_s=0.1)
        curl_pid, lines = run_curl(port, "/", N)
        assert all(line.startswith("200 ") for line in lines) and len(lines) == N
        events = drain(capture)
    finally:
        proc.kill()
        proc.wait()
    out = data(of_pid(events, proc.pid), Direction.EGRESS)
    # Node writes "8", "\r\n", "chunked ", "\r\n", ..., "0\r\n\r\n" as separate iovecs.
    payloads = [e.data for e in out]
    assert payloads.count(b"8") == N
    assert payloads.count(b"chunked ") == N
    assert payloads.count(b"0\r\n\r\n") == N
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


def test_loss_counters_readable(capture):
    counters = capture.loss_counters()
    assert list(counters) == list(LOSS_COUNTERS)
    assert all(isinstance(v, int) and v >= 0 for v in counters.values())
    assert counters["ringbuf_full"] == 0
    assert counters["conn_table_full"] == 0
    capture.flush_stats()
    assert capture.stats.get("capture.events") > 0
    assert capture.stats.snapshot()["capture.kernel.truncated_bytes"] == counters["truncated_bytes"]
