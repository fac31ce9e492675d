"""The BCC-free pieces of the resident capture, without root or BPF.

- ringbuf.RingBuffer.drain over plain memory laid out as the kernel lays out a BPF ring
  buffer (consumer page, producer page, data area): record order, 8-byte alignment,
  BUSY stops, DISCARD is skipped, a record wrapping past the end arrives whole, the
  budget (on_record returning False) stops and the consumer position says where.
- attach.file_offset: ELF virtual address -> file offset through PT_LOAD segments,
  checked against the bytes of the system libssl.
- attach.release: the fds are gone at once and their files are closed by the kernel.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct

import pytest

from otel_ebpf.capture import attach, tls
from otel_ebpf.capture.ringbuf import BUSY, DISCARD, HDR_SIZE, PAGE_SIZE, RingBuffer

SIZE = 4096  # data area; one page keeps the wrap case short


def fake_ring() -> RingBuffer:
    """A RingBuffer over bytearrays instead of the map's mmap (drain only reads and
    writes the two positions and the data area through the buffer protocol)."""
    rb = RingBuffer.__new__(RingBuffer)
    rb._size, rb._mask = SIZE, SIZE - 1
    rb._cons = bytearray(PAGE_SIZE)
    rb._data = bytearray(PAGE_SIZE + SIZE)
    rb._end = PAGE_SIZE + SIZE
    rb._view_positions()
    rb._epoll = None
    rb.records = 0
    return rb


def produce(rb: RingBuffer, prod: int, payload: bytes, flags: int = 0) -> int:
    """Write one record at producer position `prod` as the kernel would; new position."""
    off = PAGE_SIZE + (prod & (SIZE - 1))
    struct.pack_into("<II", rb._data, off, len(payload) | flags, 0)
    for i, b in enumerate(payload):  # byte by byte: the payload may wrap
        rb._data[PAGE_SIZE + ((prod + HDR_SIZE + i) & (SIZE - 1))] = b
    prod += (len(payload) + HDR_SIZE + 7) & ~7
    struct.pack_into("<Q", rb._data, 0, prod)
    return prod


def consumer(rb: RingBuffer) -> int:
    return struct.unpack_from("<Q", rb._cons, 0)[0]


def collect(out: list, stop_after: int | None = None):
    def on_record(buf, offset, size):
        out.append(bytes(buf[offset:offset + size]))
        return stop_after is None or len(out) < stop_after
    return on_record


def test_records_in_order_aligned_and_consumed():
    rb = fake_ring()
    prod = 0
    for payload in (b"a", b"bcdefghij", b"x" * 16):
        prod = produce(rb, prod, payload)
    out: list = []
    assert rb.drain(collect(out)) == 3
    assert out == [b"a", b"bcdefghij", b"x" * 16]
    assert consumer(rb) == prod == 16 + 24 + 24
    assert rb.drain(collect(out)) == 0  # nothing new


def test_busy_record_stops_and_discarded_is_skipped():
    rb = fake_ring()
    prod = produce(rb, 0, b"gone", DISCARD)
    prod = produce(rb, prod, b"kept")
    busy_at = prod
    prod = produce(rb, prod, b"being written", BUSY)
    out: list = []
    assert rb.drain(collect(out)) == 1
    assert out == [b"kept"]
    assert consumer(rb) == busy_at
    # the kernel commits it: the next drain takes it
    struct.pack_into("<I", rb._data, PAGE_SIZE + busy_at, len(b"being written"))
    assert rb.drain(collect(out)) == 1
    assert out[-1] == b"being written" and consumer(rb) == prod


def test_record_wrapping_past_the_end_arrives_whole():
    rb = fake_ring()
    start = SIZE - 16  # header fits, payload wraps
    struct.pack_into("<Q", rb._cons, 0, start)
    payload = bytes(range(40))
    prod = produce(rb, start, payload)
    out: list = []
    assert rb.drain(collect(out)) == 1
    assert out == [payload]
    assert consumer(rb) == prod


def test_budget_stops_the_drain_where_it_was():
    rb = fake_ring()
    prod = 0
    for i in range(10):
        prod = produce(rb, prod, b"r%d" % i)
    out: list = []
    assert rb.drain(collect(out, stop_after=4)) == 4
    assert consumer(rb) == 4 * 16
    rest: list = []
    assert rb.drain(collect(rest)) == 6
    assert out + rest == [b"r%d" % i for i in range(10)]


def test_file_offset_maps_symbols_to_their_bytes_in_libssl():
    path = "/usr/lib/x86_64-linux-gnu/libssl.so.3"
    if not os.path.exists(path):
        pytest.skip("no system libssl.so.3")
    info = tls.read_elf_info(path)
    segments = attach.load_segments(path)
    assert set(info.offsets) == set(info.defined)
    with open(path, "rb") as f:
        data = f.read()
    lib = ctypes.CDLL(path)
    for sym, offset in info.offsets.items():
        assert offset == attach.file_offset(segments, info.addresses[sym])
        # The loaded function's first bytes are the file's bytes at that offset; the first
        # one may be a uprobe's breakpoint (int3) if a daemon is tracing this libssl now.
        loaded = ctypes.string_at(ctypes.cast(getattr(lib, sym), ctypes.c_void_p).value, 16)
        assert loaded[1:] == data[offset + 1:offset + 16], sym
        assert loaded[0] in (data[offset], 0xCC), sym


def test_file_offset_outside_every_segment_is_an_error():
    segments = [(0x1000, 0x200, 0x0), (0x3000, 0x100, 0x800)]
    assert attach.file_offset(segments, 0x1010) == 0x10
    assert attach.file_offset(segments, 0x3020) == 0x820
    with pytest.raises(ValueError):
        attach.file_offset(segments, 0x2000)


def test_release_gives_up_the_fds_and_the_kernel_closes_their_files():
    pipes = [os.pipe() for _ in range(5)]
    attach.release([w for _, w in pipes])
    for r, w in pipes:
        with pytest.raises(OSError):
            os.fstat(w)  # ours are closed at once
        poller = select.poll()
        poller.register(r, select.POLLIN | select.POLLHUP)
        assert poller.poll(5000), "write end never closed"  # the kernel dropped it
        assert os.read(r, 1) == b""
        os.close(r)
