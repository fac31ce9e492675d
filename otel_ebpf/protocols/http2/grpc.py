"""gRPC over HTTP/2: what the HTTP/2 session needs to report a call as an RpcCall.

A gRPC call is an HTTP/2 stream whose request content-type starts with
`application/grpc`. Its method is the request :path "/package.Service/Method"; its
status is the `grpc-status` of the response trailers (or of a trailers-only response:
one HEADERS frame with END_STREAM); its messages are the length-prefixed messages in
the DATA payload of each direction: 1 byte compressed flag, 4 bytes big-endian length,
then that many bytes (https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md).

`MessageCounter` counts messages from the DATA payload bytes of one direction of one
stream, fed in stream order, with "N bytes not captured" gaps. A gap inside a message
body keeps the count exact (the length prefix says where the next message starts); a
gap that covers a length prefix (or part of one) loses the framing: the count is then
what was seen before, `lost` is set, and the session counts it
(`grpc.message_framing_lost`). Captured chunks are at most 4096 bytes per syscall, so
a large message's body is usually a gap; its prefix is in the captured head of the
write unless an earlier message of the same write ended past the captured bytes.
"""

from __future__ import annotations

GRPC_CONTENT_TYPE = b"application/grpc"


def split_grpc_path(path: str) -> tuple[str, str]:
    """"/package.Service/Method" -> ("package.Service", "Method").

    A path that is not of that shape gives (path without its leading "/", ""): the
    call is still gRPC (its content-type says so), its method name is unknown.
    """
    service, sep, method = path[1:].rpartition("/")
    if not sep or not service or not method:
        return path[1:] if path.startswith("/") else path, ""
    return service, method


class MessageCounter:
    """Counts gRPC length-prefixed messages in one direction of one stream."""

    __slots__ = ("count", "skip", "head", "lost")

    def __init__(self) -> None:
        self.count = 0  # messages whose length prefix was seen
        self.skip = 0  # body bytes of the current message still to come
        self.head = b""  # a length prefix split across pieces (< 5 bytes)
        self.lost = False  # a prefix fell into uncaptured bytes: counting stopped

    def feed(self, data: bytes, pos: int, end: int) -> None:
        """DATA payload bytes data[pos:end], in stream order."""
        if self.lost:
            return
        skip = self.skip
        while pos < end:
            if skip:
                if end - pos <= skip:
                    self.skip = skip - (end - pos)
                    return
                pos += skip
                skip = 0
            head = self.head
            if not head and end - pos >= 5:
                self.count += 1
                skip = int.from_bytes(data[pos + 1 : pos + 5], "big")
                pos += 5
                continue
            take = min(end, pos + 5 - len(head))
            part = data[pos:take]
            pos = take
            head += part
            if len(head) == 5:
                self.count += 1
                skip = int.from_bytes(head[1:5], "big")
                head = b""
            self.head = head
        self.skip = skip

    def gap(self, size: int) -> bool:
        """`size` payload bytes not captured. True when this gap lost the framing."""
        if self.lost:
            return False
        if not self.head and size <= self.skip:
            self.skip -= size
            return False
        self.lost = True
        return True
