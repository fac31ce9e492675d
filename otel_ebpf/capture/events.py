"""Decoded kernel events: the contract between capture and conntrack.

The kernel side (bpf/include/events.h) emits fixed-layout records; capture/reader.py
turns each chunk-stream record into one of the three classes below. EXCHANGE records
(one whole request/response pair from the kernel fast path) skip conntrack: the reader
hands them to the protocol's own decoder (protocols/http1/kernel_exchange.py). Conntrack consumes only these, so it
can be driven by synthetic events in unit tests with no kernel at all.

Timestamps are kernel monotonic nanoseconds (bpf_ktime_get_ns == CLOCK_MONOTONIC);
conntrack converts them to wall clock once, with the offset captured at start-up.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

# Role belongs to the record (a server or client exchange); the kernel numbers it the same
# way (ROLE_* in bpf/include/events.h), and capture re-exports it for its decoders.
from otel_ebpf.exchange import Role  # noqa: F401

# The same numbers as the EVENT_* / ROLE_* / DIR_* / SOURCE_* macros in bpf/include/events.h.


class EventKind(IntEnum):
    CONN_OPEN = 1
    DATA = 2
    CONN_CLOSE = 3
    EXCHANGE = 4  # a whole request/response pair settled by the kernel fast path


class Direction(IntEnum):
    INGRESS = 0  # bytes the traced process received (read/recv*/SSL_read)
    EGRESS = 1  # bytes the traced process sent (write/send*/sendfile/SSL_write)


class Source(IntEnum):
    SYSCALL = 0  # plaintext seen at the socket syscalls
    OPENSSL = 1  # plaintext seen at SSL_read/SSL_write (the stream is TLS on the wire)


class Protocol(IntEnum):
    """The application protocol the kernel inferred for a stream (PROTO_* in
    bpf/include/events.h); conntrack picks the decoder by it (protocols/registry.py)."""

    UNKNOWN = 0  # the first bytes were too short to say: user space sniffs them
    HTTP1 = 1
    NOT_HTTP = 2  # nothing we decode (never emitted)
    HTTP2 = 3


# A connection is (tgid, fd, generation): the generation changes whenever the fd number
# is reused, so a reused fd is a new connection. For TLS streams with no fd tied to
# them, capture uses a synthetic negative fd derived from the SSL* pointer.
ConnKey = tuple[int, int, int]


@dataclass(slots=True)
class ConnOpenEvent:
    timestamp_ns: int
    tgid: int
    tid: int
    fd: int
    generation: int
    role: Role
    source: Source
    # Addresses as the kernel saw them; None when not known (e.g. accept with a NULL
    # sockaddr). Conntrack fills gaps from /proc when it can.
    local_address: str | None = None
    local_port: int | None = None
    remote_address: str | None = None
    remote_port: int | None = None
    # Added by the kernel stage (default keeps the contract): the name (task comm, 15
    # chars max) of the thread that opened or first used the connection, so a process
    # that exits before /proc can be read (curl) still has a name. None when unknown.
    comm: str | None = None
    # Where the streams this connection's DATA events describe begin, by Direction:
    # (0, 0) from the connection's start; a message boundary further in when the kernel
    # fast path served the first exchanges and then handed the connection over.
    stream_start: tuple[int, int] = (0, 0)
    # The protocol the kernel inferred for this source's stream when it emitted the open
    # (Protocol); UNKNOWN when it could not tell yet.
    protocol: int = 0

    @property
    def key(self) -> ConnKey:
        return (self.tgid, self.fd, self.generation)


@dataclass(slots=True)
class DataEvent:
    timestamp_ns: int  # when the syscall (or SSL call) returned
    tgid: int
    tid: int
    fd: int
    generation: int
    direction: Direction
    source: Source
    position: int  # byte offset of this chunk's first byte in its direction's stream
    size: int  # bytes the call really moved (>= len(data))
    data: bytes  # the captured prefix; len(data) < size means the rest was not captured
    # HTTP/2 streams: the frame headers the kernel read in the uncaptured part (its
    # frame walk, bpf/http2_walk.h), 9 bytes each (fewer for a header the chunk ends
    # in: the bytes up to its end), keyed by their first byte's distance before the
    # chunk's end (negative: position - (chunk position + size)); None when none.
    frames: dict[int, bytes] | None = None

    @property
    def key(self) -> ConnKey:
        return (self.tgid, self.fd, self.generation)

    @property
    def truncated(self) -> bool:
        return len(self.data) < self.size


@dataclass(slots=True)
class ConnCloseEvent:
    timestamp_ns: int
    tgid: int
    tid: int
    fd: int
    generation: int
    source: Source = Source.SYSCALL
    # A read or write on the connection returned ECONNRESET or EPIPE before the close:
    # what is in flight ends CONNECTION_RESET, not CONNECTION_CLOSED.
    reset: bool = False

    @property
    def key(self) -> ConnKey:
        return (self.tgid, self.fd, self.generation)


Event = ConnOpenEvent | DataEvent | ConnCloseEvent
