"""Load bpf/syscalls.c (compiled by BCC in a short-lived child), hold its probes and
maps as file descriptors, and drain the ring buffer.

Contract:
    capture = Capture(CaptureOptions(...), stats)
    capture.start(on_event)      # compile, attach, open the ring buffer (CaptureError)
    capture.poll(timeout_ms)     # drain: on_event(ConnOpenEvent|DataEvent|ConnCloseEvent)
    capture.loss_counters()      # {"ringbuf_full": n, "truncated_bytes": n, ...}
    capture.set_pid_filter(pids) # None/empty = every process (the daemon never)
    capture.set_port_filter(ports) # None/empty = every port
    capture.ignore_pid(pid), unignore_pid(pid), take_execs()
                                 # discovery's deny-list (otel_ebpf/discovery.py)
    capture.tracked_connections(), connection_keys(), prune_connections()
    capture.attach_uprobe(path, offset, program, retprobe) -> fd; detach_probes(fds)
                                 # the OpenSSL uprobes (capture/tls.py)
    capture.maps, capture.programs, capture.features, capture.options
    capture.detach()             # no new events; what is queued can still be polled
    capture.close()              # detach + free (idempotent)

Process model: start() runs `python -m otel_ebpf.capture.compile` (a fresh interpreter)
which imports BCC, compiles, verifies, attaches the tracepoints, loads the OpenSSL
programs and hands every fd over a socketpair (SCM_RIGHTS), then exits. This process
never imports bcc: maps are read through libbpf.so.1 (capture/bpfmap.py), the ring
buffer is drained from its mmap (capture/ringbuf.py), later uprobes are attached with
perf_event_open (capture/attach.py). The compile step's errors arrive here as the same
one-line CaptureError they always were.

Start-up quirks of the project's machines are handled here: tracefs is mounted when
missing, the kernel-headers link BCC insists on is made when Debian headers are
installed (see otel_ebpf/preflight.py). Every start-up failure raises CaptureError
with a one-line diagnosis and fix. Probes that the kernel lacks are feature-detected:
required syscall tracepoints missing -> CaptureError; optional ones (sock_*_length,
tcp_rcv_space_adjust, inet_sock_set_state) only cost precision, logged once.

Port selection is done in the kernel where it can be (bpf/syscalls.c conn_select: a
connection whose two ports are known and unselected emits nothing, counted as
capture.select.dropped_connections); what goes out before the kernel knows both ports
(the first chunk of a socket older than us) still reaches user space, where conntrack
filters it.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otel_ebpf.capture import CaptureError
from otel_ebpf.capture.events import Event
from otel_ebpf.capture.reader import RecordHandler, RingReader
from otel_ebpf.preflight import OPTIONAL_TRACEPOINTS
from otel_ebpf.stats import Stats

log = logging.getLogger(__name__)

MAIN_SOURCE = "syscalls.c"

# Index -> name of the per-CPU `counters` array (CNT_* in bpf/include/events.h).
LOSS_COUNTERS: tuple[str, ...] = (
    "ringbuf_full", "truncated_events", "truncated_bytes", "conn_table_full",
    "iovec_skipped", "mmsg_skipped", "stash_full", "conn_reset", "not_http", "read_fault",
    "fast_exchanges", "fast_fallbacks", "pending_full", "fast_fb_request", "fast_fb_response",
    "fast_fb_overrun", "fast_fb_order", "fast_fb_closed", "fast_fb_other", "select_dropped",
    "h2_walk_lost", "h2_frame_hints",
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
    "fast_exchanges": "capture.fast.exchanges",
    "fast_fallbacks": "capture.fast.fallbacks",
    "pending_full": "capture.fast.pending_full",
    "fast_fb_request": "capture.fast.fallback.request_head",
    "fast_fb_response": "capture.fast.fallback.response_head",
    "fast_fb_overrun": "capture.fast.fallback.overrun",
    "fast_fb_order": "capture.fast.fallback.order",
    "fast_fb_closed": "capture.fast.fallback.closed",
    "fast_fb_other": "capture.fast.fallback.other",
    "select_dropped": "capture.select.dropped_connections",
    "h2_walk_lost": "capture.http2.walk_lost",
    "h2_frame_hints": "capture.http2.frame_hints",
}
CFG_SELECT = 0  # config[] index and bits, as in bpf/include/maps.h
CFG_FAST_PATH = 1
SELECT_ENABLED = 1
SELECT_PID_FILTER = 2
SELECT_PORT_FILTER = 4
SELECT_PID_IGNORE = 8
MAX_PORT_FILTER = 1024  # port_filter entries (bpf/include/maps.h)
STATS_INTERVAL_S = 1.0
# Longest one poll() keeps draining a busy ring buffer before it returns to the loop.
POLL_BUDGET_S = 0.05
PRUNE_INTERVAL_S = 30.0
# The compile step takes ~7 s on an idle 2-CPU machine; much longer means it is stuck.
COMPILE_TIMEOUT_S = 300.0
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_CONN_KEY = struct.Struct("<Ii")  # struct conn_key_t {u32 tgid; s32 fd}


@dataclass(frozen=True, slots=True)
class CaptureOptions:
    """Kernel capture settings (YAML section `capture:`, env OTEL_EBPF_CAPTURE_*)."""

    # Bytes captured per data chunk (power of two, 16..16384); the rest is counted.
    max_capture_bytes: int = 4096
    # Ring buffer size in KiB (power of two, >= 64 KiB; one per host, shared by CPUs).
    # The daemon maps it whole, so it counts fully in its RSS. 4 MiB holds ~400 ms at
    # 50k exchanges/s of ~200-byte fast-path records, ~170 ms of the chunk stream at the
    # 15k exchanges/s one core decodes (~1.6 KB, 5 records per exchange, measured).
    ringbuf_kib: int = 4096
    # Connections the kernel tracks at once; beyond, new ones are missed and counted.
    max_kernel_connections: int = 65536
    # iovec segments walked per readv/writev/recvmsg/sendmsg (1..16; verifier bound).
    max_iovecs: int = 16
    # Trace only these processes (tgids); None = every process except the daemon.
    pids: tuple[int, ...] | None = None
    # Trace only connections with a local or remote port in this set; None = all. The
    # kernel drops what it can tell is outside it; conntrack filters the rest.
    ports: frozenset[int] | None = None
    # Attach OpenSSL uprobes (capture/tls.py) and compile bpf/openssl.h in.
    tls: bool = True
    # Settle common HTTP/1.x exchanges in the kernel (one record per exchange); false
    # sends every connection through the chunk stream (debugging, parity checks).
    fast_path: bool = True
    # Longest request head (request line + headers) the fast path takes, in bytes
    # (power of two, 64..1024); longer heads take the chunk stream.
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
    # 1024 max: the head parser's loops are walked by the verifier once per word, and
    # 2048 takes the read/write programs past its 1M-instruction budget.
    if not _power_of_two(options.request_head_bytes) or not 64 <= options.request_head_bytes <= 1024:
        raise CaptureError("capture.request_head_bytes=%d must be a power of two between 64 and "
                           "1024 (the BPF verifier's budget), e.g. 1024"
                           % options.request_head_bytes)
    if options.ports and (len(options.ports) > MAX_PORT_FILTER
                          or not all(1 <= p <= 65535 for p in options.ports)):
        raise CaptureError("capture.ports: at most %d ports, each 1..65535 (the kernel "
                           "filter's size)" % MAX_PORT_FILTER)
    if not 1 <= options.max_iovecs <= 16:
        raise CaptureError("capture.max_iovecs=%d must be between 1 and 16 (the BPF verifier "
                           "rejects longer loops)" % options.max_iovecs)


class Capture:
    """The kernel half of the pipeline; see the module docstring for the API."""

    def __init__(self, options: CaptureOptions | None = None, stats: Stats | None = None) -> None:
        self.options = options or CaptureOptions()
        self.stats = stats if stats is not None else Stats()
        self.features: dict[str, bool] = {}
        # What the compile step handed over, by name: maps (BpfMap), OpenSSL programs
        # (fd, attached later by capture/tls.py); tracepoint and uprobe attachments (fd).
        self.maps: dict[str, Any] = {}
        self.programs: dict[str, int] = {}
        self._tracepoints: dict[str, int] = {}
        self._uprobes: set[int] = set()
        self._tracefs_events: dict[int, str] = {}  # uprobe fd -> its tracefs event
        self._ring = None
        self._reader: RingReader | None = None
        self._started = False
        self._attached = True
        self._closed = False
        self._select = 0
        self.compile_s = 0.0
        # The tgid the kernel side never traces: ours (the compile step is another one).
        self.self_tgid = os.getpid()
        self._next_stats = 0.0
        self._next_prune = 0.0
        self.wakeups = 0  # polls whose drain found at least one record

    # -- start-up -----------------------------------------------------------------

    def cflags(self, features: dict[str, bool]) -> list[str]:
        o = self.options
        pages = o.ringbuf_kib * 1024 // os.sysconf("SC_PAGE_SIZE")
        flags = [
            "-DMAX_CAPTURE_BYTES=%d" % o.max_capture_bytes,
            "-DRINGBUF_PAGES=%d" % max(pages, 1),
            "-DMAX_CONNS=%d" % o.max_kernel_connections,
            "-DMAX_IOVECS=%d" % o.max_iovecs,
            "-DMAX_PORT_FILTER=%d" % MAX_PORT_FILTER,
            "-DREQ_HEAD_MAX=%d" % o.request_head_bytes,
            # Wake the reader once 1/16 of the ring (at most 256 KiB) is queued; below,
            # it drains on its poll timeout.
            "-DWAKEUP_BYTES=%d" % min(o.ringbuf_kib * 1024 // 16, 256 * 1024),
            "-DSELF_TGID=%d" % self.self_tgid,
            "-I%s" % bpf_source_dir(),
            "-Wno-unused-function",
        ]
        flags += sorted({"-D%s" % flag for (_, _, flag) in OPTIONAL_TRACEPOINTS
                         if features.get(flag)})
        if o.tls:
            flags.append("-DWITH_OPENSSL")
        if features.get("OTEL_REGS_FALLBACK"):
            flags.append("-DOTEL_REGS_FALLBACK")
        if features.get("HAVE_TASK_STORAGE"):
            flags.append("-DHAVE_TASK_STORAGE")
        return flags

    def start(self, on_event: Callable[[Event], object],
              handlers: Mapping[int, RecordHandler] | None = None) -> None:
        """Compile, load and attach; then events flow to on_event from poll(), and
        records of the kinds in `handlers` (EVENT_EXCHANGE) to their handler.

        The compiling happens in a short-lived child (otel_ebpf/capture/compile.py),
        which hands over the maps, the tracepoint attachments and the OpenSSL programs
        as file descriptors: BCC and its compiler never enter this process."""
        if self._started:
            raise CaptureError("Capture.start() called twice; create a new Capture")
        validate(self.options)
        from otel_ebpf.privileges import capture_privilege_problem, privilege_warnings

        # Capabilities, not uid 0: the systemd unit runs unprivileged with a minimal set.
        problem = capture_privilege_problem(self.options.tls)
        if problem:
            raise CaptureError(problem)
        for warning in privilege_warnings(tls=self.options.tls):
            log.warning("%s", warning)
        from otel_ebpf.capture.bpfmap import libbpf

        libbpf()  # fail before compiling when libbpf.so.1 is missing
        if self.options.tls:
            from otel_ebpf.capture.attach import sweep_tracefs_events

            swept = sweep_tracefs_events()
            if swept:
                log.info("removed %d tracefs uprobes left by earlier daemons", swept)
        started = time.monotonic()
        handover, fds = self._run_compile_step()
        self._started = True
        self._take_handover(handover, fds)
        self.compile_s = float(handover.get("compile_s", 0.0))
        log.info("BPF programs compiled, verified and attached in %.1f s (%d tracepoints; "
                 "compile step %.1f s)", self.compile_s, len(self._tracepoints),
                 time.monotonic() - started)
        try:
            # Before tracing starts: a connection's path is chosen when it opens.
            self._set_config(CFG_FAST_PATH, int(self.options.fast_path))
            self.set_port_filter(self.options.ports)
            self.set_pid_filter(self.options.pids)  # switches tracing on: last
            from otel_ebpf.capture.ringbuf import RingBuffer

            events = self.maps["events"]
            self._ring = RingBuffer(events.fd, events.max_entries)
        except Exception:
            self.close()
            raise
        self._reader = RingReader(on_event, self.stats, handlers)

    def _run_compile_step(self) -> tuple[dict, list[int]]:
        """Spawn `python -m otel_ebpf.capture.compile`, return its handover and fds."""
        import json
        import socket
        import subprocess
        import sys

        from otel_ebpf.capture.compile import MAX_FDS, MAX_MESSAGE, options_to_json

        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_root, env.get("PYTHONPATH")) if p)
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "otel_ebpf.capture.compile", str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                # Its messages go where ours do; stdout may be the jsonl stream (--output -).
                stdout=sys.stderr.fileno() if sys.stderr is not None else subprocess.DEVNULL,
                env=env)
        except OSError as exc:
            ours.close()
            theirs.close()
            raise CaptureError("cannot start the BPF compile step (%s -m "
                               "otel_ebpf.capture.compile): %s" % (sys.executable, exc)) from None
        theirs.close()  # the child's end: EOF here when the child is gone
        fds: list[int] = []
        try:
            level = logging.getLevelName(logging.getLogger("otel_ebpf").getEffectiveLevel())
            ours.sendall(json.dumps({"options": options_to_json(self.options),
                                     "self_tgid": os.getpid(), "log_level": level}).encode())
            ours.settimeout(COMPILE_TIMEOUT_S)
            msg, fds, flags, _ = socket.recv_fds(ours, MAX_MESSAGE, MAX_FDS)
        except (OSError, socket.timeout) as exc:
            child.kill()
            child.wait()
            _close_fds(fds)
            raise CaptureError("the BPF compile step (pid %d) did not answer: %s"
                               % (child.pid, exc)) from None
        finally:
            ours.close()
        if flags & socket.MSG_CTRUNC:
            _close_fds(fds)
            child.wait()
            raise CaptureError("the BPF compile step handed over more file descriptors "
                               "than fit one message (RLIMIT_NOFILE too low?)")
        code = child.wait()
        if not msg:
            raise CaptureError("the BPF compile step (pid %d) exited with status %d before "
                               "handing over (its messages are above); nothing stays "
                               "attached" % (child.pid, code))
        handover = json.loads(msg)
        if not handover.get("ok"):
            _close_fds(fds)
            raise CaptureError(handover.get("error") or "the BPF compile step failed")
        return handover, fds

    def _take_handover(self, handover: dict, fds: list[int]) -> None:
        from otel_ebpf.capture.bpfmap import BpfMap

        self.features = dict(handover.get("features", {}))
        maps, attachments, programs = (handover["maps"], handover["attachments"],
                                       handover["programs"])
        if len(fds) != len(maps) + len(attachments) + len(programs):
            _close_fds(fds)
            raise CaptureError("the BPF compile step handed over %d fds for %d objects"
                               % (len(fds), len(maps) + len(attachments) + len(programs)))
        it = iter(fds)
        for m in maps:
            self.maps[m["name"]] = BpfMap(next(it), m["name"], m["type"], m["key_size"],
                                          m["value_size"], m["max_entries"])
        for name in attachments:
            self._tracepoints[name] = next(it)
        for name in programs:
            self.programs[name] = next(it)

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

    @property
    def started(self) -> bool:
        return self._started and not self._closed

    def _set_config(self, index: int, value: int) -> None:
        self._map("config").update(_U32.pack(index), _U64.pack(value))

    def set_pid_filter(self, pids: Iterable[int] | None) -> None:
        """Trace only these tgids (None or empty: all). The daemon is always excluded."""
        table = self._map("pid_filter")
        wanted = sorted(set(pids or ()))
        keep = {_U32.pack(pid) for pid in wanted}
        for key in table.keys():
            if key not in keep:
                table.delete(key)
        for key in keep:
            table.update(key, b"\x01")
        # Also switches tracing on: the kernel side traces nothing until this first call.
        self._select = (SELECT_ENABLED | (self._select & (SELECT_PORT_FILTER | SELECT_PID_IGNORE))
                        | (SELECT_PID_FILTER if wanted else 0))
        self._set_config(CFG_SELECT, self._select)

    def set_port_filter(self, ports: Iterable[int] | None) -> None:
        """Trace only connections with a local or remote port in `ports` (None or empty:
        all). A connection keeps a verdict the kernel already made (at its first
        syscalls, mostly); the kernel drops only where it knows both ports, so user
        space keeps filtering too. Does not switch tracing on (set_pid_filter does)."""
        table = self._map("port_filter")
        wanted = sorted(set(ports or ()))
        if len(wanted) > table.max_entries:
            raise CaptureError("%d ports selected; the kernel filter holds at most %d"
                               % (len(wanted), table.max_entries))
        keep = {_U16.pack(port) for port in wanted}
        if not wanted:  # bit off first: an emptied map with the bit on drops everything
            self._select &= ~SELECT_PORT_FILTER
            self._set_config(CFG_SELECT, self._select)
        for key in keep:  # new ports in before the bit (or stale ports out) ...
            table.update(key, b"\x01")
        if wanted:
            self._select |= SELECT_PORT_FILTER
            self._set_config(CFG_SELECT, self._select)
        for key in table.keys():  # ... so nothing selected is dropped meanwhile
            if key not in keep:
                table.delete(key)

    def ignore_pid(self, pid: int) -> bool:
        """Stop tracing this tgid (discovery judged it not reported) until it execs or
        exits; False when the kernel's table is full (user space still drops its
        exchanges) or the map is absent."""
        table = self.maps.get("pid_ignored")
        if table is None:
            return False
        try:
            table.update(_U32.pack(pid), b"\x01")
        except OSError:
            self.stats.add("discovery.kernel_ignore_failed")
            return False
        if not self._select & SELECT_PID_IGNORE:
            self._select |= SELECT_PID_IGNORE
            self._set_config(CFG_SELECT, self._select)
        return True

    def unignore_pid(self, pid: int) -> None:
        table = self.maps.get("pid_ignored")
        if table is not None:
            table.delete(_U32.pack(pid))

    def take_execs(self) -> list[int]:
        """tgids that exec'd since the last call (the kernel lists them in select_execs),
        so that their process is resolved and judged again; [] without the map."""
        table = self.maps.get("select_execs")
        if table is None:
            return []
        keys = table.keys()
        for key in keys:
            table.delete(key)
        return [_U32.unpack(key[:4])[0] for key in keys]

    def poll(self, timeout_ms: int) -> int:
        """Wait up to timeout_ms for the ring buffer, then drain it; returns events handled.

        The kernel may not wake us below its fill threshold (BPF_RB_NO_WAKEUP), so a
        timeout is not "nothing there": whatever is queued is drained either way.
        Returns 0 when not started (or after close), so a shutdown path may call it
        unconditionally."""
        ring = self._ring
        if ring is None or self._closed:
            return 0
        reader = self._reader
        before = reader.events + reader.decode_errors
        if timeout_ms > 0 and not ring.pending():
            ring.wait(timeout_ms)
        reader.deadline = time.monotonic() + POLL_BUDGET_S
        if ring.drain(reader.on_record):
            self.wakeups += 1  # drains that found records: records per wake-up = events / this
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
        table = self._map("counters")
        out = {}
        for index, name in enumerate(LOSS_COUNTERS):
            out[name] = sum(_U64.unpack(v)[0] for v in table.values_per_cpu(_U32.pack(index)))
        return out

    def flush_stats(self) -> None:
        if self._reader is not None:
            self._reader.flush_stats()
            self.stats.set_total("capture.wakeups", self.wakeups)
        if self.started:
            for name, value in self.loss_counters().items():
                self.stats.set_total(STATS_NAMES[name], value)

    def connection_keys(self) -> list[tuple[int, int]]:
        """(tgid, fd) of every connection the kernel tracks."""
        return [_CONN_KEY.unpack(key) for key in self._map("conns").keys()]

    def pending_exchanges(self) -> list[tuple[int, int, bytes]]:
        """(tgid, fd, struct pending_t bytes) of every exchange in flight in the kernel
        fast path (few: only those between request and response end)."""
        table = self._map("pending")
        out = []
        for key in table.keys():
            value = table.lookup(key)
            if value is not None:  # finished between keys() and lookup()
                out.append((*_CONN_KEY.unpack(key), value))
        return out

    def forget_pending(self, tgid: int, fd: int) -> bool:
        """Drop a fast-path exchange in flight (reported as timed out by user space);
        the kernel hands its connection to the chunk stream at its next bytes."""
        return self._map("pending").delete(_CONN_KEY.pack(tgid, fd))

    def tracked_connections(self) -> int:
        return len(self._map("conns"))

    def prune_connections(self) -> int:
        """Forget kernel entries of exited processes (their fds closed without close(2)):
        connections, and exchanges the fast path held in flight for them."""
        conns, pending = self._map("conns"), self._map("pending")
        keys = conns.keys()
        pending_keys = pending.keys()
        # One /proc lookup per process, not per connection (a server holds thousands).
        tgids = {_CONN_KEY.unpack(key)[0] for key in keys + pending_keys}
        gone = {tgid for tgid in tgids if not os.path.exists("/proc/%d" % tgid)}
        dead = [key for key in keys if _CONN_KEY.unpack(key)[0] in gone]
        for key in dead:
            conns.delete(key)
        for key in pending_keys:
            if _CONN_KEY.unpack(key)[0] in gone:
                pending.delete(key)
        if dead:
            self.stats.add("capture.kernel_conns_pruned", len(dead))
        return len(dead)

    # -- uprobes (capture/tls.py) ---------------------------------------------------

    def attach_uprobe(self, path: str, offset: int, program: str, retprobe: bool = False) -> int:
        """Attach a handed-over program at file offset `offset` of `path`; returns the
        attachment's fd (for detach_probes). OSError/KeyError when it cannot."""
        if not self.started or not self._attached:
            raise OSError(9, "capture is not attached")
        from otel_ebpf.capture.attach import attach_uprobe

        fd = attach_uprobe(path, offset, self.programs[program], retprobe)
        self._uprobes.add(int(fd))
        if fd.event is not None:
            self._tracefs_events[int(fd)] = fd.event
        return int(fd)

    def detach_probes(self, fds: Iterable[int]) -> None:
        """Detach uprobes attach_uprobe() made. A tracefs-made one (no CAP_SYS_ADMIN) is
        closed synchronously, so its tracefs event can be deleted right after."""
        from otel_ebpf.capture.attach import release, remove_tracefs_event

        mine = [fd for fd in fds if fd in self._uprobes]
        self._uprobes.difference_update(mine)
        release([fd for fd in mine if fd not in self._tracefs_events])
        for fd in mine:
            event = self._tracefs_events.pop(fd, None)
            if event is not None:
                _close_fds([fd])
                remove_tracefs_event(event)

    # -- shutdown -----------------------------------------------------------------

    def detach(self) -> None:
        """Stop every probe (tracepoints and uprobes); idempotent. Poll still drains.

        Tracing is switched off in the kernel first (config[CFG_SELECT] = 0: every
        program returns at its first check), so nothing is emitted from here on; the
        attachments are then given up without waiting for the kernel to unregister
        them (~70 ms per tracepoint; see otel_ebpf/capture/attach.py)."""
        if not self._started or not self._attached:
            return
        self._attached = False
        try:
            self._set_config(CFG_SELECT, 0)
        except OSError as exc:
            log.warning("switching capture off in the kernel failed: %s", exc)
        from otel_ebpf.capture.attach import release

        fds = list(self._tracepoints.values()) + sorted(self._uprobes)
        self._tracepoints.clear()
        self._uprobes.clear()
        # Their tracefs events (if any) outlive us: the next start sweeps them.
        self._tracefs_events.clear()
        release(fds)

    def close(self) -> None:
        """Detach and free the maps and programs; idempotent."""
        if self._closed:
            return
        self.detach()
        if self._started:
            try:
                self.flush_stats()
            except Exception:  # stats are best effort at shutdown
                pass
        self._closed = True
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for table in self.maps.values():
            table.close()
        _close_fds(self.programs.values())
        self.programs.clear()

    def map_memory(self) -> dict[str, int]:
        """Kernel memory per map (key + value x max entries), for `otel-ebpf check`."""
        return {name: m.kernel_bytes() for name, m in self.maps.items()}

    def _map(self, name: str):
        if not self._started:
            raise CaptureError("capture is not started: call Capture.start(on_event) first")
        try:
            return self.maps[name]
        except KeyError:
            raise CaptureError("the BPF object has no map %r (bpf/ and otel_ebpf from "
                               "different versions?)" % name) from None

    def __enter__(self) -> Capture:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def compile_report(options: CaptureOptions) -> dict:
    """Run the compile step as `run` would, keep nothing: its handover description
    (maps with key/value sizes and max entries, features, compile time), for
    `otel-ebpf check`. The programs stay switched off (nothing is selected) until the
    kernel releases them, a few seconds later. CaptureError as from start()."""
    from otel_ebpf.capture.attach import release

    validate(options)
    handover, fds = Capture(options)._run_compile_step()
    release(fds)
    return handover


def map_kernel_bytes(m: dict, cpus: int) -> int:
    """Memory of one handed-over map's entries: (key + value) x max entries; per-CPU
    values once per possible CPU; a ring buffer its data size."""
    from otel_ebpf.capture.bpfmap import BPF_MAP_TYPE_RINGBUF, PERCPU_TYPES

    if m["type"] == BPF_MAP_TYPE_RINGBUF:
        return m["max_entries"]
    value = (m["value_size"] + 7) & ~7
    copies = cpus if m["type"] in PERCPU_TYPES else 1
    return (m["key_size"] + value * copies) * m["max_entries"]


def _close_fds(fds: Iterable[int]) -> None:
    for fd in list(fds):
        try:
            os.close(fd)
        except OSError:
            pass
