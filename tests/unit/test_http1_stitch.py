"""Synthetic events through ConnectionTable: request/response pairing and HttpExchange fields."""

from __future__ import annotations

from otel_ebpf.capture.events import Direction, Role, Source
from otel_ebpf.exchange import HttpExchange, Outcome
from otel_ebpf.exchange import build_exchange
from tests.unit.test_http1_support import FakeConn, get_request, make_table, ok_response

N = 23  # counting tests use a prime: off-by-one and duplicates show


def test_keep_alive_exchange_fields_and_timing():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER, tgid=4242, addrs=("127.0.0.1", 8080, "127.0.0.1", 51000))
    for i in range(N):
        base = 10_000_000 * (i + 1)
        c.request(get_request(f"/item/{i}?q={i}"), ts=base, tid=4243)
        got = c.response(ok_response(b"x" * i, extra=b"Server: t\r\n"), ts=base + 777)
        assert len(got) == 1
    assert len(c.out) == N
    for i, ex in enumerate(c.out):
        assert ex == HttpExchange(
            pid=4242, tid=4243, role=Role.SERVER,
            local_address="127.0.0.1", local_port=8080,
            remote_address="127.0.0.1", remote_port=51000,
            scheme="http", protocol_version="1.1", method="GET", target=f"/item/{i}?q={i}",
            host="example", user_agent="t/1", traceparent=None, tracestate=None,
            request_body_size=0, response_body_size=i, status_code=200,
            start_time_unix_nano=10_000_000 * (i + 1),
            end_time_unix_nano=10_000_000 * (i + 1) + 777,
        )
    assert stats.get("http.exchanges") == 0  # counted by the daemon, not twice
    assert table.active_server_requests() == {}


def test_pipelined_requests_in_one_chunk_are_answered_in_order():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(b"".join(get_request(f"/p/{i}") for i in range(N)), ts=5_000)
    assert table.active_server_requests() == {(100, "GET", "http", 8080): N}
    got = c.response(
        b"".join(ok_response(str(i).encode(), status=b"%d X" % (400 + i)) for i in range(N)),
        ts=9_000,
    )
    assert [e.target for e in got] == [f"/p/{i}" for i in range(N)]
    assert [e.status_code for e in got] == [400 + i for i in range(N)]
    assert [e.response_body_size for e in got] == [len(str(i)) for i in range(N)]
    assert {(e.start_time_unix_nano, e.end_time_unix_nano) for e in got} == {(5_000, 9_000)}
    assert table.active_server_requests() == {}


def test_one_byte_per_chunk_both_directions_exact_timing():
    table, _ = make_table()
    c = FakeConn(table, Role.SERVER)
    req = b"POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nDATA"
    resp = ok_response(b"done")
    for i, b in enumerate(req):
        c.request(bytes([b]), ts=1_000 + i)
    for i, b in enumerate(resp):
        c.response(bytes([b]), ts=50_000 + i)
    (ex,) = c.out
    assert (ex.method, ex.target, ex.request_body_size, ex.response_body_size) == (
        "POST", "/upload", 4, 4)
    assert ex.start_time_unix_nano == 1_000  # chunk with the first request byte
    assert ex.end_time_unix_nano == 50_000 + len(resp) - 1  # chunk with the last response byte


def test_client_role_timing_and_large_truncated_bodies():
    table, _ = make_table()
    c = FakeConn(table, Role.CLIENT, addrs=("10.1.1.1", 40123, "10.2.2.2", 80))
    head = b"PUT /blob HTTP/1.1\r\nHost: store\r\nContent-Length: 5000000\r\n\r\n"
    # the kernel captured only a prefix of the write: size says how much really moved
    c.request(head + b"a" * 100, size=len(head) + 5_000_000, ts=7_000)
    rhead = b"HTTP/1.1 201 Created\r\nContent-Length: 3000000\r\n\r\n"
    c.response(rhead + b"b" * 50, size=len(rhead) + 1_000_000, ts=8_000)
    c.response(b"c" * 10, size=2_000_000, ts=9_000)
    (ex,) = c.out
    assert ex.role == Role.CLIENT
    assert (ex.request_body_size, ex.response_body_size, ex.status_code) == (
        5_000_000, 3_000_000, 201)
    assert (ex.start_time_unix_nano, ex.end_time_unix_nano) == (7_000, 9_000)
    assert (ex.local_port, ex.remote_port) == (40123, 80)
    assert table.active_server_requests() == {}  # client requests are not server requests


def test_chunked_response_with_truncated_chunks_exact_size():
    table, _ = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/stream"))
    c.response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for _ in range(N):
        # a Node.js-style writev: size line, 100000 bytes of data, CRLF; 64 bytes captured
        chunk = b"186a0\r\n" + b"d" * 100_000 + b"\r\n"
        c.response(chunk[:64], size=len(chunk))
    got = c.response(b"0\r\n\r\n")
    assert [e.response_body_size for e in got] == [N * 100_000]
    assert got[0].outcome is Outcome.OK


def test_head_204_304_and_100_continue():
    table, _ = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(b"HEAD /h HTTP/1.1\r\n\r\n")
    c.response(b"HTTP/1.1 200 OK\r\nContent-Length: 123456\r\n\r\n")
    c.request(get_request("/204"))
    c.response(b"HTTP/1.1 204 No Content\r\n\r\n")
    c.request(get_request("/304"))
    c.response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n")
    c.request(b"POST /c HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    c.response(b"HTTP/1.1 100 Continue\r\n\r\n")
    c.request(b"abc")
    c.response(ok_response(b"12345"))
    assert [(e.method, e.target, e.status_code, e.response_body_size) for e in c.out] == [
        ("HEAD", "/h", 200, 0),
        ("GET", "/204", 204, 0),
        ("GET", "/304", 304, 0),
        ("POST", "/c", 200, 5),
    ]
    assert c.out[-1].request_body_size == 3


def test_close_delimited_response_completes_at_close():
    table, _ = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(b"GET /old HTTP/1.0\r\n\r\n", ts=1_000)
    c.response(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst", ts=2_000)
    c.response(b"second", size=4_000, ts=3_000)
    assert c.out == []
    c.close(ts=4_000)
    (ex,) = c.out
    assert (ex.protocol_version, ex.status_code, ex.response_body_size, ex.outcome) == (
        "1.0", 200, 5 + 4_000, Outcome.OK)
    assert ex.end_time_unix_nano == 3_000  # last response byte, not the close


def test_request_never_answered_times_out_and_late_response_is_not_misattributed():
    table, stats = make_table(request_timeout_s=30)
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/slow"), ts=1_000_000_000)
    assert table.expire(30_999_999_999) == []
    assert table.active_server_requests() == {(100, "GET", "http", 8080): 1}
    (ex,) = table.expire(31_000_000_000)
    assert (ex.target, ex.outcome, ex.error_reason, ex.status_code, ex.response_body_size) == (
        "/slow", Outcome.TIMEOUT, "timeout", None, None)
    assert ex.end_time_unix_nano - ex.start_time_unix_nano == 30_000_000_000
    assert table.active_server_requests() == {}
    assert table.expire(40_000_000_000) == []  # reported once
    # the slow response finally comes, then a normal pair: no shift
    assert c.response(ok_response(b"late"), ts=41_000_000_000) == []
    c.request(get_request("/next"), ts=42_000_000_000)
    (nxt,) = c.response(ok_response(b"ok"), ts=42_000_001_000)
    assert (nxt.target, nxt.response_body_size, nxt.outcome) == ("/next", 2, Outcome.OK)
    assert stats.get("http.late_responses") == 1
    assert stats.get("http.outcome.timeout") == 1


def test_close_and_reset_mid_exchange():
    table, _ = make_table()
    a = FakeConn(table, Role.SERVER, fd=10)
    a.request(get_request("/a"), ts=1_000)
    a.close(ts=5_000)
    b = FakeConn(table, Role.SERVER, fd=11)
    b.request(get_request("/b"), ts=1_000)
    b.response(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789", ts=2_000)
    b.close(ts=6_000, reset=True)
    (ea,) = a.out
    (eb,) = b.out
    assert (ea.outcome, ea.error_reason, ea.status_code, ea.end_time_unix_nano) == (
        Outcome.CONNECTION_CLOSED, "connection_closed", None, 5_000)
    assert (eb.outcome, eb.error_reason, eb.status_code, eb.response_body_size) == (
        Outcome.CONNECTION_RESET, "connection_reset", 200, 10)
    assert table.active_server_requests() == {}
    assert len(table) == 0


def test_unknown_methods_reported_as_on_the_wire():
    table, _ = make_table()
    c = FakeConn(table, Role.SERVER)
    for method in (b"PURGE", b"FOO", b"PATCH", b"OPTIONS"):
        c.request(method + b" /m HTTP/1.1\r\n\r\n")
        c.response(ok_response(b""))
    assert [e.method for e in c.out] == ["PURGE", "FOO", "PATCH", "OPTIONS"]


def test_trace_context_captured_headers_and_body_prefixes():
    table, _ = make_table(
        capture_request_headers=("X-Request-Id", "content-type"),
        capture_response_headers=("x-cache",),
        body_prefix_bytes=8,
    )
    c = FakeConn(table, Role.SERVER)
    c.request(
        b"POST /api HTTP/1.1\r\nTraceparent: 00-aa-bb-01\r\nTraceState: k=v\r\n"
        b"X-Request-Id: r-1\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n"
        b'{"hello":"world"}'
    )
    c.response(b"HTTP/1.1 200 OK\r\nX-Cache: MISS\r\nContent-Length: 3\r\n\r\nabc")
    (ex,) = c.out
    assert (ex.traceparent, ex.tracestate) == ("00-aa-bb-01", "k=v")
    assert ex.request_headers == (("x-request-id", "r-1"), ("content-type", "application/json"))
    assert ex.response_headers == (("x-cache", "MISS"),)
    assert (ex.request_body_prefix, ex.response_body_prefix) == (b'{"hello"', b"abc")


def test_response_to_a_request_we_never_saw_is_dropped_not_paired():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/lost")[:10], size=len(get_request("/lost")) + 200, ts=1_000)
    # the truncated head parsed nothing; a gap also ate the next request entirely
    c.response(ok_response(b"for /lost"), ts=2_000)
    c.request(get_request("/seen"), ts=3_000)
    (ex,) = c.response(ok_response(b"for /seen"), ts=4_000)
    assert (ex.target, ex.response_body_size) == ("/seen", 9)
    assert stats.get("http.unpaired_responses") == 1


def test_lost_response_does_not_shift_later_pairs():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/one"), ts=1_000)
    lost = ok_response(b"one")
    c.response(b"", size=len(lost), ts=2_000)  # the kernel lost the whole response
    c.request(get_request("/two"), ts=3_000)
    got = c.response(ok_response(b"two!"), ts=4_000)
    assert [(e.target, e.outcome, e.error_reason, e.status_code) for e in got] == [
        ("/one", Outcome.TRUNCATED, "response_lost", None),
        ("/two", Outcome.OK, None, 200),
    ]
    assert got[1].response_body_size == 4


def test_upgrade_reports_101_then_ignores_the_connection():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/ws", b"Upgrade: websocket\r\nConnection: Upgrade\r\n"))
    c.response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    c.request(b"\x81\x85\x00\x00\x00\x00hello")
    (ex,) = c.out
    assert ex.status_code == 101
    assert stats.get("conntrack.disabled.upgrade") == 1
    assert stats.get("http.parse_failures") == 0


def test_close_all_reports_in_flight_requests_at_shutdown():
    table, _ = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/inflight"))
    done = FakeConn(table, Role.SERVER, fd=9)
    done.request(get_request("/done"))
    done.response(ok_response())
    got = table.close_all()
    assert [(e.target, e.outcome, e.error_reason) for e in got] == [
        ("/inflight", Outcome.CONNECTION_CLOSED, "shutdown")]
    assert len(table) == 0 and table.active_server_requests() == {}


def test_wall_clock_offset_applied_once():
    from otel_ebpf.conntrack import ConnectionTable, ConntrackOptions
    from otel_ebpf.stats import Stats

    table = ConnectionTable(ConntrackOptions(), Stats(), resolve_addresses=None,
                            clock_offset_ns=1_700_000_000_000_000_000)
    c = FakeConn(table, Role.SERVER)
    c.request(get_request(), ts=5)
    (ex,) = c.response(ok_response(), ts=8)
    assert (ex.start_time_unix_nano, ex.end_time_unix_nano) == (
        1_700_000_000_000_000_005, 1_700_000_000_000_000_008)


def test_openssl_source_is_https_and_ciphertext_is_ignored():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    c.send(Direction.INGRESS, b"\x16\x03\x01\x00\x10" + b"\x00" * 16)  # handshake (syscall)
    c.positions = [0, 0]  # OpenSSL plaintext positions count from its own start
    c.request(get_request("/secure"), source=Source.OPENSSL)
    c.send(Direction.INGRESS, b"\x17\x03\x03\x00\x20" + b"\x01" * 32, position=21)  # ciphertext
    (ex,) = c.response(ok_response(b"s"), source=Source.OPENSSL)
    assert (ex.scheme, ex.target, ex.status_code) == ("https", "/secure", 200)
    assert stats.get("conntrack.ciphertext_ignored") == 1


def test_builder_matches_the_dataclass_constructor():
    values = (1, 2, Role.CLIENT, "a", 1, "b", 2, "https", "1.0", "GET", "/?x", "h", "ua",
              "tp", "ts", 3, 4, 500, 10, 20, Outcome.TRUNCATED, "why", (("a", "b"),), (),
              b"p", None)
    built = build_exchange(*values)
    assert type(built) is HttpExchange
    assert built == HttpExchange(*values)


def test_pending_requests_after_lost_response_bytes_are_truncated_not_blamed_on_the_peer():
    table, _ = make_table(request_timeout_s=30)
    a = FakeConn(table, Role.SERVER, fd=1)
    a.request(get_request("/a1") + get_request("/a2"), ts=1_000)
    resp = ok_response(b"1") + ok_response(b"2")
    a.response(b"", size=len(resp), ts=2_000)  # both responses fell in uncaptured bytes
    b = FakeConn(table, Role.SERVER, fd=2)
    b.request(get_request("/b"), ts=1_000)
    b.response(b"", size=10, ts=2_000)
    got_a = a.close(ts=3_000)
    got_b = table.expire(40_000_000_000)
    assert [(e.target, e.outcome, e.error_reason) for e in got_a + got_b] == [
        ("/a1", Outcome.TRUNCATED, "response_lost"),
        ("/a2", Outcome.TRUNCATED, "response_lost"),
        ("/b", Outcome.TRUNCATED, "response_lost"),
    ]
