"""The BPF ring buffer (BPF_MAP_TYPE_RINGBUF) drained in Python from its mmap; no BCC.

Contract:
    rb = RingBuffer(map_fd, data_size)      # data_size: the map's max_entries (bytes)
    rb.fileno()                             # epoll-able: readable when data is queued
    rb.wait(timeout_ms)                     # epoll up to timeout_ms (False: timed out)
    rb.drain(on_record) -> records handed   # on_record(buf, offset, size) per record,
                                            # in order; returning False stops the drain
    rb.pending() -> bytes queued; rb.close()
`buf` is the mapping itself (struct.unpack_from works on it, slicing copies), so a
record is decoded where it lies, with no per-record copy. The one exception: a record
whose payload wraps past the end of the data area is handed over as a bytes copy at
offset 0 (see below). Records are consumed, i.e. the consumer position is written
back, as soon as on_record returns, so the space is free for the kernel again.

Layout (kernel/bpf/ringbuf.c, Documentation/bpf/ringbuf.rst): page 0 holds the
consumer position (u64, the only page user space may write); page 1 the producer
position (u64); the data area follows. Each record starts with an 8-byte header
{u32 len | BUSY bit 31 | DISCARD bit 30, u32 pg_off}; records are 8-byte aligned;
positions grow forever and are taken modulo the data size. A BUSY record is being
written: draining stops there until the next call.

The kernel maps the data area twice in a row so that wrapping records look
contiguous; we map it once. The mapping counts fully in the daemon's RSS (the kernel
inserts every page at mmap time), so the second copy would cost as much resident
memory as the ring buffer itself, to spare a copy of the rare record that wraps.

Positions are read and written whole: through a ctypes u64 over the consumer page and a
u64 memoryview over the producer page, i.e. one 8-byte load or store. struct's "<Q"
goes byte by byte, and the kernel, reading a consumer position half written, saw it far
behind and refused reservations as if the buffer were full (measured: 18-37 of ~300k
records lost at 60k records/s with struct, none with whole stores, none with libbpf's
own consumer).

Wake-ups: the kernel may submit with BPF_RB_NO_WAKEUP (no epoll wake-up below a fill
threshold), so callers wait up to their timeout and then drain regardless.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import select

BUSY = 1 << 31
DISCARD = 1 << 30
HDR_SIZE = 8
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class RingBuffer:
    __slots__ = ("_fd", "_size", "_mask", "_cons", "_data", "_end", "_epoll", "records",
                 "_cons_pos", "_prod_pos", "_words")

    def __init__(self, map_fd: int, data_size: int) -> None:
        if data_size <= 0 or data_size & (data_size - 1) or data_size % PAGE_SIZE:
            raise ValueError("ring buffer size %d is not a power-of-two multiple of the page"
                             % data_size)
        self._fd = map_fd
        self._size = data_size
        self._mask = data_size - 1
        self._cons = mmap.mmap(map_fd, PAGE_SIZE, mmap.MAP_SHARED,
                               mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._data = mmap.mmap(map_fd, PAGE_SIZE + data_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=PAGE_SIZE)
        except BaseException:
            self._cons.close()
            raise
        self._end = PAGE_SIZE + data_size
        self._view_positions()
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self.records = 0  # handed to on_record since start

    def _view_positions(self) -> None:
        """Whole 8-byte loads and stores of the positions (see the module doc)."""
        self._cons_pos = ctypes.c_uint64.from_buffer(self._cons, 0)
        self._prod_pos = memoryview(self._data)[:8].cast("Q")
        # Record header words (u32 in the kernel's own byte order), each read with one
        # 4-byte load instead of struct's byte-by-byte unpack; index = byte offset // 4.
        self._words = memoryview(self._data).cast("I")

    def fileno(self) -> int:
        return self._epoll.fileno()

    def pending(self) -> int:
        """Bytes between the consumer and producer positions (headers included)."""
        return self._prod_pos[0] - self._cons_pos.value

    def wait(self, timeout_ms: int) -> bool:
        """Block until the kernel signals data or timeout_ms passed (0: don't block)."""
        try:
            return bool(self._epoll.poll(max(timeout_ms, 0) / 1000.0, 1))
        except InterruptedError:  # a signal: the caller's loop looks at its stop flag
            return False

    def drain(self, on_record) -> int:
        """Hand every complete record to on_record(buf, offset, size); see the module doc."""
        data = self._data
        cons_pos, prod_pos = self._cons_pos, self._prod_pos
        words = self._words
        mask, end = self._mask, self._end
        cons = cons_pos.value
        prod = prod_pos[0]
        handed = 0
        while cons < prod:
            while cons < prod:
                off = PAGE_SIZE + (cons & mask)
                word = words[off >> 2]
                if word & BUSY:
                    self.records += handed
                    return handed  # being written: next time
                size = word & ~(BUSY | DISCARD)
                cons += (size + HDR_SIZE + 7) & ~7
                if word & DISCARD:
                    cons_pos.value = cons
                    continue
                start = off + HDR_SIZE
                if start + size <= end:
                    keep = on_record(data, start, size)
                else:  # wraps: the head from the end of the area, the rest from its start
                    first = end - start
                    keep = on_record(data[start:end] + data[PAGE_SIZE:PAGE_SIZE + size - first],
                                     0, size)
                cons_pos.value = cons
                handed += 1
                if keep is False:
                    self.records += handed
                    return handed
            prod = prod_pos[0]
        self.records += handed
        return handed

    def close(self) -> None:
        """Unmap and stop polling (the map fd belongs to the caller)."""
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
            # The position views export the mappings' buffers: release them first.
            self._prod_pos.release()
            self._prod_pos = None
            self._words.release()
            self._words = None
            self._cons_pos = None
            self._data.close()
            self._cons.close()
