"""ConnectionTable: capture events in, HttpExchange records out.

Conntrack knows connections and byte positions, not protocols: each connection gets
one Session (protocols/base.py) of the protocol the kernel inferred, or, when the
kernel could not tell, of the protocol whose sniff() accepts the first captured bytes
(protocols/registry.py). A session may hand its connection over to another protocol
(HTTP/1.1 `101 Switching Protocols` to h2c): conntrack starts that protocol's session
with the upgrade request and feeds it the rest (`conntrack.upgraded.<protocol>`).

In: ConnOpenEvent / DataEvent / ConnCloseEvent (otel_ebpf.capture.events), in ring
buffer order. Out: the HttpExchange records each call completed (usually none).

One tracker per ConnKey (tgid, fd, generation). Per direction it follows the stream
position (DataEvent.position/size): a chunk past the expected position means the
kernel lost bytes, a truncated chunk (len(data) < size) means it did not copy them;
either way the session is told "N bytes you cannot see" so body sizes stay exact.
A chunk entirely behind the expected position (duplicate, or a late out-of-order chunk
whose bytes were already accounted as a gap) is dropped; a partly overlapping one is
trimmed. Both are counted.

Connections never seen opening (opened before we attached) start with role UNKNOWN:
the first message start found in either direction decides the role, and addresses
come from /proc through `resolve_addresses`. With `options.ports` set, connections
whose local and remote ports are both outside it are dropped once addresses are known,
and so are connections whose ports neither the kernel nor /proc could tell.

TLS: when OPENSSL-source data arrives on a key, syscall-source data on it is
ciphertext from then on: it is counted (`conntrack.ciphertext_ignored`) and ignored,
and exchanges on the connection get scheme "https".

Memory is bounded: per-connection buffered bytes (the session's) <= max_buffer_bytes,
at most max_connections trackers (least recently active evicted), idle trackers
forgotten by expire(), at most max_pending_requests pipelined requests per connection.
Counters (otel_ebpf.stats): conntrack.connections.opened/closed, conntrack.evicted,
conntrack.expired_idle, conntrack.filtered, conntrack.disabled.<reason> (not_http,
parse_error, header_too_large, buffer_limit, lost_sync, too_many_pending; upgrade and
tunnel are not failures), conntrack.gaps, conntrack.gap_bytes (position jumps),
conntrack.truncated_bytes (uncaptured tails), conntrack.duplicate_chunks,
conntrack.ciphertext_ignored, conntrack.late_events, conntrack.resolve_failures,
conntrack.role_inferred, http.outcome.<outcome> (non-OK only; the daemon counts
http.exchanges),
http.parse_failures, http.skipped_bytes, http.resyncs, http.unpaired_responses,
http.late_responses, http.dropped_pending; gauge conntrack.connections.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

from otel_ebpf.capture.events import (
    ConnCloseEvent,
    ConnKey,
    ConnOpenEvent,
    DataEvent,
    Event,
    Role,
    Source,
)
from otel_ebpf.conntrack import procfs
from otel_ebpf.conntrack.options import ConntrackOptions
from otel_ebpf.exchange import HttpExchange, Outcome
from otel_ebpf.protocols import registry
from otel_ebpf.protocols.base import ConnectionInfo, Session, SessionContext
from otel_ebpf.stats import Stats

logger = logging.getLogger(__name__)

Resolver = Callable[[int, int], "tuple[str, int, str, int] | None"]

# Keys of recently closed connections: events racing the close are dropped, not
# mistaken for a new connection opened before we attached.
RECENTLY_CLOSED = 4096

_OPENSSL = Source.OPENSSL
_UNKNOWN = Role.UNKNOWN


class Connection(ConnectionInfo):
    __slots__ = ("key", "fd", "seen_open", "stream_start", "tls", "expected", "session",
                 "last_ts", "filtered", "kernel_protocol", "protocol")

    def __init__(self, key: ConnKey, role: Role, seen_open: bool, ts: int,
                 stream_start: tuple[int, int] = (0, 0), kernel_protocol: int = 0) -> None:
        super().__init__(key[0], role)
        self.key = key
        self.fd = key[1]
        # We saw accept/connect: streams start at a message boundary, at position 0 or,
        # for a connection the kernel fast path handed over, at stream_start.
        self.seen_open = seen_open
        self.stream_start = stream_start
        self.tls = False
        # next expected position per Direction; None: take the first chunk's position
        self.expected: list[int | None] = list(stream_start) if seen_open else [None, None]
        self.session: Session | None = None
        self.last_ts = ts
        self.filtered = False
        # the protocol the kernel inferred (capture.events.Protocol; 0: it could not tell)
        self.kernel_protocol = kernel_protocol
        # the protocol decoding it (registry.ProtocolSpec); None until the session starts
        self.protocol: registry.ProtocolSpec | None = None


class ConnectionTable:
    """All tracked connections (see the module docstring). Not thread-safe: one owner."""

    def __init__(
        self,
        options: ConntrackOptions,
        stats: Stats,
        resolve_addresses: Resolver | None = procfs.resolve,
        clock_offset_ns: int | None = None,
    ) -> None:
        if clock_offset_ns is None:
            # bpf_ktime_get_ns() is CLOCK_MONOTONIC, as is time.monotonic_ns() on Linux.
            clock_offset_ns = time.time_ns() - time.monotonic_ns()
        self.options = options
        self.stats = stats
        self._resolve = resolve_addresses
        self._ports = options.ports or None
        self._conns: OrderedDict[ConnKey, Connection] = OrderedDict()
        self._closed: OrderedDict[ConnKey, None] = OrderedDict()
        self._ctx = SessionContext(options, stats, clock_offset_ns)
        self._ctx.upgrade_tokens = frozenset(registry.BY_UPGRADE_TOKEN)
        stats.gauge("conntrack.connections", self.__len__)

    def __len__(self) -> int:
        return len(self._conns)

    @property
    def clock_offset_ns(self) -> int:
        return self._ctx.offset_ns

    # -- public API -----------------------------------------------------------------------

    def handle(self, event: Event) -> list[HttpExchange]:
        """Process one event; returns the exchanges it completed (usually none)."""
        out: list[HttpExchange] = []
        self._ctx.out = out
        if type(event) is DataEvent or isinstance(event, DataEvent):
            self._on_data(event)
        elif isinstance(event, ConnOpenEvent):
            self._on_open(event)
        elif isinstance(event, ConnCloseEvent):
            self._on_close(event)
        return out

    def expire(self, now_monotonic_ns: int) -> list[HttpExchange]:
        """Report timed-out requests and forget idle connections (call ~once a second)."""
        out: list[HttpExchange] = []
        ctx = self._ctx
        ctx.out = out
        timeout_ns = int(self.options.request_timeout_s * 1e9)
        for session in list(ctx.pending_sessions):
            if not session.expire(now_monotonic_ns, timeout_ns):
                ctx.pending_sessions.discard(session)
        idle_ns = int(self.options.idle_timeout_s * 1e9)
        idle: list[ConnKey] = []
        for key, conn in self._conns.items():
            if now_monotonic_ns - conn.last_ts < idle_ns:
                break  # ordered by activity: the rest are younger
            idle.append(key)
        for key in idle:
            self._forget(self._conns.pop(key))
        if idle:
            self.stats.add("conntrack.expired_idle", len(idle))
        return out

    def close_all(self) -> list[HttpExchange]:
        """At shutdown: report every pending request (CONNECTION_CLOSED, "shutdown")."""
        out: list[HttpExchange] = []
        self._ctx.out = out
        now = time.monotonic_ns()
        for conn in self._conns.values():
            if conn.session is not None:
                # A close-delimited body still open at shutdown did not end: not OK.
                conn.session.close(now, Outcome.CONNECTION_CLOSED, "shutdown", finish_body=False)
        self._conns.clear()
        self._ctx.pending_sessions.clear()
        return out

    def active_server_requests(self) -> dict[tuple[int, str, str, int | None], int]:
        """Server requests in flight: (pid, method, scheme, local_port) -> count."""
        return dict(self._ctx.active)

    def buffered_bytes(self) -> int:
        """Bytes held in parser buffers over all connections (O(connections))."""
        return sum(c.session.buffered() for c in self._conns.values() if c.session is not None)

    # -- events ---------------------------------------------------------------------------

    def _on_data(self, ev: DataEvent) -> None:
        key = (ev.tgid, ev.fd, ev.generation)
        conns = self._conns
        conn = conns.get(key)
        if conn is None:
            if key in self._closed:
                self.stats.add("conntrack.late_events")
                return
            conn = self._create(key, _UNKNOWN, False, ev.timestamp_ns, None)
        else:
            conns.move_to_end(key)
            conn.last_ts = ev.timestamp_ns
        if conn.filtered:
            return
        if ev.source == _OPENSSL:
            if not conn.tls:
                self._switch_to_tls(conn)
        elif conn.tls:
            self.stats.add("conntrack.ciphertext_ignored")
            return
        session = conn.session
        if session is None:
            if conn.protocol is not None or not ev.data:
                return  # forgotten, or nothing yet to tell the protocol by
            session = self._start_session(conn, ev.data)
        elif session.disabled is not None:
            return
        direction = ev.direction
        position = ev.position
        size = ev.size
        data = ev.data
        expected = conn.expected[direction]
        end = position + size
        if position != expected:
            if expected is None:
                pass  # first chunk of a connection seen mid-stream: the framer resyncs
            elif position > expected:
                lost = position - expected
                self.stats.add("conntrack.gaps")
                self.stats.add("conntrack.gap_bytes", lost)
                session.gap(direction, lost, ev.timestamp_ns)
            elif end <= expected:
                self.stats.add("conntrack.duplicate_chunks")
                return
            else:
                cut = expected - position
                self.stats.add("conntrack.duplicate_chunks")
                data = data[cut:]
                size -= cut
        conn.expected[direction] = end
        captured = len(data)
        if captured:
            # The session checks the per-connection buffer cap itself, where buffers grow.
            session.feed(direction, data, ev.timestamp_ns, ev.tid)
            if self._ctx.upgrades:
                session = self._take_over(conn)
        if size > captured and session.disabled is None:
            self.stats.add("conntrack.truncated_bytes", size - captured)
            if ev.frames:  # HTTP/2 frame headers the kernel read in those bytes
                session.gap(direction, size - captured, ev.timestamp_ns, ev.frames)
            else:
                session.gap(direction, size - captured, ev.timestamp_ns)

    def _on_open(self, ev: ConnOpenEvent) -> None:
        key = (ev.tgid, ev.fd, ev.generation)
        self._closed.pop(key, None)
        addresses = (ev.local_address, ev.local_port, ev.remote_address, ev.remote_port)
        conn = self._conns.get(key)
        if conn is None:
            conn = self._create(key, ev.role, ev.role != _UNKNOWN, ev.timestamp_ns, addresses,
                                ev.stream_start, ev.protocol)
        else:
            # Data raced ahead of its open event: keep the tracker, learn what we can.
            self._conns.move_to_end(key)
            conn.last_ts = ev.timestamp_ns
            if conn.role == _UNKNOWN:
                conn.role = ev.role
            if ev.protocol:
                conn.kernel_protocol = ev.protocol
            self._set_addresses(conn, addresses)
            self._apply_port_filter(conn)
        if ev.source == _OPENSSL and not conn.tls:
            conn.tls = True
            conn.scheme = "https"

    def _on_close(self, ev: ConnCloseEvent) -> None:
        key = (ev.tgid, ev.fd, ev.generation)
        conn = self._conns.pop(key, None)
        if conn is None:
            return
        closed = self._closed
        closed[key] = None
        if len(closed) > RECENTLY_CLOSED:
            closed.popitem(last=False)
        self.stats.add("conntrack.connections.closed")
        if conn.session is not None:
            # ev.reset: a read/write on it returned ECONNRESET/EPIPE (the kernel remembers
            # it on the connection). The reason is the outcome's value
            # ("connection_reset"/"connection_closed").
            outcome = Outcome.CONNECTION_RESET if ev.reset else Outcome.CONNECTION_CLOSED
            conn.session.close(ev.timestamp_ns, outcome, outcome.value)

    # -- internals --------------------------------------------------------------------------

    def _create(
        self,
        key: ConnKey,
        role: Role,
        seen_open: bool,
        ts: int,
        addresses: tuple[str | None, int | None, str | None, int | None] | None,
        stream_start: tuple[int, int] = (0, 0),
        kernel_protocol: int = 0,
    ) -> Connection:
        conns = self._conns
        if len(conns) >= self.options.max_connections:
            _, victim = conns.popitem(last=False)
            self._forget(victim)
            self.stats.add("conntrack.evicted")
        conn = Connection(key, role, seen_open, ts, stream_start, kernel_protocol)
        if addresses is not None:
            self._set_addresses(conn, addresses)
        if (conn.local_port is None or conn.remote_port is None) and conn.fd >= 0:
            self._resolve_from_proc(conn)
        conns[key] = conn
        self.stats.add("conntrack.connections.opened")
        self._apply_port_filter(conn)
        if not conn.filtered and kernel_protocol in registry.BY_KERNEL_ID:
            self._start_session(conn, b"")
        # else: the first captured bytes tell the protocol (_on_data)
        return conn

    def _start_session(self, conn: Connection, first_bytes: bytes) -> Session:
        spec = registry.for_stream(conn.kernel_protocol, first_bytes)
        conn.protocol = spec
        session = conn.session = spec.session(conn, self._ctx, conn.seen_open)
        return session

    def _take_over(self, conn: Connection) -> Session:
        """A session handed its connection to another protocol (h2c after a 101): start
        that protocol's session with the upgrade request and the bytes after the 101."""
        upgrades = self._ctx.upgrades
        old, token, request, direction, rest = upgrades.pop()
        upgrades.clear()  # one connection per call: nothing else can be queued
        spec = registry.BY_UPGRADE_TOKEN[token]
        assert spec.upgraded is not None  # BY_UPGRADE_TOKEN holds only specs that can
        conn.protocol = spec
        session = conn.session = spec.upgraded(conn, self._ctx, request)
        self.stats.add("conntrack.upgraded." + spec.name)
        if rest:
            session.feed(direction, rest, conn.last_ts, request.tid)
        return session

    def _set_addresses(
        self, conn: Connection, addresses: tuple[str | None, int | None, str | None, int | None]
    ) -> None:
        local_address, local_port, remote_address, remote_port = addresses
        if local_address is not None:
            conn.local_address = local_address
        if local_port is not None:
            conn.local_port = local_port
        if remote_address is not None:
            conn.remote_address = remote_address
        if remote_port is not None:
            conn.remote_port = remote_port

    def _resolve_from_proc(self, conn: Connection) -> None:
        if self._resolve is None:
            return
        try:
            found = self._resolve(conn.tgid, conn.fd)
        except Exception:  # an injected resolver must not take the pipeline down
            logger.debug("address lookup for pid %d fd %d failed", conn.tgid, conn.fd,
                         exc_info=True)
            found = None
        if found is None:
            self.stats.add("conntrack.resolve_failures")
            return
        self._set_addresses(conn, found)

    def _apply_port_filter(self, conn: Connection) -> None:
        ports = self._ports
        if ports is None or conn.filtered:
            return
        if conn.local_port is None and conn.remote_port is None:
            # Neither the kernel nor /proc could tell (the process is gone, or the fd
            # is not an inet socket): a selection by port cannot include it.
            self.stats.add("conntrack.filtered_unknown_port")
        elif conn.local_port in ports or conn.remote_port in ports:
            return
        conn.filtered = True
        self.stats.add("conntrack.filtered")
        if conn.session is not None:
            conn.session.discard()
            conn.session = None

    def _switch_to_tls(self, conn: Connection) -> None:
        """First OPENSSL-source data on this key: plaintext from now on comes from there."""
        conn.tls = True
        conn.scheme = "https"
        old = conn.session
        if old is not None:
            old.discard()
        # OpenSSL plaintext has its own positions; anything before it was ciphertext.
        conn.expected = list(conn.stream_start) if conn.seen_open else [None, None]
        conn.session = None
        conn.protocol = None  # the plaintext's first bytes tell (_on_data), unless the
        conn.kernel_protocol = 0  # OpenSSL open event named it (that sets conn.tls first)

    def _forget(self, conn: Connection) -> None:
        if conn.session is not None:
            conn.session.discard()
            conn.session = None
