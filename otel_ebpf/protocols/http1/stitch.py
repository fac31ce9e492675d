"""HTTP/1.x stitcher: pairs one connection's requests with its responses.

In: message events from the two MessageFramers of a connection (parse.py), one per
direction, plus close/expire calls from conntrack. Out: HttpExchange records appended
to the shared context's `out` list.

Pairing is FIFO (HTTP/1.1 answers pipelined requests in order). Two guards keep lost
bytes from shifting every later pair:
- a response whose first byte was seen before the oldest pending request's first
  byte cannot answer it (it answers a request we never saw): it is framed, counted as
  `http.unpaired_responses` and dropped;
- after the response stream lost a message start, a new response answers the most
  recent request that began before it; older pending requests are reported TRUNCATED
  ("response_lost").
A request that times out stays in the FIFO as a marker so that its late response is
consumed (`http.late_responses`) instead of being paired with the next request.
Requests still pending at close or timeout after the response stream lost bytes are
reported TRUNCATED ("response_lost"): their answers may have been sent unseen.

Outcomes: OK; TIMEOUT ("timeout", end = the expire() time); CONNECTION_CLOSED
("connection_closed", or "shutdown" from close_all); CONNECTION_RESET; TRUNCATED
("gap_in_headers", "gap_in_chunked_framing", "response_lost"). A 101 response is
reported with status 101 (the upgrade's final answer), then the connection is ignored,
unless the Upgrade token names a protocol the registry decodes (h2c): then the request
is handed over (`SessionContext.upgrades`) and that protocol reports it.

Timing (exchange.py): start = timestamp of the chunk carrying the first request byte;
end = the chunk carrying the last response byte. Server and client roles only differ
in which direction carries requests.
"""

from __future__ import annotations

import logging
from otel_ebpf.exchange import Outcome, Role, build_exchange
from otel_ebpf.protocols.base import (
    ConnectionInfo,
    HeadVerdict,
    MessageKind,
    SessionContext,
    UpgradeRequest,
)
from otel_ebpf.protocols.http1.parse import (
    BODY_CLOSE,
    MessageFramer,
    RequestHead,
    ResponseHead,
)

logger = logging.getLogger(__name__)

_SERVER = Role.SERVER
_CLIENT = Role.CLIENT
_REQUEST = MessageKind.REQUEST
_RESPONSE = MessageKind.RESPONSE
_NORMAL = HeadVerdict.NORMAL
_NO_BODY = HeadVerdict.NO_BODY
_STOP = HeadVerdict.STOP
_OK = Outcome.OK
_TRUNCATED = Outcome.TRUNCATED
_TIMEOUT = Outcome.TIMEOUT


class _Pending:
    __slots__ = (
        "head",
        "start_ts",
        "tid",
        "body_size",
        "body_prefix",
        "truncated",
        "timed_out",
        "active_key",
    )

    def __init__(self, head: RequestHead, start_ts: int, tid: int) -> None:
        self.head = head
        self.start_ts = start_ts
        self.tid = tid
        self.body_size = 0
        self.body_prefix: bytes | None = None
        self.truncated: str | None = None
        self.timed_out = False
        self.active_key: tuple[int, str, str, int | None] | None = None


class Http1Session:
    """Both directions of one connection: two framers and the request FIFO."""

    __slots__ = (
        "conn",
        "ctx",
        "framers",
        "pending",
        "req_current",
        "resp_current",
        "resp_head",
        "resp_interim",
        "resp_lost",
        "stop_reason",
        "disabled",
        "handover",
    )

    def __init__(self, conn: ConnectionInfo, ctx: SessionContext, strict: bool) -> None:
        self.conn = conn
        self.ctx = ctx
        options = ctx.options
        role = conn.role
        if role == _SERVER:
            kinds = (_REQUEST, _RESPONSE)  # indexed by Direction: INGRESS, EGRESS
        elif role == _CLIENT:
            kinds = (_RESPONSE, _REQUEST)
        else:
            kinds = (MessageKind.SNIFF, MessageKind.SNIFF)
            strict = False
        self.framers = tuple(
            MessageFramer(
                self,
                kind,
                strict=strict,
                max_header=options.max_header_bytes,
                max_resync=options.max_resync_bytes,
                capture=ctx.capture_request if kind == _REQUEST else ctx.capture_response,
                prefix_limit=options.body_prefix_bytes,
                max_buffer=options.max_buffer_bytes,
            )
            for kind in kinds
        )
        # FIFO of requests awaiting a response: a list, not a deque (a deque costs ~600
        # bytes per idle connection; the FIFO is almost always 0 or 1 long).
        self.pending: list[_Pending] = []
        self.req_current: _Pending | None = None  # request whose body is being framed
        self.resp_current: _Pending | None = None  # request whose response is being framed
        self.resp_head: ResponseHead | None = None
        self.resp_interim = False  # the response being framed is a 1xx
        self.resp_lost = False  # the response stream lost a message start
        self.stop_reason: str | None = None  # disable after this response (upgrade)
        self.disabled: str | None = None
        # set by a 101 to a protocol the registry knows: (token, the upgrade request)
        self.handover: tuple[str, UpgradeRequest] | None = None

    # -- from conntrack -----------------------------------------------------------------

    def feed(self, direction: int, data: bytes, ts: int, tid: int) -> None:
        framer = self.framers[direction]
        framer.feed(data, ts, tid)
        if self.handover is not None and self.disabled is not None:
            # The 101 head ended inside this chunk: the rest is the new protocol's.
            token, request = self.handover
            self.handover = None
            at = framer.stopped_at
            rest = data[at:] if at is not None else b""
            self.ctx.upgrades.append((self, token, request, direction, rest))

    def gap(self, direction: int, size: int, ts: int,
            frames: dict[int, bytes] | None = None) -> None:
        self.framers[direction].gap(size, ts)  # (frames: HTTP/2 only)

    def buffered(self) -> int:
        ingress, egress = self.framers
        return ingress.buffered() + egress.buffered()

    def close(self, ts: int, outcome: Outcome, reason: str, finish_body: bool = True) -> None:
        """The connection ended: finish close-delimited bodies, report what is pending."""
        if self.disabled is not None:
            return
        for framer in self.framers:
            if framer.kind == _RESPONSE:
                if finish_body and framer.state == BODY_CLOSE:
                    framer.close()  # ends the message: emitted as OK
                elif self.resp_current is not None:
                    p = self.resp_current
                    self.resp_current = None
                    if not p.timed_out:
                        self._emit(
                            p, self.resp_head, ts, framer.body_size, None, outcome, reason
                        )
            framer.stop()
        if self.resp_lost:
            # Response bytes were lost since the last response we saw: the answers to
            # these requests may well have been sent; say so instead of blaming the peer.
            outcome, reason = _TRUNCATED, "response_lost"
        for p in self.pending:
            if not p.timed_out:
                self._emit(p, None, ts, None, None, outcome, reason)
        self.pending.clear()
        self.disabled = "closed"
        self.ctx.pending_sessions.discard(self)

    def discard(self) -> None:
        """Forget the connection (evicted, idle, disabled): pending requests are dropped."""
        dropped = 0
        for p in self.pending:
            if not p.timed_out:
                dropped += 1
                self._release(p)
        p = self.resp_current
        if p is not None and not p.timed_out:
            dropped += 1
            self._release(p)
        self.resp_current = None
        self.pending.clear()
        if dropped:
            self.ctx.stats.add("http.dropped_pending", dropped)
        for framer in self.framers:
            framer.stop()
        self.ctx.pending_sessions.discard(self)

    def expire(self, now: int, timeout_ns: int) -> bool:
        """Report requests older than the timeout; True while some are still waiting."""
        waiting = False
        p = self.resp_current
        if p is not None and not p.timed_out:
            if now - p.start_ts >= timeout_ns:
                p.timed_out = True
                framer = self.framers[0] if self.framers[0].kind == _RESPONSE else self.framers[1]
                self._emit(p, self.resp_head, now, framer.body_size, None, _TIMEOUT, "timeout")
            else:
                waiting = True
        if self.resp_lost:  # see close(): the responses may have been sent
            outcome, reason = _TRUNCATED, "response_lost"
        else:
            outcome, reason = _TIMEOUT, "timeout"
        for p in self.pending:
            if p.timed_out:
                continue
            if now - p.start_ts >= timeout_ns:
                p.timed_out = True
                self._emit(p, None, now, None, None, outcome, reason)
            else:
                waiting = True
        return waiting

    # -- from the framers (MessageListener) ---------------------------------------------

    def on_kind(self, framer: MessageFramer, kind: MessageKind) -> None:
        ingress, egress = self.framers
        is_ingress = framer is ingress
        if kind == _REQUEST:
            role = _SERVER if is_ingress else _CLIENT
        else:
            role = _CLIENT if is_ingress else _SERVER
        self.conn.role = role
        other = egress if is_ingress else ingress
        other.set_kind(_RESPONSE if kind == _REQUEST else _REQUEST)
        self.ctx.stats.add("conntrack.role_inferred")

    def on_request_head(self, framer: MessageFramer, head: RequestHead, ts: int, tid: int) -> int:
        pending = self.pending
        if len(pending) >= self.ctx.max_pending:
            self.disable("too_many_pending")
            return _STOP
        p = _Pending(head, ts, tid)
        conn = self.conn
        if conn.role == _SERVER:
            key = (conn.tgid, head.method, conn.scheme, conn.local_port)
            self.ctx.server_request_started(key)
            p.active_key = key
        pending.append(p)
        self.req_current = p
        self.ctx.pending_sessions.add(self)
        return _NORMAL

    def on_response_head(
        self, framer: MessageFramer, head: ResponseHead, ts: int, tid: int
    ) -> int:
        status = head.status
        if status < 200 and status != 101:
            self.resp_interim = True  # 100 Continue etc.: the final response follows
            return _NORMAL
        pending = self.pending
        if not self.resp_lost and pending and pending[0].start_ts <= ts:
            p: _Pending | None = pending.pop(0)  # the usual case, inlined
        else:
            p = self._pair(ts)
        self.resp_current = p
        self.resp_head = head
        if p is None:
            return _NORMAL
        method = p.head.method
        if status == 101:
            self.stop_reason = "upgrade"  # the bytes that follow are not HTTP/1.x
            if head.upgrade in self.ctx.upgrade_tokens:
                # h2c: not the final answer; the new protocol answers the request (stream
                # 1), so the session that takes over reports it (on_message_end).
                self.handover = (head.upgrade, p)  # type: ignore[assignment]
            return _NO_BODY
        if method == "CONNECT" and status < 300:
            self.stop_reason = "tunnel"
            return _NO_BODY
        if method == "HEAD":
            return _NO_BODY
        return _NORMAL

    def on_message_end(
        self,
        framer: MessageFramer,
        ts: int,
        body_size: int,
        prefix: bytes | None,
        reason: str | None,
    ) -> None:
        if framer.kind == _REQUEST:
            p = self.req_current
            if p is not None:
                self.req_current = None
                p.body_size = body_size
                p.body_prefix = prefix
                if reason is not None:
                    p.truncated = reason
            return
        if self.resp_interim:
            self.resp_interim = False
            return
        p = self.resp_current
        if p is None:
            return  # unpaired response, already counted
        self.resp_current = None
        if p.timed_out:
            self.ctx.stats.add("http.late_responses")
        elif self.handover is not None and self.handover[1] is p:
            head = p.head
            self._release(p)
            self.handover = (self.handover[0], UpgradeRequest(
                head.method, head.target, head.host, head.user_agent, head.traceparent,
                head.tracestate, head.headers, p.body_size, p.start_ts, p.tid))
        else:
            if reason is None:
                reason = p.truncated
            if p is self.req_current:
                # Answered before its body was complete (e.g. 413): report the body so far.
                p.body_size = self.framers[0 if framer is self.framers[1] else 1].body_size
            self._emit(
                p,
                self.resp_head,
                ts,
                body_size,
                prefix,
                _OK if reason is None else _TRUNCATED,
                reason,
            )
        if self.stop_reason is not None:
            self.disable(self.stop_reason, failure=False)

    def on_loss(self, framer: MessageFramer) -> None:
        self.ctx.stats.add("http.resyncs")
        if framer.kind != _REQUEST:
            self.resp_lost = True

    def on_skip(self, framer: MessageFramer, count: int) -> None:
        self.ctx.stats.add("http.skipped_bytes", count)

    def on_invalid(self, framer: MessageFramer, reason: str) -> None:
        self.disable(reason)

    # -- internals ------------------------------------------------------------------------

    def disable(self, reason: str, failure: bool = True) -> None:
        """Stop parsing this connection for good; the reason is counted."""
        if self.disabled is not None:
            return
        self.disabled = reason
        stats = self.ctx.stats
        stats.add("conntrack.disabled." + reason)
        if failure:
            stats.add("http.parse_failures")
            logger.debug(
                "pid %d %s:%s: HTTP/1.x parsing disabled (%s); its events are ignored from now on",
                self.conn.tgid,
                self.conn.local_address,
                self.conn.local_port,
                reason,
            )
        self.discard()

    def _pair(self, ts: int) -> _Pending | None:
        pending = self.pending
        if self.resp_lost:
            self.resp_lost = False
            while len(pending) > 1 and pending[1].start_ts <= ts:
                lost = pending.pop(0)
                if not lost.timed_out:
                    self._emit(lost, None, ts, None, None, _TRUNCATED, "response_lost")
        if pending and pending[0].start_ts <= ts:
            return pending.pop(0)
        self.ctx.stats.add("http.unpaired_responses")
        return None

    def _release(self, p: _Pending) -> None:
        key = p.active_key
        if key is not None:
            p.active_key = None
            self.ctx.server_request_ended(key)

    def _emit(
        self,
        p: _Pending,
        rhead: ResponseHead | None,
        end_ts: int,
        body_size: int | None,
        prefix: bytes | None,
        outcome: Outcome,
        reason: str | None,
    ) -> None:
        conn = self.conn
        ctx = self.ctx
        offset = ctx.offset_ns
        h = p.head
        if rhead is None:
            status = None
            response_headers: tuple[tuple[str, str], ...] = ()
        else:
            status = rhead.status
            response_headers = rhead.headers
        ctx.out.append(
            build_exchange(
                conn.tgid,
                p.tid,
                conn.role,
                conn.local_address,
                conn.local_port,
                conn.remote_address,
                conn.remote_port,
                conn.scheme,
                h.version,
                h.method,
                h.target,
                h.host,
                h.user_agent,
                h.traceparent,
                h.tracestate,
                p.body_size,
                body_size,
                status,
                p.start_ts + offset,
                end_ts + offset,
                outcome,
                reason,
                h.headers,
                response_headers,
                p.body_prefix,
                prefix,
            )
        )
        if p.active_key is not None:
            self._release(p)
        # (http.exchanges is counted by the daemon, which sees every exchange it emits.)
        if outcome is not _OK:
            ctx.stats.add("http.outcome." + outcome.value)


__all__ = ["ConnectionInfo", "Http1Session", "SessionContext", "build_exchange"]
