"""HttpExchange -> OpenTelemetry attributes, per the stable HTTP semantic conventions.

In: one HttpExchange and its `http.route` (or None). Out: `http_attributes()`, a flat
dict of span attributes (also what the jsonl sink writes), and `span_status()`, the
(is_error, error.type) pair. Pure functions, no I/O; the span encoder and the metric
aggregator use the same helpers, so spans, metrics and jsonl cannot disagree.

Rules (https://opentelemetry.io/docs/specs/semconv/http/http-spans/):
- `http.request.method`: the method when it is one of the nine RFC 9110/5789 methods
  (case-sensitive, as semconv requires), else `_OTHER` with the wire method in
  `http.request.method_original`.
- SERVER spans: `server.address`/`server.port` from the Host header (the origin the
  client asked for; a Host without a port means the scheme's default port, RFC 9110
  7.2), else the local socket. `client.*` and `network.peer.*` are the remote peer.
- CLIENT spans: `server.address`/`server.port` from the Host header (same default-port
  rule), else the remote socket; `network.peer.*` is the remote socket.
- Metrics use `server.port` too, but for SERVER exchanges the local socket's port:
  it names the listener, and a client cannot inflate its cardinality via Host.
- Status: a SERVER span is an error on 5xx, a CLIENT span on 4xx and 5xx; any exchange
  that did not complete (timeout, closed, reset, truncated) is an error whose
  `error.type` is the outcome's short name. `error.type` always has low cardinality
  (it is a metric attribute): the free-text `error_reason` never goes into it.
  HTTP/2 adds two such outcomes, `stream_reset` (RST_STREAM) and `goaway`.
- HTTP/2 without gRPC is this same mapping, `network.protocol.version` "2". The stream
  id is not an attribute: no convention defines one, and it only means something
  together with the connection (the jsonl sink writes it as `otel_ebpf.stream_id`).

gRPC (`exchange.rpc` is set): `rpc_attributes()` and `rpc_status()`, per the RPC and
gRPC semantic conventions as of v1.37 (https://github.com/open-telemetry/
semantic-conventions/blob/v1.37.0/docs/rpc/grpc.md), the version the issue asks for
and the one the OpenTelemetry gRPC instrumentations emit by default. Later versions
renamed things (rpc.system.name, rpc.method "Service/Method", rpc.response.status_code
as a string, rpc.server.call.duration in seconds) and tell existing instrumentations
to keep the old names until users opt in; we keep them.
- Span name `{rpc.service}/{rpc.method}` ("helloworld.Greeter/SayHello"); attributes
  rpc.system, rpc.service, rpc.method, rpc.grpc.status_code (the int), server.*,
  client.* (server side), network.peer.*, network.protocol.version ("2").
- Status (recording-errors + gRPC conventions): a CLIENT span is an error for every
  code but OK; a SERVER span only for UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED,
  INTERNAL, UNAVAILABLE and DATA_LOSS (the others are the caller's fault). error.type
  is the code's name ("DEADLINE_EXCEEDED"). A call that ended without a grpc-status
  (reset, closed, timed out, truncated) is an error whose error.type is the outcome,
  as for HTTP; one that completed without a grpc-status has "missing_grpc_status".
- Message counts: the conventions' per-message `rpc.message` events need each
  message's time and size, which the record does not carry (it counts the
  length-prefixed messages of the stream); making them up would invent data. The
  counts go on the span as `otel_ebpf.rpc.request_messages` /
  `otel_ebpf.rpc.response_messages` (our own namespace: the rpc.* one is the
  conventions'), and into the conventions' rpc.*.requests_per_rpc /
  responses_per_rpc histograms (see metrics.py).
"""

from __future__ import annotations

from otel_ebpf.exchange import HttpExchange, Outcome, Role, RpcCall
from otel_ebpf.telemetry.redact import QueryRedactor

AttrValue = str | int | float | bool
Attributes = dict[str, AttrValue]

KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
)
OTHER_METHOD = "_OTHER"
DEFAULT_PORTS = {"http": 80, "https": 443}

_default_redactor = QueryRedactor()

# Host header -> (host, port | None). Hosts are few per service; the cache is bounded
# by clearing (an attacker sending random Hosts costs a re-parse, never memory).
_HOST_CACHE_MAX = 1024
_host_cache: dict[str, tuple[str, int | None]] = {}


def split_host(host_header: str) -> tuple[str, int | None]:
    """`example.com:8080` -> ("example.com", 8080); `[::1]:80` -> ("::1", 80)."""
    cached = _host_cache.get(host_header)
    if cached is not None:
        return cached
    raw = host_header.strip()
    host, port = raw, None
    if raw.startswith("["):  # IPv6 literal
        end = raw.find("]")
        if end > 0:
            host = raw[1:end]
            rest = raw[end + 1 :]
            if rest.startswith(":") and rest[1:].isdigit():
                port = int(rest[1:])
    else:
        name, sep, p = raw.rpartition(":")
        if sep and name and p.isdigit() and ":" not in name:
            host, port = name, int(p)
        elif sep and not p and name and ":" not in name:  # "host:" (empty port)
            host = name
    if port is not None and not 0 < port < 65536:
        port = None
    result = (host, port)
    if len(_host_cache) >= _HOST_CACHE_MAX:
        _host_cache.clear()
    _host_cache[host_header] = result
    return result


def normalize_method(method: str) -> tuple[str, str | None]:
    """-> (http.request.method, http.request.method_original or None)."""
    if method in KNOWN_METHODS:
        return method, None
    return OTHER_METHOD, method


def url_path(exchange: HttpExchange) -> str:
    """The path of the request-target; absolute-form targets (proxies) lose the origin."""
    target = exchange.target
    path = target.split("?", 1)[0]
    if path[:1] != "/" and "://" in path:
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    return path


def span_status(exchange: HttpExchange) -> tuple[bool, str | None]:
    """-> (is_error, error.type). error.type is None when the exchange is not an error."""
    outcome = exchange.outcome
    if outcome is not Outcome.OK:
        return True, outcome.value
    code = exchange.status_code
    if code is None:  # defensive: OK without a status should not happen
        return True, "no_response"
    threshold = 400 if exchange.role == Role.CLIENT else 500
    if code >= threshold:
        return True, str(code)
    return False, None


def server_endpoint(exchange: HttpExchange) -> tuple[str | None, int | None]:
    """-> (server.address, server.port) for the span, per the rules in the docstring."""
    if exchange.host:
        host, port = split_host(exchange.host)
        if port is None:  # RFC 9110 7.2: no port in Host means the scheme's default
            port = DEFAULT_PORTS.get(
                exchange.scheme, None if exchange.role == Role.CLIENT else exchange.local_port)
        return (host or None), port
    if exchange.role == Role.CLIENT:
        return exchange.remote_address, exchange.remote_port
    return exchange.local_address, exchange.local_port


def _add_connection_attributes(attrs: Attributes, exchange: HttpExchange) -> None:
    """server.*, client.* (server side), network.peer.* and the protocol version: the
    same for HTTP and RPC spans."""
    address, port = server_endpoint(exchange)
    if address is not None:
        attrs["server.address"] = address
    if port is not None:
        attrs["server.port"] = port
    if exchange.role != Role.CLIENT:
        if exchange.remote_address is not None:
            attrs["client.address"] = exchange.remote_address
        if exchange.remote_port is not None:
            attrs["client.port"] = exchange.remote_port
    if exchange.remote_address is not None:
        attrs["network.peer.address"] = exchange.remote_address
    if exchange.remote_port is not None:
        attrs["network.peer.port"] = exchange.remote_port
    attrs["network.protocol.version"] = exchange.protocol_version


def http_attributes(
    exchange: HttpExchange,
    route: str | None,
    redact: QueryRedactor | None = None,
) -> Attributes:
    """All span attributes of one exchange (absent values are left out, never None)."""
    attrs: Attributes = {}
    method, original = normalize_method(exchange.method)
    attrs["http.request.method"] = method
    if original is not None:
        attrs["http.request.method_original"] = original
    attrs["url.path"] = url_path(exchange)
    query = exchange.query
    if query is not None:
        attrs["url.query"] = (redact or _default_redactor)(query)
    attrs["url.scheme"] = exchange.scheme
    if route is not None:
        attrs["http.route"] = route
    if exchange.status_code is not None:
        attrs["http.response.status_code"] = exchange.status_code
    _add_connection_attributes(attrs, exchange)
    if exchange.user_agent is not None:
        attrs["user_agent.original"] = exchange.user_agent
    attrs["http.request.body.size"] = exchange.request_body_size
    if exchange.response_body_size is not None:
        attrs["http.response.body.size"] = exchange.response_body_size
    is_error, error_type = span_status(exchange)
    if is_error and error_type is not None:
        attrs["error.type"] = error_type
    return attrs


def span_name(exchange: HttpExchange, route: str | None) -> str:
    """`{method} {route}`, `{method}`, or `HTTP` for unknown methods (semconv)."""
    method = exchange.method
    if method not in KNOWN_METHODS:
        return "HTTP"
    return method + " " + route if route else method


# ---------------------------------------------------------------- gRPC

# https://github.com/grpc/grpc/blob/master/doc/statuscodes.md, indexed by code.
GRPC_STATUS_NAMES: tuple[str, ...] = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)
# The codes a gRPC SERVER span counts as errors (semantic conventions, gRPC).
GRPC_SERVER_ERROR_CODES = frozenset((2, 4, 12, 13, 14, 15))
GRPC_UNIMPLEMENTED = 12
MISSING_GRPC_STATUS = "missing_grpc_status"


def grpc_status_name(code: int) -> str:
    """`4` -> "DEADLINE_EXCEEDED"; a code outside the table -> its number as text."""
    if 0 <= code < len(GRPC_STATUS_NAMES):
        return GRPC_STATUS_NAMES[code]
    return str(code)


def rpc_status(outcome: Outcome, code: int | None, is_client: bool) -> tuple[bool, str | None]:
    """-> (is_error, error.type) of a gRPC call, per the rules in the docstring."""
    if outcome is not Outcome.OK:
        return True, outcome.value
    if code is None:
        return True, MISSING_GRPC_STATUS
    if code == 0:
        return False, None
    if is_client or code in GRPC_SERVER_ERROR_CODES:
        return True, grpc_status_name(code)
    return False, None


def rpc_span_name(rpc: RpcCall) -> str:
    """`{service}/{method}`; when the :path was not "/service/method" (the HTTP/2
    decoder then gives the path as the service and an empty method), whichever part
    is known, else "grpc"."""
    if rpc.service and rpc.method:
        return rpc.service + "/" + rpc.method
    return rpc.service or rpc.method or rpc.system


def rpc_attributes(exchange: HttpExchange) -> Attributes:
    """All span attributes of one gRPC exchange (`exchange.rpc` must be set)."""
    rpc = exchange.rpc
    assert rpc is not None
    attrs: Attributes = {"rpc.system": rpc.system, "rpc.service": rpc.service}
    if rpc.method:  # empty when the :path had no method part
        attrs["rpc.method"] = rpc.method
    if rpc.status_code is not None:
        attrs["rpc.grpc.status_code"] = rpc.status_code
    _add_connection_attributes(attrs, exchange)
    attrs["otel_ebpf.rpc.request_messages"] = rpc.request_messages
    attrs["otel_ebpf.rpc.response_messages"] = rpc.response_messages
    is_error, error_type = rpc_status(exchange.outcome, rpc.status_code,
                                      exchange.role == Role.CLIENT)
    if is_error and error_type is not None:
        attrs["error.type"] = error_type
    return attrs


def exchange_attributes(
    exchange: HttpExchange,
    route: str | None,
    redact: QueryRedactor | None = None,
) -> Attributes:
    """The span attributes of any exchange: the RPC mapping when it is a gRPC call,
    else the HTTP one."""
    if exchange.rpc is not None:
        return rpc_attributes(exchange)
    return http_attributes(exchange, route, redact)
