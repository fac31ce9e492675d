"""Vectored calls (writev, sendmsg, readv, recvmsg) on the chunk stream: one DATA record
per call that fits one record's capture (max_capture_bytes; 8 KiB runs when it is
16 KiB), its segments' bytes concatenated; a segment larger than that keeps a record of
its own, captured as before (its first max_capture_bytes), the small segments around it
gathered in their own records. Positions, sizes and captured bytes are exact; the
truncation counters count the big segments only.

One child process holds both ends of each loopback connection (a server fd from
accept, a client fd from connect), on HTTP/2 (prior knowledge: the client's preface)
and on HTTP/1; the kernel fast path is off, so both are on the chunk stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from otel_ebpf.capture.events import DataEvent, Direction
from otel_ebpf.capture.loader import Capture, CaptureOptions
from otel_ebpf.stats import Stats

from .peers import poll_until_quiet


# max_capture_bytes of the capture, and the bytes one run gathers (bpf/syscalls.c
# IOV_RUN_BYTES: max_capture_bytes up to 8 KiB)
@pytest.fixture(scope="module", params=[(4096, 4096), (16384, 8192)], ids=["4k", "16k"])
def capture(bpf_available, request):
    events: list = []
    cap_bytes, run_bytes = request.param
    # Our own pid is never traced: nothing is, until the test names its child.
    cap = Capture(CaptureOptions(tls=False, fast_path=False, max_capture_bytes=cap_bytes,
                                 pids=(os.getpid(),)), Stats())
    cap.start(events.append)
    cap.events = events  # type: ignore[attr-defined]
    cap.cap_bytes, cap.run_bytes = cap_bytes, run_bytes  # type: ignore[attr-defined]
    yield cap
    cap.close()


# The child: per connection, the client's first write, then `calls`: each a list of
# segments the writer sends with one writev (server -> client) and the reader takes with
# one recvmsg_into(MSG_WAITALL) into buffers of the `read` sizes (or os.readv). Prints
# the fds, then the sizes each call moved, as JSON.
CHILD = textwrap.dedent("""
    import json, os, socket, struct, sys
    plan = json.loads(sys.argv[1])
    srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    print(json.dumps({"server": conn.fileno(), "client": cli.fileno()}), flush=True)
    sys.stdin.readline()  # traced from here on
    first = bytes.fromhex(plan["first"])
    cut = plan["cut"]  # the kernel infers the protocol from the first segment's bytes
    cli.sendmsg([first[:cut[0]], first[cut[0]:cut[1]], first[cut[1]:]])
    got = bytearray()
    while len(got) < len(first):
        got += conn.recv(65536)
    assert got == first
    moved = []
    for call in plan["calls"]:
        segs = [bytes.fromhex(s) for s in call["write"]]
        n = os.writev(conn.fileno(), segs)
        bufs = [bytearray(k) for k in call["read"]]
        if call.get("readv"):
            m = os.readv(cli.fileno(), bufs)
        else:
            m, _, _, _ = cli.recvmsg_into(bufs, 0, socket.MSG_WAITALL)
        assert b"".join(bufs)[:m] == b"".join(segs)[:m]
        moved.append([n, m])
    print(json.dumps(moved), flush=True)
""")


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> list[bytes]:
    """An HTTP/2 frame as nginx writes it: header and payload in separate buffers."""
    return [len(payload).to_bytes(3, "big") + bytes([ftype, flags]) + sid.to_bytes(4, "big"),
            payload]


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def run_child(capture, first: bytes, cut: tuple[int, int],
              calls: list[dict]) -> tuple[dict, list, list]:
    plan = {"first": first.hex(), "cut": cut,
            "calls": [dict(c, write=[s.hex() for s in c["write"]]) for c in calls]}
    child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(plan)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fds = json.loads(child.stdout.readline())
        capture.set_pid_filter([child.pid])
        before = capture.loss_counters()
        child.stdin.write("go\n")
        child.stdin.flush()
        moved = json.loads(child.stdout.readline())
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
    poll_until_quiet(capture, 0.3, 10.0)
    after = capture.loss_counters()
    capture.set_pid_filter([os.getpid()])
    events = [e for e in capture.events if e.tgid == child.pid]
    capture.events.clear()
    diff = {k: after[k] - before[k] for k in ("truncated_events", "truncated_bytes",
                                              "read_fault", "iovec_skipped", "ringbuf_full")}
    return fds, moved, [events, diff]


def stream_records(events: list, fd: int, direction: Direction) -> list[DataEvent]:
    out = [e for e in events if isinstance(e, DataEvent) and e.fd == fd
           and e.direction is direction]
    for prev, cur in zip(out, out[1:]):
        assert cur.position == prev.position + prev.size, (prev, cur)
    return out


def shape(records: list[DataEvent]) -> list[tuple[int, int]]:
    return [(e.size, len(e.data)) for e in records]


def expected_records(segments: list[bytes], cap: int, run_max: int) -> list[tuple[int, bytes]]:
    """(size, captured bytes) of each record the kernel is to emit for one call: runs
    of segments that fit run_max together; a larger segment alone, its first cap bytes."""
    out: list[tuple[int, bytes]] = []
    run = b""
    for seg in segments:
        if not seg:
            continue
        if run and len(run) + len(seg) > run_max:
            out.append((len(run), run))
            run = b""
        if len(seg) > run_max:
            out.append((len(seg), seg[:cap]))
        else:
            run += seg
    if run:
        out.append((len(run), run))
    return out


def check(capture, records: list[DataEvent], calls: list[list[bytes]]) -> None:
    want = [r for segs in calls for r in expected_records(segs, capture.cap_bytes,
                                                          capture.run_bytes)]
    assert [(e.size, e.data) for e in records] == want


def test_http2_frames_in_writev_and_recvmsg_are_one_record_per_call(capture):
    settings = frame(4, 0, 0, b"")
    headers = frame(1, 4, 1, os.urandom(100))  # HEADERS, END_HEADERS
    data_small = frame(0, 1, 1, b"d" * 616)  # DATA, END_STREAM (nginx's index.html)
    # 20 frames: 40 segments, past the 16 the syscall's program walks (a tail call)
    many = [s for i in range(20) for s in frame(0, 0, 3, bytes([65 + i]) * 20)]
    cap, run = capture.cap_bytes, capture.run_bytes
    exact = frame(0, 0, 5, b"e" * (run - 9))  # header + payload = a run: still one record
    over = frame(0, 0, 5, b"o" * (run - 8))  # one byte more: header, then payload alone
    big_size = 2 * cap + 1808  # truncated (10000 bytes with a 4 KiB capture)
    big = frame(0, 0, 7, os.urandom(big_size)) + frame(0, 1, 7, b"t" * 50)
    gaps = [b"", *frame(8, 0, 0, b"\x00\x00\x10\x00"), b""]  # empty segments skipped
    writes = [settings + headers + data_small, many, exact, over, big, gaps]
    calls = []
    for i, segs in enumerate(writes):
        total = sum(map(len, segs))
        # a call that fits: the reader's buffers split it elsewhere than the writer's
        # segments (readv once, recvmsg otherwise); else the writer's segment sizes
        read = [1, 7, total - 8] if total <= run else [len(s) for s in segs if s]
        calls.append({"write": segs, "read": read, "readv": i == 1})
    fds, moved, (events, diff) = run_child(capture, PREFACE + b"".join(settings), (24, 30), calls)
    assert [n for n, _ in moved] == [m for _, m in moved] == [sum(map(len, s)) for s in writes]
    server = stream_records(events, fds["server"], Direction.EGRESS)
    check(capture, server, writes)
    assert shape(server) == [(743, 743), (580, 580), (run, run), (9, 9), (run - 8, run - 8),
                             (9, 9), (big_size, cap), (59, 59), (13, 13)]
    client = stream_records(events, fds["client"], Direction.INGRESS)
    check(capture, client, writes)
    assert shape(client) == shape(server)
    # the client's first write (preface, SETTINGS in two pieces: a sendmsg of three
    # segments): one record
    first = stream_records(events, fds["client"], Direction.EGRESS)
    assert [(e.position, e.data) for e in first] == [(0, PREFACE + b"".join(settings))]
    # truncated: exactly the big segment, once per side
    assert diff == {"truncated_events": 2, "truncated_bytes": 2 * (big_size - cap),
                    "read_fault": 0, "iovec_skipped": 0, "ringbuf_full": 0}


def test_http1_sendmsg_and_writev_are_one_record_per_call(capture):
    request = b"GET /x HTTP/1.1\r\nHost: example\r\nUser-Agent: t\r\n\r\n"
    body = os.urandom(300)
    head = [b"HTTP/1.1 200 OK\r\n", b"Content-Length: 300\r\n", b"X-A: b\r\n", b"\r\n"]
    writes = [head + [body[:100], body[100:]]]
    calls = [{"write": writes[0], "read": [5, sum(map(len, writes[0])) - 5]}]
    fds, moved, (events, diff) = run_child(capture, request, (17, len(request) - 2), calls)
    sent = stream_records(events, fds["client"], Direction.EGRESS)
    assert [(e.position, e.size, e.data) for e in sent] == [(0, len(request), request)]
    received = stream_records(events, fds["server"], Direction.INGRESS)
    assert b"".join(e.data for e in received) == request
    response = b"".join(writes[0])
    out = stream_records(events, fds["server"], Direction.EGRESS)
    assert [(e.position, e.size, e.data) for e in out] == [(0, len(response), response)]
    back = stream_records(events, fds["client"], Direction.INGRESS)
    assert [(e.position, e.size, e.data) for e in back] == [(0, len(response), response)]
    assert diff["truncated_events"] == 0 and diff["read_fault"] == 0
