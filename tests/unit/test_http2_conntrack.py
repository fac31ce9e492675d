"""HTTP/2 through the connection table: picked by the kernel's protocol id, by sniffing
the first bytes, and taken over from HTTP/1 after `101 Switching Protocols` to h2c."""

from __future__ import annotations

import h2.config
import h2.connection

from otel_ebpf.capture.events import ConnOpenEvent, Direction, Protocol, Role, Source
from otel_ebpf.exchange import Outcome
from tests.unit.test_http1_support import SERVER_ADDRS, FakeConn, make_table
from tests.unit.test_http2_support import TO_SERVER, H2Pair


def _open(table, role=Role.SERVER, protocol=Protocol.HTTP2):
    conn = FakeConn(table, role, open_event=False)
    conn.out += table.handle(ConnOpenEvent(conn.ts, 100, 100, 7, 1, role, Source.SYSCALL,
                                           *SERVER_ADDRS, protocol=protocol))
    return conn


def _play(conn, pair):
    for chunk in pair.chunks:
        if chunk.side == TO_SERVER:
            conn.request(chunk.data)
        else:
            conn.response(chunk.data)


def test_kernel_protocol_id_and_sniffing_pick_http2():
    for protocol in (Protocol.HTTP2, Protocol.UNKNOWN):
        for role in (Role.SERVER, Role.CLIENT):
            table, stats = make_table()
            conn = _open(table, role, protocol)
            pair = H2Pair()
            for i in range(3):
                pair.respond(pair.request(f"/n{i}"), body=b"b" * i)
            _play(conn, pair)
            assert [(e.target, e.response_body_size, e.stream_id, e.role) for e in conn.out] == [
                (f"/n{i}", i, 2 * i + 1, role) for i in range(3)
            ], (protocol, role)
            conn.close()


def test_h2c_upgrade_reports_stream_1_once_with_its_http2_response():
    table, stats = make_table()
    conn = _open(table, Role.SERVER, Protocol.HTTP1)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    settings = client.initiate_upgrade_connection()
    server.initiate_upgrade_connection(settings)
    conn.request(
        b"GET /upgrade-me HTTP/1.1\r\nHost: up.example\r\nUser-Agent: h2c-test\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: " + settings + b"\r\n\r\n"
    )
    start = conn.ts
    server.send_headers(1, [(":status", "200")])
    server.send_data(1, b"from h2", end_stream=True)
    # The 101 head and the first HTTP/2 frames in one write, as servers do.
    conn.response(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
                  + server.data_to_send())
    end = conn.ts
    preface = client.data_to_send()
    server.receive_data(preface)
    conn.request(preface)
    # A second request, on stream 3, in HTTP/2.
    client.send_headers(3, [(":method", "GET"), (":scheme", "http"), (":authority", "up.example"),
                            (":path", "/second")], end_stream=True)
    data = client.data_to_send()
    conn.request(data)
    server.receive_data(data)
    server.send_headers(3, [(":status", "404")], end_stream=True)
    conn.response(server.data_to_send())
    got = [(e.protocol_version, e.method, e.target, e.host, e.status_code, e.response_body_size,
            e.stream_id, e.outcome) for e in conn.out]
    assert got == [
        ("2", "GET", "/upgrade-me", "up.example", 200, 7, 1, Outcome.OK),
        ("2", "GET", "/second", "up.example", 404, 0, 3, Outcome.OK),
    ]
    assert (conn.out[0].start_time_unix_nano, conn.out[0].end_time_unix_nano) == (start, end)
    assert stats._counters["conntrack.upgraded.http2"] == 1
    assert table.active_server_requests() == {}


def test_gap_reported_by_conntrack_inside_data_keeps_sizes_exact():
    table, stats = make_table()
    conn = _open(table)
    pair = H2Pair()
    sid = pair.request("/big")
    pair.respond(sid, body=b"z" * 12000)
    for chunk in pair.chunks:
        # The kernel captured at most 4096 bytes of each write.
        direction = Direction.INGRESS if chunk.side == TO_SERVER else Direction.EGRESS
        conn.send(direction, chunk.data[:4096], size=len(chunk.data))
    (ex,) = conn.out
    assert (ex.response_body_size, ex.outcome) == (12000, Outcome.OK)
    assert stats._counters["conntrack.truncated_bytes"] > 0
