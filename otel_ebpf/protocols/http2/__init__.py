"""HTTP/2 (cleartext h2c and over TLS) and gRPC, decoded in user space.

- frames.py: framing of one direction (9-byte frame headers, CONTINUATION joined,
  padding removed, gaps inside payloads absorbed, resync after lost framing);
- hpack_decoder.py: HPACK with the `hpack` library, one decoder per direction, made to
  decode what it can when the dynamic table is partly unknown (mid-stream attach);
- grpc.py: gRPC call naming and length-prefixed message counting;
- session.py: the streams of one connection -> one HttpExchange per stream.

`sniff` recognises a stream's first captured bytes for the protocol registry.
"""

from __future__ import annotations

from otel_ebpf.protocols.http2.frames import PREFACE, SETTINGS
from otel_ebpf.protocols.http2.session import Http2Session

# The registry's upgrade factory: the h2c session taking over after `101 Switching Protocols`.
upgraded = Http2Session.upgraded


def sniff(first_bytes: bytes) -> bool:
    """Do these first bytes of a stream start HTTP/2?

    Yes for the client connection preface (at least "PRI " of it, as far as the bytes
    go) and for the server's first frame: a SETTINGS frame (not an ACK) on stream 0
    whose length is a whole number of settings.
    """
    if len(first_bytes) >= 4 and PREFACE.startswith(first_bytes[:24]):
        return True
    if len(first_bytes) < 9:
        return False
    length = int.from_bytes(first_bytes[:3], "big")
    return (
        first_bytes[3] == SETTINGS
        and first_bytes[4] == 0
        and first_bytes[5:9] == b"\x00\x00\x00\x00"
        and length % 6 == 0
        and length <= 16384
    )


__all__ = ["PREFACE", "Http2Session", "sniff", "upgraded"]
