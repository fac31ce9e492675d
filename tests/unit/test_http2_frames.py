"""HTTP/2 framing under capture conditions: any chunking, gaps inside payloads and
across frame headers, resynchronisation, connections seen mid-stream, memory bounds."""

from __future__ import annotations

from otel_ebpf.exchange import Outcome, Role
from otel_ebpf.protocols.http2 import PREFACE
from otel_ebpf.protocols.http2.frames import DATA, END_HEADERS, END_STREAM, HEADERS, SETTINGS
from tests.unit.test_http2_support import (
    EGRESS,
    INGRESS,
    TO_SERVER,
    Chunk,
    H2Pair,
    encode_block,
    frame,
    make_session,
    replay,
    ts_of,
)


def _mixed_transcript() -> H2Pair:
    """Unary, padded, interleaved, reset and gRPC streams on one connection."""
    pair = H2Pair()
    a = pair.request("/one", extra=[("user-agent", "ua/1"), ("x-b3", "abc")])
    pair.respond(a, body=b"hello", extra=[("server", "t")])
    b = pair.request("/two", method="POST", body=b"p" * 70, end=False)
    c = pair.request("/three", extra=[("user-agent", "ua/1")])
    pair.client.send_data(b, b"q" * 30, end_stream=True, pad_length=9)
    pair.server.send_headers(c, [(":status", "404")])
    pair.server.send_headers(b, [(":status", "200"), ("server", "t")])
    pair.server.send_data(b, b"r" * 500, pad_length=20)
    pair.server.send_data(c, b"nf", end_stream=True)
    pair.server.send_data(b, b"s" * 5, end_stream=True)
    pair.flush()
    d = pair.request("/reset-me")
    pair.client.reset_stream(d, error_code=8)
    pair.flush()
    pair.grpc_call("/pkg.Svc/Call", [b"a", b"bb"], [b"c", b"dd", b"eee"], status=3)
    return pair


def _summary(out):
    return [(e.stream_id, e.method, e.target, e.status_code, e.request_body_size,
             e.response_body_size, e.outcome, e.error_reason, e.rpc, e.start_time_unix_nano,
             e.end_time_unix_nano, e.user_agent) for e in out]


def test_every_split_point_and_one_byte_feeds_give_the_same_exchanges():
    pair = _mixed_transcript()
    for role in (Role.SERVER, Role.CLIENT):
        expected = _summary(replay(make_session(role), pair.chunks, role))
        assert len(expected) == 5
        assert [e[6] for e in expected] == [Outcome.OK] * 3 + [Outcome.STREAM_RESET, Outcome.OK]
        assert _summary(replay(make_session(role), pair.chunks, role, step=1)) == expected
        longest = max(len(c.data) for c in pair.chunks)
        for split in range(1, longest):
            got = _summary(replay(make_session(role), pair.chunks, role, split=split))
            assert got == expected, split


def test_gap_inside_data_payload_keeps_sync_and_exact_sizes():
    pair = H2Pair()
    sid = pair.request("/upload", method="POST", body=b"u" * 10000)
    pair.respond(sid, body=b"d" * 9000, pad_length=100)
    second = pair.request("/after", extra=[("user-agent", "ua/2")])
    pair.respond(second, body=b"ok")
    session = make_session()
    out = replay(session, pair.chunks, capture_limit=4096)
    assert [(e.target, e.request_body_size, e.response_body_size, e.outcome, e.user_agent)
            for e in out] == [
        ("/upload", 10000, 9000, Outcome.OK, None),
        ("/after", 0, 2, Outcome.OK, "ua/2"),
    ]
    assert session.ctx.stats._counters["http2.sync_lost"] == 0


def test_gap_across_frame_headers_truncates_the_streams_of_that_direction_and_resyncs():
    pair = H2Pair()
    big = pair.request("/big")
    other = pair.request("/other")
    # 20000 bytes: DATA frames of 16384 and 3616 in one write; the second frame header is
    # beyond the 4096 captured bytes.
    pair.respond(big, body=b"b" * 20000)
    lost_at = len(pair.chunks) - 1
    pair.respond(other, body=b"o")
    after = pair.request("/after-resync", extra=[("user-agent", "ua/3")])
    pair.respond(after, body=b"fine", extra=[("server", "s")])
    session = make_session()
    out = replay(session, pair.chunks, capture_limit=4096)
    assert [(e.target, e.outcome, e.error_reason, e.status_code, e.end_time_unix_nano)
            for e in out[:2]] == [
        ("/big", Outcome.TRUNCATED, "gap_in_frames", 200, ts_of(lost_at)),
        ("/other", Outcome.TRUNCATED, "gap_in_frames", None, ts_of(lost_at)),
    ]
    assert [(e.target, e.outcome, e.status_code, e.response_body_size, e.user_agent)
            for e in out[2:]] == [("/after-resync", Outcome.OK, 200, 4, "ua/3")]
    counters = session.ctx.stats._counters
    assert counters["http2.sync_lost"] == 1 and counters["http2.resyncs"] == 1
    assert session.disabled is None


def test_gap_across_request_frames_marks_open_requests_truncated():
    pair = H2Pair()
    sid = pair.request("/stream-up", method="POST", body=b"x" * 20000, end=False)
    pair.client.send_data(sid, b"y" * 10, end_stream=True)
    pair.flush()
    pair.respond(sid, body=b"done")
    (ex,) = replay(make_session(), pair.chunks, capture_limit=4096)
    assert (ex.outcome, ex.error_reason, ex.status_code, ex.response_body_size) == (
        Outcome.TRUNCATED, "gap_in_frames", 200, 4)


def test_gap_inside_a_header_block_loses_its_fields_and_resets_hpack():
    pair = H2Pair()
    first = pair.request("/first", extra=[("user-agent", "ua/1"), ("x-pad", "p" * 200)])
    pair.respond(first)
    mark = len(pair.chunks)
    second = pair.request("/second", extra=[("user-agent", "ua/1"), ("x-pad", "p" * 200)])
    pair.respond(second)
    third = pair.request("/third", extra=[("user-agent", "ua/1")])
    pair.respond(third)
    session = make_session()
    replay(session, pair.chunks[:mark])
    # The first request's header block is captured whole; of the second only 12 bytes
    # (frame header + 3 bytes), the rest of the block is a gap inside its payload.
    chunk = pair.chunks[mark]
    assert chunk.side == TO_SERVER
    session.feed(INGRESS, chunk.data[:12], ts_of(mark), 1)
    session.gap(INGRESS, len(chunk.data) - 12, ts_of(mark))
    out = replay(session, pair.chunks[mark + 1:], start=mark + 1)
    assert [(e.stream_id, e.method, e.target, e.user_agent, e.outcome, e.error_reason)
            for e in session.ctx.out] == [
        (first, "GET", "/first", "ua/1", Outcome.OK, None),
        (second, "", "", None, Outcome.TRUNCATED, "gap_in_headers"),
        # user-agent was in the dynamic table: now unknown, left out (not guessed).
        (third, "GET", "/third", None, Outcome.OK, None),
    ]
    assert out is session.ctx.out
    counters = session.ctx.stats._counters
    assert counters["http2.lost_header_blocks"] == 1
    assert counters["http2.hpack_unknown_fields"] >= 1
    assert counters["http2.sync_lost"] == 0


def test_mid_stream_attach_decodes_what_the_static_table_and_literals_allow():
    pair = H2Pair()
    truth = {}
    for i in range(3):
        sid = pair.request(f"/warm{i}", extra=[("user-agent", "ua/9"), ("x-tenant", "t1")])
        truth[sid] = f"/warm{i}"
        pair.respond(sid, extra=[("server", "srv")])
    mark = len(pair.chunks)
    for i in range(3):
        sid = pair.request(f"/late{i}", extra=[("user-agent", "ua/9"), ("x-new", "v")])
        truth[sid] = f"/late{i}"
        pair.respond(sid, body=b"x" * i)
    for role in (Role.SERVER, Role.CLIENT, Role.UNKNOWN):
        session = make_session(role, strict=False)
        feed_role = Role.CLIENT if role == Role.CLIENT else Role.SERVER
        out = replay(session, pair.chunks[mark:], feed_role, start=mark)
        assert [(e.target, e.method, e.status_code, e.response_body_size, e.user_agent, e.host)
                for e in out] == [(f"/late{i}", "GET", 200, i, None, None) for i in range(3)]
        assert all(truth[e.stream_id] == e.target for e in out)
        # :authority and user-agent were indexed before the attach, every time.
        assert session.ctx.stats._counters["http2.hpack_unknown_fields"] >= 6
        assert session.conn.role == feed_role


def test_mid_stream_first_chunk_inside_a_frame_is_skipped_until_a_frame_start():
    pair = H2Pair()
    sid = pair.request("/a", method="POST", body=b"z" * 3000)
    pair.respond(sid)
    mark = len(pair.chunks)
    sid2 = pair.request("/b")
    pair.respond(sid2)
    session = make_session(strict=False)
    # Mid-stream: the first bytes seen are the tail of the POST body's DATA frame.
    body_chunk = next(c for c in pair.chunks if c.side == TO_SERVER and len(c.data) > 3000)
    session.feed(INGRESS, body_chunk.data[-1000:], 1, 1)
    out = replay(session, pair.chunks[mark:], start=mark)
    assert [(e.target, e.status_code) for e in out] == [("/b", 200)]
    assert session.ctx.stats._counters["http2.skipped_bytes"] == 1000


def test_protocol_errors_lose_sync_instead_of_guessing():
    block = encode_block([(":method", "GET"), (":scheme", "http"), (":path", "/x")])
    client = PREFACE + frame(SETTINGS, 0, 0, b"")
    client += frame(HEADERS, END_STREAM, 1, block[:2])  # no END_HEADERS...
    client += frame(DATA, 0, 1, b"oops")  # ...but no CONTINUATION follows
    session = make_session()
    replay(session, [Chunk(TO_SERVER, client)])
    assert session.ctx.stats._counters["http2.sync_lost"] == 1
    assert session.streams == {}
    # The next chunk that starts with a frame header resyncs.
    nxt = frame(HEADERS, END_HEADERS | END_STREAM, 3, encode_block(
        [(":method", "GET"), (":scheme", "http"), (":path", "/y")]))
    session.feed(INGRESS, nxt, 5000, 1)
    session.feed(EGRESS, frame(HEADERS, END_HEADERS | END_STREAM, 3,
                               encode_block([(":status", "200")])), 6000, 2)
    assert [(e.target, e.outcome) for e in session.ctx.out] == [("/y", Outcome.OK)]


def test_a_client_direction_without_the_preface_is_not_http2():
    session = make_session()
    session.feed(INGRESS, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1, 1)
    assert session.disabled == "not_http2"
    assert session.ctx.stats._counters["conntrack.disabled.not_http2"] == 1


def test_header_block_over_max_header_bytes_is_skipped_not_buffered():
    pair = H2Pair()
    sid = pair.request("/huge", extra=[("x-big", "v" * 3000)])
    pair.respond(sid)
    session = make_session(max_header_bytes=1024)
    peak = 0
    for i, chunk in enumerate(pair.chunks):
        direction = INGRESS if chunk.side == TO_SERVER else EGRESS
        for j in range(len(chunk.data)):
            session.feed(direction, chunk.data[j : j + 1], ts_of(i), 1)
            peak = max(peak, session.buffered())
    assert peak <= 1024
    (ex,) = session.ctx.out
    assert (ex.outcome, ex.error_reason, ex.status_code) == (
        Outcome.TRUNCATED, "gap_in_headers", 200)
    assert session.ctx.stats._counters["http2.header_block_too_large"] == 1


def test_buffer_limit_disables_the_session():
    pair = H2Pair()
    pair.request("/x", extra=[("x-big", "v" * 600)])
    session = make_session(max_buffer_bytes=256)
    replay(session, pair.chunks, step=100)
    assert session.disabled == "buffer_limit"
    assert session.ctx.stats._counters["conntrack.disabled.buffer_limit"] == 1
    assert session.buffered() == 0


def test_trailers_of_a_stream_begun_before_the_attach_do_not_open_a_stream():
    session = make_session(strict=False)
    session.feed(INGRESS, frame(HEADERS, END_HEADERS | END_STREAM, 7,
                                encode_block([("x-checksum", "c")])), 1, 1)
    session.feed(EGRESS, frame(HEADERS, END_HEADERS | END_STREAM, 7,
                               encode_block([(":status", "200")])), 2, 2)
    assert session.ctx.out == [] and session.streams == {}
    counters = session.ctx.stats._counters
    assert counters["http2.unpaired_trailers"] == 1 and counters["http2.unpaired_responses"] == 1


def test_bad_padding_loses_sync():
    block = encode_block([(":method", "POST"), (":scheme", "http"), (":path", "/")])
    client = PREFACE + frame(SETTINGS, 0, 0, b"") + frame(HEADERS, END_HEADERS, 1, block)
    client += frame(DATA, 0x08, 1, bytes([200]) + b"short")  # pad length beyond the frame
    session = make_session()
    replay(session, [Chunk(TO_SERVER, client)])
    assert session.ctx.stats._counters["http2.sync_lost"] == 1
    assert list(session.streams) == [1] and session.streams[1].truncated == "bad_padding"


def test_role_unknown_the_preface_direction_is_the_client_and_frames_never_pass_as_it():
    session = make_session(Role.UNKNOWN)
    session.feed(INGRESS, frame(SETTINGS, 0, 0, b""), 1, 1)  # the server's first frame
    session.feed(EGRESS, PREFACE + frame(SETTINGS, 0, 0, b""), 2, 2)
    assert session.conn.role == Role.CLIENT and session.disabled is None
    session = make_session(Role.SERVER)
    # A preface where the server's frames are due is read as a (far too long) frame.
    session.feed(EGRESS, PREFACE + frame(SETTINGS, 0, 0, b""), 1, 2)
    assert session.ctx.stats._counters["http2.sync_lost"] == 1


def test_random_chunking_and_gaps_never_invent_anything():
    """Seeded random captures of a mixed transcript: writes cut anywhere, tails lost like
    the kernel's 4096-byte truncation or whole writes lost. Whatever is reported as OK
    has exact sizes, and every decoded field is the true one or left out."""
    import random

    pair = _mixed_transcript()
    truth = {e.stream_id: e for e in replay(make_session(), pair.chunks)}
    rng = random.Random(12)
    reported_ok = 0
    for _ in range(300):
        session = make_session(strict=rng.random() < 0.7)
        for i, chunk in enumerate(pair.chunks):
            direction = INGRESS if chunk.side == TO_SERVER else EGRESS
            data = chunk.data
            roll = rng.random()
            if roll < 0.15:  # the write's tail was not captured
                keep = rng.randrange(len(data))
                pieces, lost = [data[:keep]], len(data) - keep
            elif roll < 0.2:  # the whole write was lost
                pieces, lost = [], len(data)
            else:
                cut = rng.randrange(len(data) + 1)
                pieces, lost = [data[:cut], data[cut:]], 0
            for piece in pieces:
                if piece:
                    session.feed(direction, piece, ts_of(i), 1)
            if lost:
                session.gap(direction, lost, ts_of(i))
        session.close(10**9, Outcome.CONNECTION_CLOSED, "connection_closed")
        for ex in session.ctx.out:
            true = truth[ex.stream_id]
            assert ex.method in ("", true.method) and ex.target in ("", true.target)
            assert ex.user_agent in (None, true.user_agent)
            assert ex.status_code in (None, true.status_code)
            if ex.outcome == Outcome.OK:
                reported_ok += 1
                assert (ex.request_body_size, ex.response_body_size) == (
                    true.request_body_size, true.response_body_size)
                if ex.rpc is not None:
                    # (None: grpc-status was an HPACK entry inserted in lost bytes)
                    assert ex.rpc.status_code in (None, true.rpc.status_code)
                    assert ex.rpc.request_messages <= true.rpc.request_messages
                    assert ex.rpc.response_messages <= true.rpc.response_messages
    assert reported_ok > 300  # most captures still carry most exchanges whole


def test_random_bytes_never_raise():
    import random

    rng = random.Random(5)
    for _ in range(200):
        session = make_session(Role.UNKNOWN, strict=False)
        for _ in range(20):
            size = rng.randrange(1, 64)
            data = bytes(rng.randrange(256) for _ in range(size))
            if rng.random() < 0.3:  # start some chunks like frames, to get past resync
                data = frame(rng.randrange(10), rng.randrange(256), rng.randrange(4), data)
            session.feed(rng.randrange(2), data, 1, 1)
            if rng.random() < 0.1:
                session.gap(rng.randrange(2), rng.randrange(1, 100), 1)
        session.expire(10**12, 1)
        session.close(10**12, Outcome.CONNECTION_CLOSED, "connection_closed")


def test_long_resync_disables_only_a_direction_never_seen_in_sync():
    junk = b"\xff" * 1000  # never a frame header (length far beyond 16 KiB)
    session = make_session(strict=False, max_resync_bytes=4000)
    for i in range(5):
        session.feed(INGRESS, junk, i, 1)
    assert session.disabled == "not_http2"
    session = make_session(max_resync_bytes=4000)
    pair = H2Pair()
    replay(session, pair.chunks[:1])  # the preface and SETTINGS: in sync
    session.gap(INGRESS, 10, 5)  # across a frame header: lost
    for i in range(10):
        session.feed(INGRESS, junk, 10 + i, 1)
    assert session.disabled is None
    sid = pair.request("/still-decoded")
    pair.respond(sid)
    out = replay(session, pair.chunks[1:], start=100)
    assert [e.target for e in out] == ["/still-decoded"]
