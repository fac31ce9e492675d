"""HTTP/1.x framing of one direction of one connection.

In: the direction's bytes in stream order, as `feed(data, ts, tid)` calls, and the
bytes conntrack knows were moved but could not see, as `gap(n, ts)` calls (kernel
truncation or loss). Out: message events reported to a listener (the stitcher,
stitch.py): `on_request_head` / `on_response_head` once a complete header block has
been parsed, `on_message_end` when the body's framing says the message is over (with
the exact body size, counted across gaps), `on_loss` when a message start was lost,
`on_invalid` when the bytes are not HTTP/1.x (the framer then ignores everything).

Why a hand parser rather than llhttp (httptools): gaps ("N bytes you cannot see"),
mid-stream attach and resynchronisation are the normal case here, and a C parser
cannot be told to skip bytes it never received. Header blocks are parsed once, when
CRLFCRLF has been seen, with bytes.find/split (no per-byte Python work); the search
for CRLFCRLF resumes where it stopped, so one-byte-at-a-time writers cost O(n).

Nothing here raises on traffic: malformed input ends in `on_invalid`, unparseable
prefixes are skipped and reported through `on_skip` for counting.

Not supported (reported as invalid or skipped): bare-LF line endings, HTTP/0.9;
obs-fold continuation lines are ignored rather than joined.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from otel_ebpf.protocols.base import HeadVerdict, MessageKind, MessageListener

# Framer states: the ParseState values as plain ints (cheaper comparisons on the hot path).
HEAD, BODY_LENGTH, CHUNK_SIZE, CHUNK_DATA, CHUNK_CRLF, TRAILERS, BODY_CLOSE, RESYNC, DEAD = range(9)

_REQUEST = MessageKind.REQUEST
_RESPONSE = MessageKind.RESPONSE
_SNIFF = MessageKind.SNIFF
_NORMAL = HeadVerdict.NORMAL
_STOP = HeadVerdict.STOP

# RFC 9110 5.6.2 token characters: what a method may be made of ("PURGE", "FOO" are fine).
TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_TOKEN_BYTES = frozenset(TOKEN_CHARS)
_HEX_CHARS = b"0123456789abcdefABCDEF"

# A chunk-size line longer than this is not a chunk-size line (extensions included).
MAX_CHUNK_LINE = 1024
# A partial line kept while resynchronising; longer ones cannot be a request line we
# would accept anyway (bounded so one-byte writes in resync stay cheap).
MAX_RESYNC_LINE = 8192

# First bytes of a TLS record (handshake, application data, alert, change cipher spec):
# TLS on a port that also carries HTTP must be recognised at once, not scanned.
_TLS_PREFIXES = (b"\x16\x03", b"\x17\x03", b"\x15\x03", b"\x14\x03")

_REQUEST_LINE = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32} [^ \r\n]{1,8192} HTTP/1\.[01]\r\n"
_STATUS_LINE = rb"HTTP/1\.[01] [0-9]{3}[ \r]"
# Plausible message starts, at the start of a line: used after mid-stream attach or a
# gap. A request needs its whole request line to match (cheap false positives in
# bodies are what this avoids); a status line is distinctive after 13 bytes.
_START_AT = {  # used with .match() at a chunk boundary
    _REQUEST: re.compile(_REQUEST_LINE),
    _RESPONSE: re.compile(_STATUS_LINE),
    _SNIFF: re.compile(rb"(?P<req>" + _REQUEST_LINE + rb")|(?P<resp>" + _STATUS_LINE + rb")"),
}
_START_RE = {kind: re.compile(rb"^(?:" + r.pattern + rb")", re.M) for kind, r in _START_AT.items()}

_H_HOST, _H_UA, _H_CL, _H_TE, _H_TP, _H_TS = range(6)
_FIELD_IDS = {
    b"host": _H_HOST,
    b"user-agent": _H_UA,
    b"content-length": _H_CL,
    b"transfer-encoding": _H_TE,
    b"traceparent": _H_TP,
    b"tracestate": _H_TS,
}
_VERSIONS = {b"HTTP/1.1": "1.1", b"HTTP/1.0": "1.0"}


def header_regex(names: Iterable[bytes]) -> re.Pattern[bytes]:
    """A regex finding the given header fields (case-insensitive) in a header block.

    One C-level scan per block instead of a Python loop over every header line: the
    per-exchange budget cannot afford per-line Python work.
    """
    alternatives = b"|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True))
    # No whitespace between name and colon (RFC 9112 5.1: such a line is not that field;
    # servers reject or ignore it), the same rule as the kernel fast path's name compares.
    return re.compile(rb"\r\n(" + alternatives + rb"):[ \t]*([^\r\n]*)", re.I)


_REQUEST_FIELDS_RE = header_regex(_FIELD_IDS)
_RESPONSE_FIELDS_RE = header_regex((b"content-length", b"transfer-encoding"))
_capture_regexes: dict[frozenset[bytes], re.Pattern[bytes]] = {}


def captured_headers(block: bytes, start: int, capture: frozenset[bytes]) -> tuple[tuple[str, str], ...]:
    regex = _capture_regexes.get(capture)
    if regex is None:
        regex = _capture_regexes[capture] = header_regex(capture)
    return tuple(
        (name.lower().decode("latin-1"), value.rstrip().decode("latin-1"))
        for name, value in regex.findall(block, start)
    )


class RequestHead:
    __slots__ = (
        "method",
        "target",
        "version",
        "host",
        "user_agent",
        "traceparent",
        "tracestate",
        "headers",
        "content_length",
        "chunked",
    )

    def __init__(
        self,
        method: str,
        target: str,
        version: str,
        host: str | None,
        user_agent: str | None,
        traceparent: str | None,
        tracestate: str | None,
        headers: tuple[tuple[str, str], ...],
        content_length: int | None,
        chunked: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.host = host
        self.user_agent = user_agent
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked


class ResponseHead:
    __slots__ = ("version", "status", "headers", "content_length", "chunked", "upgrade")

    def __init__(
        self,
        version: str,
        status: int,
        headers: tuple[tuple[str, str], ...],
        content_length: int | None,
        chunked: bool,
        upgrade: str | None = None,
    ) -> None:
        self.version = version
        self.status = status
        self.headers = headers
        self.content_length = content_length
        self.chunked = chunked
        self.upgrade = upgrade  # the Upgrade header of a 101, lower case ("h2c")


def _is_chunked(value: bytes) -> bool:
    # RFC 9112 6.3: chunked framing applies when chunked is the final transfer coding.
    return value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


def parse_request_head(block: bytes, capture: frozenset[bytes] = frozenset()) -> RequestHead | None:
    """Parse a request line + header lines (CRLF-separated, without the final CRLFCRLF).

    Returns None when the request line is not a valid HTTP/1.0 or 1.1 one, or the
    framing headers contradict each other. `capture` holds the lower-case header names
    to copy into `headers`. Header lines are not validated one by one (cost); only the
    fields we use are looked at.
    """
    line_end = block.find(b"\r\n")
    parts = (block[:line_end] if line_end >= 0 else block).split(b" ")
    if len(parts) != 3:
        return None
    method, target, version_bytes = parts
    version = _VERSIONS.get(version_bytes)
    if version is None or not method or not target or method.translate(None, TOKEN_CHARS):
        return None
    host = user_agent = traceparent = tracestate = None
    content_length: int | None = None
    chunked = te_seen = False
    if line_end >= 0:
        for name, value in _REQUEST_FIELDS_RE.findall(block, line_end):
            field = _FIELD_IDS[name.lower()]
            value = value.rstrip()
            if field == _H_HOST:
                host = value.decode("latin-1")
            elif field == _H_UA:
                user_agent = value.decode("latin-1")
            elif field == _H_CL:
                if not value.isdigit() or len(value) > 18:
                    return None
                length = int(value)
                if content_length is not None and content_length != length:
                    return None  # RFC 9112 6.3: conflicting lengths are unrecoverable
                content_length = length
            elif field == _H_TE:
                te_seen = True
                chunked = _is_chunked(value)
            elif field == _H_TP:
                traceparent = value.decode("latin-1")
            else:
                tracestate = value.decode("latin-1")
    if te_seen and not chunked:
        return None  # RFC 9112 6.3: a request body of unknown length cannot be framed
    return RequestHead(
        method.decode("ascii"),
        target.decode("latin-1"),
        version,
        host,
        user_agent,
        traceparent,
        tracestate,
        captured_headers(block, line_end, capture) if capture and line_end >= 0 else (),
        None if chunked else content_length,
        chunked,
    )


_MESSAGE_START_RE = re.compile(rb"HTTP/1\.|[!#$%&'*+.^_`|~0-9A-Za-z-]{1,32} [^ ]")


def looks_like_http1(first: bytes) -> bool:
    """Could a stream starting with these bytes be HTTP/1.x? A status line's version,
    or a method token, a space and a target (not the HTTP/2 preface's "PRI * HTTP/2")."""
    return _MESSAGE_START_RE.match(first) is not None and not first.startswith(b"PRI * HTTP/2")


_UPGRADE_RE = re.compile(rb"\r\nupgrade:[ \t]*([^\r\n]*)", re.IGNORECASE)


def parse_response_head(
    block: bytes, capture: frozenset[bytes] = frozenset()
) -> ResponseHead | None:
    """Parse a status line + header lines; None when not a valid HTTP/1.x response head."""
    line_end = block.find(b"\r\n")
    line = block[:line_end] if line_end >= 0 else block
    version = _VERSIONS.get(line[:8])
    code = line[9:12]
    if (
        version is None
        or len(line) < 12
        or line[8] != 32
        or not code.isdigit()
        or (len(line) > 12 and line[12] != 32)
    ):
        return None
    content_length: int | None = None
    chunked = False
    if line_end >= 0:
        for name, value in _RESPONSE_FIELDS_RE.findall(block, line_end):
            value = value.rstrip()
            if len(name) == 14:  # content-length
                if not value.isdigit() or len(value) > 18:
                    return None
                length = int(value)
                if content_length is not None and content_length != length:
                    return None
                content_length = length
            else:
                chunked = _is_chunked(value)
    status = int(code)
    upgrade = None
    if status == 101:  # which protocol follows (rare: looked up only here)
        match = _UPGRADE_RE.search(block)
        if match is not None:
            upgrade = match.group(1).strip().lower().decode("latin-1")
    return ResponseHead(
        version,
        status,
        captured_headers(block, line_end, capture) if capture and line_end >= 0 else (),
        None if chunked else content_length,
        chunked,
        upgrade,
    )


class MessageFramer:
    """Incremental HTTP/1.x framer for one direction (see the module docstring).

    `kind` is REQUEST or RESPONSE, or SNIFF while the connection's role is unknown:
    then the framer resynchronises on either a request or a status line and tells the
    listener which it found (`on_kind`). `strict` framers (connections seen from their
    first byte) expect a message start at once; others start by resynchronising.
    """

    __slots__ = (
        "kind",
        "listener",
        "state",
        "buf",
        "searched",
        "remaining",
        "body_size",
        "prefix",
        "prefix_left",
        "head_ts",
        "head_tid",
        "tail_ts",
        "tail_tid",
        "last_ts",
        "messages",
        "resync_skipped",
        "at_line_start",
        "started",
        "max_header",
        "max_resync",
        "capture",
        "prefix_limit",
        "max_buffer",
        "stopped_at",
    )

    def __init__(
        self,
        listener: MessageListener,
        kind: MessageKind,
        *,
        strict: bool = True,
        max_header: int = 16 * 1024,
        max_resync: int = 64 * 1024,
        capture: frozenset[bytes] = frozenset(),
        prefix_limit: int = 0,
        max_buffer: int = 64 * 1024,
    ) -> None:
        self.kind = kind
        self.listener = listener
        self.state = HEAD if strict and kind != _SNIFF else RESYNC
        self.buf: bytearray | None = None
        self.searched = 0  # where the CRLFCRLF search resumes in buf
        self.remaining = 0
        self.body_size = 0
        self.prefix: bytearray | None = None
        self.prefix_left = 0
        self.head_ts = 0  # timestamp of the chunk carrying the message's first byte
        self.head_tid = 0
        self.tail_ts = 0  # timestamp of the chunk that brought the resync tail's first byte
        self.tail_tid = 0
        self.last_ts = 0
        self.messages = 0  # valid heads parsed so far (0: "not_http" when invalid)
        self.resync_skipped = 0
        self.at_line_start = True
        self.started = False  # any byte (or gap) seen yet
        self.max_header = max_header
        self.max_resync = max_resync
        self.capture = capture
        self.prefix_limit = prefix_limit
        self.max_buffer = max_buffer  # per connection: both framers (listener.buffered())
        self.stopped_at: int | None = None  # offset in the chunk where parsing stopped

    def buffered(self) -> int:
        size = len(self.buf) if self.buf is not None else 0
        if self.prefix is not None:
            size += len(self.prefix)
        return size

    # -- input -------------------------------------------------------------------------

    def feed(self, data: bytes, ts: int, tid: int) -> None:
        self.last_ts = ts
        pos = 0
        n = len(data)
        while pos < n:
            state = self.state
            if state == HEAD:
                if self.buf is None and data[pos] in _TOKEN_BYTES:
                    # Fast path: a whole header block in this chunk (the usual case).
                    idx = data.find(b"\r\n\r\n", pos)
                    if 0 <= idx - pos <= self.max_header:
                        self.head_ts = ts
                        self.head_tid = tid
                        self._on_head(data[pos:idx], ts)
                        pos = idx + 4
                        continue
                pos = self._feed_head(data, pos, ts, tid)
            elif state == BODY_LENGTH or state == CHUNK_DATA:
                rem = self.remaining
                take = n - pos
                if take < rem:
                    self.body_size += take
                    if self.prefix_left:
                        self._keep(data, pos, take)
                    self.remaining = rem - take
                    break
                self.body_size += rem
                if self.prefix_left:
                    self._keep(data, pos, rem)
                pos += rem
                if state == BODY_LENGTH:
                    self._end(ts, None)
                else:
                    self.state = CHUNK_CRLF
                    self.remaining = 2
            elif state == CHUNK_SIZE:
                pos = self._feed_chunk_size(data, pos)
            elif state == CHUNK_CRLF:
                # The CRLF that closes chunk data: anything else means we lost the framing.
                while self.remaining and pos < n:
                    if data[pos] != (13 if self.remaining == 2 else 10):
                        self._invalid(None)
                        return
                    pos += 1
                    self.remaining -= 1
                if not self.remaining:
                    self.state = CHUNK_SIZE
            elif state == TRAILERS:
                pos = self._feed_trailers(data, pos, ts)
            elif state == BODY_CLOSE:
                take = n - pos
                self.body_size += take
                if self.prefix_left:
                    self._keep(data, pos, take)
                break
            elif state == RESYNC:
                pos = self._feed_resync(data, pos, ts, tid)
            else:  # DEAD
                self.stopped_at = pos  # bytes from here on belong to what follows (upgrade)
                break
        self.started = True

    def gap(self, n: int, ts: int) -> None:
        """`n` bytes of this direction were moved but not captured."""
        self.last_ts = ts
        self.started = True
        state = self.state
        if state == BODY_LENGTH or state == CHUNK_DATA:
            self.prefix_left = 0  # a body prefix must be contiguous from the body's start
            rem = self.remaining
            if n < rem:
                self.body_size += n
                self.remaining = rem - n
                return
            self.body_size += rem
            n -= rem
            if state == BODY_LENGTH:
                self._end(ts, None)  # exact: the length said where the message ends
            else:
                self.state = CHUNK_CRLF
                self.remaining = 2
            if n:
                self.gap(n, ts)
        elif state == CHUNK_CRLF:
            if n < self.remaining:
                self.remaining -= n
                return
            n -= self.remaining
            self.remaining = 0
            self.state = CHUNK_SIZE
            if n:
                self.gap(n, ts)
        elif state == BODY_CLOSE:
            self.prefix_left = 0
            self.body_size += n
        elif state == HEAD:
            if self.buf:
                self._partial_head(ts)
            if self.state != DEAD:
                self._lose()
        elif state == CHUNK_SIZE:
            # The gap swallowed chunk framing: the end of this body can no longer be
            # found. Report the message TRUNCATED with the body counted so far and
            # resynchronise on the next message start.
            self._end(ts, "gap_in_chunked_framing")
            if self.state != DEAD:
                self._lose()
        elif state == TRAILERS:
            self._end(ts, None)  # the last chunk was seen: the body size is exact
            if self.state != DEAD:
                self._lose()
        elif state == RESYNC:
            # Whatever partial line we held is broken; the bytes after a gap often
            # start a message (a truncated write ends where the next one begins).
            self.buf = None
            self.at_line_start = True
            # Truncated writes mean bulk transfer (a body we attached in the middle of),
            # not a chatty foreign protocol: do not let them exhaust the resync budget.
            self.resync_skipped = 0

    def close(self) -> bool:
        """The connection closed. Ends a close-delimited body (True if it did)."""
        ended = False
        if self.state == BODY_CLOSE:
            self._end(self.last_ts, None)
            ended = True
        self.stop()
        return ended

    def stop(self) -> None:
        self.state = DEAD
        self.buf = None
        self.prefix = None

    def set_kind(self, kind: MessageKind) -> None:
        """The role was inferred from the other direction: look for this kind from now on."""
        self.kind = kind

    # -- internals ---------------------------------------------------------------------

    def _grew(self) -> bool:
        """A buffer grew: enforce the per-connection cap. False when over it (disabled)."""
        if self.listener.buffered() > self.max_buffer:
            self._invalid("buffer_limit")
            return False
        return True

    def _keep(self, data: bytes, pos: int, count: int) -> None:
        take = count if count < self.prefix_left else self.prefix_left
        self.prefix += data[pos : pos + take]  # type: ignore[operator]
        self.prefix_left -= take

    def _end(self, ts: int, reason: str | None) -> None:
        body = self.body_size
        prefix = bytes(self.prefix) if self.prefix is not None else None
        self.body_size = 0
        self.prefix = None
        self.prefix_left = 0
        self.state = HEAD
        self.listener.on_message_end(self, ts, body, prefix, reason)

    def _lose(self) -> None:
        self.state = RESYNC
        self.buf = None
        self.at_line_start = True
        self.resync_skipped = 0
        self.body_size = 0
        self.prefix = None
        self.prefix_left = 0
        self.listener.on_loss(self)

    def _invalid(self, reason: str | None) -> None:
        if reason is None:
            reason = "not_http" if self.messages == 0 else "parse_error"
        self.stop()
        self.listener.on_invalid(self, reason)

    def _feed_head(self, data: bytes, pos: int, ts: int, tid: int) -> int:
        n = len(data)
        buf = self.buf
        if buf is None:
            c = data[pos]
            if c == 13 or c == 10:
                # RFC 9112 2.2: empty lines before a message are ignored.
                while pos < n and data[pos] in b"\r\n":
                    pos += 1
                if pos == n:
                    return n
                c = data[pos]
            if not (c in _TOKEN_BYTES if self.kind == _REQUEST else c == 72):  # 72: "H"
                self._invalid(None)
                return n
            self.head_ts = ts
            self.head_tid = tid
            idx = data.find(b"\r\n\r\n", pos)
            if idx < 0:
                if n - pos > self.max_header:
                    self._invalid("header_too_large")
                    return n
                self.buf = bytearray(data[pos:])
                self.searched = max(0, n - pos - 3)
                self._grew()
                return n
            if idx - pos > self.max_header:
                self._invalid("header_too_large")
                return n
            self._on_head(data[pos:idx], ts)
            return idx + 4
        old = len(buf)
        buf += data[pos:] if pos else data
        idx = buf.find(b"\r\n\r\n", self.searched)
        if idx < 0:
            if len(buf) > self.max_header:
                self._invalid("header_too_large")
                return n
            self.searched = max(0, len(buf) - 3)
            self._grew()
            return n
        self.buf = None
        if idx > self.max_header:
            self._invalid("header_too_large")
            return n
        self._on_head(bytes(buf[:idx]), ts)
        return pos + idx + 4 - old

    def _on_head(self, block: bytes, ts: int) -> None:
        if self.kind == _REQUEST:
            head = parse_request_head(block, self.capture)
            if head is None:
                self._invalid(None)
                return
            self.messages += 1
            if self.listener.on_request_head(self, head, self.head_ts, self.head_tid) == _STOP:
                return
            if self.prefix_limit:
                self.prefix = bytearray()
                self.prefix_left = self.prefix_limit
            if head.chunked:
                self.state = CHUNK_SIZE
            elif head.content_length:
                self.state = BODY_LENGTH
                self.remaining = head.content_length
            else:
                self._end(ts, None)
            return
        rhead = parse_response_head(block, self.capture)
        if rhead is None:
            self._invalid(None)
            return
        self.messages += 1
        verdict = self.listener.on_response_head(self, rhead, self.head_ts, self.head_tid)
        if verdict == _STOP:
            return
        if self.prefix_limit:
            self.prefix = bytearray()
            self.prefix_left = self.prefix_limit
        status = rhead.status
        # RFC 9112 6.3: 1xx, 204, 304 and responses to HEAD have no body.
        if verdict != _NORMAL or status < 200 or status == 204 or status == 304:
            self._end(ts, None)
        elif rhead.chunked:
            self.state = CHUNK_SIZE
        elif rhead.content_length is not None:
            if rhead.content_length:
                self.state = BODY_LENGTH
                self.remaining = rhead.content_length
            else:
                self._end(ts, None)
        else:
            self.state = BODY_CLOSE  # no length, not chunked: the body ends at close

    def _partial_head(self, ts: int) -> None:
        """A gap cut a header block: report what its complete lines say, as TRUNCATED."""
        buf = self.buf
        self.buf = None
        if buf is None:
            return
        end = buf.rfind(b"\r\n")
        if end <= 0:
            return
        block = bytes(buf[:end])
        if self.kind == _REQUEST:
            head = parse_request_head(block, self.capture)
            if head is None:
                return
            self.messages += 1
            if self.listener.on_request_head(self, head, self.head_ts, self.head_tid) == _STOP:
                return
        elif self.kind == _RESPONSE:
            rhead = parse_response_head(block, self.capture)
            if rhead is None:
                return
            self.messages += 1
            if self.listener.on_response_head(self, rhead, self.head_ts, self.head_tid) == _STOP:
                return
        else:
            return
        self._end(ts, "gap_in_headers")

    def _feed_chunk_size(self, data: bytes, pos: int) -> int:
        buf = self.buf
        n = len(data)
        if buf is None:
            idx = data.find(b"\r\n", pos)
            if idx < 0:
                if n - pos > MAX_CHUNK_LINE:
                    self._invalid(None)
                    return n
                self.buf = bytearray(data[pos:])
                self._grew()
                return n
            line = data[pos:idx]
            newpos = idx + 2
        else:
            old = len(buf)
            buf += data[pos:]
            idx = buf.find(b"\r\n", max(0, old - 1))
            if idx < 0:
                if len(buf) > MAX_CHUNK_LINE:
                    self._invalid(None)
                else:
                    self._grew()
                return n
            line = bytes(buf[:idx])
            newpos = pos + idx + 2 - old
            self.buf = None
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 15 or size_text.translate(None, _HEX_CHARS):
            self._invalid(None)
            return n
        size = int(size_text, 16)
        if size:
            self.state = CHUNK_DATA
            self.remaining = size
        else:
            self.state = TRAILERS
        return newpos

    def _feed_trailers(self, data: bytes, pos: int, ts: int) -> int:
        buf = self.buf
        if buf is None:
            if data.startswith(b"\r\n", pos):
                self._end(ts, None)
                return pos + 2
            old = 0
            text: bytes | bytearray = data[pos:]
        else:
            old = len(buf)
            buf += data[pos:]
            text = buf
        if text[:2] == b"\r\n":
            end = 2
        else:
            idx = text.find(b"\r\n\r\n")
            end = idx + 4 if idx >= 0 else -1
        if end < 0:
            if len(text) > self.max_header:
                self._invalid("header_too_large")
                return len(data)
            if buf is None:
                self.buf = bytearray(text)
            self._grew()
            return len(data)
        self.buf = None
        self._end(ts, None)
        return pos + end - old

    def _feed_resync(self, data: bytes, pos: int, ts: int, tid: int) -> int:
        n = len(data)
        if not self.started and data[pos : pos + 2] in _TLS_PREFIXES:
            self._invalid("not_http")
            return n
        buf = self.buf
        if buf:
            text: bytes = bytes(buf) + data[pos:]
            boundary = len(buf)
        else:
            text = data[pos:] if pos else data
            boundary = 0
        self.buf = None
        # A chunk boundary is the likeliest message start (one write per message is the
        # common case): it wins over a line start in buffered bytes that would run into it.
        m = _START_AT[self.kind].match(text, boundary)
        if m is None:
            start = 0
            if not self.at_line_start:
                nl = text.find(b"\n")
                if nl < 0:
                    self._skip(len(text))
                    return n
                start = nl + 1
            m = _START_RE[self.kind].search(text, start)
        if m is None:
            # Keep the last partial line: it may grow into a message start.
            nl = text.rfind(b"\n", start)
            tail = nl + 1 if nl >= 0 else start
            if len(text) - tail > MAX_RESYNC_LINE:
                tail = len(text)
                self.at_line_start = False
            else:
                self.at_line_start = True
                if tail < len(text):
                    self.buf = bytearray(text[tail:])
                    if tail >= boundary:  # the kept line starts in this chunk
                        self.tail_ts = ts
                        self.tail_tid = tid
            self._skip(tail)
            if self.buf is not None and self.state != DEAD:
                self._grew()
            return n
        k = m.start()
        if k:
            self._skip(k)
            if self.state == DEAD:
                return n
        self.resync_skipped = 0
        self.at_line_start = True
        self.state = HEAD
        if self.kind == _SNIFF:
            self.kind = _REQUEST if m.group("req") is not None else _RESPONSE
            self.listener.on_kind(self, self.kind)
        if k < boundary:
            # The message started in buffered bytes: frame them with the timestamp of
            # the chunk that brought them (the message's first byte), then the rest.
            self.feed(text[k:boundary], self.tail_ts, self.tail_tid)
            if self.state != DEAD:
                self.feed(text[boundary:], ts, tid)
            return n
        return pos + k - boundary

    def _skip(self, count: int) -> None:
        if not count:
            return
        self.resync_skipped += count
        self.listener.on_skip(self, count)
        if self.resync_skipped > self.max_resync:
            self._invalid("not_http" if self.messages == 0 else "lost_sync")
