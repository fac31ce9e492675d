"""Parity: the kernel fast path and the chunk stream report the same exchanges.

Two captures are loaded at once, one with the fast path and one forced onto the chunk
stream (capture.fast_path=false); both see the very same syscalls of the same real
traffic (a Python HTTP/1.1 keep-alive server and curl). Each feeds the daemon's own
pipeline (ConnectionTable for chunks, KernelExchangeDecoder for exchange records), and
the two lists of exchanges must be equal field by field, with timestamps taken at the
same syscalls (two programs read the clock at the same syscall exit, microseconds
apart).
"""

from __future__ import annotations

import os
import subprocess

import pytest

from otel_ebpf.capture.events import EventKind, Role
from otel_ebpf.capture.loader import Capture, CaptureOptions
from otel_ebpf.conntrack import ConnectionTable, ConntrackOptions
from otel_ebpf.protocols.http1.kernel_exchange import KernelExchangeDecoder
from otel_ebpf.stats import Stats

from .peers import free_port, poll_until_quiet, python_keepalive_server

pytestmark = pytest.mark.usefixtures("bpf_available")

# Two programs stamp the same syscall exit; anything further apart is another syscall.
SAME_SYSCALL_NS = 2_000_000
FIELDS = ("role", "scheme", "protocol_version", "method", "target", "host", "user_agent",
          "request_body_size", "response_body_size", "status_code", "outcome",
          "local_address", "local_port", "remote_address", "remote_port")


class Pipeline:
    """What the daemon wires behind one Capture, collecting exchanges of one port."""

    def __init__(self, port: int, fast_path: bool) -> None:
        self.stats = Stats()
        ports = frozenset({port})
        self.exchanges: list = []
        self.table = ConnectionTable(ConntrackOptions(ports=ports), self.stats,
                                     clock_offset_ns=0)
        self.decoder = KernelExchangeDecoder(self.exchanges.append, self.stats, 0, ports)
        # Selected in the kernel too, as the daemon does with --port: other traffic on the
        # machine cannot crowd this test's records out of the ring buffer.
        self.capture = Capture(CaptureOptions(tls=False, fast_path=fast_path, ports=ports),
                               self.stats)
        self.capture.start(lambda event: self.exchanges.extend(self.table.handle(event)),
                           {EventKind.EXCHANGE: self.decoder.on_record})

    def drain(self, quiet_s: float = 0.5, limit_s: float = 15.0) -> None:
        poll_until_quiet(self.capture, quiet_s, limit_s)

    def close(self) -> None:
        self.capture.close()


@pytest.fixture
def two_paths(tmp_path):
    port = free_port()
    fast = Pipeline(port, fast_path=True)
    slow = Pipeline(port, fast_path=False)
    try:
        with python_keepalive_server(tmp_path, port):
            yield port, fast, slow
    finally:
        fast.close()
        slow.close()


def test_fast_path_and_chunk_stream_report_identical_exchanges(two_paths, tmp_path):
    port, fast, slow = two_paths
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(3_000_000))
    base = "http://127.0.0.1:%d" % port
    # One curl, one keep-alive connection: 23 small GETs, then the awkward ones.
    urls = ["%s/bytes/%d" % (base, i) for i in range(23)]
    urls += ["%s/bytes/1048576" % base, "%s/status/204" % base, "%s/status/304" % base,
             "%s/status/404" % base, "%s/status/503" % base]
    out = subprocess.run(["curl", "-sS", "-w", "%{http_code}\\n"] + ["-o", "/dev/null"] * len(urls)
                         + urls, capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["200"] * 24 + ["204", "304", "404", "503"]
    subprocess.run(["curl", "-sS", "-o", "/dev/null", "-I", base + "/head"], check=True, timeout=30)
    subprocess.run(["curl", "-sS", "-o", "/dev/null", "--data-binary", "@%s" % upload,
                    "-H", "Content-Type: application/octet-stream", base + "/upload"],
                   check=True, timeout=30)
    for pipeline in (fast, slow):
        pipeline.drain()
    expected = len(urls) + 2  # both sides: server and client
    for pipeline in (fast, slow):
        for role in (Role.SERVER, Role.CLIENT):
            assert len([x for x in pipeline.exchanges if x.role == role]) == expected, (
                role, pipeline.stats.snapshot())
    fast_share = fast.decoder.exchanges / len(fast.exchanges)
    print("fast-path share of this traffic: %d of %d exchanges" % (fast.decoder.exchanges,
                                                                   len(fast.exchanges)))
    assert slow.decoder.exchanges == 0
    assert fast_share >= 0.9  # every exchange here is Content-Length framed or bodiless
    for role in (Role.SERVER, Role.CLIENT):
        mine = sorted((x for x in fast.exchanges if x.role == role),
                      key=lambda x: x.start_time_unix_nano)
        theirs = sorted((x for x in slow.exchanges if x.role == role),
                        key=lambda x: x.start_time_unix_nano)
        for f, s in zip(mine, theirs):
            assert [getattr(f, n) for n in FIELDS] == [getattr(s, n) for n in FIELDS], (f, s)
            assert abs(f.start_time_unix_nano - s.start_time_unix_nano) < SAME_SYSCALL_NS, (f, s)
            assert abs(f.end_time_unix_nano - s.end_time_unix_nano) < SAME_SYSCALL_NS, (f, s)
            assert f.tid == s.tid
    sizes = sorted(x.response_body_size for x in fast.exchanges if x.role == Role.SERVER)
    assert sizes[-1] == 1048576
    posts = [x for x in fast.exchanges if x.method == "POST"]
    assert [x.request_body_size for x in posts] == [3_000_000, 3_000_000]
