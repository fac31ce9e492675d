"""Differential and mutation fuzzing of the HTTP/1.x chunk stream and the fast-path decoder.

Differential: hypothesis generates valid HTTP/1.1 conversations (methods, targets, header
sets, Content-Length and chunked bodies with trailers, HEAD/204/304 and 1xx answers,
pipelined requests) and splits both byte streams at arbitrary points; conntrack and the
stitcher must report exactly what h11, the reference parser, sees in the same bytes.
Mutation: arbitrary and mutated byte streams must never raise, keep buffers within
their cap, and every stream given up on must be counted. The fast path's record decoder
gets random records: decoded or counted, never an exception.

CI runs a short budget with fixed seeds (derandomized); the long run:
    HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/unit/test_http1_fuzz.py
"""

from __future__ import annotations

import ctypes
import os

import h11
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otel_ebpf.capture import reader
from otel_ebpf.capture.events import EventKind, Role
from otel_ebpf.exchange import Outcome
from otel_ebpf.protocols.http1.kernel_exchange import KernelExchangeDecoder
from otel_ebpf.stats import Stats
from tests.unit.test_http1_support import FakeConn, make_table

settings.register_profile("ci", max_examples=150, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# (not CONNECT: a 2xx answer turns the connection into a tunnel)
TOKEN = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=12).filter(lambda m: m != "CONNECT")
METHODS = st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS",
                                     "HEAD", "PROPFIND"]), TOKEN)
SEGMENT = st.text("abcdefghijklmnopqrstuvwxyz0123456789-._~%", min_size=0, max_size=20)
TARGETS = st.builds(lambda segs, q: "/" + "/".join(segs) + (("?" + q) if q else ""),
                    st.lists(SEGMENT, max_size=4), st.one_of(st.none(), SEGMENT))
HEADER_NAME = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=16).filter(
    lambda n: n not in ("content-length", "transfer-encoding", "host", "connection",
                        "expect", "upgrade", "te", "trailer") and not n.startswith("-"))
HEADER_VALUE = st.text("abcdefghijklmnopqrstuvwxyz0123456789 /;=,.", max_size=40).map(str.strip)
EXTRA_HEADERS = st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=6)
BODY = st.binary(max_size=3000)
# How a body is framed: Content-Length, or chunked with these chunk sizes (+ trailers)
FRAMING = st.one_of(st.just(None), st.lists(st.integers(1, 700), min_size=1, max_size=5))


def _chunked(body: bytes, sizes: list[int], trailers: list[tuple[str, str]]) -> bytes:
    out, at, i = [], 0, 0
    while at < len(body):
        n = sizes[i % len(sizes)]
        out.append(b"%x\r\n%s\r\n" % (n, body[at:at + n]) if at + n <= len(body)
                   else b"%x\r\n%s\r\n" % (len(body) - at, body[at:]))
        at += n
        i += 1
    tail = b"".join(b"%s: %s\r\n" % (k.encode(), v.encode()) for k, v in trailers)
    return b"".join(out) + b"0\r\n" + tail + b"\r\n"


@st.composite
def exchanges(draw):
    """One request and its answer, serialized, with what a correct parser must report."""
    method = draw(METHODS)
    target = draw(TARGETS)
    host = draw(st.sampled_from(["svc", "svc:8080", "10.0.0.1", "[::1]:80"]))
    headers = draw(EXTRA_HEADERS)
    body = b"" if method in ("GET", "HEAD") and draw(st.booleans()) else draw(BODY)
    framing = draw(FRAMING)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    trailers = draw(st.lists(st.tuples(HEADER_NAME, HEADER_VALUE), max_size=2))
    if framing is None:
        if body or draw(st.booleans()):
            lines.append(f"Content-Length: {len(body)}")
        payload = body if body else b""
        if not body and not any(x.startswith("Content-Length") for x in lines):
            payload = b""
    else:
        lines.append("Transfer-Encoding: chunked")
        payload = _chunked(body, framing, trailers)
    request = ("\r\n".join(lines) + "\r\n\r\n").encode() + payload

    interim = draw(st.sampled_from([None, 100, 103]))
    status = draw(st.sampled_from([200, 201, 204, 301, 304, 400, 404, 418, 500, 503]))
    rbody = b"" if status in (204, 304) or method == "HEAD" else draw(BODY)
    rframing = draw(FRAMING)
    rlines = [f"HTTP/1.1 {status} Whatever"]
    rlines += [f"{k}: {v}" for k, v in draw(EXTRA_HEADERS)]
    if status in (204, 304):
        rpayload = b""
    elif rframing is None or method == "HEAD":
        # a HEAD answer announces the length of the body it does not send
        announced = len(rbody) if method != "HEAD" else draw(st.integers(0, 5000))
        rlines.append(f"Content-Length: {announced}")
        rpayload = rbody
    else:
        rlines.append("Transfer-Encoding: chunked")
        rpayload = _chunked(rbody, rframing, [])
    response = ("\r\n".join(rlines) + "\r\n\r\n").encode() + rpayload
    if interim is not None:
        response = f"HTTP/1.1 {interim} Interim\r\n\r\n".encode() + response
    return request, response


def reference(conversation: list[tuple[bytes, bytes]]) -> list[tuple]:
    """What h11 sees: (method, target, host, request body, status, response body)."""
    seen = []
    client = h11.Connection(h11.CLIENT)
    for request, response in conversation:
        server = h11.Connection(h11.SERVER)
        server.receive_data(request)
        req = server.next_event()
        assert isinstance(req, h11.Request), req
        req_body = 0
        while True:
            ev = server.next_event()
            if isinstance(ev, h11.Data):
                req_body += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"h11 wanted more request bytes: {ev}")
        # The client state only needs the method (HEAD) to frame the answer: send it bodiless.
        bodiless = [(k, v) for k, v in req.headers
                    if k not in (b"content-length", b"transfer-encoding")]
        client.send(h11.Request(method=req.method, target=req.target, headers=bodiless))
        client.send(h11.EndOfMessage())
        client.receive_data(response)
        status, resp_body = None, 0
        while True:
            ev = client.next_event()
            if isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                resp_body += len(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                break
            elif isinstance(ev, h11.InformationalResponse):
                continue
            else:
                raise AssertionError(f"h11 wanted more response bytes: {ev}")
        client.start_next_cycle()
        host = dict(req.headers).get(b"host")
        seen.append((req.method.decode(), req.target.decode(), host.decode() if host else None,
                     req_body, status, resp_body))
    return seen


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


@given(st.lists(exchanges(), min_size=1, max_size=4), st.lists(st.integers(0, 10**6), max_size=12),
       st.lists(st.integers(0, 10**6), max_size=12), st.booleans())
def test_the_chunk_stream_reports_what_h11_sees(conversation, req_cuts, resp_cuts, pipelined):
    expected = reference(conversation)
    table, stats = make_table()
    conn = FakeConn(table, Role.SERVER)
    requests = b"".join(r for r, _ in conversation)
    responses = [r for _, r in conversation]
    if pipelined:  # every request first, arbitrarily split, then every answer
        for chunk in split(requests, req_cuts):
            conn.request(chunk)
        for chunk in split(b"".join(responses), resp_cuts):
            conn.response(chunk)
    else:
        for request, response in conversation:
            for chunk in split(request, req_cuts):
                conn.request(chunk)
            for chunk in split(response, resp_cuts):
                conn.response(chunk)
    got = [(e.method, e.target, e.host, e.request_body_size, e.status_code,
            e.response_body_size) for e in conn.out]
    assert got == expected
    assert all(e.outcome is Outcome.OK for e in conn.out)
    assert stats.get("http.parse_failures") == 0


def _mutate(data: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, at, chunk in edits:
        at = at % (len(buf) + 1)
        if op == 0:
            buf[at:at] = chunk  # insert
        elif op == 1:
            del buf[at:at + len(chunk)]  # delete
        else:
            buf[at:at + len(chunk)] = chunk  # overwrite
    return bytes(buf)


MAX_BUFFER = 8192


@given(st.lists(exchanges(), min_size=1, max_size=3),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10**6), st.binary(min_size=1, max_size=40)),
                max_size=6),
       st.binary(max_size=2000), st.lists(st.integers(0, 10**6), max_size=10),
       st.sampled_from([Role.SERVER, Role.CLIENT, Role.UNKNOWN]), st.booleans())
def test_mutated_and_random_streams_never_raise_and_stay_bounded(
        conversation, edits, noise, cuts, role, use_noise):
    table, stats = make_table(max_buffer_bytes=MAX_BUFFER, max_header_bytes=4096)
    conn = FakeConn(table, role, open_event=role is not Role.UNKNOWN)
    requests = _mutate(b"".join(r for r, _ in conversation), edits)
    responses = noise if use_noise else _mutate(b"".join(r for _, r in conversation), edits[::-1])
    for a, b in zip(split(requests, cuts), split(responses, cuts[::-1]), strict=False):
        conn.request(a)
        conn.response(b)
        assert table.buffered_bytes() <= MAX_BUFFER + 4096  # one chunk over, at most
    conn.close()
    assert len(table) == 0  # closed: nothing left behind
    disabled = {k: v for k, v in stats.snapshot().items() if k.startswith("conntrack.disabled.")}
    if stats.get("http.parse_failures"):
        assert disabled, "a stream given up on must be counted by reason"
    for ex in conn.out:
        assert ex.request_body_size >= 0 and (ex.response_body_size or 0) >= 0


@given(st.binary(min_size=0, max_size=600), st.integers(0, 2**16 - 1), st.integers(0, 2**16 - 1),
       st.integers(0, 255))
def test_random_fast_path_records_are_decoded_or_counted(tail, off, length, minor):
    """A record whose offsets or lengths lie must raise DecodeError (counted by the reader),
    never anything else."""
    head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + tail
    raw = reader.EXCHANGE_HDR.pack(
        EventKind.EXCHANGE, 1, 0, minor % 3, 100, 100, 7, 1, 1_000, 2_000, 0, 0, 200, 2,
        80, 40000, bytes(16), bytes(16), b"nginx", min(len(head), 2**16 - 1), 3, 4,
        length % 700, off, length, off, length % 64, off % 300, length % 90, 0, 0) + head
    out: list = []
    stats = Stats()
    decoder = KernelExchangeDecoder(out.append, stats, clock_offset_ns=0)
    rr = reader.RingReader(lambda event: None, stats, {EventKind.EXCHANGE: decoder.on_record})
    buf = ctypes.create_string_buffer(raw, len(raw))
    rr.callback(None, ctypes.addressof(buf), len(raw))
    rr.flush_stats()
    assert len(out) + stats.get("capture.decode_errors") == 1
