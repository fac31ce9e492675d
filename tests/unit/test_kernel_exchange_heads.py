"""KernelExchangeDecoder keeps each connection's last request head with its decoded
fields: a repeated head reuses them, any other head (or the same head with other field
offsets) is checked and decoded afresh."""

from __future__ import annotations

import ctypes

from otel_ebpf.capture import reader
from otel_ebpf.capture.events import EventKind
from otel_ebpf.exchange import HttpExchange
from otel_ebpf.protocols.http1.kernel_exchange import KernelExchangeDecoder
from otel_ebpf.stats import Stats
from tests.unit.test_kernel_exchange import pack_exchange

A = b"GET /aa HTTP/1.1\r\nHost: x\r\nUser-Agent: ua/1\r\n\r\n"
B = b"GET /bb HTTP/1.1\r\nHost: y\r\nUser-Agent: ua/2\r\n\r\n"  # same length as A
C = b"POST /c HTTP/1.0\r\n\r\n"


def feed(rr: reader.RingReader, raw: bytes) -> None:
    buf = ctypes.create_string_buffer(raw, len(raw))
    rr.callback(None, ctypes.addressof(buf), len(raw))


def fields(ex: HttpExchange) -> tuple:
    return ex.method, ex.target, ex.host, ex.user_agent, ex.protocol_version, ex.request_headers


def test_repeated_and_changing_heads_on_one_connection():
    out, stats = [], Stats()
    decoder = KernelExchangeDecoder(out.append, stats, clock_offset_ns=0,
                                    capture_request_headers=("user-agent",))
    rr = reader.RingReader(lambda event: None, stats, {EventKind.EXCHANGE: decoder.on_record})
    heads = [A, A, B, A, C, C, B, B, A]
    for i, head in enumerate(heads):
        feed(rr, pack_exchange(head, start=i, end=i + 10))
    fresh = []
    for i, head in enumerate(heads):
        one = KernelExchangeDecoder(fresh.append, Stats(), clock_offset_ns=0,
                                    capture_request_headers=("user-agent",))
        one.on_record(pack_exchange(head, start=i, end=i + 10), 0,
                      len(pack_exchange(head, start=i, end=i + 10)))
    assert out == fresh
    assert [fields(ex)[:2] for ex in out] == [
        ("GET", "/aa"), ("GET", "/aa"), ("GET", "/bb"), ("GET", "/aa"), ("POST", "/c"),
        ("POST", "/c"), ("GET", "/bb"), ("GET", "/bb"), ("GET", "/aa")]
    assert out[0].request_headers == (("user-agent", "ua/1"),)
    assert out[2].request_headers == (("user-agent", "ua/2"),)


def test_the_same_head_with_bad_offsets_is_still_rejected():
    out, stats = [], Stats()
    decoder = KernelExchangeDecoder(out.append, stats, clock_offset_ns=0)
    rr = reader.RingReader(lambda event: None, stats, {EventKind.EXCHANGE: decoder.on_record})
    good = pack_exchange(A)
    feed(rr, good)
    # the same head, its Host length pointing past the head
    hdr = reader.EXCHANGE_HDR
    values = list(hdr.unpack_from(good))
    values[-7] = len(A)  # host_len (the last 12: head_len, method_len, target off/len, host
    # off/len, user agent off/len, traceparent off/len, tracestate off/len)
    feed(rr, hdr.pack(*values) + A)
    feed(rr, good)
    rr.flush_stats()
    assert len(out) == 2 and fields(out[0]) == fields(out[1]) == (
        "GET", "/aa", "x", "ua/1", "1.1", ())
    assert stats.get("capture.decode_errors") == 1
