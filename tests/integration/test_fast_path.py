"""The kernel fast path (bpf/http1_fast.h) against real servers and clients.

One Capture with the fast path on (config[CFG_FAST_PATH] = 1 before any traffic:
eligibility is decided at accept/connect), one with it off. EVENT_EXCHANGE records are
taken raw through a record handler and decoded here with the layout of
bpf/include/events.h, so these tests check the kernel side on its own.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import defaultdict

import pytest

from otel_ebpf.capture.events import ConnOpenEvent, DataEvent, Direction
from otel_ebpf.capture.loader import Capture, CaptureOptions
from otel_ebpf.capture.reader import EXCHANGE_HDR
from otel_ebpf.stats import Stats

from .peers import (
    Nginx,
    free_port,
    poll_until_quiet,
    python_keepalive_server,
    self_signed_certificate,
    wait_for_port,
)

N = 23  # prime: off-by-one and duplicates show
EVENT_EXCHANGE = 4
FIELDS = ("kind", "role", "source", "version_minor", "tgid", "tid", "fd", "generation",
          "start_ns", "end_ns", "request_body_size", "response_body_size", "status",
          "family", "local_port", "remote_port", "local_addr", "remote_addr", "comm",
          "head_len", "method_len", "target_off", "target_len", "host_off", "host_len",
          "user_agent_off", "user_agent_len", "traceparent_off", "traceparent_len",
          "tracestate_off", "tracestate_len")


class Exchange(dict):
    """One raw EVENT_EXCHANGE: header fields by name, plus `head` and helpers."""

    def field(self, name: str) -> bytes:
        off, length = self[name + "_off"], self[name + "_len"]
        return self["head"][off:off + length]

    @property
    def method(self) -> bytes:
        return self["head"][:self["method_len"]]

    @property
    def target(self) -> bytes:
        return self.field("target")


def _capture(fast: bool, tls: bool = False):
    events: list = []
    exchanges: list[Exchange] = []

    def on_exchange(buf, offset: int, size: int) -> None:
        raw = bytes(buf[offset:offset + size])
        ex = Exchange(zip(FIELDS, EXCHANGE_HDR.unpack_from(raw)))
        ex["head"] = raw[EXCHANGE_HDR.size:EXCHANGE_HDR.size + ex["head_len"]]
        assert len(ex["head"]) == ex["head_len"] == size - EXCHANGE_HDR.size
        exchanges.append(ex)

    cap = Capture(CaptureOptions(tls=tls, fast_path=fast), Stats())
    cap.start(events.append, handlers={EVENT_EXCHANGE: on_exchange})
    cap._set_config(1, int(fast))  # CFG_FAST_PATH, whatever the options default to
    cap.events = events  # type: ignore[attr-defined]
    cap.exchanges = exchanges  # type: ignore[attr-defined]
    return cap


@pytest.fixture(scope="module")
def fast(bpf_available):
    cap = _capture(True)
    yield cap
    cap.close()


def drain(cap: Capture, quiet_s: float = 0.4, limit_s: float = 15.0):
    """Poll until nothing arrived for quiet_s; return (events, exchanges) and forget them."""
    poll_until_quiet(cap, quiet_s, limit_s)
    out = list(cap.events), list(cap.exchanges)
    cap.events.clear()
    cap.exchanges.clear()
    return out


def summary(exchanges: list) -> list:
    return [(e["tgid"], e["role"], e.method, e.target, e["status"]) for e in exchanges]


def of_pid(items: list, pid: int) -> list:
    return [e for e in items if (e["tgid"] if isinstance(e, dict) else e.tgid) == pid]


def data(events: list) -> list[DataEvent]:
    return [e for e in events if isinstance(e, DataEvent)]


def curl(args: list[str]) -> tuple[int, str]:
    proc = subprocess.Popen(["curl", "-sS", *args], stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    return proc.pid, out


@pytest.fixture
def py_server(tmp_path, fast):
    port = free_port()
    with python_keepalive_server(tmp_path, port) as proc:
        drain(fast, quiet_s=0.1)
        yield proc, port


@pytest.fixture
def nginx(tmp_path, fast):
    port = free_port()
    with Nginx(tmp_path, port) as server:
        drain(fast, quiet_s=0.1)
        yield server, port


def test_23_requests_one_record_each_side_no_data(fast, nginx):
    server, port = nginx
    url = "http://127.0.0.1:%d/index.html" % port
    curl_pid, out = curl(["-w", "%{http_code}\\n", "-H",
                          "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"]
                         + ["-o", "/dev/null"] * N + [url] * N)
    assert out.split() == ["200"] * N
    events, exchanges = drain(fast)
    workers = {server.proc.pid} | {int(p) for p in subprocess.run(
        ["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout.split()}
    srv = [e for e in exchanges if e["tgid"] in workers]
    cli = of_pid(exchanges, curl_pid)
    assert len(srv) == N and len(cli) == N
    assert data([e for e in events if e.tgid in workers | {curl_pid}]) == []
    body = len((server.dir / "www" / "index.html").read_bytes())
    for ex in srv + cli:
        assert ex["status"] == 200 and ex["version_minor"] == 1
        assert ex.method == b"GET" and ex.target == b"/index.html"
        assert ex.field("host") == b"127.0.0.1:%d" % port
        assert ex.field("user_agent").startswith(b"curl/")
        assert ex.field("traceparent") == b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        assert ex["tracestate_len"] == 0
        assert ex["request_body_size"] == 0 and ex["response_body_size"] == body
        assert ex["head"].startswith(b"GET /index.html HTTP/1.1\r\n")
        assert ex["head"].endswith(b"\r\n\r\n")
        assert 0 < ex["start_ns"] <= ex["end_ns"]
        assert ex["family"] == socket.AF_INET
    assert {ex["role"] for ex in srv} == {1} and {ex["role"] for ex in cli} == {2}
    assert {ex["local_port"] for ex in srv} == {port}
    assert {ex["remote_port"] for ex in cli} == {port}
    assert {ex["comm"].rstrip(b"\0") for ex in cli} == {b"curl"}
    assert len(nginx[0].access_log()) == N


def test_exact_body_sizes_big_download_and_upload(fast, py_server, tmp_path):
    server, port = py_server
    base = "http://127.0.0.1:%d" % port
    pid, out = curl(["-o", "/dev/null", "-w", "%{size_download}\\n", base + "/bytes/1048576"])
    assert out.split() == ["1048576"]
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(3_000_000))
    # no "Expect: 100-continue" (curl adds it above 1 MiB): a 1xx response falls back
    pid2, out2 = curl(["-w", "\\n", "-H", "Expect:", "--data-binary", "@%s" % upload,
                       base + "/upload"])
    assert out2.split()[0:2] == ["got", "3000000"]
    events, exchanges = drain(fast)
    for who in (pid, server.pid):
        got = [e for e in of_pid(exchanges, who) if e.target == b"/bytes/1048576"]
        assert len(got) == 1, (who, summary(exchanges))
        assert got[0]["response_body_size"] == 1048576 and got[0]["request_body_size"] == 0
    for who in (pid2, server.pid):
        got = [e for e in of_pid(exchanges, who) if e.target == b"/upload"]
        assert len(got) == 1, (who, summary(exchanges))
        assert got[0].method == b"POST" and got[0]["status"] == 201
        assert got[0]["request_body_size"] == 3_000_000
        assert got[0]["response_body_size"] == len(b"got 3000000")
    assert data(of_pid(events, pid) + of_pid(events, pid2) + of_pid(events, server.pid)) == []


def test_head_204_304_bodiless(fast, py_server):
    server, port = py_server
    base = "http://127.0.0.1:%d" % port
    pid, out = curl(["-o", "/dev/null", "-w", "%{http_code}\\n", "-I", base + "/x",
                     "--next", "-o", "/dev/null", "-w", "%{http_code}\\n", base + "/status/204",
                     "--next", "-o", "/dev/null", "-w", "%{http_code}\\n", base + "/status/304"])
    assert out.split() == ["200", "204", "304"]
    events, exchanges = drain(fast)
    for who in (pid, server.pid):
        got = sorted((e.method, e.target, e["status"], e["response_body_size"])
                     for e in of_pid(exchanges, who))
        assert got == [(b"GET", b"/status/204", 204, 0), (b"GET", b"/status/304", 304, 0),
                       (b"HEAD", b"/x", 200, 0)], who
    assert data(of_pid(events, pid) + of_pid(events, server.pid)) == []


RAW_CLIENT = """
import socket, sys, time
port, pause, expect = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
sock = socket.create_connection(("127.0.0.1", port))
for chunk in sys.argv[4:]:
    sock.sendall(chunk.encode().decode("unicode_escape").encode("latin-1"))
    time.sleep(pause)
got = b""
deadline = time.monotonic() + 10
while got.count(b"HTTP/1.1 200") < expect and time.monotonic() < deadline:
    got += sock.recv(65536)
sock.close()
"""


def raw_client(port: int, chunks: list[bytes], expect: int, pause: float = 0.0) -> int:
    """A separate process (ours is never traced) that sends each chunk with one send()
    and reads until `expect` 200 responses came; returns its pid."""
    args = [c.decode("latin-1").encode("unicode_escape").decode() for c in chunks]
    proc = subprocess.Popen([sys.executable, "-c", RAW_CLIENT, str(port), str(pause),
                             str(expect), *args])
    assert proc.wait(30) == 0
    return proc.pid


def streams(events: list, pid: int) -> dict:
    """(fd, generation, direction) -> DATA events of pid, and the CONN_OPENs by key."""
    out: dict = defaultdict(list)
    for e in data(of_pid(events, pid)):
        out[(e.fd, e.generation, e.direction)].append(e)
    return out


def opens(events: list, pid: int) -> dict:
    return {(e.fd, e.generation): e for e in of_pid(events, pid) if isinstance(e, ConnOpenEvent)}


def stream_start(cap_open, direction: Direction) -> int:
    return cap_open.stream_start[int(direction)]


def assert_contiguous(chunks: list[DataEvent], start: int) -> None:
    assert chunks[0].position == start, (chunks[0], start)
    for prev, cur in zip(chunks, chunks[1:]):
        assert cur.position == prev.position + prev.size, (prev, cur)


def test_chunked_response_falls_back_with_stream_start(fast, tmp_path):
    """Node answers /chunked/ with Transfer-Encoding: chunked: a fallback after one fast
    exchange on the same connection; the chunk stream starts at the boundary."""
    from .peers import node_server

    port = free_port()
    with node_server(tmp_path, port) as proc:
        drain(fast, quiet_s=0.1)
        base = "http://127.0.0.1:%d" % port
        pid, out = curl(["-w", "%{size_download}\\n", "-o", "/dev/null", "-o", "/dev/null",
                         base + "/plain", base + "/chunked/100000"])
        assert out.split() == [str(len("received 0")), "100000"]
        events, exchanges = drain(fast)
        for who in (pid, proc.pid):
            got = of_pid(exchanges, who)
            assert [e.target for e in got] == [b"/plain"], who
            first = got[0]
            op = opens(events, who)
            assert len(op) == 1
            (key, open_ev), = op.items()
            st = streams(events, who)
            req_dir = Direction.INGRESS if who == proc.pid else Direction.EGRESS
            resp_dir = Direction(1 - int(req_dir))
            req_chunks, resp_chunks = st[key + (req_dir,)], st[key + (resp_dir,)]
            # The second request starts where the first exchange ended, in both directions.
            head_len = first["head_len"]
            assert stream_start(open_ev, req_dir) == head_len
            assert stream_start(open_ev, resp_dir) > 0
            assert_contiguous(req_chunks, head_len)
            assert_contiguous(resp_chunks, stream_start(open_ev, resp_dir))
            assert req_chunks[0].data.startswith(b"GET /chunked/100000 HTTP/1.1\r\n")
            assert resp_chunks[0].data.startswith(b"HTTP/1.1 200")
            assert b"chunked" in resp_chunks[0].data.lower()


def test_pipelined_requests_fall_back_and_replay(fast, py_server):
    """Two requests in one write: the fast path refuses the first head (bytes beyond
    it), so both sides are today's chunk stream from position 0."""
    server, port = py_server
    two = (b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /bytes/20 HTTP/1.1\r\nHost: x\r\n\r\n")
    pid = raw_client(port, [two], expect=2)
    events, exchanges = drain(fast)
    assert of_pid(exchanges, pid) == [] and of_pid(exchanges, server.pid) == []
    (key, open_ev), = opens(events, pid).items()
    assert tuple(open_ev.stream_start) == (0, 0)
    st = streams(events, pid)
    sent = st[key + (Direction.EGRESS,)]
    assert len(sent) == 1 and sent[0].data == two and sent[0].position == 0
    srv = streams(events, server.pid)
    recv = [c for k, v in srv.items() if k[2] == Direction.INGRESS for c in v]
    assert b"".join(c.data for c in recv) == two
    out = b"".join(c.data for k, v in srv.items() if k[2] == Direction.EGRESS for c in v)
    assert out.count(b"HTTP/1.1 200") == 2


def test_pipelined_after_fast_exchange_replays_request_in_flight(fast, py_server):
    """The fast path took a request; the next one came before its response (/never
    answers): the first is replayed as DATA at position 0 with its real timestamp,
    then the second takes today's stream."""
    server, port = py_server
    first, second = (b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n",
                     b"GET /bytes/7 HTTP/1.1\r\nHost: x\r\n\r\n")
    pid = raw_client(port, [first, second], expect=0, pause=0.2)
    events, exchanges = drain(fast)
    assert of_pid(exchanges, pid) == []
    (key, open_ev), = opens(events, pid).items()
    assert tuple(open_ev.stream_start) == (0, 0)
    sent = streams(events, pid)[key + (Direction.EGRESS,)]
    assert_contiguous(sent, 0)
    assert [c.data for c in sent] == [first, second]
    assert sent[1].timestamp_ns - sent[0].timestamp_ns > 150_000_000  # the replay's own time
    for e in sent:
        assert e.tid == pid  # the single-threaded client wrote both


def test_close_mid_exchange_replays(fast, py_server):
    server, port = py_server
    request = b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n"
    pid = raw_client(port, [request], expect=0, pause=0.3)
    events, exchanges = drain(fast)
    (key, open_ev), = opens(events, pid).items()
    assert tuple(open_ev.stream_start) == (0, 0)
    sent = streams(events, pid)[key + (Direction.EGRESS,)]
    assert [(c.position, c.size, c.data) for c in sent] == [(0, len(request), request)]
    closes = [e for e in of_pid(events, pid) if type(e).__name__ == "ConnCloseEvent"]
    assert [(e.fd, e.generation) for e in closes] == [key]
    counters = fast.loss_counters()
    assert counters["fast_fb_closed"] >= 1


def test_disabled_is_todays_chunk_stream(fast, tmp_path):
    fast.close()
    off = _capture(False)
    try:
        port = free_port()
        with python_keepalive_server(tmp_path, port) as server:
            drain(off, quiet_s=0.1)
            pid, out = curl(["-w", "%{http_code}\\n"] + ["-o", "/dev/null"] * N
                            + ["http://127.0.0.1:%d/bytes/100" % port] * N)
            assert out.split() == ["200"] * N
            events, exchanges = drain(off)
        assert exchanges == []
        for who in (pid, server.pid):
            st = streams(events, who)
            req_dir = Direction.EGRESS if who == pid else Direction.INGRESS
            heads = [c for k, v in st.items() if k[2] == req_dir for c in v
                     if c.data.startswith(b"GET /bytes/100 ")]
            assert len(heads) == N
            for o in opens(events, who).values():
                assert tuple(o.stream_start) == (0, 0)
        counters = off.loss_counters()
        assert counters["fast_exchanges"] == 0 and counters["fast_fallbacks"] == 0
    finally:
        off.close()


def test_https_through_openssl_one_record_each_side(tmp_path, bpf_available):
    """nginx and curl over TLS: the plaintext at SSL_read/SSL_write (source OPENSSL) of
    sockets from accept/connect takes the fast path too."""
    from otel_ebpf.capture.tls import TlsAttacher

    cert, key = self_signed_certificate(tmp_path / "certs")
    cap = _capture(True, tls=True)
    try:
        tls = TlsAttacher(cap, Stats())
        tls.scan()
        port = free_port()
        with Nginx(tmp_path, port, certs=(cert, key)) as server:
            tls.scan()
            drain(cap, quiet_s=0.1)
            url = "https://127.0.0.1:%d/big.bin" % port
            pid, out = curl(["-k", "-w", "%{http_code}\\n"] + ["-o", "/dev/null"] * N
                            + [url] * N)
            assert out.split() == ["200"] * N
            events, exchanges = drain(cap)
            workers = {int(p) for p in subprocess.run(
                ["pgrep", "-P", str(server.proc.pid)], capture_output=True,
                text=True).stdout.split()}
        srv = [e for e in exchanges if e["tgid"] in workers]
        cli = of_pid(exchanges, pid)
        assert len(srv) == N and len(cli) == N, summary(exchanges)
        for ex in srv + cli:
            assert ex["source"] == 1  # SOURCE_OPENSSL
            assert ex.target == b"/big.bin" and ex["status"] == 200
            assert ex["response_body_size"] == 1 << 20
        plain = [e for e in data(of_pid(events, pid)) if e.source.name == "OPENSSL"]
        assert plain == []
    finally:
        cap.close()
