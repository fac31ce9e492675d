"""Attachments as file descriptors: uprobes through perf_event_open, released in bulk.

Contract:
- `attach_uprobe(path, offset, prog_fd, retprobe=False) -> fd`: a uprobe (or uretprobe)
  on the instruction at file `offset` of `path`, running the loaded BPF program
  `prog_fd`; the probe lives exactly as long as the returned perf-event fd. Uses the
  uprobe PMU (/sys/bus/event_source/devices/uprobe): no tracefs event is created, so
  nothing is left behind by a crash. Raises OSError (errno and what failed).
- `file_offset(path, vaddr) -> int`: an ELF symbol value (st_value) -> file offset,
  through the PT_LOAD program headers (what the uprobe PMU wants).
- `release(fds)`: gives up attachment fds without waiting for the kernel (see below).
- `sweep_tracefs_events()`: removes tracefs uprobes left by daemons that are gone.

Privileges (measured on 6.18 as uid 65534 with the systemd unit's set): the uprobe PMU
refuses perf_event_open without CAP_SYS_ADMIN (EACCES, even with CAP_PERFMON). Then,
as BCC did, the uprobe is created through tracefs (a line in uprobe_events: the file is
root's, so CAP_DAC_OVERRIDE) and opened as a tracepoint perf event (CAP_PERFMON). Our
tracefs events are named otel_ebpf_<pid>/p<n> (short: the kernel caps names at 64
bytes, which broke BCC's path-derived names for long paths). The kernel still refuses
a tracefs uprobe at an offset where another process holds a PMU one.

Why `release` does not simply close: releasing the last perf event of a tracepoint
unregisters it and waits for an RCU-tasks grace period (tracepoint_synchronize_unregister,
under the kernel's event_mutex): ~70 ms per tracepoint here, 2.4 s for the 34 the
daemon attaches, whether closed one by one, in threads, or by process exit. `release`
posts the fds through an SCM_RIGHTS message into a unix socket that holds itself in its
own queue and then closes both ends: the kernel's unix-socket garbage collector frees
that cycle from a worker thread, so the probes are unregistered in the background and
this process can exit at once. Callers make the programs inert first (the daemon
clears config[CFG_SELECT]: every program returns at its first check), so nothing is
emitted between release and the kernel finishing. Where the kernel runs the collector
synchronously (older kernels), this costs what close() costs, no more.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import socket
import struct
from collections.abc import Iterable

UPROBE_PMU = "/sys/bus/event_source/devices/uprobe"
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}.get(platform.machine(), 298)
PERF_FLAG_FD_CLOEXEC = 1 << 3
PERF_EVENT_IOC_ENABLE = 0x2400
PERF_EVENT_IOC_SET_BPF = 0x40042408


class PerfEventAttr(ctypes.Structure):
    """struct perf_event_attr up to config2 (PERF_ATTR_SIZE_VER1 = 72 bytes is enough)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),  # uprobe_path: char *
        ("config2", ctypes.c_uint64),  # probe_offset
    ]


_libc = None
_pmu: tuple[int, int] | None = None


def _syscall():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.syscall.restype = ctypes.c_long
    return _libc.syscall


def uprobe_pmu() -> tuple[int, int]:
    """(PMU type, config bit that makes a uretprobe), read once from sysfs."""
    global _pmu
    if _pmu is None:
        try:
            with open(UPROBE_PMU + "/type") as f:
                pmu_type = int(f.read())
            with open(UPROBE_PMU + "/format/retprobe") as f:
                bit = int(f.read().strip().split(":", 1)[1])  # "config:0"
        except (OSError, ValueError, IndexError) as exc:
            raise OSError(getattr(exc, "errno", None) or 2,
                          "no uprobe PMU at %s (kernel < 4.17 or CONFIG_UPROBE_EVENTS off): %s"
                          % (UPROBE_PMU, exc)) from None
        _pmu = (pmu_type, bit)
    return _pmu


class Uprobe(int):
    """An attachment fd; `event` names its tracefs uprobe ("group/name") when it was
    made through tracefs, to be removed once the fd is gone (`remove_tracefs_event`)."""

    event: str | None = None


_use_tracefs = False  # set after the PMU refused us once (no CAP_SYS_ADMIN)
_seq = 0


def attach_uprobe(path: str, offset: int, prog_fd: int, retprobe: bool = False) -> Uprobe:
    """The uprobe PMU when permitted, else a tracefs uprobe event (module docstring)."""
    global _use_tracefs
    if not _use_tracefs:
        try:
            return Uprobe(_attach_pmu(path, offset, prog_fd, retprobe))
        except OSError as exc:
            if exc.errno not in (1, 13):  # EPERM, EACCES: try tracefs; the rest is real
                raise
            _use_tracefs = True
    return _attach_tracefs(path, offset, prog_fd, retprobe)


def _attach_pmu(path: str, offset: int, prog_fd: int, retprobe: bool) -> int:
    pmu_type, ret_bit = uprobe_pmu()
    cpath = ctypes.create_string_buffer(os.fsencode(path))
    attr = PerfEventAttr()
    attr.type = pmu_type
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config = (1 << ret_bit) if retprobe else 0
    attr.sample_period = 1
    attr.wakeup_events = 1
    attr.config1 = ctypes.addressof(cpath)
    attr.config2 = offset
    # pid -1, cpu 0: one event for every process on every CPU (the BPF program runs
    # from the probe itself, whichever CPU hits it).
    return _open_and_attach(attr, prog_fd, "uprobe %s+0x%x" % (path, offset))


def _open_and_attach(attr: PerfEventAttr, prog_fd: int, what: str) -> int:
    fd = _syscall()(_NR_PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, "perf_event_open(%s): %s" % (what, os.strerror(err)))
    try:
        fcntl.ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog_fd)
        fcntl.ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)
    except OSError as exc:
        os.close(fd)
        raise OSError(exc.errno, "attaching the BPF program to %s: %s"
                      % (what, exc.strerror)) from None
    return fd


# -- tracefs uprobe events: the way without CAP_SYS_ADMIN ---------------------------------

PERF_TYPE_TRACEPOINT = 2
GROUP_PREFIX = "otel_ebpf_"


def _tracefs() -> str:
    from otel_ebpf.preflight import tracefs_path

    path = tracefs_path()
    if path is None:
        raise OSError(2, "tracefs is not mounted: uprobes cannot be created without "
                         "CAP_SYS_ADMIN")
    return path


def _attach_tracefs(path: str, offset: int, prog_fd: int, retprobe: bool) -> Uprobe:
    global _seq
    tracefs = _tracefs()
    _seq += 1
    # Short names of our own: the kernel caps event names at 64 bytes, and a name made
    # from the library's path (what BCC does) fails for a container's libssl.
    group = "%s%d" % (GROUP_PREFIX, os.getpid())
    event = "%s/%s%d" % (group, "r" if retprobe else "p", _seq)
    if any(c.isspace() for c in path):
        raise OSError(22, "tracefs uprobes cannot name a path with blanks: %r" % path)
    line = "%s:%s %s:0x%x\n" % ("r" if retprobe else "p", event, path, offset)
    try:
        _write_uprobe_events(tracefs, line)
        with open(os.path.join(tracefs, "events", event, "id")) as f:
            event_id = int(f.read())
    except OSError as exc:
        remove_tracefs_event(event)
        raise OSError(exc.errno, "creating tracefs uprobe %s at %s+0x%x: %s"
                      % (event, path, offset, exc.strerror)) from None
    attr = PerfEventAttr()
    attr.type = PERF_TYPE_TRACEPOINT
    attr.size = ctypes.sizeof(PerfEventAttr)
    attr.config = event_id
    attr.sample_period = 1
    attr.wakeup_events = 1
    try:
        fd = Uprobe(_open_and_attach(attr, prog_fd, "tracefs uprobe %s" % event))
    except OSError:
        remove_tracefs_event(event)
        raise
    fd.event = event
    return fd


def _write_uprobe_events(tracefs: str, line: str) -> None:
    # os.open, not open(..., "a"): Python seeks to the end of an append-mode file, and
    # tracefs files refuse SEEK_END (EINVAL).
    fd = os.open(os.path.join(tracefs, "uprobe_events"), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, line.encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)


def remove_tracefs_event(event: str) -> bool:
    """Delete a tracefs uprobe event ("group/name"); False while a perf event holds it."""
    try:
        _write_uprobe_events(_tracefs(), "-:%s\n" % event)
        return True
    except OSError:
        return False


def sweep_tracefs_events(alive=lambda pid: os.path.exists("/proc/%d" % pid)) -> int:
    """Remove the tracefs uprobes earlier daemons left (their pid is gone); how many.

    A daemon exits without waiting for its probes to be released (see `release`), so it
    cannot delete their tracefs events itself; the next start does."""
    try:
        tracefs = _tracefs()
        with open(os.path.join(tracefs, "uprobe_events")) as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    removed = 0
    for line in lines:
        # "p:otel_ebpf_1234/p1 /usr/lib/x86_64-linux-gnu/libssl.so.3:0x0000000000035430"
        name = line.split(None, 1)[0].partition(":")[2] if line else ""
        group = name.partition("/")[0]
        if not group.startswith(GROUP_PREFIX):
            continue
        try:
            pid = int(group[len(GROUP_PREFIX):])
        except ValueError:
            continue
        if not alive(pid) and remove_tracefs_event(name):
            removed += 1
    return removed


_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")
_PT_LOAD = 1


def load_segments(path: str) -> list[tuple[int, int, int]]:
    """(p_vaddr, p_filesz, p_offset) of each PT_LOAD segment of a 64-bit LE ELF file."""
    with open(path, "rb") as f:
        ehdr = f.read(_EHDR.size)
        if len(ehdr) < _EHDR.size or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
            raise ValueError("%s is not a 64-bit little-endian ELF file" % path)
        fields = _EHDR.unpack(ehdr)
        phoff, phentsize, phnum = fields[5], fields[9], fields[10]
        if phentsize != _PHDR.size or not 0 < phnum < 4096:
            raise ValueError("%s has no usable program headers" % path)
        f.seek(phoff)
        raw = f.read(phentsize * phnum)
    out = []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = _PHDR.unpack_from(raw, i * phentsize)
        if p_type == _PT_LOAD:
            out.append((p_vaddr, p_filesz, p_offset))
    return out


def file_offset(segments: list[tuple[int, int, int]], vaddr: int) -> int:
    """The file offset of the code at virtual address vaddr (a symbol's st_value)."""
    for seg_vaddr, filesz, offset in segments:
        if seg_vaddr <= vaddr < seg_vaddr + filesz:
            return vaddr - seg_vaddr + offset
    raise ValueError("address 0x%x is in no loadable segment" % vaddr)


def release(fds: Iterable[int]) -> None:
    """Give up these fds; the kernel closes them in the background (module docstring)."""
    fds = [fd for fd in fds if fd >= 0]
    if not fds:
        return
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    except OSError:
        _close_all(fds)
        return
    try:
        # One message per SCM_MAX_FD (253) descriptors.
        for i in range(0, len(fds), 250):
            socket.send_fds(a, [b"x"], fds[i:i + 250])
        socket.send_fds(a, [b"s"], [b.fileno()])  # b now holds itself: a cycle
    except OSError:
        a.close()
        b.close()
        _close_all(fds)
        return
    _close_all(fds)
    # b first: the collector runs when a unix socket is released (a, here), and must
    # find b with no user reference left, only the one in its own queue. Closing one
    # more pair asks for another pass in case a pass ran between the two closes.
    b.close()
    a.close()
    x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    x.close()
    y.close()


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
