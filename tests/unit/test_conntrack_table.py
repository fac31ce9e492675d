"""ConnectionTable bookkeeping: positions, gaps, duplicates, caps, expiry, roles, filtering."""

from __future__ import annotations

import random

from otel_ebpf.capture.events import ConnOpenEvent, DataEvent, Direction, Role, Source
from otel_ebpf.exchange import Outcome
from tests.unit.test_http1_support import FakeConn, get_request, make_table, ok_response

N = 23


def test_duplicate_and_overlapping_chunks_are_dropped_and_counted():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    req = get_request("/dup")
    c.request(req[:20])
    c.request(req[:20], position=0)  # the same chunk again
    c.request(req[10:], position=10)  # overlaps 10 bytes already seen
    resp = ok_response(b"abc")
    c.response(resp)
    c.response(resp, position=0)
    assert [(e.target, e.response_body_size) for e in c.out] == [("/dup", 3)]
    assert stats.get("conntrack.duplicate_chunks") == 3


def test_position_jump_inside_a_body_keeps_size_exact():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/g"))
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n"
    c.response(head + b"a" * 1000)
    # 50000 bytes the kernel lost (ring buffer full): the next chunk starts further on
    c.response(b"b" * (100000 - 1000 - 50000), position=len(head) + 1000 + 50000)
    (ex,) = c.out
    assert (ex.response_body_size, ex.outcome) == (100000, Outcome.OK)
    assert stats.get("conntrack.gaps") == 1 and stats.get("conntrack.gap_bytes") == 50000


def test_position_jump_over_whole_messages_resyncs_on_the_next_one():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/1"), ts=1_000)
    c.response(ok_response(b"1"), ts=2_000)
    skipped_req = get_request("/2")
    skipped_resp = ok_response(b"2")
    c.positions[Direction.INGRESS] += len(skipped_req)  # /2 and its response: lost
    c.positions[Direction.EGRESS] += len(skipped_resp)
    c.request(get_request("/3"), ts=5_000)
    c.response(ok_response(b"33"), ts=6_000)
    assert [(e.target, e.response_body_size) for e in c.out] == [("/1", 1), ("/3", 2)]
    assert stats.get("conntrack.gaps") == 2


def test_unknown_connection_role_from_bytes_and_addresses_from_resolver():
    calls = []

    def resolver(pid, fd):
        calls.append((pid, fd))
        return ("192.168.1.5", 8000, "192.168.1.9", 33333)

    table, stats = make_table(resolver=resolver)
    # Attached mid-stream: the first bytes are the tail of a request body.
    c = FakeConn(table, Role.SERVER, open_event=False, tgid=300, fd=12)
    tail = b"rest-of-some-body"
    c.request(tail, position=5000)  # positions of a pre-existing connection start anywhere
    c.request(get_request("/after-attach"), ts=77_000)
    (ex,) = c.response(ok_response(b"x"), position=9000)
    assert calls == [(300, 12)]
    assert (ex.role, ex.target, ex.local_address, ex.local_port, ex.remote_port) == (
        Role.SERVER, "/after-attach", "192.168.1.5", 8000, 33333)
    assert ex.start_time_unix_nano == 77_000
    assert ex.method == "GET"  # not "rest-of-some-bodyGET": a new chunk is a likelier start
    assert stats.get("http.skipped_bytes") == len(tail)
    assert stats.get("conntrack.role_inferred") == 1


def test_unknown_connection_first_egress_request_is_a_client():
    table, _ = make_table()
    c = FakeConn(table, Role.CLIENT, open_event=False)
    c.request(get_request("/out"), position=123)
    (ex,) = c.response(ok_response(b"in"), position=456)
    assert (ex.role, ex.target) == (Role.CLIENT, "/out")
    assert table.active_server_requests() == {}


def test_unknown_connection_attached_between_request_and_response():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER, open_event=False)
    c.response(ok_response(b"orphan"), position=10)  # first thing seen: a response
    c.request(get_request("/next"), position=20)
    (ex,) = c.response(ok_response(b"mine"))
    assert (ex.role, ex.target, ex.response_body_size) == (Role.SERVER, "/next", 4)
    assert stats.get("http.unpaired_responses") == 1


def test_garbage_and_tls_are_disabled_and_counted_while_http_on_the_same_port_works():
    table, stats = make_table()
    tls = FakeConn(table, Role.SERVER, fd=20)
    tls.request(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(40)))
    junk = FakeConn(table, Role.SERVER, fd=21)
    junk.request(bytes(random.Random(7).randrange(256) for _ in range(3000)))
    good = FakeConn(table, Role.SERVER, fd=22)
    for i in range(N):
        tls.request(b"\x17\x03\x03" + bytes(100))
        good.request(get_request(f"/{i}"))
        good.response(ok_response())
    assert len(good.out) == N and tls.out == [] and junk.out == []
    assert stats.get("conntrack.disabled.not_http") == 2
    assert stats.get("http.parse_failures") == 2


def test_garbage_after_valid_traffic_disables_with_parse_error():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/ok"))
    c.response(ok_response())
    c.request(get_request("/pending"))
    c.request(b"\x00\x00garbage")
    assert [e.target for e in c.out] == ["/ok"]
    assert stats.get("conntrack.disabled.parse_error") == 1
    assert stats.get("http.dropped_pending") == 1
    assert table.active_server_requests() == {}


def test_per_connection_buffer_cap():
    table, stats = make_table(max_buffer_bytes=4096, max_header_bytes=65536)
    c = FakeConn(table, Role.SERVER)
    c.request(b"GET / HTTP/1.1\r\n")
    for _ in range(N * 10):
        c.request(b"X-Long: " + b"v" * 100 + b"\r\n")
    assert stats.get("conntrack.disabled.buffer_limit") == 1
    assert table.buffered_bytes() == 0


def test_connection_cap_evicts_least_recently_active():
    table, stats = make_table(max_connections=5)
    conns = [FakeConn(table, Role.SERVER, fd=100 + i) for i in range(N)]
    assert len(table) == 5
    assert stats.get("conntrack.evicted") == N - 5
    # the most recent five still work
    conns[-1].request(get_request("/alive"))
    conns[-1].response(ok_response())
    assert [e.target for e in conns[-1].out] == ["/alive"]


def test_idle_connections_expire():
    table, stats = make_table(idle_timeout_s=300)
    FakeConn(table, Role.SERVER, fd=1, ts=1_000_000_000)  # idle from then on
    young = FakeConn(table, Role.SERVER, fd=2, ts=200_000_000_000)
    assert table.expire(300_999_999_999) == []
    assert len(table) == 2
    table.expire(301_000_000_000)
    assert len(table) == 1 and stats.get("conntrack.expired_idle") == 1
    young.request(get_request("/y"))
    (ex,) = young.response(ok_response())
    assert ex.target == "/y"


def test_port_selection():
    table, stats = make_table(ports=frozenset({8080}))
    kept = FakeConn(table, Role.SERVER, fd=1, addrs=("10.0.0.1", 8080, "10.0.0.2", 5555))
    client = FakeConn(table, Role.CLIENT, fd=2, addrs=("10.0.0.2", 5555, "10.0.0.1", 8080))
    dropped = FakeConn(table, Role.SERVER, fd=3, addrs=("10.0.0.1", 9090, "10.0.0.2", 5556))
    for c in (kept, client, dropped):
        c.request(get_request("/sel"))
        c.response(ok_response())
    assert (len(kept.out), len(client.out), dropped.out) == (1, 1, [])
    assert stats.get("conntrack.filtered") == 1


def test_port_selection_applies_to_resolved_addresses_of_unknown_connections():
    table, stats = make_table(ports=frozenset({443}),
                              resolver=lambda pid, fd: ("127.0.0.1", 8080, "127.0.0.1", 999))
    c = FakeConn(table, Role.SERVER, open_event=False)
    c.request(get_request("/x"))
    c.response(ok_response())
    assert c.out == [] and stats.get("conntrack.filtered") == 1


def test_events_racing_a_close_are_not_a_new_connection():
    table, stats = make_table()
    c = FakeConn(table, Role.SERVER)
    c.request(get_request("/a"))
    c.response(ok_response())
    c.close()
    c.request(get_request("/ghost"))
    assert len(table) == 0 and stats.get("conntrack.late_events") == 1


def test_too_many_pipelined_requests():
    table, stats = make_table(max_pending_requests=N - 1)
    c = FakeConn(table, Role.SERVER)
    c.request(b"".join(get_request(f"/{i}") for i in range(N)))
    assert stats.get("conntrack.disabled.too_many_pending") == 1
    assert table.active_server_requests() == {}


def test_open_event_after_data_keeps_the_tracker():
    table, _ = make_table()
    c = FakeConn(table, Role.CLIENT, open_event=False, fd=5)
    c.request(get_request("/early"), position=0)
    table.handle(ConnOpenEvent(c.ts + 1, 100, 100, 5, 1, Role.CLIENT, Source.SYSCALL,
                               "10.0.0.9", 45000, "10.0.0.1", 80))
    (ex,) = c.response(ok_response())
    assert (ex.target, ex.local_port, ex.remote_port) == ("/early", 45000, 80)


# -- fuzz-ish ----------------------------------------------------------------------------


def _split(rng: random.Random, data: bytes) -> list[bytes]:
    parts, i = [], 0
    while i < len(data):
        step = rng.choice((1, 1, 2, 3, 7, 50, 500, 5000))
        parts.append(data[i : i + step])
        i += step
    return parts


def test_random_splits_of_a_valid_pipelined_stream_give_exactly_n_exchanges():
    rng = random.Random(2024)
    for trial in range(30):
        table, stats = make_table()
        c = FakeConn(table, Role.SERVER, fd=trial)
        reqs = b"".join(
            get_request(f"/r{i}") if i % 3 else
            b"POST /r%d HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" % i
            for i in range(N)
        )
        resps = b"".join(
            ok_response(b"z" * i) if i % 2 else
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n"
            for i in range(N)
        )
        for part in _split(rng, reqs):
            c.request(part)
        for part in _split(rng, resps):
            c.response(part)
        assert [e.target for e in c.out] == [f"/r{i}" for i in range(N)], trial
        assert [e.response_body_size for e in c.out] == [i if i % 2 else 2 for i in range(N)]
        assert [e.request_body_size for e in c.out] == [0 if i % 3 else 3 for i in range(N)]
        assert stats.get("http.parse_failures") == 0


def test_random_garbage_and_events_never_raise_and_memory_stays_bounded():
    rng = random.Random(99)
    table, stats = make_table(max_connections=50, max_buffer_bytes=8192, max_header_bytes=4096)
    fragments = [
        get_request("/f"), ok_response(b"body"), b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"ffff\r\n", b"0\r\n\r\n", b"\r\n", b"\x16\x03\x01", b"GET ", b"HTTP/1.", b"Content-Length: 99999999\r\n",
    ]
    for i in range(20000):
        key = rng.randrange(80)
        direction = Direction(rng.randrange(2))
        roll = rng.random()
        if roll < 0.02:
            table.handle(ConnOpenEvent(i, 1, 1, key, 0, Role(rng.randrange(3)), Source.SYSCALL,
                                       "127.0.0.1", 80, "127.0.0.1", 1000 + key))
            continue
        if roll < 0.5:
            data = rng.choice(fragments)
        else:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        size = len(data) + (rng.randrange(100000) if rng.random() < 0.1 else 0)
        position = rng.randrange(1 << 20)
        source = Source.OPENSSL if rng.random() < 0.05 else Source.SYSCALL
        table.handle(DataEvent(i, 1, 1, key, 0, direction, source, position, size, data))
        if i % 1000 == 0:
            table.expire(i)
            assert len(table) <= 50
            assert table.buffered_bytes() <= 50 * 8192
    assert len(table) <= 50
    table.close_all()
    assert len(table) == 0 and table.active_server_requests() == {}
    assert stats.get("conntrack.evicted") > 0
