"""EVENT_EXCHANGE records (the kernel fast path) -> HttpExchange.

In: one record per request/response pair that the kernel settled itself
(bpf/http1_fast.h): both timestamps, exact body sizes, the status, the connection's
addresses and the whole request head with the offsets of the fields we use
(bpf/include/events.h, struct exchange_event_hdr; layout EXCHANGE_HDR in
capture/reader.py). Out: the same HttpExchange the chunk-stream stitcher builds for
the same traffic, handed to `emit`.

Nothing here parses framing: the kernel only takes the fast path for heads it parsed
completely and bodies it counted exactly, and hands everything else to the chunk
stream. Decoding is slicing: the request head's fields are cut at the offsets the
kernel found. Allow-listed request headers (conntrack.capture_request_headers) are
read from the same head bytes, since the whole head is in the record.

Requests the kernel holds with no answer: `expire()` gets the fast path's exchanges in
flight (struct pending_t, read from the kernel once a second) and reports those older
than the request timeout as TIMEOUT exchanges, as the chunk stream's stitcher does; the
caller then deletes them from the kernel (which hands the connection to the chunk
stream at its next bytes: a late answer is counted there as unpaired, not paired with
the next request).

Dropped and counted: records that contradict their own lengths raise DecodeError (the
reader counts them as `capture.decode_errors`); exchanges of connections outside the
port selection are counted as `conntrack.filtered_exchanges`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from otel_ebpf.capture.reader import EXCHANGE_HDR, PENDING_TAIL, DecodeError, format_address
from otel_ebpf.exchange import HttpExchange, Outcome, Role, build_exchange
from otel_ebpf.protocols.http1.parse import captured_headers
from otel_ebpf.stats import Stats

_HDR_SIZE = EXCHANGE_HDR.size
_unpack = EXCHANGE_HDR.unpack_from
# The same layout up to head_len, without the kind, family, addresses and task name (no
# bytes objects made per record: those are read once per connection, see _connection);
# the field offsets after head_len are read only for a head not seen just before.
assert EXCHANGE_HDR.format == "<BBBBIIiQQQQQHHHH16s16s16s12H"  # what these follow
_unpack_lean = struct.Struct("<xBBBIIiQQQQQH2xHH48xH").unpack_from
_unpack_fields = struct.Struct("<11H").unpack_from
_FILTERED = ()  # a connection outside the port selection
# The header's last fields, the head's field offsets and lengths (12 u16), right before it.
_FIELDS_SIZE = 24
# Longest request head kept per connection (memory: 16384 connections x this).
_MAX_KEPT_HEAD = 256
_MAX_CACHED_CONNECTIONS = 16384
_ROLES = (None, Role.SERVER, Role.CLIENT)
_SCHEMES = ("http", "https")
_VERSIONS = ("1.0", "1.1")
_OK = Outcome.OK
_TIMEOUT = Outcome.TIMEOUT
_unpack_pending = PENDING_TAIL.unpack_from
# Formatted addresses by (family, raw 16 bytes): a server sees the same few peers again
# and again, and inet_ntop costs more than a dict hit. Bounded: cleared when full.
_MAX_CACHED_ADDRESSES = 4096

Resolver = Callable[[int, int], "tuple[str, int, str, int] | None"]


def _head_fields(head: bytes, method_len: int, target_off: int, target_len: int,
                 host_off: int, host_len: int, ua_off: int, ua_len: int, tp_off: int,
                 tp_len: int, ts_off: int, ts_len: int) -> tuple:
    """(method, target, host, user agent, traceparent, tracestate) cut from a request
    head at the offsets the kernel found; None for a header that was absent."""
    return (
        head[:method_len].decode("latin-1"),
        head[target_off:target_off + target_len].decode("latin-1"),
        head[host_off:host_off + host_len].decode("latin-1") if host_len else None,
        head[ua_off:ua_off + ua_len].decode("latin-1") if ua_len else None,
        head[tp_off:tp_off + tp_len].decode("latin-1") if tp_len else None,
        head[ts_off:ts_off + ts_len].decode("latin-1") if ts_len else None,
    )


class KernelExchangeDecoder:
    """Turns EVENT_EXCHANGE records into HttpExchange records (see the module doc)."""

    __slots__ = ("_emit", "_stats", "_offset", "_ports", "_capture", "_note_process",
                 "_addresses", "_conns", "_resolve", "exchanges", "filtered", "_output",
                 "_verdict", "_current", "_drop")

    def __init__(
        self,
        emit: Callable[[HttpExchange], object],
        stats: Stats,
        clock_offset_ns: int,
        ports: frozenset[int] | None = None,
        capture_request_headers: tuple[str, ...] = (),
        note_process: Callable[[int, str | None], object] | None = None,
        resolve_addresses: Resolver | None = None,
    ) -> None:
        self._emit = emit
        # emit = daemon.reported_only(output, ...): discovery's verdict is kept in the
        # per-connection entry and checked with one dict lookup per exchange; selected
        # exchanges go straight to the output, the others are not even built.
        parts = getattr(emit, "reported_only", None)
        self._output, self._verdict, self._current, self._drop = parts or (emit, None, None,
                                                                           None)
        self._stats = stats
        self._offset = clock_offset_ns
        self._ports = ports or None
        self._capture = frozenset(h.lower().encode("latin-1") for h in capture_request_headers)
        # Called once per connection first seen here, with the kernel's task name: the
        # resolver reads /proc while the process most likely still exists. Per
        # connection, not per pid: a pid reused by another program (pid_max may be
        # 32768) is named afresh.
        self._note_process = note_process
        self._addresses: dict[tuple[int, bytes], str | None] = {}
        # (tgid, fd) -> [generation, local port, remote port, addresses or _FILTERED,
        # discovery verdict's ProcessInfo or None, reported?, the last request head with
        # its field offsets (<= _MAX_KEPT_HEAD bytes), its decoded fields]:
        # one entry per open descriptor, replaced when the fd is reused by a new
        # connection (the kernel hands out the lowest free fd), so closed connections do
        # not pile up. Bounded: cleared when full (a connection then costs one more lookup).
        self._conns: dict[tuple[int, int], list] = {}
        # (pid, fd) -> addresses, for timed-out requests (their records were never made)
        self._resolve = resolve_addresses
        self.exchanges = 0  # emitted (pushed into Stats by the daemon)
        self.filtered = 0

    def on_record(self, buf, offset: int, size: int) -> None:
        if size < _HDR_SIZE:
            raise DecodeError("exchange record of %d bytes is shorter than its header" % size)
        (role, source, minor, tgid, tid, fd, gen, start, end, req_size, resp_size, status,
         lport, rport, head_len) = _unpack_lean(buf, offset)
        if head_len > size - _HDR_SIZE or role > 2 or not role or source > 1 or minor > 1:
            raise DecodeError("exchange record with inconsistent lengths (head %d of %d bytes)"
                              % (head_len, size - _HDR_SIZE))
        base = offset + _HDR_SIZE
        # The request head with the kernel's field offsets before it: the same bytes as
        # the connection's previous request (a client repeating itself) give the same
        # fields, already checked and decoded.
        key = buf[base - _FIELDS_SIZE:base + head_len]
        entry = self._conns.get((tgid, fd))
        if entry is not None and key == entry[6]:
            fields = entry[7]
        else:
            fields = None
            (method_len, target_off, target_len, host_off, host_len, ua_off, ua_len, tp_off,
             tp_len, ts_off, ts_len) = _unpack_fields(buf, base - _FIELDS_SIZE + 2)
            if (not method_len or not target_len
                    or max(target_off + target_len, host_off + host_len, ua_off + ua_len,
                           tp_off + tp_len, ts_off + ts_len) > head_len):
                raise DecodeError("exchange record with inconsistent lengths (head %d of %d "
                                  "bytes)" % (head_len, size - _HDR_SIZE))
        # What is the same for every exchange of a connection, worked out once for it.
        if entry is None or entry[0] != gen or entry[1] != lport or entry[2] != rport:
            entry = self._connection(buf, offset)
        conn = entry[3]
        if conn is _FILTERED:
            self.filtered += 1
            return
        self.exchanges += 1
        if self._current is not None:  # discovery: is this process reported?
            info = entry[4]
            if info is None or self._current(tgid) is not info:
                self._judge(tgid, entry)
            if not entry[5]:
                self._drop()
                return
        if fields is None:
            # Only when the connection's last head differs (its fields are kept below).
            head = buf[base:base + head_len]
            fields = (*_head_fields(head, method_len, target_off, target_len, host_off,
                                    host_len, ua_off, ua_len, tp_off, tp_len, ts_off,
                                    ts_len),
                      captured_headers(head, head.find(b"\r\n"), self._capture)
                      if self._capture else ())
            if head_len <= _MAX_KEPT_HEAD:
                entry[6] = key
                entry[7] = fields
        offset_ns = self._offset
        self._output(build_exchange(
            tgid,
            tid,
            _ROLES[role],
            conn[0],
            conn[1],
            conn[2],
            conn[3],
            _SCHEMES[source],
            _VERSIONS[minor],
            fields[0],
            fields[1],
            fields[2],
            fields[3],
            fields[4],
            fields[5],
            req_size,
            resp_size,
            status,
            start + offset_ns,
            end + offset_ns,
            _OK,
            None,
            fields[6],
            (),
            None,
            None,
        ))

    def _judge(self, tgid: int, entry: list) -> None:
        """Note discovery's current verdict on tgid in a connection's entry."""
        entry[4], entry[5] = self._verdict(tgid)

    def _connection(self, buf, offset: int) -> list:
        """The cache entry of a record's connection (see __init__), its addresses
        (local address, local port, remote address, remote port) or _FILTERED; noted in
        the bounded per-connection cache. The verdict is left to _judge."""
        (_, _role, _source, _minor, tgid, _tid, fd, gen, _s, _e, _rq, _rs, _status, family,
         lport, rport, laddr, raddr, comm) = _unpack(buf, offset)[:19]
        conns = self._conns
        key = (tgid, fd)
        if key not in conns and len(conns) >= _MAX_CACHED_CONNECTIONS:
            conns.clear()
        ports = self._ports
        if ports is not None and lport not in ports and rport not in ports:
            entry = conns[key] = [gen, lport, rport, _FILTERED, None, False, None, None]
            return entry
        if self._note_process is not None:
            self._note_process(tgid, comm.split(b"\0", 1)[0].decode("utf-8", "replace") or None)
        local = self._address(family, laddr) if lport else None
        remote = self._address(family, raddr) if rport else None
        conn = (local, lport if local is not None else None,
                remote, rport if remote is not None else None)
        entry = conns[key] = [gen, lport, rport, conn, None, True, None, None]
        return entry

    def _address(self, family: int, raw: bytes) -> str | None:
        addresses = self._addresses
        text = addresses.get((family, raw), False)
        if text is False:
            if len(addresses) >= _MAX_CACHED_ADDRESSES:
                addresses.clear()
            text = addresses[(family, raw)] = format_address(family, raw)
        return text

    def expire(self, pending: list[tuple[int, int, bytes]], now_monotonic_ns: int,
               timeout_ns: int) -> list[tuple[int, int]]:
        """Report the exchanges in flight older than timeout_ns as TIMEOUT; returns their
        (tgid, fd) for the caller to delete from the kernel."""
        expired = []
        tail = PENDING_TAIL.size
        for tgid, fd, value in pending:
            if len(value) < tail:
                continue
            (_gen, start, _rq_pos, _rs_pos, req_body, _rs_body, tid, req_cap, resp_cap,
             head_len, method_len, target_off, target_len, host_off, ua_off, tp_off, ts_off,
             host_len, ua_len, tp_len, ts_len, status, minor, _is_head, role, source
             ) = _unpack_pending(value, len(value) - tail)
            if now_monotonic_ns - start < timeout_ns:
                continue
            expired.append((tgid, fd))
            head = value[:min(head_len, req_cap)]
            if (not 0 < role <= 2 or source > 1 or minor > 1 or not method_len
                    or target_off + target_len > len(head)):
                continue  # not a head the kernel took: nothing sensible to report
            ports = self._ports
            addresses = self._resolve(tgid, fd) if self._resolve is not None else None
            local, lport, remote, rport = addresses or (None, None, None, None)
            if ports is not None and lport not in ports and rport not in ports:
                self.filtered += 1
                continue
            offset_ns = self._offset
            self.exchanges += 1
            self._stats.add("http.outcome.timeout")
            self._emit(build_exchange(
                tgid, tid, _ROLES[role], local, lport, remote, rport, _SCHEMES[source],
                _VERSIONS[minor],
                *_head_fields(head, method_len, target_off, target_len, host_off, host_len,
                              ua_off, ua_len, tp_off, tp_len, ts_off, ts_len),
                req_body, None, status if resp_cap else None, start + offset_ns,
                now_monotonic_ns + offset_ns,
                _TIMEOUT, "timeout",
                captured_headers(head, head.find(b"\r\n"), self._capture) if self._capture else (),
                (), None, None,
            ))
        return expired
