"""Ring buffer -> events: decode the raw records of bpf/include/events.h.

In: raw ring-buffer records, each starting with its kind byte, read in place
(`on_record(buf, offset, size)`: buf is the ring buffer's memory or a bytes object).
Out: ConnOpenEvent / DataEvent / ConnCloseEvent (otel_ebpf/capture/events.py), one
call of the user callback per chunk-stream record, in ring-buffer order. Records of
other kinds (EVENT_EXCHANGE from the kernel fast path) go, undecoded, to the handler
registered for their kind: the reader knows their layout (EXCHANGE_HDR, checked against
the C header like the others) but not what they mean.
Dropped and counted: records too short for their kind or of an unknown kind
(`capture.decode_errors`), callbacks that raised (`capture.callback_errors`; the
exception is logged once per distinct type, the event is lost, capture goes on).

Decoding is `struct.unpack_from` straight on a ctypes view of the record (no copy;
the data slice is the one bytes object made), ~0.3 us against ~0.6 us for
`ctypes.string_at` + unpack and more for BCC's `table.event(data)` ctypes struct.
tests/unit/test_events_layout.py checks the layout against the C header and measures
the per-event cost.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct
import time
from collections.abc import Callable, Mapping

from otel_ebpf.capture.events import (
    ConnCloseEvent,
    ConnOpenEvent,
    DataEvent,
    Direction,
    Event,
    EventKind,
    Protocol,
    Role,
    Source,
)
from otel_ebpf.stats import Stats

log = logging.getLogger(__name__)

# Layouts of bpf/include/events.h (little-endian, natural alignment, explicit padding).
# kind, role, source, protocol, tgid, tid, fd, generation, timestamp, family, lport,
# rport, pad, local_addr[16], remote_addr[16], comm[16], stream_start[2]
CONN_OPEN = struct.Struct("<BBBBIIiQQHHH2x16s16s16sQQ")
# kind, direction, source, role, tgid, tid, fd, generation, timestamp, position, size,
# captured_len, frame_hints, pad; followed by captured_len bytes and frame_hints entries
DATA_HDR = struct.Struct("<BBBBIIiQQQQIH2x")
# struct h2_frame_hint: offset from the chunk's first byte, header bytes, how many of
# them are real (9; fewer for a header the chunk ends in), pad
FRAME_HINT = struct.Struct("<I9sB2x")
# kind, source, reset, pad, tgid, tid, fd, generation, timestamp, bytes_sent, bytes_received
CONN_CLOSE = struct.Struct("<BBBxIIiQQQQ")
# kind, role, source, version_minor, tgid, tid, fd, generation, start_ns, end_ns,
# request_body_size, response_body_size, status, family, local_port, remote_port,
# local_addr[16], remote_addr[16], comm[16], head_len, method_len, target (off, len),
# host (off, len), user_agent (off, len), traceparent (off, len), tracestate (off, len);
# followed by head_len bytes of request head.
EXCHANGE_HDR = struct.Struct("<BBBBIIiQQQQQHHHH16s16s16s12H")
# struct pending_t (an exchange in flight in the fast path) after its two head buffers
# (req[REQ_HEAD_MAX], resp[RESP_HEAD_MAX]): generation, start_ns, req_pos, resp_pos,
# req_body, resp_body, tid, req_cap, resp_cap, head_len, method_len, target_off,
# target_len, hv_off[4], hv_len[4], status, version_minor, is_head, role, source, pad.
PENDING_TAIL = struct.Struct("<QQQQQQIHHHHHH4H4HHBBBB2x")

AF_INET = 2
AF_INET6 = 10
_V4_MAPPED = b"\x00" * 10 + b"\xff\xff"

# Enum members by number: indexing a tuple is several times cheaper than Enum(n).
_DIRECTIONS = (Direction.INGRESS, Direction.EGRESS)
_SOURCES = (Source.SYSCALL, Source.OPENSSL)
_ROLES = (Role.UNKNOWN, Role.SERVER, Role.CLIENT)
_PROTOCOLS = tuple(sorted(Protocol))  # indexed by value: 0, 1, 2, 3, ...

_EVENT_DATA = int(EventKind.DATA)
_HDR_SIZE = DATA_HDR.size
_HINT_SIZE = FRAME_HINT.size
_unpack_hdr = DATA_HDR.unpack_from
# A view type large enough for any record; only ever sliced within the record's size.
_RECORD = ctypes.c_char * (1 << 30)
_EVENT_OPEN = int(EventKind.CONN_OPEN)
_EVENT_CLOSE = int(EventKind.CONN_CLOSE)


class DecodeError(ValueError):
    """A record that does not match events.h (kernel/user-space version skew)."""


def format_address(family: int, raw: bytes) -> str | None:
    """The text form of a 16-byte address field; IPv4-mapped IPv6 becomes plain IPv4."""
    if family == AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    if family == AF_INET6:
        if raw[:12] == _V4_MAPPED:
            return socket.inet_ntop(socket.AF_INET, raw[12:])
        return socket.inet_ntop(socket.AF_INET6, raw)
    return None


def _enum(table: tuple, value: int, what: str):
    try:
        return table[value]
    except IndexError:
        raise DecodeError("unknown %s %d" % (what, value)) from None


def frame_hints(buf, start: int, count: int, size: int) -> dict[int, bytes]:
    """The `count` frame headers at buf[start:] of a DATA record of a `size`-byte chunk
    (bpf/http2_walk.h), keyed by distance before the chunk's end (DataEvent.frames)."""
    out = {}
    for i in range(count):
        offset, header, length = FRAME_HINT.unpack_from(buf, start + i * FRAME_HINT.size)
        if offset >= size or not 0 < length <= 9 or (length < 9 and offset + length != size):
            raise DecodeError("frame header of %d bytes at %d of a %d-byte chunk"
                              % (length, offset, size))
        out[offset - size] = bytes(header[:length])
    return out


def decode(raw: bytes) -> Event:
    """One raw ring-buffer record -> its event. Raises DecodeError on a bad record."""
    if not raw:
        raise DecodeError("empty record")
    kind = raw[0]
    if kind == _EVENT_DATA:
        if len(raw) < DATA_HDR.size:
            raise DecodeError("data record of %d bytes is shorter than its header" % len(raw))
        (_, direction, source, _role, tgid, tid, fd, generation, ts, position, size,
         captured, hints) = DATA_HDR.unpack_from(raw)
        end = DATA_HDR.size + captured
        if end + hints * FRAME_HINT.size > len(raw) or captured > size:
            raise DecodeError("data record claims %d captured bytes of %d and %d frame "
                              "headers, has %d" % (captured, size, hints,
                                                   len(raw) - DATA_HDR.size))
        return DataEvent(ts, tgid, tid, fd, generation, _enum(_DIRECTIONS, direction, "direction"),
                         _enum(_SOURCES, source, "source"), position, size,
                         raw[DATA_HDR.size:end],
                         frame_hints(raw, end, hints, size) if hints else None)
    if kind == _EVENT_OPEN:
        if len(raw) < CONN_OPEN.size:
            raise DecodeError("open record of %d bytes, expected %d" % (len(raw), CONN_OPEN.size))
        (_, role, source, protocol, tgid, tid, fd, generation, ts, family, lport, rport,
         laddr, raddr, comm, start_in, start_out) = CONN_OPEN.unpack_from(raw)
        # A zero port means "not known": accept/connect only see the remote side.
        local = format_address(family, laddr) if lport else None
        remote = format_address(family, raddr) if rport else None
        return ConnOpenEvent(ts, tgid, tid, fd, generation, _enum(_ROLES, role, "role"),
                             _enum(_SOURCES, source, "source"), local,
                             lport if local is not None else None, remote,
                             rport if remote is not None else None,
                             comm.split(b"\0", 1)[0].decode("utf-8", "replace") or None,
                             (start_in, start_out),
                             # a newer kernel side's id stays a number: conntrack sniffs
                             _PROTOCOLS[protocol] if protocol < len(_PROTOCOLS) else protocol)
    if kind == _EVENT_CLOSE:
        if len(raw) < CONN_CLOSE.size:
            raise DecodeError("close record of %d bytes, expected %d" % (len(raw), CONN_CLOSE.size))
        (_, source, reset, tgid, tid, fd, generation, ts, _sent,
         _received) = CONN_CLOSE.unpack_from(raw)
        return ConnCloseEvent(ts, tgid, tid, fd, generation, _enum(_SOURCES, source, "source"),
                              reset != 0)
    raise DecodeError("unknown record kind %d" % kind)


_monotonic = time.monotonic


RecordHandler = Callable[[object, int, int], object]


class RingReader:
    """Decodes ring-buffer records in place into `on_event`; counts what it did.

    `on_record(buf, offset, size)` takes one record where it lies (the ring buffer's
    memory, or any bytes-like object) and returns False once the poll's time budget is
    spent. `handlers` maps other record kinds (EVENT_EXCHANGE) to a function taking
    the same (buf, offset, size). `callback` adapts BCC's per-record callback (ctx,
    data pointer, size). Counters are kept in plain ints on the hot path and pushed into
    Stats by `flush_stats()`.
    """

    __slots__ = ("_on_event", "_stats", "_handlers", "events", "decode_errors",
                 "callback_errors", "_logged", "_flushed", "deadline")

    def __init__(self, on_event: Callable[[Event], object], stats: Stats | None,
                 handlers: Mapping[int, RecordHandler] | None = None) -> None:
        self._on_event = on_event
        self._stats = stats
        # Indexed by the record's kind byte (0-255): one subscript per record.
        by_kind: list[RecordHandler | None] = [None] * 256
        for kind, handler in (handlers or {}).items():
            by_kind[kind] = handler
        self._handlers = tuple(by_kind)
        self.events = 0
        self.decode_errors = 0
        self.callback_errors = 0
        self._logged: set[str] = set()
        self._flushed = (0, 0, 0)
        # time.monotonic() after which one poll stops draining (set by Capture.poll).
        # Under sustained load a single drain would never end, and timeouts, span
        # flushes and the liveness mark would starve.
        self.deadline = float("inf")

    def callback(self, _ctx: object, data: int, size: int) -> int:
        # BCC/libbpf's callback: a negative return makes libbpf stop after this record.
        return 0 if self.on_record(_RECORD.from_address(data), 0, size) else -1

    def on_record(self, buf, offset: int, size: int) -> bool:
        # Data records, the hot case of the chunk stream, are decoded inline; the rest
        # go through decode() or their kind's handler.
        try:
            kind = buf[offset]
            if type(kind) is bytes:  # a ctypes char array yields bytes of length 1
                kind = kind[0]
            handler = self._handlers[kind]
            if handler is not None:
                events = self.events = self.events + 1
                try:
                    handler(buf, offset, size)
                except DecodeError:
                    raise
                except Exception as exc:  # a bug downstream must not stop capture
                    self.callback_errors += 1
                    self._log_once(type(exc).__name__, "record handler raised %r; record "
                                   "dropped, capture continues (logged once per exception "
                                   "type)", exc)
                return not (not events & 255 and _monotonic() > self.deadline)
            if kind == _EVENT_DATA and size >= _HDR_SIZE:
                h = _unpack_hdr(buf, offset)
                start = offset + _HDR_SIZE
                end = start + h[11]
                hints = h[12]
                if (end + hints * _HINT_SIZE > offset + size or h[11] > h[10] or h[1] > 1
                        or h[2] > 1):
                    raise DecodeError("bad data record: direction %d source %d captured %d "
                                      "size %d frame headers %d in %d bytes"
                                      % (h[1], h[2], h[11], h[10], hints, size))
                event = DataEvent(h[8], h[4], h[5], h[6], h[7], _DIRECTIONS[h[1]],
                                  _SOURCES[h[2]], h[9], h[10], buf[start:end],
                                  frame_hints(buf, end, hints, h[10]) if hints else None)
            else:
                event = decode(bytes(buf[offset:offset + size]))
        except DecodeError as exc:
            self.decode_errors += 1
            self._log_once("decode", "dropping a malformed kernel record (%s); is bpf/ from "
                           "the same version as the Python package?", exc)
            return True
        self.events += 1
        try:
            self._on_event(event)
        except Exception as exc:  # a bug downstream must not stop capture
            self.callback_errors += 1
            self._log_once(type(exc).__name__, "event handler raised %r; event dropped, "
                           "capture continues (logged once per exception type)", exc)
        return not (not self.events & 255 and _monotonic() > self.deadline)

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged:
            self._logged.add(key)
            log.error(msg, *args, exc_info=key not in ("decode",))

    def flush_stats(self) -> None:
        if self._stats is None:
            return
        events, dec, cb = self._flushed
        self._stats.add("capture.events", self.events - events)
        if self.decode_errors != dec:
            self._stats.add("capture.decode_errors", self.decode_errors - dec)
        if self.callback_errors != cb:
            self._stats.add("capture.callback_errors", self.callback_errors - cb)
        self._flushed = (self.events, self.decode_errors, self.callback_errors)
