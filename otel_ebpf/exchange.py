"""HttpExchange: the central record, the contract between protocols and telemetry.

One request paired with its response (or with the reason it has none). Produced by
protocols/http1 from conntrack's byte streams; consumed by telemetry (spans, metrics)
and by the console/jsonl sinks. Immutable and slotted: one is built per exchange on
the hot path.

Timing: a server exchange starts when the syscall that returned the first
request byte completes and ends when the syscall that sent the last response byte
completes; a client exchange starts at the write of the first request byte and ends
at the read of the last response byte. Times are wall clock (unix ns), converted from
kernel monotonic time once, in conntrack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from enum import Enum, IntEnum



class Role(IntEnum):
    """Which side of the connection the process is on; numbered like ROLE_* in
    bpf/include/events.h."""

    UNKNOWN = 0  # opened before we attached: conntrack infers it from /proc or the bytes
    SERVER = 1  # the socket came from accept/accept4
    CLIENT = 2  # the socket came from connect


class Outcome(str, Enum):
    OK = "ok"  # a complete response was seen
    TIMEOUT = "timeout"  # no (complete) response before the configured timeout
    CONNECTION_CLOSED = "connection_closed"  # closed before the response completed
    CONNECTION_RESET = "connection_reset"  # reset (ECONNRESET/EPIPE) mid-exchange
    TRUNCATED = "truncated"  # bytes were lost (kernel gap) so framing is uncertain
    # HTTP/2: the stream was reset (RST_STREAM) before it completed; error_reason is the
    # error code's name in lower case ("cancel", "refused_stream", ...).
    STREAM_RESET = "stream_reset"
    # HTTP/2: the peer's GOAWAY said the stream was not processed, or the connection
    # ended after a GOAWAY before the stream completed.
    GOAWAY = "goaway"


Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class RpcCall:
    """A gRPC call carried by an HTTP/2 exchange (content-type application/grpc*).

    Its presence on an HttpExchange selects the RPC telemetry mapping (span name
    "{service}/{method}", rpc.* attributes and metrics) instead of the HTTP one.
    """

    system: str  # "grpc"
    service: str  # "package.Service", from :path "/package.Service/Method"
    method: str  # "Method"
    status_code: int | None  # grpc-status from the trailers or a trailers-only response
    request_messages: int  # length-prefixed gRPC messages the client sent on the stream
    response_messages: int  # ... and the server sent


@dataclass(frozen=True, slots=True)
class HttpExchange:
    pid: int  # tgid of the process that served or sent it
    tid: int  # thread that read the request (server) or wrote it (client)
    role: Role  # SERVER or CLIENT (UNKNOWN only when it could not be inferred)
    local_address: str | None
    local_port: int | None
    remote_address: str | None
    remote_port: int | None
    scheme: str  # "http" or "https"
    protocol_version: str  # "1.0" or "1.1" as on the request line; "2" for HTTP/2
    method: str  # as on the wire (may be an unknown method)
    target: str  # request-target as on the wire: path and query
    host: str | None  # Host header
    user_agent: str | None
    traceparent: str | None
    tracestate: str | None
    request_body_size: int  # exact, from framing, even when the bytes were not captured
    response_body_size: int | None  # None when there is no response
    status_code: int | None  # final status (never a 1xx); None when there is no response
    start_time_unix_nano: int
    end_time_unix_nano: int
    outcome: Outcome = Outcome.OK
    error_reason: str | None = None  # short detail for the unhappy outcomes
    request_headers: Headers = ()  # allow-listed captured headers, lower-case names
    response_headers: Headers = ()
    request_body_prefix: bytes | None = None  # opt-in body capture
    response_body_prefix: bytes | None = None
    stream_id: int | None = None  # HTTP/2 stream id; None for HTTP/1
    rpc: RpcCall | None = None  # set for gRPC: telemetry maps it to rpc.* instead of http.*

    @property
    def duration_ns(self) -> int:
        return self.end_time_unix_nano - self.start_time_unix_nano

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    @property
    def query(self) -> str | None:
        _, sep, query = self.target.partition("?")
        return query if sep else None


def _compile_exchange_builder() -> Callable[..., HttpExchange]:
    """A positional constructor for HttpExchange that skips the frozen-dataclass __init__.

    The generated __init__ of a frozen dataclass stores each field through
    object.__setattr__ (name lookup + descriptor call): ~4 us, a fifth of the whole
    per-exchange budget of the chunk stream. Here the fields are stored into an instance
    of a mutable twin class with the very same slots (plain attribute stores, which the
    interpreter specializes to a direct slot write), which then becomes an HttpExchange
    by __class__ assignment (allowed between classes of identical layout): ~0.3 us
    against ~0.9 us through each slot descriptor's __set__. The builder is generated
    from dataclasses.fields(), like dataclass's own __init__, so it follows the
    contract's field order and defaults; a unit test checks it equals HttpExchange(...).
    """
    names = [f.name for f in fields(HttpExchange)]
    twin = type("_MutableHttpExchange", (), {"__slots__": HttpExchange.__slots__})
    if twin.__slots__ != tuple(names) or twin.__basicsize__ != HttpExchange.__basicsize__:
        raise TypeError("HttpExchange's slots are not its fields")  # the twin must match
    namespace: dict[str, object] = {"_new": object.__new__, "_cls": HttpExchange,
                                    "_twin": twin}
    params, body = [], []
    for f in fields(HttpExchange):
        if f.default is MISSING:
            params.append(f.name)
        else:
            namespace["_default_" + f.name] = f.default
            params.append(f"{f.name}=_default_{f.name}")
        body.append(f"    obj.{f.name} = {f.name}")
    lines = [f"def build({', '.join(params)}):", "    obj = _new(_twin)", *body,
             "    obj.__class__ = _cls", "    return obj"]
    exec("\n".join(lines), namespace)  # noqa: S102 - code built from field names only
    return namespace["build"]  # type: ignore[return-value]


build_exchange = _compile_exchange_builder()
