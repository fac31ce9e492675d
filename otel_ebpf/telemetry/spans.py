"""HttpExchange -> one OTLP Span, as bytes (the hot path of the telemetry stage).

In: an HttpExchange and its http.route. Out: a `ScopeSpans.spans` field (bytes), or
None when the captured request carried a valid W3C traceparent whose sampled flag is
off (the caller still records metrics and counts the span as unsampled).

Trace context (https://www.w3.org/TR/trace-context/): a `traceparent` of version 00,
lower-case hex, non-zero trace id and parent id makes our span a child of the remote
caller's span (its trace id, its span id as parent_span_id, `tracestate` carried,
Span.flags = sampled | parent is remote). Anything else is ignored, as the spec
requires, and the span starts a new trace. Our own span id is random; our span is
always marked sampled so that downstream SDK-style samplers keep it.

Attributes are exactly those of attributes.http_attributes() (a unit test holds the
two together); this module writes them straight to protobuf so that no dict and no
message objects are built per exchange. (key, value) pairs that repeat are cached as
whole encoded fields.

gRPC calls (`exchange.rpc` set) go through `encode_rpc()` instead, whose attributes
are exactly attributes.rpc_attributes(); the caller (Telemetry.record) picks one by
the record, so the HTTP path pays one attribute test for it.
"""

from __future__ import annotations

import os
import re
import struct

from otel_ebpf.exchange import HttpExchange, Outcome, Role, RpcCall
from otel_ebpf.telemetry import otlp_encode as enc
from otel_ebpf.telemetry.attributes import (
    DEFAULT_PORTS,
    KNOWN_METHODS,
    rpc_span_name,
    rpc_status,
    server_endpoint,
    split_host,
    url_path,
)
from otel_ebpf.telemetry.redact import QueryRedactor

_TRACEPARENT = re.compile(r"[ \t]*00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})[ \t]*\Z")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# W3C caps tracestate at 32 list members; 512 characters is the size vendors must
# accept. Longer values are dropped rather than cut mid-member.
_MAX_TRACESTATE = 512
_ZERO16 = bytes(16)
_ZERO8 = bytes(8)

_FLAGS_LOCAL_ROOT = enc.SPAN_FLAGS_SAMPLED | enc.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE
_FLAGS_REMOTE_PARENT = _FLAGS_LOCAL_ROOT | enc.SPAN_FLAGS_CONTEXT_IS_REMOTE

_SERVER = Role.SERVER
_CLIENT = Role.CLIENT
_OK = Outcome.OK

# Pieces of enc.field_span, precomputed for the inlined span encoding in encode().
_SMALL_VARINTS = enc._SMALL_VARINTS
_pack_times = enc._pack_times
_KIND_SERVER = enc._KIND_FIELDS[enc.SPAN_KIND_SERVER]
_KIND_CLIENT = enc._KIND_FIELDS[enc.SPAN_KIND_CLIENT]
_KIND_INTERNAL = enc._KIND_FIELDS[enc.SPAN_KIND_INTERNAL]
_FLAGS_FIELD_LOCAL_ROOT = enc._FLAGS_FIELDS[_FLAGS_LOCAL_ROOT]
_FLAGS_FIELD_REMOTE_PARENT = enc._FLAGS_FIELDS[_FLAGS_REMOTE_PARENT]
# ScopeSpans.spans(2) tag and a two-byte length (a span of 128 to 16383 bytes).
_pack_span_head2 = struct.Struct("<3B").pack
# url.query field = tag(9) len (key field "url.query") 0x12 len 0x0a len value: for a
# value of n bytes, everything before the value, when every length fits one byte.
_QUERY_KEY = enc._key_field("url.query")
_QUERY_INLINE_MAX = 128 - 4 - len(_QUERY_KEY)
_QUERY_HEAD = [
    b"".join((b"\x4a", _SMALL_VARINTS[len(_QUERY_KEY) + 4 + n], _QUERY_KEY, b"\x12",
              _SMALL_VARINTS[n + 2], b"\x0a", _SMALL_VARINTS[n]))
    for n in range(_QUERY_INLINE_MAX)
]
# Bounded caches of encode(): whole url.path fields (paths up to _MAX_CACHED_PATH
# characters), body-size field pairs, peer address fields and per-connection attribute
# blocks (one per socket, up to _MAX_CONNECTION_BLOCK bytes); each is cleared when full.
_MAX_PATHS = 4096
_MAX_CACHED_PATH = 256
_MAX_SIZES = 4096
_MAX_CONNECTIONS = 16384
_MAX_PEERS = 4096  # peer addresses (client.address/network.peer.address fields)
_MAX_CONNECTION_BLOCK = 512  # bytes: the memory bound is 16384 x 512 (~8 MiB)
_OTHER_METHOD_FIELD = enc._ld(9, enc.encode_key_value("http.request.method", "_OTHER"))
_OTHER_NAME_FIELD = enc.span_name_field("HTTP")  # semconv: unknown methods name no route
_RPC = "rpc"  # first element of the RPC keys in the shared connection/endpoint caches


def parse_traceparent(header: str) -> tuple[bytes, bytes, bool] | None:
    """-> (trace_id, parent_span_id, sampled) or None when the header is not valid."""
    m = _TRACEPARENT.match(header)
    if m is None:
        return None
    trace_hex, span_hex, flags_hex = m.groups()
    if trace_hex == _ZERO_TRACE or span_hex == _ZERO_SPAN:
        return None
    return bytes.fromhex(trace_hex), bytes.fromhex(span_hex), bool(int(flags_hex, 16) & 1)


class IdGenerator:
    """Random trace and span ids from os.urandom, read in bulk (one syscall per ~2k ids).

    ids() hands out (trace id, span id) pairs cut from a chunk by struct.iter_unpack (one
    C call per pair). An all-zero id is invalid: a chunk is used only if no 8 zero bytes
    in a row occur anywhere in it (one search per chunk; 2**-64 odds per position), so
    no id cut from it can be zero and none needs checking."""

    __slots__ = ("_buf", "_pos", "_pairs")

    _CHUNK = 16 * 4096
    _PAIRS = struct.Struct("16s8s")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._pairs = iter(())

    def _take(self, n: int) -> bytes:
        pos = self._pos
        end = pos + n
        if end > len(self._buf):
            self._buf = os.urandom(self._CHUNK)
            pos, end = 0, n
        self._pos = end
        out = self._buf[pos:end]
        if not any(out):  # an all-zero id is invalid; 2**-64 odds, but be exact
            return self._take(n)
        return out

    def trace_id(self) -> bytes:
        return self._take(16)

    def span_id(self) -> bytes:
        return self._take(8)

    def ids(self) -> tuple[bytes, bytes]:
        """A new (trace id, span id) pair."""
        try:
            return next(self._pairs)
        except StopIteration:
            chunk = os.urandom(self._CHUNK)[:self._CHUNK - self._CHUNK % 24]
            while _ZERO8 in chunk:
                chunk = os.urandom(self._CHUNK)[:len(chunk)]
            self._pairs = self._PAIRS.iter_unpack(chunk)
            return next(self._pairs)


class SpanEncoder:
    __slots__ = ("_redact", "_ids", "_attr", "_names", "_status", "_max_names",
                 "_requests", "_other_requests", "_endpoints", "_peers", "_connections",
                 "_paths", "_sizes", "_calls", "_counts")

    def __init__(self, redact: QueryRedactor, ids: IdGenerator | None = None) -> None:
        self._redact = redact
        self._ids = ids or IdGenerator()
        # Low-cardinality (key, value) fields; mid-cardinality values (addresses, user
        # agents, body sizes, paths) live in their own bounded caches so that a flood of
        # them can only clear those, never the method/route/status one.
        self._attr = enc.AttributeFieldCache(9)
        self._paths: dict[str, bytes] = {}
        self._sizes: dict[tuple[int, int | None], bytes] = {}
        self._names: dict[tuple[str, str | None], bytes] = {}
        self._max_names = 8192
        self._status: dict[tuple[bool, str | None], bytes] = {}
        # Whole attribute blocks: per (method, route, status, outcome, role), per origin
        # and per peer socket. Bounded, cleared when full.
        self._requests: dict[tuple, tuple[bytes, bytes, bytes, str | None, str]] = {}
        # Requests with a method outside KNOWN_METHODS: keyed without the method (a
        # client invents as many as it likes), the method_original field added per span.
        self._other_requests: dict[tuple, tuple[bytes, bytes, str | None]] = {}
        self._endpoints: dict[tuple, bytes] = {}
        self._peers: dict[tuple, bytes] = {}
        # endpoint + peer block per socket (role, local and remote address and port), with
        # the other inputs of the block (Host, user agent, scheme, version) it was made
        # from: a connection whose Host or user agent changes replaces its one entry, so
        # the cache holds one entry per connection however many Hosts a client invents.
        self._connections: dict[tuple, tuple] = {}
        # gRPC: per (service, method, grpc-status, outcome, role) the same kind of
        # cached block as _requests; per (request, response) message counts, fields.
        self._calls: dict[tuple, tuple[bytes, bytes, bytes, str | None]] = {}
        self._counts: dict[tuple[int, int], bytes] = {}

    def _name_field(self, method: str, route: str | None) -> bytes:
        key = (method, route)
        field = self._names.get(key)
        if field is None:
            if method not in KNOWN_METHODS:
                name = "HTTP"
            else:
                name = method + " " + route if route else method
            field = enc.span_name_field(name)
            if len(self._names) >= self._max_names:
                self._names.clear()
            self._names[key] = field
        return field

    def _status_field(self, is_error: bool, message: str | None) -> bytes:
        key = (is_error, message)
        field = self._status.get(key)
        if field is None:
            field = enc.status_field(is_error, message)
            if message is None or len(self._status) < 256:
                self._status[key] = field
        return field

    def _request_block(
        self, method: str, route: str | None, code: int | None, outcome: Outcome, is_client: bool
    ) -> tuple[bytes, bytes, bytes, str | None]:
        """(attribute fields, name field, status field, error.type) of the
        low-cardinality request attributes."""
        cached = self._attr.get
        parts = []
        if method in KNOWN_METHODS:
            parts.append(cached("http.request.method", method))
        else:
            parts.append(cached("http.request.method", "_OTHER"))
            parts.append(cached("http.request.method_original", method))
        if route is not None:
            parts.append(cached("http.route", route))
        if code is not None:
            parts.append(cached("http.response.status_code", code))
        # attributes.span_status, for the cacheable part (error_reason is added later).
        if outcome is not Outcome.OK:
            error_type = outcome.value
            status = self._status_field(True, error_type)
        elif code is None:
            error_type = "no_response"
            status = self._status_field(True, error_type)
        elif code >= (400 if is_client else 500):
            error_type = str(code)
            status = self._status_field(True, None)  # semconv: the code says it all
        else:
            error_type = None
            status = self._status_field(False, None)
        if error_type is not None:
            parts.append(cached("error.type", error_type))
        return b"".join(parts), self._name_field(method, route), status, error_type

    def _endpoint_block(self, ex: HttpExchange, is_client: bool) -> bytes:
        """Attribute fields shared by every request a service receives (or a client
        sends) to one origin: scheme, protocol version, server.address/port, user agent."""
        cached = self._attr.get
        parts = [cached("url.scheme", ex.scheme),
                 cached("network.protocol.version", ex.protocol_version)]
        # attributes.server_endpoint, inlined.
        if ex.host:
            address, port = split_host(ex.host)
            address = address or None
            if port is None:  # RFC 9110 7.2: no port in Host means the scheme's default
                port = DEFAULT_PORTS.get(ex.scheme, None if is_client else ex.local_port)
        elif is_client:
            address, port = ex.remote_address, ex.remote_port
        else:
            address, port = ex.local_address, ex.local_port
        # Encoded fresh, not through the (key, value) cache: this block is cached
        # whole, and a Host port or user agent a client invents must not evict the
        # low-cardinality fields from that cache.
        fresh = self._attr
        if address is not None:
            parts.append(fresh.fresh_str("server.address", address))
        if port is not None:
            parts.append(fresh.fresh_int("server.port", port))
        if ex.user_agent is not None:
            parts.append(fresh.fresh_str("user_agent.original", ex.user_agent))
        return b"".join(parts)

    def _peer_block(self, address: str | None, port: int | None, is_client: bool) -> bytes:
        """client.* (server spans) and network.peer.*: constant over a connection.
        The address fields are cached per peer address (a few per service); the ports
        are encoded each time: a peer's port is new with every connection, and this is
        only called for a connection the per-socket cache does not hold."""
        parts = []
        if address is not None:
            pkey = (address, is_client)
            fields = self._peers.get(pkey)
            if fields is None:
                address_value = enc.encode_any_value(address)
                fields = enc.field_key_any(9, "network.peer.address", address_value)
                if not is_client:
                    fields = enc.field_key_any(9, "client.address", address_value) + fields
                if len(self._peers) >= _MAX_PEERS:
                    self._peers.clear()
                self._peers[pkey] = fields
            parts.append(fields)
        if port is not None:
            if not is_client:
                parts.append(self._attr.fresh_int("client.port", port))
            parts.append(self._attr.fresh_int("network.peer.port", port))
        return b"".join(parts)

    def request_info(
        self, method: str, route: str | None, code: int | None, outcome: Outcome,
        is_client: bool,
    ) -> tuple[bytes, bytes, bytes, str | None, str]:
        """Cached (attribute fields, name field, status field, error.type, metric
        http.request.method) of one kind of request; shared with the metric path."""
        key = (method, route, code, outcome, is_client)
        info = self._requests.get(key)
        if info is None:
            if method not in KNOWN_METHODS:
                return self._other_request_info(method, route, code, outcome, is_client)
            info = self._request_block(method, route, code, outcome, is_client) + (method,)
            if len(self._requests) >= 4096:
                self._requests.clear()
            self._requests[key] = info
        return info

    def _other_request_info(
        self, method: str, route: str | None, code: int | None, outcome: Outcome,
        is_client: bool,
    ) -> tuple[bytes, bytes, bytes, str | None, str]:
        """request_info() of a method outside KNOWN_METHODS: the fields after
        http.request.method_original are cached per (route, status, outcome, role); the
        method_original field itself is encoded per span, and nothing keyed by the
        method is kept (no cache can be flooded by invented methods)."""
        key = (route, code, outcome, is_client)
        other = self._other_requests.get(key)
        if other is None:
            # The block of a known method minus its method field: same fields, same order.
            attrs, _name, status, error_type = self._request_block(
                "GET", route, code, outcome, is_client)
            other = (attrs[len(self._attr.get("http.request.method", "GET")):], status,
                     error_type)
            if len(self._other_requests) >= 4096:
                self._other_requests.clear()
            self._other_requests[key] = other
        attrs = b"".join((_OTHER_METHOD_FIELD,
                          self._attr.fresh_str("http.request.method_original", method),
                          other[0]))
        return attrs, _OTHER_NAME_FIELD, other[1], other[2], "_OTHER"

    def encode(self, ex: HttpExchange, route: str | None, path: str | None = None,
               query: str | None = None, request: tuple | None = None,
               path_field: bytes | None = None) -> bytes | None:
        """`path`/`query` may be passed when the caller already split the target
        (url.path as attributes.url_path gives it; query None when there is none),
        `request` when it already has this exchange's request_info(), `path_field`
        when it has path_field(path) (for a path that is its own route)."""
        trace_state = None
        parent = None
        tp = ex.traceparent
        if tp is not None:
            ctx = parse_traceparent(tp)
            if ctx is not None:
                trace_id, parent, sampled = ctx
                if not sampled:
                    return None
                ts = ex.tracestate
                if ts and len(ts) <= _MAX_TRACESTATE:
                    trace_state = ts
        if parent is None:
            trace_id, span_id = self._ids.ids()
        else:
            span_id = self._ids.span_id()

        role = ex.role
        is_client = role is _CLIENT
        outcome = ex.outcome
        if request is None:
            request = self.request_info(ex.method, route, ex.status_code, outcome, is_client)
        attrs, name_field, status = request[0], request[1], request[2]
        if outcome is not _OK and ex.error_reason:
            status = self._status_field(True, ex.error_reason)

        # Connection-level attributes (origin: scheme, version, server.*, user agent;
        # peer: client.*, network.peer.*), one entry per socket, checked against every
        # other input of the blocks.
        skey = (is_client, ex.local_address, ex.local_port, ex.remote_address,
                ex.remote_port)
        entry = self._connections.get(skey)
        if (entry is not None and entry[0] == ex.host and entry[1] == ex.user_agent
                and entry[2] == ex.scheme and entry[3] == ex.protocol_version):
            connection = entry[4]
        else:
            connection = self._connection_block(ex, is_client, skey, entry)

        if path is None:
            path = url_path(ex)
            query = ex.query
        if path_field is None:
            path_field = self._paths.get(path)
        if path_field is None:
            if path == route:  # nothing templated away: a low-cardinality path
                path_field = self._path_field(path)
            else:  # an id in the path: unique per request, not worth a cache entry
                path_field = self._attr.fresh_str("url.path", path)
        if query is None:
            query_field = b""
        else:  # unique per request in practice: encoded inline, never cached
            vb = self._redact(query).encode("utf-8", "replace")
            n = len(vb)
            if n < _QUERY_INLINE_MAX:
                query_field = b"".join((_QUERY_HEAD[n], vb))
            else:
                query_field = enc._ld(9, _QUERY_KEY + enc._ld(2, enc._ld(1, vb)))
        sizes = self._sizes.get((ex.request_body_size, ex.response_body_size))
        if sizes is None:
            sizes = self._size_fields(ex.request_body_size, ex.response_body_size)

        # enc.field_span, inlined: one join for the whole Span body.
        if parent is None:
            tail = b""
            flags = _FLAGS_FIELD_LOCAL_ROOT
        else:
            tail = b"".join((enc._str(3, trace_state) if trace_state else b"",
                             b"\x22\x08", parent))  # trace_state(3), parent_span_id(4)
            flags = _FLAGS_FIELD_REMOTE_PARENT
        payload = b"".join((
            b"\x0a\x10", trace_id, b"\x12\x08", span_id, tail,  # ids(1, 2)
            name_field,  # name(5)
            _KIND_CLIENT if is_client else _KIND_SERVER if role is _SERVER else _KIND_INTERNAL,
            _pack_times(0x39, ex.start_time_unix_nano, 0x41, ex.end_time_unix_nano),
            attrs,  # attributes(9) from here to sizes
            connection,
            path_field,
            query_field,
            sizes,
            status,  # status(15)
            flags,
        ))
        n = len(payload)
        if n < 128:
            return b"\x12" + _SMALL_VARINTS[n] + payload
        if n < 16384:
            return _pack_span_head2(0x12, (n & 0x7F) | 0x80, n >> 7) + payload
        return b"".join((b"\x12", enc.varint(n), payload))

    def _connection_block(self, ex: HttpExchange, is_client: bool, skey: tuple,
                          entry: tuple | None) -> bytes:
        """Origin and peer attribute blocks of one connection, each from its own
        bounded cache (a new connection to a known origin reuses the origin block)."""
        host = ex.host
        if not is_client:
            ekey = (False, ex.scheme, ex.protocol_version, host, ex.user_agent,
                    ex.local_address, ex.local_port)
        elif host:  # the origin is the Host header; the socket does not matter
            ekey = (True, ex.scheme, ex.protocol_version, host, ex.user_agent, None, None)
        else:
            ekey = (True, ex.scheme, ex.protocol_version, None, ex.user_agent,
                    ex.remote_address, ex.remote_port)
        endpoint = self._endpoints.get(ekey)
        if endpoint is None:
            endpoint = self._endpoint_block(ex, is_client)
            if len(self._endpoints) >= 4096:
                self._endpoints.clear()
            self._endpoints[ekey] = endpoint
        # The peer block depends on the socket only: kept from the socket's entry when a
        # new Host or user agent replaces it.
        peer = entry[5] if entry is not None else self._peer_block(
            ex.remote_address, ex.remote_port, is_client)
        block = endpoint + peer
        if len(block) <= _MAX_CONNECTION_BLOCK:  # long user agents/hosts: not kept twice
            connections = self._connections
            if skey not in connections and len(connections) >= _MAX_CONNECTIONS:
                connections.clear()
            connections[skey] = (ex.host, ex.user_agent, ex.scheme, ex.protocol_version,
                                 block, peer)
        return block

    def path_field(self, path: str) -> bytes:
        """The url.path field encode() writes for a path that is its own route."""
        field = self._paths.get(path)
        return field if field is not None else self._path_field(path)

    def _path_field(self, path: str) -> bytes:
        """url.path as a whole attribute field, kept for paths that are their own
        route (they repeat) and short; bounded, cleared when full."""
        field = self._attr.fresh_str("url.path", path)
        if len(path) <= _MAX_CACHED_PATH:
            paths = self._paths
            if len(paths) >= _MAX_PATHS:
                paths.clear()
            paths[path] = field
        return field

    def _size_fields(self, request_size: int, response_size: int | None) -> bytes:
        """http.request.body.size and http.response.body.size fields (bounded cache)."""
        sized = self._attr.fresh_int
        field = sized("http.request.body.size", request_size)
        if response_size is not None:
            field += sized("http.response.body.size", response_size)
        sizes = self._sizes
        if len(sizes) >= _MAX_SIZES:
            sizes.clear()
        sizes[(request_size, response_size)] = field
        return field

    # ------------------------------------------------------------------ gRPC

    def rpc_info(
        self, rpc: RpcCall, outcome: Outcome, is_client: bool,
    ) -> tuple[bytes, bytes, bytes, str | None]:
        """Cached (attribute fields, name field, status field, error.type) of one kind
        of gRPC call (attributes.rpc_attributes/rpc_status, written as protobuf)."""
        key = (rpc.service, rpc.method, rpc.status_code, outcome, is_client, rpc.system)
        info = self._calls.get(key)
        if info is None:
            cached = self._attr.get
            code = rpc.status_code
            parts = [cached("rpc.system", rpc.system), cached("rpc.service", rpc.service)]
            if rpc.method:
                parts.append(cached("rpc.method", rpc.method))
            if code is not None:
                parts.append(cached("rpc.grpc.status_code", code))
            is_error, error_type = rpc_status(outcome, code, is_client)
            if is_error:
                parts.append(cached("error.type", error_type))
                # an unhappy outcome names itself in the status message; a status code
                # says it all (as for HTTP status codes)
                status = self._status_field(
                    True, None if outcome is _OK and code is not None else error_type)
            else:
                status = self._status_field(False, None)
            info = (b"".join(parts), enc.span_name_field(rpc_span_name(rpc)), status,
                    error_type if is_error else None)
            if len(self._calls) >= 4096:
                self._calls.clear()
            self._calls[key] = info
        return info

    def encode_rpc(self, ex: HttpExchange, info: tuple | None = None) -> bytes | None:
        """One gRPC span (`ex.rpc` set); `info` = this exchange's rpc_info() when the
        caller already has it. None when the parent was not sampled."""
        rpc = ex.rpc
        trace_state = None
        parent = None
        tp = ex.traceparent
        if tp is not None:
            ctx = parse_traceparent(tp)
            if ctx is not None:
                trace_id, parent, sampled = ctx
                if not sampled:
                    return None
                ts = ex.tracestate
                if ts and len(ts) <= _MAX_TRACESTATE:
                    trace_state = ts
        if parent is None:
            trace_id, span_id = self._ids.ids()
        else:
            span_id = self._ids.span_id()
        role = ex.role
        is_client = role is _CLIENT
        outcome = ex.outcome
        if info is None:
            info = self.rpc_info(rpc, outcome, is_client)
        attrs, name_field, status = info[0], info[1], info[2]
        if outcome is not _OK and ex.error_reason:
            status = self._status_field(True, ex.error_reason)
        skey = (_RPC, is_client, ex.local_address, ex.local_port, ex.remote_address,
                ex.remote_port)
        entry = self._connections.get(skey)
        if (entry is not None and entry[0] == ex.host and entry[2] == ex.scheme
                and entry[3] == ex.protocol_version):
            connection = entry[4]
        else:
            connection = self._rpc_connection_block(ex, is_client, skey, entry)
        counts_key = (rpc.request_messages, rpc.response_messages)
        counts = self._counts.get(counts_key)
        if counts is None:
            counts = (self._attr.fresh_int("otel_ebpf.rpc.request_messages", counts_key[0])
                      + self._attr.fresh_int("otel_ebpf.rpc.response_messages",
                                             counts_key[1]))
            if len(self._counts) >= _MAX_SIZES:
                self._counts.clear()
            self._counts[counts_key] = counts
        if parent is None:
            head = b"".join((b"\x0a\x10", trace_id, b"\x12\x08", span_id))
        else:
            head = b"".join((b"\x0a\x10", trace_id, b"\x12\x08", span_id,
                             enc._str(3, trace_state) if trace_state else b"",
                             b"\x22\x08", parent))
        payload = b"".join((
            head,
            name_field,
            _KIND_CLIENT if is_client else _KIND_SERVER if role is _SERVER else _KIND_INTERNAL,
            _pack_times(0x39, ex.start_time_unix_nano, 0x41, ex.end_time_unix_nano),
            attrs,
            connection,
            counts,
            status,
            _FLAGS_FIELD_LOCAL_ROOT if parent is None else _FLAGS_FIELD_REMOTE_PARENT,
        ))
        return b"".join((b"\x12", enc.varint(len(payload)), payload))

    def _rpc_connection_block(self, ex: HttpExchange, is_client: bool, skey: tuple,
                              entry: tuple | None) -> bytes:
        """server.*, network.protocol.version, client.* and network.peer.* of one gRPC
        connection (as _connection_block, without the HTTP-only url.scheme and
        user_agent.original)."""
        ekey = (_RPC, is_client, ex.scheme, ex.protocol_version, ex.host,
                ex.local_address, ex.local_port, ex.remote_address if is_client else None,
                ex.remote_port if is_client else None)
        endpoint = self._endpoints.get(ekey)
        if endpoint is None:
            address, port = server_endpoint(ex)
            parts = [self._attr.get("network.protocol.version", ex.protocol_version)]
            if address is not None:
                parts.append(self._attr.fresh("server.address", address))
            if port is not None:
                parts.append(self._attr.get("server.port", port))
            endpoint = b"".join(parts)
            if len(self._endpoints) >= 4096:
                self._endpoints.clear()
            self._endpoints[ekey] = endpoint
        # The peer block depends on the socket only: kept from the socket's entry when a
        # new Host or user agent replaces it.
        peer = entry[5] if entry is not None else self._peer_block(
            ex.remote_address, ex.remote_port, is_client)
        block = endpoint + peer
        if len(block) <= _MAX_CONNECTION_BLOCK:
            connections = self._connections
            if skey not in connections and len(connections) >= _MAX_CONNECTIONS:
                connections.clear()
            connections[skey] = (ex.host, None, ex.scheme, ex.protocol_version, block,
                                 peer)
        return block
