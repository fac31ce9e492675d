"""Literal byte streams into the HTTP/1.x head parsers and the framer (no conntrack)."""

from __future__ import annotations

import pytest

from otel_ebpf.protocols.base import HeadVerdict, MessageKind, ParseState
from otel_ebpf.protocols.http1.parse import (
    MessageFramer,
    parse_request_head,
    parse_response_head,
)


class Recorder:
    """A MessageListener that records what the framer reports."""

    def __init__(self, no_body: bool = False) -> None:
        self.events: list[tuple] = []
        self.no_body = no_body
        self.framers: list[MessageFramer] = []

    def buffered(self) -> int:
        return sum(f.buffered() for f in self.framers)

    def on_kind(self, framer, kind):
        self.events.append(("kind", kind))

    def on_request_head(self, framer, head, ts, tid):
        self.events.append(("req", head.method, head.target, ts, tid))
        return HeadVerdict.NORMAL

    def on_response_head(self, framer, head, ts, tid):
        self.events.append(("resp", head.status, ts))
        return HeadVerdict.NO_BODY if self.no_body else HeadVerdict.NORMAL

    def on_message_end(self, framer, ts, body_size, prefix, reason):
        self.events.append(("end", ts, body_size, prefix, reason))

    def on_loss(self, framer):
        self.events.append(("loss",))

    def on_skip(self, framer, count):
        self.events.append(("skip", count))

    def on_invalid(self, framer, reason):
        self.events.append(("invalid", reason))


def framer(kind=MessageKind.REQUEST, strict=True, **kw) -> tuple[MessageFramer, Recorder]:
    rec = Recorder(no_body=kw.pop("no_body", False))
    f = MessageFramer(rec, kind, strict=strict, **kw)
    rec.framers.append(f)
    return f, rec


# -- heads -------------------------------------------------------------------------------


def test_request_head_fields():
    head = parse_request_head(
        b"POST /submit?a=1&b=2 HTTP/1.1\r\nHost: api.example:8080\r\nuser-agent: curl/8.0\r\n"
        b"Content-Length: 12\r\nTraceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n"
        b"tracestate: congo=t61rcWkgMzE\r\nX-Request-Id:  abc \r\nAuthorization: secret",
        frozenset([b"x-request-id"]),
    )
    assert head is not None
    assert (head.method, head.target, head.version) == ("POST", "/submit?a=1&b=2", "1.1")
    assert head.host == "api.example:8080"
    assert head.user_agent == "curl/8.0"
    assert head.content_length == 12 and head.chunked is False
    assert head.traceparent == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    assert head.tracestate == "congo=t61rcWkgMzE"
    assert head.headers == (("x-request-id", "abc"),)


def test_request_head_chunked_overrides_length_and_unknown_methods():
    head = parse_request_head(
        b"PURGE /cache HTTP/1.0\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5"
    )
    assert head is not None
    assert (head.method, head.version, head.chunked, head.content_length) == (
        "PURGE", "1.0", True, None)
    foo = parse_request_head(b"FOO * HTTP/1.1")
    assert foo is not None and (foo.method, foo.target, foo.host) == ("FOO", "*", None)


@pytest.mark.parametrize(
    "block",
    [
        b"GET / HTTP/2.0\r\nHost: x",  # not HTTP/1.x
        b"GET /\r\nHost: x",  # HTTP/0.9-style request line
        b"GET  / HTTP/1.1",  # empty target (double space)
        b"G(T / HTTP/1.1",  # "(" is not a token character
        b"GET / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6",  # conflicting lengths
        b"GET / HTTP/1.1\r\nContent-Length: -5",
        b"GET / HTTP/1.1\r\nTransfer-Encoding: gzip",  # request body of unknown length
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    ],
)
def test_request_head_invalid(block):
    assert parse_request_head(block) is None


def test_response_head():
    head = parse_response_head(
        b"HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nServer: x\r\nX-Cache: HIT",
        frozenset([b"x-cache"]),
    )
    assert head is not None
    assert (head.version, head.status, head.content_length, head.chunked) == ("1.1", 404, 9, False)
    assert head.headers == (("x-cache", "HIT"),)
    bare = parse_response_head(b"HTTP/1.0 200")
    assert bare is not None and (bare.version, bare.status, bare.content_length) == ("1.0", 200, None)
    chunked = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3")
    assert chunked is not None and chunked.chunked and chunked.content_length is None


@pytest.mark.parametrize(
    "block",
    [b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"HTTP/2 200 OK", b"HTTX/1.1 200 OK",
     b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2"],
)
def test_response_head_invalid(block):
    assert parse_response_head(block) is None


# -- framer ------------------------------------------------------------------------------


def test_one_byte_at_a_time_request_keeps_first_byte_timestamp_and_searches_linearly():
    f, rec = framer()
    data = b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
    for i, byte in enumerate(data):
        f.feed(bytes([byte]), 100 + i, 7 + i)
        if f.buf is not None:
            # The CRLFCRLF search resumes near the end instead of rescanning the block.
            assert f.searched == max(0, len(f.buf) - 3)
    head_len = data.index(b"\r\n\r\n") + 4
    assert rec.events == [
        ("req", "POST", "/x", 100, 7),
        ("end", 100 + len(data) - 1, 3, None, None),
    ]
    assert head_len < len(data)


def test_content_length_body_across_gaps_is_exact():
    f, rec = framer(MessageKind.RESPONSE)
    f.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n" + b"x" * 4000, 10, 1)
    f.gap(1_000_000 - 4000, 10)
    f.feed(b"y" * 100, 20, 1)
    f.gap(10_000_000 - 1_000_000 - 100, 30)
    f.feed(b"HTTP/1.1 204 No Content\r\n\r\n", 40, 1)
    assert rec.events == [
        ("resp", 200, 10),
        ("end", 30, 10_000_000, None, None),
        ("resp", 204, 40),
        ("end", 40, 0, None, None),
    ]


def test_chunked_body_with_gap_inside_chunk_data_is_exact():
    f, rec = framer(MessageKind.RESPONSE, prefix_limit=6)
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", 1, 1)
    f.feed(b"5;ext=1\r\nhello\r\n186A0\r\n" + b"z" * 50, 2, 1)  # 0x186A0 = 100000
    f.gap(100_000 - 50, 3)
    f.feed(b"\r\n3\r", 4, 1)
    f.feed(b"\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n", 5, 1)
    assert rec.events == [
        ("resp", 200, 1),
        ("end", 5, 5 + 100_000 + 3, b"helloz", None),
    ]


def test_chunked_gap_swallowing_framing_is_truncated_then_resyncs():
    f, rec = framer(MessageKind.RESPONSE)
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n0123456789", 1, 1)
    f.gap(6 + 2 + 40, 2)  # rest of the chunk, its CRLF and the next size line: lost
    f.feed(b"more body bytes\r\n0\r\n\r\n", 3, 1)
    f.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 4, 1)
    assert rec.events == [
        ("resp", 200, 1),
        # body counted so far: 10 seen + the 6 the gap must have held of this chunk
        ("end", 2, 16, None, "gap_in_chunked_framing"),
        ("loss",),
        ("skip", len(b"more body bytes\r\n0\r\n\r\n")),
        ("resp", 200, 4),
        ("end", 4, 2, None, None),
    ]


def test_gap_inside_headers_reports_the_partial_head_truncated():
    f, rec = framer(MessageKind.REQUEST)
    f.feed(b"GET /big-cookie HTTP/1.1\r\nHost: h\r\nCookie: aaaa", 1, 2)
    f.gap(5000, 1)
    f.feed(b"GET /next HTTP/1.1\r\n\r\n", 3, 2)
    assert rec.events == [
        ("req", "GET", "/big-cookie", 1, 2),
        ("end", 1, 0, None, "gap_in_headers"),
        ("loss",),
        ("req", "GET", "/next", 3, 2),
        ("end", 3, 0, None, None),
    ]


def test_mid_stream_attach_skips_to_first_message_start_and_counts():
    f, rec = framer(MessageKind.REQUEST, strict=False)
    junk = b"tail of a previous body\r\nmore body"
    f.feed(junk, 1, 1)
    f.feed(b"\r\nDELETE /item/7 HTTP/1.1\r\nHost: h\r\n\r\n", 2, 1)
    assert rec.events == [
        ("skip", len(b"tail of a previous body\r\n")),
        ("skip", len(b"more body\r\n")),
        ("req", "DELETE", "/item/7", 2, 1),
        ("end", 2, 0, None, None),
    ]


def test_sniff_infers_kind():
    f, rec = framer(MessageKind.SNIFF, strict=False)
    f.feed(b"xx\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 5, 1)
    assert rec.events == [
        ("skip", 4),
        ("kind", MessageKind.RESPONSE),
        ("resp", 200, 5),
        ("end", 5, 0, None, None),
    ]


@pytest.mark.parametrize(
    "data",
    [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # TLS ClientHello
        b"\x00\x01\x02\xff\xfe binary",
        b"SSH-2.0-OpenSSH_9.2\r\n",  # token chars, but "SSH-2.0-OpenSSH_9.2" is no request line
    ],
)
def test_not_http_is_invalid_and_then_ignored(data):
    f, rec = framer(MessageKind.REQUEST)
    f.feed(data, 1, 1)
    f.feed(b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", 2, 1)
    assert rec.events == [("invalid", "not_http")]
    assert f.state == ParseState.DEAD


def test_tls_on_an_unknown_connection_is_not_scanned():
    f, rec = framer(MessageKind.SNIFF, strict=False)
    f.feed(b"\x16\x03\x01\x02\x00", 1, 1)
    assert rec.events == [("invalid", "not_http")]


def test_header_block_over_the_limit_is_invalid():
    f, rec = framer(MessageKind.REQUEST, max_header=1024)
    f.feed(b"GET / HTTP/1.1\r\n", 1, 1)
    for _ in range(100):
        f.feed(b"X-Filler: " + b"a" * 20 + b"\r\n", 1, 1)
    assert rec.events == [("invalid", "header_too_large")]
    assert f.buffered() == 0


def test_head_1xx_204_304_have_no_body():
    f, rec = framer(MessageKind.RESPONSE)
    f.feed(
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n!",
        9,
        1,
    )
    assert rec.events == [
        ("resp", 100, 9), ("end", 9, 0, None, None),
        ("resp", 204, 9), ("end", 9, 0, None, None),
        ("resp", 304, 9), ("end", 9, 0, None, None),
        ("resp", 200, 9), ("end", 9, 1, None, None),
    ]


def test_listener_no_body_verdict_for_head_requests():
    f, rec = framer(MessageKind.RESPONSE, no_body=True)
    f.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", 3, 1)
    assert [e[0] for e in rec.events] == ["resp", "end", "resp", "end"]


def test_close_delimited_body_ends_at_close():
    f, rec = framer(MessageKind.RESPONSE)
    f.feed(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nabc", 1, 1)
    f.gap(1000, 2)
    f.feed(b"def", 3, 1)
    assert rec.events == [("resp", 200, 1)]
    assert f.close() is True
    assert rec.events[-1] == ("end", 3, 1006, None, None)


def test_leading_empty_lines_between_messages_are_ignored():
    f, rec = framer(MessageKind.REQUEST)
    f.feed(b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi\r\n", 1, 1)
    f.feed(b"\r\nGET /b HTTP/1.1\r\n\r\n", 2, 1)
    assert [e for e in rec.events if e[0] == "req"] == [
        ("req", "POST", "/a", 1, 1), ("req", "GET", "/b", 2, 1)]
    assert not any(e[0] == "invalid" for e in rec.events)


def test_bad_chunk_size_is_invalid():
    f, rec = framer(MessageKind.RESPONSE)
    f.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 1, 1)
    assert rec.events == [("resp", 200, 1), ("invalid", "parse_error")]


def test_terminator_split_right_after_the_first_bytes():
    f, rec = framer(MessageKind.REQUEST)
    f.feed(b"G\r", 1, 1)  # a head cannot be this short, but the search must not skip it
    f.feed(b"\n\r\n", 2, 1)
    assert rec.events == [("invalid", "not_http")]  # "G" is not a request line
    f2, rec2 = framer(MessageKind.RESPONSE)
    f2.feed(b"HTTP/1.1 200\r", 1, 1)
    f2.feed(b"\n\r", 2, 1)
    f2.feed(b"\n", 3, 1)
    # no length, not chunked: a close-delimited body follows the head
    assert rec2.events == [("resp", 200, 1)]
    assert f2.state == ParseState.BODY_CLOSE


def test_resync_budget_counts_captured_bytes_between_gaps_only():
    # Attached in the middle of a large download: 4096 bytes captured per 64 KiB write.
    f, rec = framer(MessageKind.RESPONSE, strict=False, max_resync=16 * 1024)
    for i in range(50):
        f.feed(b"body " * 819, i, 1)
        f.gap(65536 - 4095, i)
    f.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 99, 1)
    assert ("resp", 200, 99) in rec.events
    # A chatty non-HTTP protocol with small writes and no gaps runs out of budget.
    g, rec2 = framer(MessageKind.RESPONSE, strict=False, max_resync=16 * 1024)
    for i in range(50):
        g.feed(b"+OK some redis-ish reply\r\n" * 20, i, 1)
    assert rec2.events[-1] == ("invalid", "not_http")


def test_one_byte_writes_cost_linear_time_in_header_size():
    import time

    def cost(header_bytes: int) -> float:
        block = b"GET / HTTP/1.1\r\n" + b"X-Pad: " + b"a" * header_bytes + b"\r\n\r\n"
        best = float("inf")
        for _ in range(3):
            f, rec = framer(MessageKind.REQUEST, max_header=64 * 1024, max_buffer=1 << 20)
            t0 = time.thread_time()
            for i in range(len(block)):
                f.feed(block[i : i + 1], i, 1)
            best = min(best, time.thread_time() - t0)
            assert rec.events[0][:3] == ("req", "GET", "/")
        return best

    small, large = cost(2_000), cost(16_000)
    # 8x the bytes: linear is ~8x the time, a rescan per byte would be ~64x
    assert large / small < 24, (small, large)


def test_message_found_in_buffered_resync_bytes_keeps_its_first_byte_timestamp():
    f, rec = framer(MessageKind.REQUEST, strict=False)
    f.feed(b"junk\r\nGET /late HTTP/1", 10, 3)  # request line incomplete: kept as a tail
    f.feed(b".1\r\nHost: h\r\n\r\n", 20, 4)
    assert rec.events == [
        ("skip", 6),
        ("req", "GET", "/late", 10, 3),
        ("end", 20, 0, None, None),
    ]
