"""ConntrackOptions: the knobs of the conntrack + HTTP/1.x stage, with their defaults.

The config stage maps YAML keys / environment variables onto these fields by name, so
the names are stable. Every limit here exists to keep memory bounded against bad or
hostile traffic; exceeding one is counted (otel_ebpf.stats), never fatal.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConntrackOptions:
    # Bytes a connection may hold buffered (partial headers, chunk-size lines, resync
    # tail, both directions together); over it the connection is disabled ("buffer_limit").
    max_buffer_bytes: int = 64 * 1024
    # Connections tracked at once; a new one beyond it evicts the least recently active.
    max_connections: int = 65536
    # A connection with no event for this long is forgotten by expire().
    idle_timeout_s: float = 300.0
    # A request with no complete response after this long is reported as a TIMEOUT.
    request_timeout_s: float = 30.0
    # Only connections whose local or remote port is in this set are kept (None or
    # empty: all). Applied once addresses are known (open event or /proc).
    ports: frozenset[int] | None = None
    # Largest request/response header block (request line + headers); beyond it the
    # message is invalid and the connection disabled ("header_too_large").
    max_header_bytes: int = 16 * 1024
    # Requests awaiting a response on one connection (pipelining depth); beyond it the
    # connection is disabled ("too_many_pending").
    max_pending_requests: int = 256
    # Captured bytes skipped while looking for a message start (mid-stream attach, after
    # a gap) before the connection is declared not HTTP ("not_http").
    max_resync_bytes: int = 64 * 1024
    # Request headers copied into HttpExchange.request_headers (lower-case names).
    capture_request_headers: tuple[str, ...] = ()
    # Response headers copied into HttpExchange.response_headers (lower-case names).
    capture_response_headers: tuple[str, ...] = ()
    # Bytes of each body (de-chunked, contiguous from its start) to keep in
    # request_body_prefix / response_body_prefix; 0 disables body capture (the default).
    body_prefix_bytes: int = 0
