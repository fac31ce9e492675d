"""The protocol seam: what conntrack hands a protocol, and what a protocol gives back.

Conntrack owns connections and byte positions; it knows no protocol. For each
connection it creates one Session of the protocol the kernel inferred (registry.py)
and feeds it each direction's bytes in stream order, plus "N bytes you cannot see"
gaps. The session appends the exchanges it completes to `SessionContext.out`.
Every protocol implements `Session`; `ConnectionInfo` is what it knows of its
connection, `SessionContext` what all sessions of one connection table share.

The rest of this module is HTTP/1's vocabulary between its framer (parse) and its
stitcher (stitch). A framer turns one direction of one connection (bytes plus "N bytes you cannot see"
gaps, from conntrack) into message events and reports them to a listener, the
stitcher, which pairs requests with responses. Nothing here raises on bad traffic:
a framer that cannot continue reports `on_invalid(reason)` and stops.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple, Protocol

from otel_ebpf.exchange import HttpExchange, Outcome, Role

if TYPE_CHECKING:
    from otel_ebpf.conntrack.options import ConntrackOptions
    from otel_ebpf.stats import Stats


class ConnectionInfo:
    """What a session knows about its connection (conntrack fills it in)."""

    __slots__ = (
        "tgid",
        "role",
        "local_address",
        "local_port",
        "remote_address",
        "remote_port",
        "scheme",
    )

    def __init__(self, tgid: int, role: Role) -> None:
        self.tgid = tgid
        self.role = role
        self.local_address: str | None = None
        self.local_port: int | None = None
        self.remote_address: str | None = None
        self.remote_port: int | None = None
        self.scheme = "http"


class UpgradeRequest(NamedTuple):
    """An HTTP/1.1 request answered by `101 Switching Protocols`: in the protocol that
    follows it is the first exchange (HTTP/2 over h2c: stream 1, RFC 7540 3.2)."""

    method: str
    target: str
    host: str | None
    user_agent: str | None
    traceparent: str | None
    tracestate: str | None
    headers: tuple[tuple[str, str], ...]  # allow-listed captured request headers
    body_size: int
    start_ts: int  # kernel monotonic ns of the chunk with the request's first byte
    tid: int


class Session(Protocol):
    """One connection's decoder, for one protocol. Never raises on bad traffic: it
    counts what it cannot decode and, when it cannot go on, sets `disabled`."""

    disabled: str | None  # None while decoding; the reason once it gave up or closed

    def feed(self, direction: int, data: bytes, ts: int, tid: int) -> None:
        """The next captured bytes of one direction (Direction.INGRESS / EGRESS), in
        stream order; ts: kernel monotonic ns when the syscall returned."""

    def gap(self, direction: int, size: int, ts: int,
            frames: dict[int, bytes] | None = None) -> None:
        """`size` bytes of that direction moved but were not captured. `frames`: what
        the kernel read of their framing (DataEvent.frames; HTTP/2 streams only)."""

    def close(self, ts: int, outcome: Outcome, reason: str, finish_body: bool = True) -> None:
        """The connection ended: report what is pending with that outcome."""

    def discard(self) -> None:
        """Forget the connection (evicted, idle, filtered): count what was pending."""

    def expire(self, now: int, timeout_ns: int) -> bool:
        """Report requests older than the timeout; True while some still wait."""

    def buffered(self) -> int:
        """Bytes held in this session's buffers."""


class SessionContext:
    """State shared by all sessions of one connection table."""

    __slots__ = (
        "options",
        "stats",
        "offset_ns",
        "out",
        "active",
        "pending_sessions",
        "capture_request",
        "capture_response",
        "max_pending",
        "upgrades",
        "upgrade_tokens",
    )

    def __init__(self, options: ConntrackOptions, stats: Stats, offset_ns: int) -> None:
        self.options = options
        self.stats = stats
        self.offset_ns = offset_ns  # kernel monotonic ns + offset = unix ns
        self.out: list[HttpExchange] = []  # exchanges completed by the current call
        # (pid, method, scheme, local_port) -> server requests in flight
        self.active: dict[tuple[int, str, str, int | None], int] = {}
        # sessions with requests waiting: conntrack calls their expire()
        self.pending_sessions: set[Session] = set()
        self.max_pending = options.max_pending_requests
        self.capture_request = frozenset(
            h.lower().encode("latin-1") for h in options.capture_request_headers
        )
        self.capture_response = frozenset(
            h.lower().encode("latin-1") for h in options.capture_response_headers
        )
        # Upgrade tokens ("h2c") that a registered protocol can take over after a 101
        # (conntrack fills it from the registry).
        self.upgrade_tokens: frozenset[str] = frozenset()
        # Take-overs asked for by sessions during the current call: (session, upgrade
        # token, the request that asked for it, direction, the bytes after the 101 head
        # in the chunk that carried it). Conntrack starts the new protocol's session.
        self.upgrades: list[tuple[Session, str, UpgradeRequest, int, bytes]] = []

    def server_request_started(self, key: tuple[int, str, str, int | None]) -> None:
        """A server request is in flight: (pid, method, scheme, local port)."""
        active = self.active
        active[key] = active.get(key, 0) + 1

    def server_request_ended(self, key: tuple[int, str, str, int | None]) -> None:
        """It was answered, reported or forgotten."""
        active = self.active
        left = active[key] - 1
        if left:
            active[key] = left
        else:
            del active[key]


class MessageKind(IntEnum):
    """What a direction carries: requests or responses (SNIFF until role is inferred)."""

    SNIFF = 0
    REQUEST = 1
    RESPONSE = 2


class HeadVerdict(IntEnum):
    """What the stitcher tells the framer after a message head was parsed."""

    NORMAL = 0  # frame the body from the headers
    NO_BODY = 1  # no body whatever the headers say (HEAD, 101 upgrade, CONNECT 2xx)
    STOP = 2  # the stitcher disabled the connection: stop parsing


class ParseState(IntEnum):
    """Framer states (ints on the hot path; named here for logs and tests)."""

    HEAD = 0  # accumulating a request/status line and headers up to CRLFCRLF
    BODY_LENGTH = 1  # Content-Length body, `remaining` bytes to go
    CHUNK_SIZE = 2  # reading a chunk-size line
    CHUNK_DATA = 3  # inside chunk data, `remaining` bytes to go
    CHUNK_CRLF = 4  # the CRLF after chunk data
    TRAILERS = 5  # trailer section after the last (0) chunk
    BODY_CLOSE = 6  # close-delimited response body: everything until close
    RESYNC = 7  # lost framing (mid-stream attach, gap): looking for a message start
    DEAD = 8  # disabled: ignores everything


class MessageListener(Protocol):
    def on_kind(self, framer: object, kind: MessageKind) -> None: ...

    def on_request_head(self, framer: object, head: object, ts: int, tid: int) -> int: ...

    def on_response_head(self, framer: object, head: object, ts: int, tid: int) -> int: ...

    def on_message_end(
        self, framer: object, ts: int, body_size: int, prefix: bytes | None, reason: str | None
    ) -> None: ...

    def on_loss(self, framer: object) -> None: ...

    def on_skip(self, framer: object, count: int) -> None: ...

    def on_invalid(self, framer: object, reason: str) -> None: ...

    def buffered(self) -> int: ...
