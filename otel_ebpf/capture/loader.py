"""Load bpf/syscalls.c with BCC, attach its tracepoints, and run the ring buffer.

Contract:
    capture = Capture(CaptureOptions(...), stats)
    capture.start(on_event)      # compile, attach, open the ring buffer (CaptureError)
    capture.poll(timeout_ms)     # drain: on_event(ConnOpenEvent|DataEvent|ConnCloseEvent)
    capture.loss_counters()      # {"ringbuf_full": n, "truncated_bytes": n, ...}
    capture.set_pid_filter(pids) # None/empty = every process (the daemon never)
    capture.detach()             # no new events; what is queued can still be polled
    capture.close()              # detach + free (idempotent)
    capture.bpf, capture.options # for the OpenSSL uprobes (capture/tls.py)

Start-up quirks of the project's machines are handled here: tracefs is mounted when
missing, the kernel-headers link BCC insists on is made when Debian headers are
installed (see otel_ebpf/preflight.py). Every start-up failure raises CaptureError
with a one-line diagnosis and fix. Probes that the kernel lacks are feature-detected:
required syscall tracepoints missing -> CaptureError; optional ones (sock_*_length,
tcp_rcv_space_adjust, inet_sock_set_state) only cost precision, logged once.

Port selection is not done in the kernel: ports are not known for sockets older than
us at syscall time, so conntrack filters on ports in user space.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from otel_ebpf.capture import CaptureError
from otel_ebpf.capture.events import Event
from otel_ebpf.capture.reader import RecordHandler, RingReader
from otel_ebpf.preflight import OPTIONAL_TRACEPOINTS, SYSCALLS
from otel_ebpf.stats import Stats

log = logging.getLogger(__name__)

MAIN_SOURCE = "syscalls.c"

# Index -> name of the per-CPU `counters` array (CNT_* in bpf/include/events.h).
LOSS_COUNTERS: tuple[str, ...] = (
    "ringbuf_full", "truncated_events", "truncated_bytes", "conn_table_full",
    "iovec_skipped", "mmsg_skipped", "stash_full", "conn_reset", "not_http", "read_fault",
)
# Stats names of the kernel counters: real losses under `capture.lost.` (summed into
# the stats line's lost_total), by-design truncation and information beside them.
STATS_NAMES: dict[str, str] = {
    "ringbuf_full": "capture.lost.ringbuf_full",
    "conn_table_full": "capture.lost.conn_table_full",
    "iovec_skipped": "capture.lost.iovec_skipped",
    "mmsg_skipped": "capture.lost.mmsg_skipped",
    "stash_full": "capture.lost.stash_full",
    "read_fault": "capture.lost.read_fault",
    "truncated_events": "capture.truncated_events",
    "truncated_bytes": "capture.truncated_bytes",
    "conn_reset": "capture.conn_reset",
    "not_http": "capture.not_http_connections",
}
CFG_SELECT = 0  # config[] index and bits, as in bpf/include/maps.h
CFG_FAST_PATH = 1
SELECT_ENABLED = 1
SELECT_PID_FILTER = 2
STATS_INTERVAL_S = 1.0
# Longest one poll() keeps draining a busy ring buffer before it returns to the loop.
POLL_BUDGET_S = 0.05
PRUNE_INTERVAL_S = 30.0


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """Kernel capture settings (YAML section `capture:`, env OTEL_EBPF_CAPTURE_*)."""

    # Bytes captured per data chunk (power of two, 16..16384); the rest is counted.
    max_capture_bytes: int = 4096
    # Ring buffer size in KiB (power of two, >= 64 KiB; one per host, shared by CPUs).
    ringbuf_kib: int = 8192
    # Connections the kernel tracks at once; beyond, new ones are missed and counted.
    max_kernel_connections: int = 65536
    # iovec segments walked per readv/writev/recvmsg/sendmsg (1..16; verifier bound).
    max_iovecs: int = 16
    # Trace only these processes (tgids); None = every process except the daemon.
    pids: tuple[int, ...] | None = None
    # Attach OpenSSL uprobes (capture/tls.py) and compile bpf/openssl.h in.
    tls: bool = True
    # Settle common HTTP/1.x exchanges in the kernel (one record per exchange); false
    # sends every connection through the chunk stream (debugging, parity checks).
    fast_path: bool = True
    # Longest request head (request line + headers) the fast path takes, in bytes
    # (power of two, 64..4096); longer heads take the chunk stream.
    request_head_bytes: int = 1024


def bpf_source_dir() -> Path:
    """Where bpf/ is; the one place packaging changes (see otel_ebpf/resources.py)."""
    from otel_ebpf.resources import ResourceError, bpf_dir

    try:
        return bpf_dir()
    except ResourceError as exc:
        raise CaptureError(str(exc)) from None


_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


def flatten_source(path: Path, _seen: set[Path] | None = None) -> str:
    """The C source with our own `#include "..."` files inlined (with #line markers).

    BCC rewrites map calls (`m.lookup(&k)`) only in the main file: in an included
    header they compile to an invalid indirect call ("unknown opcode 8d"). Inlining our
    headers keeps them one compilation unit while errors still name the real file.
    """
    seen = set() if _seen is None else _seen
    path = path.resolve()
    if path in seen:
        return ""  # include guards would make it empty anyway
    seen.add(path)
    try:
        lines = path.read_text().splitlines(keepends=True)
    except OSError as exc:
        raise CaptureError("cannot read BPF source %s: %s; reinstall otel-ebpf or fix "
                           "OTEL_EBPF_BPF_DIR" % (path, exc.strerror)) from None
    out = ['#line 1 "%s"\n' % path]
    for number, line in enumerate(lines, 1):
        match = _INCLUDE.match(line)
        target = path.parent / match.group(1) if match else None
        if target is not None and target.is_file():
            out.append(flatten_source(target, seen))
            out.append('#line %d "%s"\n' % (number + 1, path))
        else:
            out.append(line)
    return "".join(out)


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def validate(options: CaptureOptions) -> None:
    # 16 KiB max: the per-CPU scratch record (header + bytes) must stay under the
    # kernel's 32 KiB per-CPU map value limit with room to spare.
    if not _power_of_two(options.max_capture_bytes) or not 16 <= options.max_capture_bytes <= 16384:
        raise CaptureError("capture.max_capture_bytes=%d must be a power of two between 16 and "
                           "16384 (e.g. 4096)" % options.max_capture_bytes)
    if not _power_of_two(options.ringbuf_kib) or options.ringbuf_kib < 64:
        raise CaptureError("capture.ringbuf_kib=%d must be a power of two >= 64 (e.g. 8192)"
                           % options.ringbuf_kib)
    if options.max_kernel_connections < 1:
        raise CaptureError("capture.max_kernel_connections must be >= 1 (e.g. 65536)")
    if not _power_of_two(options.request_head_bytes) or not 64 <= options.request_head_bytes <= 4096:
        raise CaptureError("capture.request_head_bytes=%d must be a power of two between 64 and "
                           "4096 (e.g. 1024)" % options.request_head_bytes)
    if not 1 <= options.max_iovecs <= 16:
        raise CaptureError("capture.max_iovecs=%d must be between 1 and 16 (the BPF verifier "
                           "rejects longer loops)" % options.max_iovecs)


class Capture:
    """The kernel half of the pipeline; see the module docstring for the API."""

    def __init__(self, options: CaptureOptions | None = None, stats: Stats | None = None) -> None:
        self.options = options or CaptureOptions()
        self.stats = stats if stats is not None else Stats()
        self.bpf = None  # the bcc.BPF object once started (TLS attaches uprobes on it)
        self.features: dict[str, bool] = {}
        self._reader: RingReader | None = None
        self._attached = False
        self._closed = False
        self._next_stats = 0.0
        self._next_prune = 0.0

    # -- start-up -----------------------------------------------------------------

    def cflags(self, features: dict[str, bool]) -> list[str]:
        o = self.options
        pages = o.ringbuf_kib * 1024 // os.sysconf("SC_PAGE_SIZE")
        flags = [
            "-DMAX_CAPTURE_BYTES=%d" % o.max_capture_bytes,
            "-DRINGBUF_PAGES=%d" % max(pages, 1),
            "-DMAX_CONNS=%d" % o.max_kernel_connections,
            "-DMAX_IOVECS=%d" % o.max_iovecs,
            "-DREQ_HEAD_MAX=%d" % o.request_head_bytes,
            "-DSELF_TGID=%d" % os.getpid(),
            "-I%s" % bpf_source_dir(),
            "-Wno-unused-function",
        ]
        flags += sorted({"-D%s" % flag for (_, _, flag) in OPTIONAL_TRACEPOINTS
                         if features.get(flag)})
        if o.tls:
            flags.append("-DWITH_OPENSSL")
        if features.get("OTEL_REGS_FALLBACK"):
            flags.append("-DOTEL_REGS_FALLBACK")
        return flags

    def start(self, on_event: Callable[[Event], object],
              handlers: Mapping[int, RecordHandler] | None = None) -> None:
        """Compile, load and attach; then events flow to on_event from poll(), and
        records of the kinds in `handlers` (EVENT_EXCHANGE) to their handler."""
        if self.bpf is not None:
            raise CaptureError("Capture.start() called twice; create a new Capture")
        validate(self.options)
        from otel_ebpf import preflight

        from otel_ebpf.privileges import (
            capture_privilege_problem,
            kernel_version,
            privilege_warnings,
        )

        # Capabilities, not uid 0: the systemd unit runs unprivileged with a minimal set.
        problem = capture_privilege_problem(self.options.tls)
        if problem:
            raise CaptureError(problem)
        for warning in privilege_warnings(tls=self.options.tls):
            log.warning("%s", warning)
        try:
            from bcc import BPF
        except ImportError:
            raise CaptureError(preflight.BCC_MISSING) from None
        preflight.ensure_tracefs()
        preflight.ensure_kernel_headers()
        missing = [name for name in SYSCALLS
                   if not (BPF.tracepoint_exists("syscalls", "sys_enter_" + name)
                           and BPF.tracepoint_exists("syscalls", "sys_exit_" + name))]
        if missing:
            raise CaptureError("this kernel lacks the syscall tracepoints for %s "
                               "(CONFIG_FTRACE_SYSCALLS); capture needs a kernel built with them"
                               % ", ".join(missing))
        features: dict[str, bool] = {}
        for category, event, flag in OPTIONAL_TRACEPOINTS:
            ok = BPF.tracepoint_exists(category, event)
            features[flag] = features.get(flag, True) and ok
            if not ok:
                log.warning("tracepoint %s:%s is missing: %s", category, event,
                            preflight.OPTIONAL_CONSEQUENCE.get(event, "less precision"))
        # Syscalls already in flight when we attach (a server blocked in recv/accept)
        # are recovered from the saved user registers: x86_64 ABI, kernel >= 5.15.
        features["OTEL_REGS_FALLBACK"] = (platform.machine() == "x86_64"
                                          and kernel_version() >= (5, 15))
        self.features = features
        source = bpf_source_dir() / MAIN_SOURCE
        text = flatten_source(source)
        started = time.monotonic()
        try:
            bpf = BPF(text=text.encode(), cflags=self.cflags(features))
        except Exception as exc:  # BCC raises bare Exception for compile/load/attach errors
            raise CaptureError(self._explain(exc, source)) from None
        self.bpf = bpf
        self._attached = True
        try:
            # Vectored calls with more than max_iovecs segments continue here.
            cont = bpf.load_func(b"iov_continue", BPF.TRACEPOINT)
            bpf[b"iov_tail"][ctypes.c_int(0)] = ctypes.c_int(cont.fd)
        except Exception as exc:
            self.close()
            raise CaptureError(self._explain(exc, source)) from None
        log.info("BPF programs compiled, verified and attached in %.1f s (%d tracepoints)",
                 time.monotonic() - started, len(getattr(bpf, "tracepoint_fds", {})))
        # Before tracing starts: a connection's path is chosen when it opens.
        bpf[b"config"][ctypes.c_int(CFG_FAST_PATH)] = ctypes.c_uint64(int(self.options.fast_path))
        self.set_pid_filter(self.options.pids)
        self._reader = RingReader(on_event, self.stats, handlers)
        bpf[b"events"].open_ring_buffer(self._reader.callback)

    @staticmethod
    def _explain(exc: Exception, source: Path) -> str:
        msg = str(exc)
        if "Failed to compile" in msg:
            return ("compiling %s failed (compiler messages above); check the kernel headers "
                    "link /lib/modules/%s/build (scripts/bootstrap.sh makes it)"
                    % (source, os.uname().release))
        if "Failed to load BPF program" in msg:
            return ("the kernel verifier rejected a BPF program (%s; log above); try a smaller "
                    "capture.max_iovecs or report this kernel version (%s)"
                    % (msg, os.uname().release))
        if "attach" in msg.lower():
            return "attaching a tracepoint failed (%s); is tracefs mounted and are we root?" % msg
        return "loading the BPF programs failed: %s" % msg

    # -- runtime ------------------------------------------------------------------

    def set_pid_filter(self, pids: Iterable[int] | None) -> None:
        """Trace only these tgids (None or empty: all). The daemon is always excluded."""
        bpf = self._require()
        table = bpf[b"pid_filter"]
        table.clear()
        wanted = sorted(set(pids or ()))
        for pid in wanted:
            table[ctypes.c_uint32(pid)] = ctypes.c_uint8(1)
        # Also switches tracing on: the kernel side traces nothing until this first call.
        select = SELECT_ENABLED | (SELECT_PID_FILTER if wanted else 0)
        bpf[b"config"][ctypes.c_int(CFG_SELECT)] = ctypes.c_uint64(select)

    def poll(self, timeout_ms: int) -> int:
        """Drain the ring buffer (waiting up to timeout_ms); returns events handled.

        Returns 0 when not started (or after close), so a shutdown path may call it
        unconditionally."""
        bpf = self.bpf
        if bpf is None or self._closed:
            return 0
        reader = self._reader
        before = reader.events + reader.decode_errors
        reader.deadline = time.monotonic() + POLL_BUDGET_S
        bpf.ring_buffer_poll(timeout_ms)
        now = time.monotonic()
        if now >= self._next_stats:
            self._next_stats = now + STATS_INTERVAL_S
            self.flush_stats()
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL_S
            self.prune_connections()
        return reader.events + reader.decode_errors - before

    def loss_counters(self) -> dict[str, int]:
        """Kernel-side loss/health counters, summed over CPUs, since start."""
        bpf = self._require()
        table = bpf[b"counters"]
        out = {}
        for index, name in enumerate(LOSS_COUNTERS):
            out[name] = int(sum(table[ctypes.c_int(index)]))
        return out

    def flush_stats(self) -> None:
        if self._reader is not None:
            self._reader.flush_stats()
        if self.bpf is not None:
            for name, value in self.loss_counters().items():
                self.stats.set_total(STATS_NAMES[name], value)

    def tracked_connections(self) -> int:
        return len(self._require()["conns"])

    def prune_connections(self) -> int:
        """Forget kernel entries of exited processes (their fds closed without close(2))."""
        bpf = self._require()
        table = bpf[b"conns"]
        keys = list(table.keys())
        # One /proc lookup per process, not per connection (a server holds thousands).
        gone = {tgid for tgid in {key.tgid for key in keys}
                if not os.path.exists("/proc/%d" % tgid)}
        dead = [key for key in keys if key.tgid in gone]
        for key in dead:
            try:
                del table[key]
            except KeyError:
                pass
        if dead:
            self.stats.add("capture.kernel_conns_pruned", len(dead))
        return len(dead)

    # -- shutdown -----------------------------------------------------------------

    def detach(self) -> None:
        """Detach every probe (tracepoints and uprobes); idempotent. Poll still drains."""
        bpf = self.bpf
        if bpf is None or not self._attached:
            return
        self._attached = False
        for tp in list(getattr(bpf, "tracepoint_fds", {})):
            try:
                bpf.detach_tracepoint(tp)
            except Exception as exc:  # keep detaching the rest
                log.warning("detaching tracepoint %s failed: %s", tp, exc)
        for ev_name in list(getattr(bpf, "uprobe_fds", {})):
            try:
                bpf.detach_uprobe_event(ev_name)
            except Exception as exc:
                log.warning("detaching uprobe %s failed: %s", ev_name, exc)

    def close(self) -> None:
        """Detach and free the BPF object; idempotent."""
        if self._closed:
            return
        self._closed = True
        self.detach()
        if self.bpf is not None:
            try:
                self.flush_stats()
            except Exception:  # stats are best effort at shutdown
                pass
            try:
                self.bpf.cleanup()
            except Exception as exc:
                log.warning("freeing the BPF object failed: %s", exc)

    def _require(self):
        if self.bpf is None:
            raise CaptureError("capture is not started: call Capture.start(on_event) first")
        return self.bpf

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
