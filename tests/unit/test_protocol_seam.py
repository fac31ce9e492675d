"""The protocol seam: conntrack picks a session by the kernel's protocol id or the first
bytes, feeds it through the Session contract, and hands a connection over after a 101."""

from __future__ import annotations

import dataclasses

import pytest

from otel_ebpf.capture.events import ConnOpenEvent, Direction, Protocol, Role, Source
from otel_ebpf.exchange import HttpExchange, build_exchange
from otel_ebpf.protocols import registry
from otel_ebpf.protocols.base import UpgradeRequest
from otel_ebpf.protocols.http1.stitch import Http1Session
from tests.unit.test_http1_support import SERVER_ADDRS, FakeConn, get_request, make_table

FAKE_ID = 200  # a kernel id no real protocol uses


class RecordingSession:
    """A protocol that records what conntrack gives it."""

    instances: list[RecordingSession] = []

    def __init__(self, conn, ctx, strict: bool, request: UpgradeRequest | None = None) -> None:
        self.conn, self.ctx, self.strict, self.request = conn, ctx, strict, request
        self.disabled: str | None = None
        self.fed: list[tuple[int, bytes]] = []
        self.gaps: list[tuple[int, int]] = []
        RecordingSession.instances.append(self)

    @classmethod
    def upgraded(cls, conn, ctx, request: UpgradeRequest) -> RecordingSession:
        return cls(conn, ctx, True, request)

    def feed(self, direction, data, ts, tid):
        self.fed.append((direction, data))

    def gap(self, direction, size, ts):
        self.gaps.append((direction, size))

    def close(self, ts, outcome, reason, finish_body=True):
        self.disabled = "closed"

    def discard(self):
        pass

    def expire(self, now, timeout_ns):
        return False

    def buffered(self):
        return 0


FAKE = registry.ProtocolSpec(
    "fake", FAKE_ID, RecordingSession, lambda first: first.startswith(b"FAKE"),  # type: ignore[arg-type]
    upgrade_token="fake-proto", upgraded=RecordingSession.upgraded,
)


@pytest.fixture
def fake_protocol(monkeypatch):
    RecordingSession.instances = []
    monkeypatch.setattr(registry, "PROTOCOLS", (FAKE, *registry.PROTOCOLS))
    monkeypatch.setitem(registry.BY_KERNEL_ID, FAKE_ID, FAKE)
    monkeypatch.setitem(registry.BY_UPGRADE_TOKEN, "fake-proto", FAKE)
    return RecordingSession.instances


def open_with_protocol(table, protocol: int, role=Role.SERVER, fd=7) -> FakeConn:
    c = FakeConn(table, role, fd=fd, open_event=False)
    c.out += table.handle(ConnOpenEvent(c.ts, c.tgid, c.tgid, fd, 1, role, Source.SYSCALL,
                                        *SERVER_ADDRS, protocol=protocol))
    return c


def test_the_kernel_protocol_id_picks_the_session_before_any_byte(fake_protocol):
    table, _ = make_table()
    c = open_with_protocol(table, FAKE_ID)
    (session,) = fake_protocol
    assert session.strict  # seen from accept: from its first byte
    c.request(b"GET / HTTP/1.1\r\n\r\n")  # HTTP/1 bytes, but the kernel said otherwise
    c.send(Direction.EGRESS, b"abc", size=10)  # 7 bytes not captured
    assert session.fed == [(Direction.INGRESS, b"GET / HTTP/1.1\r\n\r\n"),
                           (Direction.EGRESS, b"abc")]
    assert session.gaps == [(Direction.EGRESS, 7)]
    assert c.out == []


def test_an_unknown_kernel_id_lets_the_first_bytes_decide(fake_protocol):
    table, _ = make_table()
    fake = open_with_protocol(table, Protocol.UNKNOWN, fd=7)
    assert fake_protocol == []  # nothing to tell by yet
    fake.request(b"FAKE hello")
    assert [s.fed for s in fake_protocol] == [[(Direction.INGRESS, b"FAKE hello")]]
    http = open_with_protocol(table, Protocol.UNKNOWN, fd=8)
    http.request(get_request("/sniffed"))
    (ex,) = http.response(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert ex.target == "/sniffed"
    assert len(fake_protocol) == 1


def test_http1_is_the_fallback_when_no_sniff_accepts_the_first_bytes():
    table, _ = make_table()
    c = open_with_protocol(table, Protocol.UNKNOWN)
    for byte in get_request("/one-byte-at-a-time"):  # "G" alone says nothing
        c.request(bytes([byte]))
    (ex,) = c.response(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert (ex.target, ex.status_code) == ("/one-byte-at-a-time", 204)


UPGRADE_REQUEST = (b"GET /up?x=1 HTTP/1.1\r\nHost: svc:8080\r\nUser-Agent: ua/1\r\n"
                   b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: fake-proto\r\n\r\n")


@pytest.mark.parametrize("split", [False, True])
def test_a_101_to_a_registered_protocol_hands_the_request_and_the_rest_over(
        fake_protocol, split):
    table, stats = make_table()
    c = open_with_protocol(table, Protocol.HTTP1)
    c.request(UPGRADE_REQUEST, ts=5_000, tid=42)
    head = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: FAKE-proto\r\n\r\n"
    if split:
        c.response(head)
        c.response(b"first-new-bytes")
    else:
        c.response(head + b"first-new-bytes")
    c.request(b"client-new-bytes")
    assert c.out == []  # the 101 is not the answer: the new protocol reports the request
    (session,) = fake_protocol
    assert session.request == UpgradeRequest(
        "GET", "/up?x=1", "svc:8080", "ua/1", None, None, (), 0, 5_000, 42)
    assert session.fed == [(Direction.EGRESS, b"first-new-bytes"),
                           (Direction.INGRESS, b"client-new-bytes")]
    assert stats.get("conntrack.upgraded.fake") == 1
    assert table.active_server_requests() == {}  # HTTP/1 released its in-flight count


def test_a_101_to_an_unknown_protocol_is_reported_and_the_connection_ignored(fake_protocol):
    table, stats = make_table()
    c = open_with_protocol(table, Protocol.HTTP1)
    c.request(get_request("/ws"))
    (ex,) = c.response(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello")
    assert (ex.target, ex.status_code) == ("/ws", 101)
    c.request(b"\x81\x85masked")
    assert fake_protocol == [] and stats.get("conntrack.disabled.upgrade") == 1


def test_build_exchange_honours_the_record_defaults():
    values = {f.name: i for i, f in enumerate(dataclasses.fields(HttpExchange))
              if f.default is dataclasses.MISSING}
    built = build_exchange(**values)
    assert built == HttpExchange(**values)
    assert (built.stream_id, built.rpc, built.request_headers) == (None, None, ())


def test_every_registered_protocol_keeps_the_contract():
    ids = [spec.kernel_id for spec in registry.PROTOCOLS]
    assert len(set(ids)) == len(ids) and Protocol.UNKNOWN not in ids
    assert registry.PROTOCOLS[-1] is registry.HTTP1  # the loosest sniff is tried last
    assert registry.HTTP1.session is Http1Session
    for spec in registry.PROTOCOLS:
        assert (spec.upgrade_token is None) == (spec.upgraded is None), spec.name
