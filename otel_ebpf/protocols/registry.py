"""The protocols otel-ebpf decodes, one line each, and how conntrack picks one.

Adding a protocol takes three steps:
1. a package under otel_ebpf/protocols/<name>/ with a Session (protocols/base.py) and a
   sniff() for the first bytes of a stream;
2. one ProtocolSpec line in PROTOCOLS below;
3. its inference in bpf/protocol_infer.h and a PROTO_* id in bpf/include/events.h
   (mirrored by capture/events.py Protocol), at the places marked PROTOCOL_LIST.
The record it emits is the HttpExchange (exchange.py); telemetry picks the mapping by
the record (an `rpc` call maps to rpc.*, everything else to http.*).

The kernel names a connection's protocol in its open event. When it could not tell
(the first chunk was a few bytes), the first captured bytes are offered to each
protocol's sniff(); HTTP/1 is the fallback, as its framer resynchronises on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from otel_ebpf.capture.events import Protocol
from otel_ebpf.protocols.base import ConnectionInfo, Session, SessionContext, UpgradeRequest
from otel_ebpf.protocols.http1.parse import looks_like_http1
from otel_ebpf.protocols.http1.stitch import Http1Session
from otel_ebpf.protocols import http2

SessionFactory = Callable[[ConnectionInfo, SessionContext, bool], Session]
UpgradeFactory = Callable[[ConnectionInfo, SessionContext, UpgradeRequest], Session]


@dataclass(frozen=True)
class ProtocolSpec:
    name: str  # as in logs and counters: "http1", "http2"
    kernel_id: Protocol  # the PROTO_* id the kernel's inference gives it
    session: SessionFactory  # (connection, context, strict) -> Session; strict: seen
    # from its first byte, not a connection older than the daemon
    sniff: Callable[[bytes], bool]  # do a stream's first bytes speak it?
    # HTTP/1.1 Upgrade token it takes over after `101 Switching Protocols`, and how
    upgrade_token: str | None = None
    upgraded: UpgradeFactory | None = None


HTTP1 = ProtocolSpec("http1", Protocol.HTTP1, Http1Session, looks_like_http1)

# PROTOCOL_LIST: one line per protocol, in the order sniff() is tried: add new ones
# above HTTP/1, whose sniff is the loosest.
PROTOCOLS: tuple[ProtocolSpec, ...] = (
    ProtocolSpec("http2", Protocol.HTTP2, http2.Http2Session, http2.sniff, "h2c", http2.upgraded),
    HTTP1,
)

BY_KERNEL_ID: dict[int, ProtocolSpec] = {spec.kernel_id: spec for spec in PROTOCOLS}
BY_UPGRADE_TOKEN: dict[str, ProtocolSpec] = {
    spec.upgrade_token: spec for spec in PROTOCOLS if spec.upgrade_token is not None
}


def for_stream(kernel_id: int, first_bytes: bytes) -> ProtocolSpec:
    """The protocol of a connection: the kernel's word, else the first bytes', else HTTP/1."""
    spec = BY_KERNEL_ID.get(kernel_id)
    if spec is not None:
        return spec
    for spec in PROTOCOLS:
        if spec.sniff(first_bytes):
            return spec
    return HTTP1
