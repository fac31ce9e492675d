"""gRPC over HTTP/2: RpcCall naming, grpc-status from trailers or a trailers-only
response, and message counts from the length-prefixed framing, across captures."""

from __future__ import annotations

import pytest

from otel_ebpf.exchange import Outcome, Role, RpcCall
from otel_ebpf.protocols.http2.grpc import MessageCounter, split_grpc_path
from tests.unit.test_http2_support import (
    GRPC_REQUEST_HEADERS,
    H2Pair,
    grpc_messages,
    make_session,
    replay,
)

SAY_HELLO = "/helloworld.Greeter/SayHello"


def _rpc(out):
    return [e.rpc for e in out]


@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT])
def test_unary_call_with_status_in_trailers(role):
    pair = H2Pair()
    pair.grpc_call(SAY_HELLO, [b"name"], [b"hello name"], status=0)
    out = replay(make_session(role), pair.chunks, role)
    assert _rpc(out) == [RpcCall("grpc", "helloworld.Greeter", "SayHello", 0, 1, 1)]
    (ex,) = out
    assert (ex.method, ex.target, ex.status_code, ex.outcome) == (
        "POST", SAY_HELLO, 200, Outcome.OK)
    assert (ex.request_body_size, ex.response_body_size) == (5 + 4, 5 + 10)


def test_streaming_calls_count_every_message():
    pair = H2Pair()
    pair.grpc_call("/route.Guide/ListFeatures", [b"rect"], [b"f%d" % i for i in range(7)])
    pair.grpc_call("/route.Guide/RecordRoute", [b"p%d" % i for i in range(5)], [b"summary"])
    pair.grpc_call("/route.Guide/RouteChat", [b"", b"n" * 300, b"x"], [b"", b""], status=5)
    out = replay(make_session(), pair.chunks)
    assert _rpc(out) == [
        RpcCall("grpc", "route.Guide", "ListFeatures", 0, 1, 7),
        RpcCall("grpc", "route.Guide", "RecordRoute", 0, 5, 1),
        RpcCall("grpc", "route.Guide", "RouteChat", 5, 3, 2),
    ]


def test_trailers_only_response_carries_the_status():
    pair = H2Pair()
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, [*GRPC_REQUEST_HEADERS[:3], (":path", "/pkg.Svc/Missing"),
                                   *GRPC_REQUEST_HEADERS[3:]])
    pair.client.send_data(sid, grpc_messages(b"q"), end_stream=True)
    pair.flush()
    pair.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                   ("grpc-status", "12"), ("grpc-message", "unimplemented")],
                             end_stream=True)
    pair.flush()
    (ex,) = replay(make_session(), pair.chunks)
    assert ex.rpc == RpcCall("grpc", "pkg.Svc", "Missing", 12, 1, 0)
    assert (ex.status_code, ex.response_body_size, ex.outcome) == (200, 0, Outcome.OK)


def test_cancelled_call_has_no_status():
    pair = H2Pair()
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, [*GRPC_REQUEST_HEADERS[:3], (":path", SAY_HELLO),
                                   *GRPC_REQUEST_HEADERS[3:]])
    pair.client.send_data(sid, grpc_messages(b"a", b"b"))
    pair.client.reset_stream(sid, error_code=8)  # deadline exceeded on the client: CANCEL
    pair.flush()
    (ex,) = replay(make_session(), pair.chunks)
    assert (ex.outcome, ex.error_reason) == (Outcome.STREAM_RESET, "cancel")
    assert ex.rpc == RpcCall("grpc", "helloworld.Greeter", "SayHello", None, 2, 0)


def test_http2_without_grpc_content_type_is_not_an_rpc():
    pair = H2Pair()
    pair.respond(pair.request("/helloworld.Greeter/SayHello", method="POST", body=b"abcdef",
                              extra=[("content-type", "application/json")]))
    (ex,) = replay(make_session(), pair.chunks)
    assert ex.rpc is None


def test_message_prefix_split_across_data_frames_is_counted_once():
    pair = H2Pair()
    sid = pair.client.get_next_available_stream_id()
    pair.client.send_headers(sid, [*GRPC_REQUEST_HEADERS[:3], (":path", SAY_HELLO),
                                   *GRPC_REQUEST_HEADERS[3:]])
    body = grpc_messages(b"first", b"second message")
    pair.client.send_data(sid, body[:3])
    pair.client.send_data(sid, body[3:12])
    pair.client.send_data(sid, body[12:], end_stream=True)
    pair.flush()
    pair.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                   ("grpc-status", "0")], end_stream=True)
    pair.flush()
    for step in (None, 1):
        (ex,) = replay(make_session(), pair.chunks, step=step)
        assert ex.rpc.request_messages == 2 and ex.request_body_size == len(body)


def test_large_messages_with_kernel_truncated_writes():
    # 4096 bytes of each write are captured. Two 3000-byte messages in one write: the
    # second prefix (offset 3005) is captured, the count is exact. Three: the third
    # prefix (offset 6010) falls into the uncaptured bytes: two are counted, and the loss
    # is counted.
    for n, counted, lost in ((2, 2, 0), (3, 2, 1)):
        pair = H2Pair()
        pair.grpc_call(SAY_HELLO, [b"m" * 3000] * n, [b"r" * 9000])
        session = make_session()
        (ex,) = replay(session, pair.chunks, capture_limit=4096)
        assert ex.request_body_size == n * 3005 and ex.response_body_size == 9005
        assert (ex.rpc.request_messages, ex.rpc.response_messages) == (counted, 1)
        assert session.ctx.stats._counters["grpc.message_framing_lost"] == lost
        assert ex.outcome == Outcome.OK


def test_message_counter_at_every_split_point():
    data = grpc_messages(b"abc", b"", b"x" * 100, b"yz")
    for cut in range(len(data) + 1):
        counter = MessageCounter()
        counter.feed(data, 0, cut)
        counter.feed(data, cut, len(data))
        assert (counter.count, counter.skip, counter.head, counter.lost) == (4, 0, b"", False)
    counter = MessageCounter()
    counter.feed(data, 0, 5 + 1)  # prefix of "abc" and one byte of its body
    assert counter.gap(2) is False  # the rest of its body
    counter.feed(data, 8, 10)  # the second prefix, split...
    assert counter.gap(3) is True  # ...and its end lost: framing lost
    assert counter.count == 1 and counter.lost


def test_split_grpc_path():
    assert split_grpc_path("/a.b.C/D") == ("a.b.C", "D")
    assert split_grpc_path("/nomethod") == ("nomethod", "")
    assert split_grpc_path("/svc/") == ("svc/", "")
