"""BPF maps by file descriptor, through Debian's libbpf.so.1 (ctypes); no BCC.

Contract:
    m = BpfMap(fd, name, map_type, key_size, value_size, max_entries)
    m.lookup(key: bytes) -> bytes | None     # per-CPU maps: one value per possible CPU,
    m.values_per_cpu(key) -> list[bytes]     #   each rounded up to 8 bytes
    m.update(key, value, flags=BPF_ANY); m.delete(key) -> bool
    m.keys() -> list[bytes]                  # a snapshot (the map may change meanwhile)
    m.close()                                # closes the fd (idempotent)
Keys and values are raw bytes in the kernel's layout (little-endian structs of
bpf/include/*.h); callers pack them with `struct`. Errors raise OSError with the
kernel's errno. libbpf is loaded on first use; when libbpf.so.1 is missing the error
says which package provides it (`libbpf1` on Debian).

Why libbpf and not BCC: importing bcc maps BCC's compiler (libLLVM + libclang-cpp,
~83 MB resident) into the process for its whole life; the resident daemon only needs
five map syscalls, which libbpf (~0.4 MB) wraps.
"""

from __future__ import annotations

import ctypes
import os

from otel_ebpf.capture import CaptureError

# enum bpf_map_type (include/uapi/linux/bpf.h), the ones we create or read.
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PROG_ARRAY = 3
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27
PERCPU_TYPES = frozenset({BPF_MAP_TYPE_PERCPU_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
                          BPF_MAP_TYPE_LRU_PERCPU_HASH})
HASH_TYPES = frozenset({BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH, BPF_MAP_TYPE_PERCPU_HASH,
                        BPF_MAP_TYPE_LRU_PERCPU_HASH})
BPF_ANY = 0

LIBBPF = "libbpf.so.1"
LIBBPF_MISSING = ("%s is not loadable (%%s): install Debian's libbpf1 (apt-get install libbpf1); "
                  "the daemon reads BPF maps through it" % LIBBPF)

_lib: ctypes.CDLL | None = None
_ncpus: int | None = None


def libbpf() -> ctypes.CDLL:
    """libbpf.so.1 with the prototypes we call (CaptureError when missing)."""
    global _lib
    if _lib is None:
        try:
            lib = ctypes.CDLL(LIBBPF, use_errno=True)
        except OSError as exc:
            raise CaptureError(LIBBPF_MISSING % exc) from None
        vp, c_int = ctypes.c_void_p, ctypes.c_int
        for name, args in (("bpf_map_lookup_elem", (c_int, vp, vp)),
                           ("bpf_map_update_elem", (c_int, vp, vp, ctypes.c_uint64)),
                           ("bpf_map_delete_elem", (c_int, vp)),
                           ("bpf_map_get_next_key", (c_int, vp, vp)),
                           ("libbpf_num_possible_cpus", ())):
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = c_int
        _lib = lib
    return _lib


def possible_cpus() -> int:
    """How many values a per-CPU map returns (possible, not online, CPUs)."""
    global _ncpus
    if _ncpus is None:
        n = libbpf().libbpf_num_possible_cpus()
        if n <= 0:
            raise OSError(-n, "libbpf_num_possible_cpus: %s" % os.strerror(-n))
        _ncpus = n
    return _ncpus


def _raise(ret: int, what: str, name: str) -> None:
    err = -ret if ret < 0 else ctypes.get_errno()
    raise OSError(err, "%s on BPF map %s: %s" % (what, name, os.strerror(err)))


class BpfMap:
    """One BPF map held by its fd (handed over by the compile step)."""

    __slots__ = ("fd", "name", "map_type", "key_size", "value_size", "max_entries",
                 "_vlen", "_stride", "_lib")

    def __init__(self, fd: int, name: str, map_type: int, key_size: int, value_size: int,
                 max_entries: int) -> None:
        self.fd = fd
        self.name = name
        self.map_type = map_type
        self.key_size = key_size
        self.value_size = value_size
        self.max_entries = max_entries
        self._lib = libbpf()
        # Per-CPU maps copy one 8-byte-aligned slot per possible CPU.
        self._stride = (value_size + 7) & ~7
        # Buffers are made per call (~1 us), not kept: callers on two threads (the
        # capture loop, a test's main thread) must not share them; no call is hot.
        self._vlen = self._stride * possible_cpus() if map_type in PERCPU_TYPES else value_size

    @property
    def per_cpu(self) -> bool:
        return self.map_type in PERCPU_TYPES

    def kernel_bytes(self) -> int:
        """Rough kernel memory of the map's entries (key + value x max entries)."""
        if self.map_type == BPF_MAP_TYPE_RINGBUF:
            return self.max_entries
        copies = possible_cpus() if self.per_cpu else 1
        return (self.key_size + self._stride * copies) * self.max_entries

    def _key(self, key: bytes) -> ctypes.Array:
        if len(key) != self.key_size:
            raise ValueError("BPF map %s: key of %d bytes, expected %d"
                             % (self.name, len(key), self.key_size))
        return ctypes.create_string_buffer(key, self.key_size)

    def lookup(self, key: bytes) -> bytes | None:
        """The value (all CPUs' slots concatenated for per-CPU maps), None if absent."""
        value = ctypes.create_string_buffer(max(self._vlen, 8))
        ret = self._lib.bpf_map_lookup_elem(self.fd, self._key(key), value)
        if ret != 0:
            err = -ret if ret < 0 else ctypes.get_errno()
            if err == 2:  # ENOENT
                return None
            _raise(ret, "lookup", self.name)
        return value.raw[:self._vlen]

    def values_per_cpu(self, key: bytes) -> list[bytes]:
        raw = self.lookup(key)
        if raw is None:
            return []
        if not self.per_cpu:
            return [raw]
        s = self._stride
        return [raw[i:i + self.value_size] for i in range(0, len(raw), s)]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        if len(value) != self._vlen:
            raise ValueError("BPF map %s: value of %d bytes, expected %d"
                             % (self.name, len(value), self._vlen))
        buf = ctypes.create_string_buffer(value, max(self._vlen, 1))
        ret = self._lib.bpf_map_update_elem(self.fd, self._key(key), buf, flags)
        if ret != 0:
            _raise(ret, "update", self.name)

    def delete(self, key: bytes) -> bool:
        """False when the key was not there."""
        ret = self._lib.bpf_map_delete_elem(self.fd, self._key(key))
        if ret != 0:
            err = -ret if ret < 0 else ctypes.get_errno()
            if err == 2:
                return False
            _raise(ret, "delete", self.name)
        return True

    def keys(self) -> list[bytes]:
        """Every key, by bpf_map_get_next_key (one syscall per key)."""
        out: list[bytes] = []
        get_next = self._lib.bpf_map_get_next_key
        n = max(self.key_size, 1)
        cur, nxt = ctypes.create_string_buffer(n), ctypes.create_string_buffer(n)
        ret = get_next(self.fd, None, nxt)
        n = self.key_size
        limit = self.max_entries + 1  # a map refilled while we walk must still end
        while ret == 0 and len(out) < limit:
            out.append(nxt.raw[:n])
            cur, nxt = nxt, cur
            ret = get_next(self.fd, cur, nxt)
        if ret != 0:
            err = -ret if ret < 0 else ctypes.get_errno()
            if err != 2:
                _raise(ret, "get_next_key", self.name)
        return out

    def clear(self) -> None:
        """Delete every key (hash maps); array maps are zeroed."""
        if self.map_type in HASH_TYPES:
            for key in self.keys():
                self.delete(key)
            return
        zero = bytes(self._vlen)
        for i in range(self.max_entries):
            self.update(i.to_bytes(4, "little"), zero)

    def __len__(self) -> int:
        return len(self.keys())

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1
