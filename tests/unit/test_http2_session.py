"""Http2Session on real h2 byte streams: one exchange per stream, outcomes, bounds."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest

from otel_ebpf.exchange import Outcome, Role
from otel_ebpf.protocols.base import UpgradeRequest
from otel_ebpf.protocols.http2 import PREFACE, Http2Session, sniff
from otel_ebpf.protocols.http2.frames import END_HEADERS, END_STREAM, HEADERS, SETTINGS
from tests.unit.test_http2_support import (
    TO_CLIENT,
    TO_SERVER,
    Chunk,
    H2Pair,
    encode_block,
    frame,
    make_context,
    make_session,
    replay,
    ts_of,
)

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _first(chunks, side, after=0):
    return next(i for i, c in enumerate(chunks) if i >= after and c.side == side)


def _last(chunks, side):
    return max(i for i, c in enumerate(chunks) if c.side == side)


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_unary_exchange_fields_and_timing(role):
    pair = H2Pair()
    mark = len(pair.chunks)
    sid = pair.request(
        "/items?id=7",
        method="POST",
        body=b"x" * 321,
        extra=[("user-agent", "curl/8.5"), ("traceparent", TRACEPARENT), ("tracestate", "k=v")],
    )
    pair.respond(sid, 201, body=b"y" * 1234, extra=[("content-type", "text/plain")])
    session = make_session(role)
    out = replay(session, pair.chunks, role)
    assert len(out) == 1
    ex = out[0]
    assert (ex.method, ex.target, ex.host, ex.scheme) == (
        "POST", "/items?id=7", "example.com", "http")
    assert (ex.user_agent, ex.traceparent, ex.tracestate) == ("curl/8.5", TRACEPARENT, "k=v")
    assert (ex.status_code, ex.request_body_size, ex.response_body_size) == (201, 321, 1234)
    assert (ex.protocol_version, ex.stream_id, ex.rpc, ex.outcome) == ("2", 1, None, Outcome.OK)
    assert ex.role == role and ex.pid == 100 and ex.local_port == 8080
    assert ex.start_time_unix_nano == ts_of(_first(pair.chunks, TO_SERVER, mark))
    assert ex.end_time_unix_nano == ts_of(_last(pair.chunks, TO_CLIENT))
    assert ex.tid == 1  # the thread of the request's chunk
    assert session.ctx.active == {}
    assert not session.streams


def test_role_unknown_is_inferred_from_the_preface():
    pair = H2Pair()
    sid = pair.request("/")
    pair.respond(sid, 204)
    for role_seen, direction_role in ((Role.SERVER, Role.SERVER), (Role.CLIENT, Role.CLIENT)):
        session = make_session(Role.UNKNOWN)
        out = replay(session, pair.chunks, direction_role)
        assert [(e.method, e.target, e.status_code, e.role) for e in out] == [
            ("GET", "/", 204, role_seen)
        ]
        assert session.conn.role == role_seen
        assert session.ctx.stats._counters["conntrack.role_inferred"] == 1


def test_interleaved_streams_are_reported_each_with_its_own_sizes():
    pair = H2Pair()
    sids = [pair.request(f"/s{i}", method="PUT", body=b"q" * (100 + i), end=False)
            for i in range(3)]
    # Request bodies and responses interleaved, answered in reverse order.
    for i, sid in enumerate(sids):
        pair.client.send_data(sid, b"r" * (10 * i + 1), end_stream=True)
    pair.flush()
    for i, sid in reversed(list(enumerate(sids))):
        pair.server.send_headers(sid, [(":status", str(200 + i))])
        pair.server.send_data(sid, b"a" * (1000 * (i + 1)))
        pair.flush()
    for i, sid in enumerate(sids):
        pair.server.send_data(sid, b"b" * 7, end_stream=True)
        pair.flush()
    out = replay(make_session(), pair.chunks)
    got = {e.stream_id: (e.target, e.status_code, e.request_body_size, e.response_body_size)
           for e in out}
    assert len(out) == 3
    assert got == {
        sid: (f"/s{i}", 200 + i, 100 + i + 10 * i + 1, 1000 * (i + 1) + 7)
        for i, sid in enumerate(sids)
    }
    assert [e.stream_id for e in out] == sids  # ended in stream order (END_STREAM order)


def test_interim_1xx_is_skipped_and_trailers_do_not_replace_the_status():
    pair = H2Pair()
    sid = pair.request("/upload", method="POST", extra=[("expect", "100-continue")], end=False)
    pair.server.send_headers(sid, [(":status", "100")])
    pair.flush()
    pair.client.send_data(sid, b"z" * 50, end_stream=True)
    pair.respond(sid, 200, body=b"ok", trailers=[("x-checksum", "abc")])
    (ex,) = replay(make_session(), pair.chunks)
    assert (ex.status_code, ex.request_body_size, ex.response_body_size) == (200, 50, 2)


def test_captured_headers_are_the_allow_listed_ones():
    pair = H2Pair()
    sid = pair.request("/", extra=[("x-request-id", "abc"), ("cookie", "secret")])
    pair.respond(sid, extra=[("x-served-by", "n1"), ("set-cookie", "s")])
    ctx = make_context(capture_request_headers=("X-Request-Id",),
                       capture_response_headers=("x-served-by",))
    (ex,) = replay(make_session(ctx=ctx), pair.chunks)
    assert ex.request_headers == (("x-request-id", "abc"),)
    assert ex.response_headers == (("x-served-by", "n1"),)


def test_padding_is_not_counted_in_data_sizes():
    pair = H2Pair()
    sid = pair.request("/pad")
    pair.respond(sid, body=b"p" * 100, pad_length=50)
    (ex,) = replay(make_session(), pair.chunks)
    assert ex.response_body_size == 100


def test_body_prefix_capture_is_contiguous_from_the_start():
    pair = H2Pair()
    sid = pair.request("/b", method="POST", body=b"hello world")
    pair.respond(sid, body=b"R" * 10000)
    (ex,) = replay(make_session(body_prefix_bytes=8), pair.chunks)
    assert (ex.request_body_prefix, ex.response_body_prefix) == (b"hello wo", b"RRRRRRRR")


def test_rst_stream_from_either_side():
    pair = H2Pair()
    a = pair.request("/cancelled")
    b = pair.request("/refused")
    pair.client.reset_stream(a, error_code=8)
    pair.flush()
    pair.server.reset_stream(b, error_code=7)
    pair.flush()
    out = replay(make_session(), pair.chunks)
    assert [(e.stream_id, e.outcome, e.error_reason, e.status_code) for e in out] == [
        (a, Outcome.STREAM_RESET, "cancel", None),
        (b, Outcome.STREAM_RESET, "refused_stream", None),
    ]
    assert out[0].end_time_unix_nano == ts_of(_last(pair.chunks, TO_SERVER))


def test_rst_after_the_response_headers_keeps_the_status():
    pair = H2Pair()
    sid = pair.request("/half")
    pair.server.send_headers(sid, [(":status", "200")])
    pair.server.send_data(sid, b"d" * 10)
    pair.server.reset_stream(sid, error_code=2)
    pair.flush()
    (ex,) = replay(make_session(), pair.chunks)
    assert (ex.outcome, ex.error_reason, ex.status_code, ex.response_body_size) == (
        Outcome.STREAM_RESET, "internal_error", 200, 10)


def test_goaway_ends_unprocessed_streams_and_later_close_reports_goaway():
    pair = H2Pair()
    s1, s3, s5 = (pair.request(f"/{i}") for i in range(3))
    pair.respond(s1)
    pair.server.close_connection(error_code=0, last_stream_id=s3)
    pair.flush()
    session = make_session()
    out = replay(session, pair.chunks)
    assert [(e.stream_id, e.outcome, e.error_reason) for e in out] == [
        (s1, Outcome.OK, None),
        (s5, Outcome.GOAWAY, "no_error"),
    ]
    session.close(10**9, Outcome.CONNECTION_CLOSED, "connection_closed")
    assert [(e.stream_id, e.outcome, e.error_reason) for e in out[2:]] == [
        (s3, Outcome.GOAWAY, "no_error")
    ]
    assert session.disabled == "closed"


def test_close_expire_discard_and_active_requests():
    pair = H2Pair()
    a = pair.request("/slow")
    b = pair.request("/slower")
    session = make_session()
    ctx = session.ctx
    out = replay(session, pair.chunks)
    assert out == [] and ctx.active == {(100, "GET", "http", 8080): 2}
    assert session in ctx.pending_sessions
    start_b = ts_of(_last(pair.chunks, TO_SERVER))  # the younger request
    assert session.expire(start_b + 10, timeout_ns=100) is True  # b not timed out yet
    assert [(e.stream_id, e.outcome) for e in out] == [(a, Outcome.TIMEOUT)]
    out.clear()
    now = 10**6
    assert session.expire(now, timeout_ns=100) is False
    assert [(e.stream_id, e.outcome, e.end_time_unix_nano, e.status_code) for e in out] == [
        (b, Outcome.TIMEOUT, now, None)]
    assert ctx.active == {}
    out.clear()
    # A late response is absorbed and counted, not reported again.
    late = len(pair.chunks)
    pair.respond(a)
    replay(session, pair.chunks[late:], start=late, first_ts=10**6)
    assert out == [] and ctx.stats._counters["http.late_responses"] == 1
    # Close reports open streams; timed-out ones (b) are not reported twice.
    mark = len(pair.chunks)
    c = pair.request("/open")
    replay(session, pair.chunks[mark:], start=mark, first_ts=10**6)
    session.close(10**9, Outcome.CONNECTION_RESET, "connection_reset")
    assert [(e.stream_id, e.outcome, e.end_time_unix_nano) for e in out] == [
        (c, Outcome.CONNECTION_RESET, 10**9)]
    assert ctx.active == {} and session not in ctx.pending_sessions

    session = make_session()
    ctx = session.ctx
    pair = H2Pair()
    pair.request("/dropped")
    replay(session, pair.chunks)
    session.discard()
    assert ctx.out == [] and ctx.active == {}
    assert ctx.stats._counters["http.dropped_pending"] == 1


def test_open_streams_are_bounded_and_counted():
    pair = H2Pair()
    sids = [pair.request(f"/{i}") for i in range(5)]
    for sid in sids:
        pair.respond(sid)
    session = make_session(max_pending_requests=3)
    out = replay(session, pair.chunks)
    assert [e.stream_id for e in out] == sids[:3]
    counters = session.ctx.stats._counters
    assert counters["http2.streams_over_limit"] == 2
    assert counters["http2.unpaired_responses"] == 2


def test_upgraded_session_reports_the_http1_request_as_stream_1():
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    settings = client.initiate_upgrade_connection()
    server.initiate_upgrade_connection(settings)
    request = UpgradeRequest("GET", "/up", "h.example", "ua", None, None, (), 0, 500, 9)
    session = Http2Session.upgraded(make_session().conn, make_context(), request)
    chunks = [Chunk(TO_SERVER, client.data_to_send())]
    server.receive_data(chunks[0].data)
    server.send_headers(1, [(":status", "200")])
    server.send_data(1, b"upgraded!", end_stream=True)
    chunks.append(Chunk(TO_CLIENT, server.data_to_send()))
    assert chunks[0].data.startswith(PREFACE)
    (ex,) = replay(session, chunks)
    assert (ex.method, ex.target, ex.host, ex.user_agent, ex.stream_id) == (
        "GET", "/up", "h.example", "ua", 1)
    assert (ex.status_code, ex.response_body_size, ex.protocol_version) == (200, 9, "2")
    assert (ex.start_time_unix_nano, ex.end_time_unix_nano, ex.tid) == (500, ts_of(1), 9)
    assert session.ctx.active == {}


def test_continuation_frames_are_joined():
    block = encode_block([(":method", "GET"), (":scheme", "https"), (":path", "/cont"),
                          (":authority", "c.example"), ("user-agent", "u" * 40)])
    parts = [block[:10], block[10:20], block[20:]]
    client = PREFACE + frame(SETTINGS, 0, 0, b"")
    client += frame(HEADERS, END_STREAM, 1, parts[0])
    client += frame(9, 0, 1, parts[1]) + frame(9, END_HEADERS, 1, parts[2])
    server = frame(SETTINGS, 0, 0, b"") + frame(
        HEADERS, END_HEADERS | END_STREAM, 1, encode_block([(":status", "304")]))
    for step in (None, 1):
        (ex,) = replay(make_session(), [Chunk(TO_SERVER, client), Chunk(TO_CLIENT, server)],
                       step=step)
        assert (ex.target, ex.host, ex.scheme, ex.user_agent, ex.status_code) == (
            "/cont", "c.example", "https", "u" * 40, 304)


def test_padded_headers_with_priority():
    block = encode_block([(":method", "GET"), (":scheme", "http"), (":path", "/p")])
    payload = bytes([7]) + b"\x00\x00\x00\x00\x10" + block + b"\x00" * 7
    client = PREFACE + frame(SETTINGS, 0, 0, b"") + frame(
        HEADERS, END_HEADERS | END_STREAM | 0x08 | 0x20, 1, payload)
    server = frame(HEADERS, END_HEADERS | END_STREAM, 1, encode_block([(":status", "200")]))
    (ex,) = replay(make_session(), [Chunk(TO_SERVER, client), Chunk(TO_CLIENT, server)])
    assert (ex.method, ex.target, ex.status_code) == ("GET", "/p", 200)


def test_sniff():
    assert sniff(PREFACE) and sniff(PREFACE[:4]) and sniff(PREFACE + b"\x00\x00")
    assert sniff(frame(SETTINGS, 0, 0, b"\x00\x03\x00\x00\x00\x64"))
    assert not sniff(b"PRI")  # too short to tell
    assert not sniff(b"GET / HTTP/1.1\r\n")
    assert not sniff(b"HTTP/1.1 200 OK\r\n")
    assert not sniff(frame(SETTINGS, 1, 0, b""))  # an ACK is not a first frame
    assert not sniff(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc")  # TLS ClientHello


def test_client_goaway_ends_nothing_at_once_but_names_the_close():
    pair = H2Pair()
    sid = pair.request("/pending")
    pair.client.close_connection(error_code=0xB)  # ENHANCE_YOUR_CALM, about pushes only
    pair.flush()
    session = make_session()
    out = replay(session, pair.chunks)
    assert out == [] and list(session.streams) == [sid]
    session.close(10**9, Outcome.CONNECTION_CLOSED, "connection_closed")
    assert [(e.stream_id, e.outcome, e.error_reason) for e in out] == [
        (sid, Outcome.GOAWAY, "enhance_your_calm")]
