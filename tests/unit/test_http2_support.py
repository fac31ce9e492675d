"""Real HTTP/2 byte streams for the HTTP/2 unit tests (helpers, no tests).

`H2Pair` runs a python-hyper `h2` client and server against each other in memory and
records every write each side makes, in order, as a `Chunk`: the byte streams a
kernel probe would capture on either end of the connection. `replay` feeds such a
transcript to an Http2Session from the server's or the client's point of view.
`frame` builds single frames by hand for what h2 will not send (CONTINUATION below
16 KiB, padded HEADERS, malformed input).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
from hpack import Encoder

from otel_ebpf.conntrack.options import ConntrackOptions
from otel_ebpf.exchange import HttpExchange, Role
from otel_ebpf.protocols.base import ConnectionInfo, SessionContext
from otel_ebpf.protocols.http2 import Http2Session
from otel_ebpf.stats import Stats

TO_SERVER = 0  # the client's writes
TO_CLIENT = 1  # the server's writes
INGRESS, EGRESS = 0, 1

GRPC_REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":authority", "grpc.example:50051"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-python/1.0"),
]


@dataclass
class Chunk:
    side: int  # TO_SERVER or TO_CLIENT
    data: bytes


def grpc_messages(*payloads: bytes) -> bytes:
    """gRPC length-prefixed messages: flag byte 0, 4-byte big-endian length, payload."""
    return b"".join(b"\x00" + len(p).to_bytes(4, "big") + p for p in payloads)


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    header = len(payload).to_bytes(3, "big") + bytes((ftype, flags)) + sid.to_bytes(4, "big")
    return header + payload


class H2Pair:
    """An h2 client and server wired together; every flush records one write per side."""

    def __init__(self) -> None:
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False)
        )
        self.chunks: list[Chunk] = []
        self.client.initiate_connection()
        self.flush_client()
        self.server.initiate_connection()
        self.flush()

    def flush_client(self) -> bool:
        return self._move(self.client, self.server, TO_SERVER)

    def flush_server(self) -> bool:
        return self._move(self.server, self.client, TO_CLIENT)

    def flush(self) -> None:
        """Deliver both sides' pending bytes until neither has more (ACKs, updates)."""
        for _ in range(10):
            if not (self.flush_client() | self.flush_server()):
                return

    def _move(self, sender, receiver, side: int) -> bool:
        data = sender.data_to_send()
        if not data:
            return False
        self.chunks.append(Chunk(side, data))
        for event in receiver.receive_data(data):
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                receiver.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        return True

    # -- the usual moves --------------------------------------------------------------------

    def request(self, path: str, *, method: str = "GET", body: bytes = b"", extra=(),
                end: bool = True, authority: str = "example.com") -> int:
        sid = self.client.get_next_available_stream_id()
        headers = [(":method", method), (":scheme", "http"), (":authority", authority),
                   (":path", path), *extra]
        self.client.send_headers(sid, headers, end_stream=end and not body)
        if body:
            send_data(self.client, sid, body, end_stream=end)
        self.flush()
        return sid

    def respond(self, sid: int, status: int = 200, body: bytes = b"", extra=(),
                trailers=None, pad_length=None) -> None:
        self.server.send_headers(
            sid, [(":status", str(status)), *extra], end_stream=not body and not trailers
        )
        if body:
            send_data(self.server, sid, body, end_stream=not trailers, pad_length=pad_length)
        if trailers:
            self.server.send_headers(sid, trailers, end_stream=True)
        self.flush()

    def grpc_call(self, path: str, requests: Iterable[bytes], responses: Iterable[bytes],
                  status: int = 0) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, [*GRPC_REQUEST_HEADERS[:3], (":path", path),
                                       *GRPC_REQUEST_HEADERS[3:]])
        self.client.send_data(sid, grpc_messages(*requests), end_stream=True)
        self.flush()
        self.server.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        for message in responses:
            self.server.send_data(sid, grpc_messages(message))
            self.flush()
        self.server.send_headers(sid, [("grpc-status", str(status))], end_stream=True)
        self.flush()
        return sid


def send_data(conn, sid: int, body: bytes, *, end_stream: bool, pad_length=None) -> None:
    """DATA frames of at most 16384 bytes (h2 does not split), the last one padded."""
    size = 16384
    for i in range(0, len(body), size):
        last = i + size >= len(body)
        piece = body[i : i + size]
        if last and pad_length is not None and len(piece) + pad_length + 1 > size:
            conn.send_data(sid, piece[:size // 2])
            piece = piece[size // 2 :]
        conn.send_data(sid, piece, end_stream=end_stream and last,
                       pad_length=pad_length if last else None)


def make_context(**options) -> SessionContext:
    return SessionContext(ConntrackOptions(**options), Stats(), 0)


def make_session(role: Role = Role.SERVER, *, strict: bool = True,
                 ctx: SessionContext | None = None, **options) -> Http2Session:
    conn = ConnectionInfo(100, role)
    conn.local_address, conn.local_port = "10.0.0.1", 8080
    conn.remote_address, conn.remote_port = "10.0.0.2", 40000
    return Http2Session(conn, ctx or make_context(**options), strict)


def direction_of(side: int, role: Role) -> int:
    """The capture direction of a side's writes, seen from the traced process."""
    if role == Role.CLIENT:
        return EGRESS if side == TO_SERVER else INGRESS
    return INGRESS if side == TO_SERVER else EGRESS


def replay(session: Http2Session, chunks: Iterable[Chunk], role: Role = Role.SERVER, *,
           split: int | None = None, step: int | None = None, first_ts: int = 1000,
           capture_limit: int | None = None, start: int = 0) -> list[HttpExchange]:
    """Feed the chunks in order, chunk i stamped ts_of(i) (tid 1 for the client's
    writes, 2 for the server's). `step`: feed each chunk in pieces of that size (same
    timestamp); `split`: split every chunk once at that offset; `capture_limit`: like the
    kernel, capture only that many bytes of a write and report the rest as a gap;
    `start`: index of the first chunk (its timestamp stays ts_of(start))."""
    out = session.ctx.out
    for i, chunk in enumerate(chunks, start):
        ts = first_ts * (i + 1)
        tid = 1 if chunk.side == TO_SERVER else 2
        direction = direction_of(chunk.side, role)
        data = chunk.data
        lost = 0
        if capture_limit is not None and len(data) > capture_limit:
            lost = len(data) - capture_limit
            data = data[:capture_limit]
        if step is not None:
            pieces = [data[j : j + step] for j in range(0, len(data), step)]
        elif split is not None and 0 < split < len(data):
            pieces = [data[:split], data[split:]]
        else:
            pieces = [data]
        for piece in pieces:
            session.feed(direction, piece, ts, tid)
        if lost:
            session.gap(direction, lost, ts)
    return out


def ts_of(index: int, first_ts: int = 1000) -> int:
    """The timestamp replay() gives chunk `index`."""
    return first_ts * (index + 1)


def encode_block(headers, encoder: Encoder | None = None) -> bytes:
    return (encoder or Encoder()).encode(headers)
