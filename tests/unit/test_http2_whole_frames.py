"""FrameReader's whole-frame path (an unpadded DATA or HEADERS frame whose payload is
all in the chunk) gives what the general path gives: the same transcripts fed whole
and a byte or a few bytes at a time (which never takes it) report the same exchanges
and counters."""

from __future__ import annotations

from otel_ebpf.exchange import Role
from otel_ebpf.protocols.http2.frames import END_HEADERS, END_STREAM, HEADERS
from tests.unit.test_http2_support import (
    Chunk,
    H2Pair,
    TO_CLIENT,
    TO_SERVER,
    frame,
    make_session,
    replay,
)


def _transcript() -> list[Chunk]:
    pair = H2Pair()
    for i in range(6):
        sid = pair.request("/r%d" % i, method="POST" if i % 2 else "GET",
                           body=b"q" * (i * 700), extra=[("x-i", str(i))])
        pair.respond(sid, 200 + i, body=b"p" * (i * 5000), extra=[("server", "s")],
                     pad_length=7 if i == 3 else None,
                     trailers=[("x-t", "1")] if i == 4 else None)
    sid = pair.client.get_next_available_stream_id()  # priority field, no body
    pair.client.send_headers(sid, [(":method", "GET"), (":scheme", "http"),
                                   (":authority", "a"), (":path", "/p")], end_stream=True,
                             priority_weight=100)
    pair.flush()
    pair.respond(sid, 204)
    chunks = list(pair.chunks)
    # a request header block in HEADERS + CONTINUATION, and an empty DATA frame ending it
    block = pair.client.encoder.encode([(":method", "PUT"), (":scheme", "http"),
                                        (":authority", "a"), (":path", "/c")])
    chunks.append(Chunk(TO_SERVER, frame(HEADERS, 0, 101, block[:3])
                        + frame(9, END_HEADERS, 101, block[3:]) + frame(0, END_STREAM, 101, b"")))
    response = pair.server.encoder.encode([(":status", "201")])
    chunks.append(Chunk(TO_CLIENT, frame(HEADERS, END_HEADERS | END_STREAM, 101, response)))
    return chunks


def _report(**feed):
    session = make_session(Role.SERVER, body_prefix_bytes=64)
    out = replay(session, _transcript(), **feed)
    return [repr(x) for x in out], session.ctx.stats.snapshot()


def test_whole_frames_report_as_the_general_path_does():
    whole = _report()
    assert len(whole[0]) == 8
    assert _report(step=1) == whole
    assert _report(step=7) == whole
    assert _report(split=12) == whole
