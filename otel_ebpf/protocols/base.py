"""Shared vocabulary between a protocol's framer (parse) and its stitcher (stitch).

A framer turns one direction of one connection (bytes plus "N bytes you cannot see"
gaps, from conntrack) into message events and reports them to a listener, the
stitcher, which pairs requests with responses. Nothing here raises on bad traffic:
a framer that cannot continue reports `on_invalid(reason)` and stops.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Protocol


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
