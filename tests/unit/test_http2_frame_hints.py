"""HTTP/2 frame headers read by the kernel in uncaptured bytes (bpf/http2_walk.h) keep
the framing across the gap: DATA sizes and END_STREAM exact, header blocks in the gap
lost and counted (never invented), a missing or misplaced header a loss as before.

The records are synthetic: `kernel_records` cuts a real byte stream into calls and
captures each as the kernel does (MAX_CAPTURE_BYTES, the frame walk's tracking and
hints, bpf/http2_walk.h), so each test says which calls a process made.
"""

from __future__ import annotations

from hpack import Encoder

from otel_ebpf.exchange import Outcome, Role
from otel_ebpf.protocols.http2 import PREFACE
from otel_ebpf.protocols.http2.frames import (
    DATA,
    END_HEADERS,
    END_STREAM,
    HEADERS,
    SETTINGS,
)
from tests.unit.test_http2_support import INGRESS, EGRESS, encode_block, frame, make_session

CAP = 4096  # MAX_CAPTURE_BYTES
MAX_FRAME = 16384


def client_stream(count: int) -> bytes:
    """The client's bytes: preface, SETTINGS, one GET per stream 1, 3, 5..."""
    enc = Encoder()
    out = [PREFACE, frame(SETTINGS, 0, 0, b"")]
    for i in range(count):
        block = encode_block([(":method", "GET"), (":scheme", "http"),
                              (":authority", "example.com"), (":path", "/big/%d" % i)], enc)
        out.append(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, block))
    return b"".join(out)


def response(sid: int, body_size: int, enc: Encoder, status: int = 200) -> bytes:
    """HEADERS then DATA frames of MAX_FRAME bytes, END_STREAM on the last."""
    block = encode_block([(":status", str(status)), ("content-type", "application/octet-stream")],
                         enc)
    out = [frame(HEADERS, END_HEADERS, sid, block)]
    for at in range(0, body_size, MAX_FRAME):
        piece = bytes([sid & 0xFF]) * min(MAX_FRAME, body_size - at)
        out.append(frame(DATA, END_STREAM if at + MAX_FRAME >= body_size else 0, sid, piece))
    return b"".join(out)


def kernel_records(stream: bytes, sizes: list[int], cap: int = CAP):
    """(captured bytes, size, frames) per call of these sizes, as bpf/http2_walk.h
    hands them over: the next header's offset is tracked across calls (a header a call
    ends in within its length field: the next call completes it); headers not wholly
    captured are handed over keyed by distance before the call's end."""
    assert sum(sizes) == len(stream)
    records = []
    pos = 0
    next_header: int | bytes = 0  # bytes: the first 1 or 2 bytes of a split header
    for size in sizes:
        chunk = stream[pos : pos + size]
        frames = {}
        if isinstance(next_header, bytes):  # complete the split header's length
            k = len(next_header)
            off = 9 - k + int.from_bytes(next_header + chunk[: 3 - k], "big")
        else:
            off = next_header
            if pos == 0 and off == 0 and chunk[:8] == PREFACE[:8]:
                off = 24
        while off < size:
            header = chunk[off : off + 9]  # (fewer bytes: split across the call's end)
            if off + len(header) > cap:
                frames[off - size] = header
            if len(header) < 3:
                break
            off += 9 + int.from_bytes(header[:3], "big")
        next_header = chunk[off:] if off < size else off - size
        records.append((chunk[:cap], size, frames or None))
        pos += size
    return records


def run(role: Role, client: bytes, server: bytes, server_sizes: list[int], *,
        hints: bool = True, edit=None):
    """Replay: the client's bytes in one call, then the server's in calls of
    `server_sizes`; `edit(index, frames)` may change the hints of a call."""
    session = make_session(role)
    ingress_is_client = role == Role.SERVER
    client_dir = INGRESS if ingress_is_client else EGRESS
    server_dir = 1 - client_dir
    ts = 1000
    for data, size, frames in kernel_records(client, [len(client)]):
        session.feed(client_dir, data, ts, 1)
        if size > len(data):
            session.gap(client_dir, size - len(data), ts, frames if hints else None)
    for i, (data, size, frames) in enumerate(kernel_records(server, server_sizes)):
        ts += 1000
        if edit is not None:
            frames = edit(i, frames)
        session.feed(server_dir, data, ts, 2)
        if size > len(data):
            session.gap(server_dir, size - len(data), ts, frames if hints else None)
    return session


def server_bytes(bodies: list[int]) -> tuple[bytes, list[int]]:
    """The server's stream and its calls: SETTINGS, then one call per response."""
    enc = Encoder()
    settings = frame(SETTINGS, 0, 0, b"")
    responses = [response(2 * i + 1, size, enc) for i, size in enumerate(bodies)]
    return settings + b"".join(responses), [len(settings)] + [len(r) for r in responses]


BODIES = [100_000, 1_000_000, 100_000, 12_345]


def test_large_responses_in_one_write_each_come_out_exact_on_both_sides():
    server, sizes = server_bytes(BODIES)
    for role in (Role.SERVER, Role.CLIENT):
        session = run(role, client_stream(len(BODIES)), server, sizes)
        out = session.ctx.out
        assert [(e.stream_id, e.outcome, e.status_code, e.response_body_size) for e in out] == [
            (2 * i + 1, Outcome.OK, 200, size) for i, size in enumerate(BODIES)]
        assert [e.target for e in out] == ["/big/%d" % i for i in range(len(BODIES))]
        counters = session.ctx.stats._counters
        # every DATA header past the first frame of a response came from the kernel
        assert counters["http2.kernel_frame_headers"] == sum(
            -(-size // MAX_FRAME) - 1 for size in BODIES)
        assert "http2.sync_lost" not in counters


def test_without_the_headers_the_same_calls_are_truncated():
    server, sizes = server_bytes(BODIES)
    session = run(Role.CLIENT, client_stream(len(BODIES)), server, sizes, hints=False)
    out = session.ctx.out
    assert len(out) == len(BODIES)
    assert all(e.outcome == Outcome.TRUNCATED for e in out[:3])
    assert out[0].response_body_size < BODIES[0]


def test_reads_at_any_boundary_keep_the_framing():
    """A client reading 16 KiB, 10000 or 4099 bytes at a time: calls begin mid-frame,
    and headers straddle the capture limit and the calls' ends. Every body size is
    exact; a response whose HEADERS frame lay past a call's capture limit is TRUNCATED
    for its lost header block (status absent), every other one OK."""
    server, _ = server_bytes(BODIES)
    offsets = header_offsets(server)
    # a step that splits a header with 1 byte, one with 2 bytes in the first call
    split_1 = offsets[5] + 1
    split_2 = next(step for step in range(5000, 20000)
                   if any(step - start % step == 2 for start in offsets))
    for step in (16384, 10000, 4099, 4096 + 5, split_1, split_2):
        sizes = [step] * (len(server) // step) + ([len(server) % step] if len(server) % step else [])
        if step in (split_1, split_2):  # the kernel hands over the header's 1 or 2 bytes
            assert any(len(h) == (1 if step == split_1 else 2)
                       for _, _, frames in kernel_records(server, sizes) if frames
                       for h in frames.values())
        session = run(Role.CLIENT, client_stream(len(BODIES)), server, sizes)
        out = session.ctx.out
        assert "http2.sync_lost" not in session.ctx.stats._counters, step
        blocks_lost = [not wholly_captured(start, end, step)
                       for start, end in headers_frames(server)]
        assert [(e.stream_id, e.response_body_size) for e in out] == [
            (2 * i + 1, size) for i, size in enumerate(BODIES)], step
        assert [e.outcome for e in out] == [
            Outcome.TRUNCATED if lost else Outcome.OK for lost in blocks_lost], step
        assert [e.status_code for e in out] == [
            None if lost else 200 for lost in blocks_lost], step
        assert session.ctx.stats._counters.get("http2.lost_header_blocks", 0) == sum(blocks_lost)


def wholly_captured(start: int, end: int, step: int) -> bool:
    """Are bytes [start, end) of a stream read in calls of `step` all captured?"""
    return start // step == (end - 1) // step and end - (start // step) * step <= CAP


def headers_frames(stream: bytes) -> list[tuple[int, int]]:
    return [(off, off + 9 + int.from_bytes(stream[off : off + 3], "big"))
            for off in header_offsets(stream) if stream[off + 3] == HEADERS]


def header_offsets(stream: bytes) -> list[int]:
    off, out = 0, []
    while off + 9 <= len(stream):
        out.append(off)
        off += 9 + int.from_bytes(stream[off : off + 3], "big")
    return out


def test_a_header_straddling_the_capture_limit():
    """The header's first bytes are captured (the reader holds them), its rest is in
    the gap: the kernel's 9 bytes complete it."""
    server, _ = server_bytes([100_000])
    first = header_offsets(server)[3]  # a DATA header
    sizes = [first - 4090, len(server) - (first - 4090)]  # it starts 6 bytes before CAP
    session = run(Role.CLIENT, client_stream(1), server, sizes)
    (ex,) = session.ctx.out
    assert (ex.outcome, ex.response_body_size) == (Outcome.OK, 100_000)


def test_header_blocks_in_the_gap_are_lost_and_counted_never_invented():
    """Three small responses in one write: the 2nd and 3rd HEADERS lie past the
    capture limit. Their sizes and ends are exact; their fields are absent."""
    enc = Encoder()
    settings = frame(SETTINGS, 0, 0, b"")
    bodies = [5000, 2500, 2000]
    responses = b"".join(response(2 * i + 1, size, enc, status=200 + i)
                         for i, size in enumerate(bodies))
    session = run(Role.CLIENT, client_stream(3), settings + responses,
                  [len(settings), len(responses)])
    out = session.ctx.out
    assert [(e.stream_id, e.response_body_size) for e in out] == [(1, 5000), (3, 2500), (5, 2000)]
    assert (out[0].outcome, out[0].status_code) == (Outcome.OK, 200)
    for ex in out[1:]:
        assert ex.outcome == Outcome.TRUNCATED and ex.error_reason == "gap_in_headers"
        assert ex.status_code is None  # absent, not guessed
    assert session.ctx.stats._counters["http2.lost_header_blocks"] == 2
    assert "http2.sync_lost" not in session.ctx.stats._counters


def test_a_walk_that_fell_out_of_step_leaves_a_plain_gap():
    """The kernel's hints stop after the first (its walk met a header it could not
    validate): the reader uses what is known, then loses the framing there."""
    server, sizes = server_bytes([100_000])

    def keep_first(i, frames):
        if not frames:
            return frames
        first = min(frames)
        return {first: frames[first]}

    session = run(Role.CLIENT, client_stream(1), server, sizes, edit=keep_first)
    (ex,) = session.ctx.out
    assert ex.outcome == Outcome.TRUNCATED and ex.error_reason == "gap_in_frames"
    assert ex.response_body_size < 100_000
    assert session.ctx.stats._counters["http2.kernel_frame_headers"] == 1
    assert session.ctx.stats._counters["http2.sync_lost"] == 1


def test_a_header_at_a_position_the_reader_does_not_expect_is_not_used():
    """Hints from a walk that guessed wrong (after it lost track) sit where no frame
    starts: they must not be taken for the framing."""
    server, sizes = server_bytes([100_000])

    def shift(i, frames):
        return {k + 1: v for k, v in frames.items()} if frames else frames

    session = run(Role.CLIENT, client_stream(1), server, sizes, edit=shift)
    (ex,) = session.ctx.out
    assert ex.outcome == Outcome.TRUNCATED and ex.response_body_size < 100_000
    assert "http2.kernel_frame_headers" not in session.ctx.stats._counters
