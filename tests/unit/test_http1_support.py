"""Synthetic event streams for the conntrack / HTTP/1.x unit tests (helpers, no tests)."""

from __future__ import annotations

from otel_ebpf.capture.events import (
    ConnCloseEvent,
    ConnOpenEvent,
    DataEvent,
    Direction,
    Role,
    Source,
)
from otel_ebpf.conntrack import ConnectionTable, ConntrackOptions
from otel_ebpf.exchange import HttpExchange
from otel_ebpf.stats import Stats

SERVER_ADDRS = ("10.0.0.1", 8080, "10.0.0.2", 40000)


def make_table(**options) -> tuple[ConnectionTable, Stats]:
    stats = Stats()
    resolver = options.pop("resolver", None)
    table = ConnectionTable(
        ConntrackOptions(**options), stats, resolve_addresses=resolver, clock_offset_ns=0
    )
    return table, stats


class FakeConn:
    """Drives one connection: keeps positions and timestamps like the kernel would."""

    def __init__(
        self,
        table: ConnectionTable,
        role: Role = Role.SERVER,
        *,
        tgid: int = 100,
        fd: int = 7,
        generation: int = 1,
        addrs: tuple = SERVER_ADDRS,
        open_event: bool = True,
        source: Source = Source.SYSCALL,
        ts: int = 1_000_000,
    ) -> None:
        self.table = table
        self.role = role
        self.tgid = tgid
        self.fd = fd
        self.generation = generation
        self.source = source
        self.positions = [0, 0]
        self.ts = ts
        self.out: list[HttpExchange] = []
        if open_event:
            self.out += table.handle(
                ConnOpenEvent(ts, tgid, tgid, fd, generation, role, source, *addrs)
            )

    def next_ts(self, ts: int | None) -> int:
        self.ts = self.ts + 1000 if ts is None else ts
        return self.ts

    def send(
        self,
        direction: Direction,
        data: bytes,
        *,
        size: int | None = None,
        ts: int | None = None,
        position: int | None = None,
        source: Source | None = None,
        tid: int | None = None,
    ) -> list[HttpExchange]:
        size = len(data) if size is None else size
        pos = self.positions[direction] if position is None else position
        ev = DataEvent(
            self.next_ts(ts),
            self.tgid,
            self.tgid if tid is None else tid,
            self.fd,
            self.generation,
            direction,
            self.source if source is None else source,
            pos,
            size,
            data,
        )
        self.positions[direction] = max(self.positions[direction], pos + size)
        got = self.table.handle(ev)
        self.out += got
        return got

    # requests travel INGRESS on a server, EGRESS on a client
    def request(self, data: bytes, **kw) -> list[HttpExchange]:
        d = Direction.INGRESS if self.role != Role.CLIENT else Direction.EGRESS
        return self.send(d, data, **kw)

    def response(self, data: bytes, **kw) -> list[HttpExchange]:
        d = Direction.EGRESS if self.role != Role.CLIENT else Direction.INGRESS
        return self.send(d, data, **kw)

    def close(self, *, ts: int | None = None, reset: bool = False) -> list[HttpExchange]:
        ev = ConnCloseEvent(self.next_ts(ts), self.tgid, self.tgid, self.fd, self.generation,
                            reset=reset)
        got = self.table.handle(ev)
        self.out += got
        return got


def get_request(path: str = "/", extra: bytes = b"") -> bytes:
    return b"GET " + path.encode() + b" HTTP/1.1\r\nHost: example\r\nUser-Agent: t/1\r\n" + extra + b"\r\n"


def ok_response(body: bytes = b"hello", status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
        + extra + b"\r\n" + body
    )
