"""HTTP/2 session: one connection's streams, turned into one HttpExchange per stream.

In: the two directions' bytes and gaps from conntrack (the `Session` contract of
protocols/base.py), framed by one FrameReader per direction (frames.py) whose header
blocks are decoded by one HPACK decoder per direction (hpack_decoder.py). Out:
HttpExchange records (protocol_version "2", stream_id, and an RpcCall for gRPC)
appended to the context's `out` list.

Which direction carries requests: the client's (INGRESS for a server, EGRESS for a
client). When the role is unknown, the direction that sent the connection preface is
the client's; for a connection seen mid-stream, the first decoded header block with
:method (requests) or :status (responses) tells.

A stream opens with the request HEADERS (start = the chunk carrying its first byte;
tid = the thread of that chunk), counts DATA payload bytes of both directions (padding
excluded, exact across gaps inside DATA), and is reported when the response's
END_STREAM arrives (end = the chunk carrying the last byte of that frame or header
block). 1xx responses are skipped; a second response header block is the trailers
(grpc-status). Outcomes:
- OK; TRUNCATED when bytes of the stream were lost: its header block ("gap_in_headers"),
  a DATA pad length ("gap_in_data_padding"), or the framing of a direction
  ("gap_in_frames" and the other reasons of FrameReader.lose).
  When frames of a direction go unseen (its framing lost, or bytes skipped or lost
  while it resynchronises): for the response direction every open stream ends at once
  as TRUNCATED (its end may have been among them); for the request direction the open
  requests are marked TRUNCATED and reported when their response ends. A lost header
  block (request head, response head or trailers) makes its stream TRUNCATED.
- STREAM_RESET: an RST_STREAM from either peer before the stream completed
  (error_reason: the error code name, lower case).
- GOAWAY: the server's GOAWAY names a last stream id below the stream's (not
  processed), or the connection ended after a GOAWAY (error_reason: its error code).
- TIMEOUT (expire), CONNECTION_CLOSED / CONNECTION_RESET (close), as HTTP/1. A stream
  that timed out stays as a marker until it ends (`http.late_responses`), so streaming
  RPCs longer than the request timeout are reported once, as TIMEOUT.

Bounds: open streams per connection <= max_pending_requests (more are not tracked,
counted in `http2.streams_over_limit`; timed-out markers make room first); buffered
bytes <= max_buffer_bytes (the session is disabled beyond, "buffer_limit"); header
blocks <= max_header_bytes (a larger one is skipped as lost, not buffered); HPACK
tables <= hpack_decoder.MAX_TABLE_SIZE per direction.

Counters (Stats): http2.sync_lost, http2.resyncs, http2.skipped_bytes,
http2.kernel_frame_headers (frame headers from the kernel used across a gap) (framing);
http2.lost_header_blocks, http2.header_block_too_large, http2.hpack_errors,
http2.hpack_unknown_fields (headers); http2.unpaired_responses, http2.unpaired_trailers
(streams begun before the attach), http2.streams_over_limit, http2.push_promises,
http2.goaway_lost, http2.malformed_frames; grpc.message_framing_lost; and, as HTTP/1,
http.outcome.<outcome>, http.late_responses, http.dropped_pending,
http.parse_failures, conntrack.disabled.<reason>, conntrack.role_inferred.

Connections seen mid-stream: fields the HPACK decoder cannot know are left out
(counted in `http2.hpack_unknown_fields`); a request whose :method or :path could not
be decoded is reported with "" for it. Streams that began before the attach are not
reported (their request HEADERS were not seen).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from otel_ebpf.exchange import Outcome, Role, RpcCall, build_exchange
from otel_ebpf.protocols.http2.frames import PUSH_PROMISE, FrameReader
from otel_ebpf.protocols.http2.grpc import GRPC_CONTENT_TYPE, MessageCounter, split_grpc_path
from otel_ebpf.protocols.http2.hpack_decoder import HeaderBlockDecoder

if TYPE_CHECKING:
    from otel_ebpf.protocols.base import ConnectionInfo, SessionContext, UpgradeRequest

logger = logging.getLogger(__name__)

_INGRESS, _EGRESS = 0, 1  # capture.events.Direction
_SERVER = Role.SERVER
_CLIENT = Role.CLIENT
_OK = Outcome.OK
_TRUNCATED = Outcome.TRUNCATED
_TIMEOUT = Outcome.TIMEOUT
_STREAM_RESET = Outcome.STREAM_RESET
_GOAWAY = Outcome.GOAWAY

# RFC 9113 7: error code -> the name reported in error_reason.
ERROR_CODES = {
    0x0: "no_error",
    0x1: "protocol_error",
    0x2: "internal_error",
    0x3: "flow_control_error",
    0x4: "settings_timeout",
    0x5: "stream_closed",
    0x6: "frame_size_error",
    0x7: "refused_stream",
    0x8: "cancel",
    0x9: "compression_error",
    0xA: "connect_error",
    0xB: "enhance_your_calm",
    0xC: "inadequate_security",
    0xD: "http_1_1_required",
}

_SETTINGS_HEADER_TABLE_SIZE = 0x1
_SETTINGS_MAX_FRAME_SIZE = 0x5

# gRPC decision for a stream: not gRPC, gRPC, or unknown until the response (the
# request's content-type could not be decoded).
_NOT_GRPC, _GRPC, _MAYBE_GRPC = 0, 1, 2


def error_name(code: int | None) -> str:
    if code is None:
        return "unknown"
    return ERROR_CODES.get(code) or f"error_{code:#x}"


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _grpc_status(value: bytes | None) -> int | None:
    return int(value) if value is not None and value.isdigit() and len(value) < 10 else None


def _request_head(fields: list[tuple[bytes, bytes]], unknown: int,
                  capture: frozenset[bytes]) -> tuple | None:
    """What a stream takes from its request header block: (method, target, host, scheme,
    user_agent, traceparent, tracestate, captured headers, gRPC decision); None for a
    block without pseudo-header (trailers of a stream whose request was not seen)."""
    found = dict(fields)
    if not (b":method" in found or b":path" in found or b":scheme" in found
            or b":authority" in found):
        return None
    method = found.get(b":method")
    path = found.get(b":path")
    authority = found.get(b":authority")
    content_type = found.get(b"content-type")
    if content_type is not None:
        grpc = _GRPC if content_type.startswith(GRPC_CONTENT_TYPE) else _NOT_GRPC
    else:
        grpc = _MAYBE_GRPC if unknown else _NOT_GRPC  # it may be among the unknown fields
    return (
        method.decode("latin-1") if method is not None else "",
        path.decode("latin-1") if path is not None else "",
        _text(authority if authority is not None else found.get(b"host")),
        _text(found.get(b":scheme")),
        _text(found.get(b"user-agent")),
        _text(found.get(b"traceparent")),
        _text(found.get(b"tracestate")),
        tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in fields if n in capture)
        if capture else (),
        grpc,
    )


def _response_head(fields: list[tuple[bytes, bytes]], capture: frozenset[bytes]) -> tuple:
    """What a stream takes from its (first) response header block: (status code or None,
    captured headers, content-type or None, grpc-status or None)."""
    found = dict(fields)
    status = found.get(b":status")
    code = int(status) if status is not None and status.isdigit() and len(status) == 3 else None
    return (
        code,
        tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in fields if n in capture)
        if capture else (),
        found.get(b"content-type"),
        _grpc_status(found.get(b"grpc-status")),
    )


class _Stream:
    """One request/response exchange in progress."""

    __slots__ = (
        "sid",
        "start_ts",
        "tid",
        "method",
        "target",
        "host",
        "scheme",
        "user_agent",
        "traceparent",
        "tracestate",
        "request_headers",
        "response_headers",
        "status",
        "responded",
        "request_size",
        "response_size",
        "request_ended",
        "truncated",
        "timed_out",
        "grpc",
        "grpc_status",
        "request_messages",
        "response_messages",
        "request_prefix",
        "response_prefix",
        "active_key",
    )

    def __init__(self, sid: int, start_ts: int, tid: int) -> None:
        self.sid = sid
        self.start_ts = start_ts
        self.tid = tid
        self.method = ""
        self.target = ""
        self.host: str | None = None
        self.scheme: str | None = None
        self.user_agent: str | None = None
        self.traceparent: str | None = None
        self.tracestate: str | None = None
        self.request_headers: tuple[tuple[str, str], ...] = ()
        self.response_headers: tuple[tuple[str, str], ...] = ()
        self.status: int | None = None
        self.responded = False  # the final response header block was seen
        self.request_size = 0
        self.response_size = 0
        self.request_ended = False
        self.truncated: str | None = None  # why the record cannot be exact
        self.timed_out = False  # reported as TIMEOUT; kept to absorb its late end
        self.grpc = _NOT_GRPC
        self.grpc_status: int | None = None
        self.request_messages: MessageCounter | None = None
        self.response_messages: MessageCounter | None = None
        # Opt-in body capture (body_prefix_bytes): a bytearray while it may grow, bytes
        # once frozen by a gap (a prefix is contiguous from the body's start).
        self.request_prefix: bytearray | bytes | None = None
        self.response_prefix: bytearray | bytes | None = None
        self.active_key: tuple[int, str, str, int | None] | None = None


class Http2Session:
    """Both directions of one HTTP/2 connection; see the module docstring."""

    __slots__ = (
        "conn",
        "ctx",
        "readers",
        "streams",
        "last_request_sid",
        "goaway",
        "prefix_limit",
        "max_buffer",
        "disabled",
        "request_head",
        "response_head",
    )

    def __init__(self, conn: ConnectionInfo, ctx: SessionContext, strict: bool) -> None:
        self.conn = conn
        self.ctx = ctx
        options = ctx.options
        role = conn.role
        if role == _SERVER:
            client_direction: int | None = _INGRESS
        elif role == _CLIENT:
            client_direction = _EGRESS
        else:
            client_direction = None
            strict = False  # each direction looks for the preface or a frame start
        max_header = options.max_header_bytes
        # A decoded header list may be several times its encoded size; beyond this the
        # block counts as lost (hpack's OversizedHeaderListError).
        max_list = max(4 * max_header, 64 * 1024)
        self.readers = tuple(
            FrameReader(
                self,
                direction,
                HeaderBlockDecoder(max_list),
                expect_preface=direction == client_direction,
                strict=strict,
                max_header=max_header,
                max_resync=options.max_resync_bytes,
            )
            for direction in (_INGRESS, _EGRESS)
        )
        if client_direction is not None:
            self.readers[client_direction].requests = True
            self.readers[1 - client_direction].requests = False
        self.streams: dict[int, _Stream] = {}
        self.last_request_sid = 0  # highest stream id whose request HEADERS were seen
        self.goaway: str | None = None  # error code name of a GOAWAY seen
        self.prefix_limit = options.body_prefix_bytes
        self.max_buffer = options.max_buffer_bytes
        self.disabled: str | None = None
        # The last header block's fields list and what was taken from it: the HPACK
        # decoder's caches return the same list for a repeated block, so a repeated
        # request or response head is read once (the lists are never changed).
        self.request_head: tuple | None = None  # (fields, unknown, _request_head(...))
        self.response_head: tuple | None = None  # (fields, _response_head(...))

    @classmethod
    def upgraded(
        cls, conn: ConnectionInfo, ctx: SessionContext, request: UpgradeRequest
    ) -> Http2Session:
        """The session of a connection that switched from HTTP/1.1 (`Upgrade: h2c`, 101).

        `request`, the HTTP/1 request that asked for the upgrade, becomes stream 1, whose
        response comes in HTTP/2 (RFC 7540 3.2); it is complete (half-closed by the
        client). Both directions start at their first HTTP/2 byte: the client's
        connection preface, the server's SETTINGS.
        """
        session = cls(conn, ctx, strict=True)
        for reader in session.readers:
            reader.limit_frames = False  # the client's HTTP2-Settings were not decoded
        s = _Stream(1, request.start_ts, request.tid)
        s.method = request.method
        s.target = request.target
        s.host = request.host
        s.scheme = conn.scheme
        s.user_agent = request.user_agent
        s.traceparent = request.traceparent
        s.tracestate = request.tracestate
        s.request_headers = request.headers
        s.request_size = request.body_size
        s.request_ended = True
        session._open(s)
        return session

    # -- from conntrack (the Session contract) ----------------------------------------------

    def feed(self, direction: int, data: bytes, ts: int, tid: int) -> None:
        if self.disabled is None:
            self.readers[direction].feed(data, ts, tid)

    def gap(self, direction: int, size: int, ts: int,
            frames: dict[int, bytes] | None = None) -> None:
        if self.disabled is None:
            self.readers[direction].gap(size, ts, frames)

    def buffered(self) -> int:
        ingress, egress = self.readers
        size = ingress.buffered() + egress.buffered()
        if self.prefix_limit:
            for s in self.streams.values():
                if s.request_prefix is not None:
                    size += len(s.request_prefix)
                if s.response_prefix is not None:
                    size += len(s.response_prefix)
        return size

    def close(self, ts: int, outcome: Outcome, reason: str, finish_body: bool = True) -> None:
        """The connection ended: streams still open end with that outcome (or GOAWAY)."""
        if self.disabled is not None:
            return
        if self.goaway is not None:
            outcome, reason = _GOAWAY, self.goaway
        for s in self.streams.values():
            if not s.timed_out:
                self._emit(s, ts, outcome, reason)
        self.streams.clear()
        for reader in self.readers:
            reader.stop()
        self.disabled = "closed"
        self.ctx.pending_sessions.discard(self)

    def discard(self) -> None:
        """Forget the connection (evicted, idle, disabled): open streams are dropped."""
        dropped = 0
        for s in self.streams.values():
            if not s.timed_out:
                dropped += 1
                self._release(s)
        self.streams.clear()
        if dropped:
            self.ctx.stats.add("http.dropped_pending", dropped)
        for reader in self.readers:
            reader.stop()
        self.ctx.pending_sessions.discard(self)

    def expire(self, now: int, timeout_ns: int) -> bool:
        """Report streams older than the timeout; True while some are still waiting."""
        waiting = False
        for s in self.streams.values():
            if s.timed_out:
                continue
            if now - s.start_ts >= timeout_ns:
                s.timed_out = True
                self._emit(s, now, _TIMEOUT, "timeout")
            else:
                waiting = True
        return waiting

    # -- from the frame readers ---------------------------------------------------------------

    def count(self, name: str, value: int = 1) -> None:
        self.ctx.stats.add(name, value)

    def check_buffer(self, reader: FrameReader) -> bool:
        """A buffer grew: enforce the per-connection cap. False when over it (disabled)."""
        if self.buffered() > self.max_buffer:
            self.disable("buffer_limit")
            return False
        return True

    def not_http2(self, reader: FrameReader) -> None:
        self.disable("not_http2")

    def on_preface(self, reader: FrameReader) -> None:
        if reader.requests is None:
            self._set_request_direction(reader.direction)
        elif not reader.requests:
            self.disable("not_http2")  # the server does not send the client preface

    def on_resynced(self, reader: FrameReader) -> None:
        self.count("http2.resyncs")

    def on_sync_lost(self, reader: FrameReader, ts: int, reason: str) -> None:
        self.count("http2.sync_lost")
        logger.debug(
            "pid %d %s:%s: HTTP/2 framing lost in direction %d (%s); resyncing",
            self.conn.tgid,
            self.conn.local_address,
            self.conn.local_port,
            reader.direction,
            reason,
        )
        self.on_unseen(reader, ts, reason)

    def on_unseen(self, reader: FrameReader, ts: int, reason: str) -> None:
        """Frames of this direction went unseen (lost framing, or bytes skipped or lost
        while resynchronising): any open stream may have had frames among them."""
        if reader.requests is None or not self.streams:
            return
        streams = self.streams
        if reader.requests:
            # The request may have ended unseen: its size is uncertain. The response
            # direction still tells when the stream ends.
            for s in streams.values():
                if not s.request_ended and s.truncated is None:
                    s.truncated = reason
            return
        # The response's end may have been among them: nothing later can be trusted.
        for s in list(streams.values()):
            del streams[s.sid]
            if not s.timed_out:
                self._emit(s, ts, _TRUNCATED, reason)

    def on_settings(self, reader: FrameReader, payload: bytes) -> None:
        # Settings limit what the *other* direction may send.
        other = self.readers[1 - reader.direction]
        for i in range(0, len(payload) - 5, 6):
            ident = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if ident == _SETTINGS_HEADER_TABLE_SIZE:
                other.hpack.allow_table_size(value)
            elif ident == _SETTINGS_MAX_FRAME_SIZE and value > other.max_frame:
                other.max_frame = min(value, (1 << 24) - 1)

    def on_header_block(
        self,
        reader: FrameReader,
        sid: int,
        block_type: int,
        end_stream: int,
        block: bytes | None,
        start_ts: int,
        start_tid: int,
        end_ts: int,
    ) -> None:
        unknown = 0
        if block is None:
            fields = None
            self.count("http2.lost_header_blocks")
        else:
            fields, unknown = reader.hpack.decode(block)
            if unknown:
                self.count("http2.hpack_unknown_fields", unknown)
            if fields is None:
                self.count("http2.hpack_errors")
        if block_type == PUSH_PROMISE:
            self.count("http2.push_promises")  # decoded for the HPACK state; not reported
            return
        requests = reader.requests
        if requests is None:
            if fields is None:
                return
            found = dict(fields)
            if b":method" in found:
                requests = True
            elif b":status" in found:
                requests = False
            else:
                return
            self._set_request_direction(
                reader.direction if requests else 1 - reader.direction
            )
        if requests:
            self._request_block(sid, end_stream, fields, unknown, start_ts, start_tid)
        else:
            self._response_block(sid, end_stream, fields, end_ts)

    def on_data(self, reader: FrameReader, sid: int, data: bytes, pos: int, end: int) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        if reader.requests:
            s.request_size += end - pos
            counter = s.request_messages
            prefix = s.request_prefix
            if prefix is not None and type(prefix) is bytearray:
                self._keep(prefix, data, pos, end)
        else:
            s.response_size += end - pos
            counter = s.response_messages
            prefix = s.response_prefix
            if prefix is not None and type(prefix) is bytearray:
                self._keep(prefix, data, pos, end)
        if counter is not None:
            counter.feed(data, pos, end)

    def on_data_gap(self, reader: FrameReader, sid: int, size: int) -> None:
        s = self.streams.get(sid)
        if s is None:
            return
        if reader.requests:
            s.request_size += size
            counter = s.request_messages
            if s.request_prefix is not None:  # contiguous from the start: frozen now
                s.request_prefix = bytes(s.request_prefix)
        else:
            s.response_size += size
            counter = s.response_messages
            if s.response_prefix is not None:
                s.response_prefix = bytes(s.response_prefix)
        if counter is not None and counter.gap(size):
            self.count("grpc.message_framing_lost")

    def on_data_uncertain(self, reader: FrameReader, sid: int) -> None:
        s = self.streams.get(sid)
        if s is not None and s.truncated is None:
            s.truncated = "gap_in_data_padding"

    def on_data_end(self, reader: FrameReader, sid: int, end_stream: int, ts: int) -> None:
        if not end_stream:
            return
        s = self.streams.get(sid)
        if s is None:
            return
        if reader.requests:
            s.request_ended = True
        else:
            self._finish(s, ts)

    def on_rst_stream(self, reader: FrameReader, sid: int, code: int | None, ts: int) -> None:
        s = self.streams.pop(sid, None)
        if s is None:
            return
        if s.timed_out:
            self.count("http.late_responses")
        else:
            self._emit(s, ts, _STREAM_RESET, error_name(code))

    def on_goaway(self, reader: FrameReader, last_sid: int, code: int, ts: int) -> None:
        name = error_name(code)
        self.goaway = name
        if reader.requests is False:
            # The server will not process streams above last_sid: they are over.
            streams = self.streams
            for s in [s for s in streams.values() if s.sid > last_sid]:
                del streams[s.sid]
                if not s.timed_out:
                    self._emit(s, ts, _GOAWAY, name)

    # -- streams ---------------------------------------------------------------------------

    def _set_request_direction(self, direction: int) -> None:
        readers = self.readers
        readers[direction].requests = True
        readers[1 - direction].requests = False
        self.conn.role = _SERVER if direction == _INGRESS else _CLIENT
        self.count("conntrack.role_inferred")

    def _request_block(
        self,
        sid: int,
        end_stream: int,
        fields: list[tuple[bytes, bytes]] | None,
        unknown: int,
        start_ts: int,
        tid: int,
    ) -> None:
        streams = self.streams
        s = streams.get(sid)
        if s is not None:  # request trailers
            if end_stream:
                s.request_ended = True
            return
        if sid <= self.last_request_sid:
            return  # trailers of a stream already reported
        head = None
        if fields is not None:
            cached = self.request_head
            if cached is not None and cached[0] is fields and cached[1] == unknown:
                head = cached[2]
            else:
                head = _request_head(fields, unknown, self.ctx.capture_request)
                self.request_head = (fields, unknown, head)
            if head is None:
                # No pseudo-header: the trailers of a stream whose request we did not see
                # (it began before the attach or in lost bytes), not a new request.
                self.count("http2.unpaired_trailers")
                return
        self.last_request_sid = sid
        if len(streams) >= self.ctx.max_pending and not self._drop_timed_out():
            self.count("http2.streams_over_limit")
            return
        s = _Stream(sid, start_ts, tid)
        if end_stream:
            s.request_ended = True
        if head is None:
            s.truncated = "gap_in_headers"
        else:
            (s.method, s.target, s.host, s.scheme, s.user_agent, s.traceparent, s.tracestate,
             s.request_headers, grpc) = head
            if grpc != _NOT_GRPC:
                s.grpc = grpc
                s.request_messages = MessageCounter()
                s.response_messages = MessageCounter()
        self._open(s)

    def _open(self, s: _Stream) -> None:
        conn = self.conn
        if self.prefix_limit:
            if s.request_prefix is None:
                s.request_prefix = bytearray()
            s.response_prefix = bytearray()
        if s.scheme is None:
            s.scheme = conn.scheme
        if conn.role == _SERVER:
            key = (conn.tgid, s.method, s.scheme, conn.local_port)
            self.ctx.server_request_started(key)
            s.active_key = key
        self.streams[s.sid] = s
        if s.sid > self.last_request_sid:
            self.last_request_sid = s.sid
        self.ctx.pending_sessions.add(self)

    def _response_block(
        self,
        sid: int,
        end_stream: int,
        fields: list[tuple[bytes, bytes]] | None,
        end_ts: int,
    ) -> None:
        s = self.streams.get(sid)
        if s is None:
            if sid & 1:  # (even ids are server pushes: not reported)
                self.count("http2.unpaired_responses")
            return
        if fields is None:
            # The response head (or an interim 1xx: it cannot be told) or the trailers.
            s.responded = True
            if s.truncated is None:
                s.truncated = "gap_in_headers"
        elif not s.responded:
            cached = self.response_head
            if cached is not None and cached[0] is fields:
                head = cached[1]
            else:
                head = _response_head(fields, self.ctx.capture_response)
                self.response_head = (fields, head)
            code, response_headers, content_type, grpc_status = head
            if code is not None:
                if code < 200:
                    return  # interim (100 Continue, 103 Early Hints): the final follows
                s.status = code
            s.responded = True
            s.response_headers = response_headers
            if s.grpc == _MAYBE_GRPC:
                if content_type is not None:
                    s.grpc = _GRPC if content_type.startswith(GRPC_CONTENT_TYPE) else _NOT_GRPC
            if s.grpc != _NOT_GRPC:
                s.grpc_status = grpc_status  # trailers-only
        elif s.grpc != _NOT_GRPC:  # trailers
            for name, value in fields:
                if name == b"grpc-status":
                    s.grpc_status = _grpc_status(value)
        if end_stream:
            self._finish(s, end_ts)

    def _finish(self, s: _Stream, ts: int) -> None:
        """The response's END_STREAM was read: report the stream."""
        del self.streams[s.sid]
        if s.timed_out:
            self.count("http.late_responses")
        elif s.truncated is None:
            self._emit(s, ts, _OK, None)
        else:
            self._emit(s, ts, _TRUNCATED, s.truncated)

    def _drop_timed_out(self) -> bool:
        """Make room among the streams: forget the timed-out markers. True if any went."""
        streams = self.streams
        stale = [sid for sid, s in streams.items() if s.timed_out]
        for sid in stale:
            del streams[sid]
        return bool(stale)

    def _keep(self, prefix: bytearray, data: bytes, pos: int, end: int) -> None:
        room = self.prefix_limit - len(prefix)
        if room > 0:
            prefix += data[pos : pos + room if end - pos > room else end]

    def _release(self, s: _Stream) -> None:
        key = s.active_key
        if key is not None:
            s.active_key = None
            self.ctx.server_request_ended(key)

    def _emit(self, s: _Stream, end_ts: int, outcome: Outcome, reason: str | None) -> None:
        conn = self.conn
        ctx = self.ctx
        offset = ctx.offset_ns
        rpc = None
        if s.grpc == _GRPC:
            service, method = split_grpc_path(s.target.split("?", 1)[0])
            rpc = RpcCall(
                "grpc",
                service,
                method,
                s.grpc_status,
                s.request_messages.count if s.request_messages is not None else 0,
                s.response_messages.count if s.response_messages is not None else 0,
            )
        ctx.out.append(
            build_exchange(
                conn.tgid,
                s.tid,
                conn.role,
                conn.local_address,
                conn.local_port,
                conn.remote_address,
                conn.remote_port,
                s.scheme or conn.scheme,
                "2",
                s.method,
                s.target,
                s.host,
                s.user_agent,
                s.traceparent,
                s.tracestate,
                s.request_size,
                s.response_size if s.responded else None,
                s.status,
                s.start_ts + offset,
                end_ts + offset,
                outcome,
                reason,
                s.request_headers,
                s.response_headers,
                bytes(s.request_prefix) if s.request_prefix is not None else None,
                bytes(s.response_prefix) if s.response_prefix is not None else None,
                s.sid,
                rpc,
            )
        )
        if s.active_key is not None:
            self._release(s)
        if outcome is not _OK:
            ctx.stats.add("http.outcome." + outcome.value)

    def disable(self, reason: str, failure: bool = True) -> None:
        """Stop decoding this connection for good; the reason is counted."""
        if self.disabled is not None:
            return
        self.disabled = reason
        stats = self.ctx.stats
        stats.add("conntrack.disabled." + reason)
        if failure:
            stats.add("http.parse_failures")
            logger.debug(
                "pid %d %s:%s: HTTP/2 decoding disabled (%s); its events are ignored from now on",
                self.conn.tgid,
                self.conn.local_address,
                self.conn.local_port,
                reason,
            )
        self.discard()


__all__ = ["ERROR_CODES", "Http2Session", "error_name"]
