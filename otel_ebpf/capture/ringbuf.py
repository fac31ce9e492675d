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

Wake-ups: the kernel may submit with BPF_RB_NO_WAKEUP (no epoll wake-up below a fill
threshold), so callers wait up to their timeout and then drain regardless.
"""

from __future__ import annotations

import mmap
import os
import select
import struct

BUSY = 1 << 31
DISCARD = 1 << 30
HDR_SIZE = 8
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")


class RingBuffer:
    __slots__ = ("_fd", "_size", "_mask", "_cons", "_data", "_end", "_epoll", "records")

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
        self._epoll = select.epoll()
        self._epoll.register(map_fd, select.EPOLLIN)
        self.records = 0  # handed to on_record since start

    def fileno(self) -> int:
        return self._epoll.fileno()

    def pending(self) -> int:
        """Bytes between the consumer and producer positions (headers included)."""
        return _U64.unpack_from(self._data, 0)[0] - _U64.unpack_from(self._cons, 0)[0]

    def wait(self, timeout_ms: int) -> bool:
        """Block until the kernel signals data or timeout_ms passed (0: don't block)."""
        try:
            return bool(self._epoll.poll(max(timeout_ms, 0) / 1000.0, 1))
        except InterruptedError:  # a signal: the caller's loop looks at its stop flag
            return False

    def drain(self, on_record) -> int:
        """Hand every complete record to on_record(buf, offset, size); see the module doc."""
        data, cons_map = self._data, self._cons
        u64, u32 = _U64, _U32
        mask, end = self._mask, self._end
        cons = u64.unpack_from(cons_map, 0)[0]
        prod = u64.unpack_from(data, 0)[0]
        handed = 0
        while cons < prod:
            while cons < prod:
                off = PAGE_SIZE + (cons & mask)
                word = u32.unpack_from(data, off)[0]
                if word & BUSY:
                    self.records += handed
                    return handed  # being written: next time
                size = word & ~(BUSY | DISCARD)
                cons += (size + HDR_SIZE + 7) & ~7
                if word & DISCARD:
                    u64.pack_into(cons_map, 0, cons)
                    continue
                start = off + HDR_SIZE
                if start + size <= end:
                    keep = on_record(data, start, size)
                else:  # wraps: the head from the end of the area, the rest from its start
                    first = end - start
                    keep = on_record(data[start:end] + data[PAGE_SIZE:PAGE_SIZE + size - first],
                                     0, size)
                u64.pack_into(cons_map, 0, cons)
                handed += 1
                if keep is False:
                    self.records += handed
                    return handed
            prod = u64.unpack_from(data, 0)[0]
        self.records += handed
        return handed

    def close(self) -> None:
        """Unmap and stop polling (the map fd belongs to the caller)."""
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
            self._data.close()
            self._cons.close()
