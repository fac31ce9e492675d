"""Process plumbing for the benchmark: start/stop real programs, read their CPU and RSS.

Every program the harness starts goes through `Proc`, which owns exactly that child (and
the session it leads, so nginx's workers go with their master) and stops it on exit,
including after an exception. CPU time and RSS come from /proc, the same numbers `top`
shows; nothing here samples anything the harness did not start.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.receiver import free_port  # noqa: F401 (re-exported to the harness)

log = logging.getLogger(__name__)

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchmarkError(RuntimeError):
    """A peer could not be started or measured; the message says which and why."""


def wait_port(port: int, timeout: float = 20.0, proc: subprocess.Popen | None = None,
              what: str = "server") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchmarkError("%s exited with %s before listening on 127.0.0.1:%d"
                                 % (what, proc.returncode, port))
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise BenchmarkError("%s: nothing listens on 127.0.0.1:%d after %.0fs" % (what, port, timeout))


class Proc:
    """One child process: started pinned (optional), logged to a file, always stopped."""

    def __init__(self, name: str, argv: Sequence[str], logdir: Path,
                 cpus: set[int] | None = None, env: dict[str, str] | None = None,
                 cwd: Path | None = None, stdout=None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = logdir / ("%s.log" % name)
        self.cpus = cpus
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self._stdout = stdout
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> Proc:
        cpus = self.cpus
        # Affinity is set in the child before exec, so children it forks (nginx workers)
        # inherit it; sched_setaffinity after Popen would race with those forks.
        preexec = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.argv, cwd=self.cwd, env=self.env, preexec_fn=preexec,
                stdout=self._stdout if self._stdout is not None else self._log,
                stderr=self._log, start_new_session=True)
        except OSError as exc:
            raise BenchmarkError("cannot start %s (%s): %s" % (self.name, self.argv[0], exc)) from exc
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored signal %d for %.0fs; killing its session",
                            self.name, proc.pid, sig, timeout)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Leftover children of the session we created (e.g. an orphaned nginx worker).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self._log:
            self._log.close()
            self._log = None
        return proc.returncode

    def __enter__(self) -> Proc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime + stime of a process (all its threads), in seconds; with
    `reaped_children`, plus cutime + cstime (children it has waited for)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime/stime/cutime/cstime are fields 14-17
    # -> indexes 11-14.
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def rss_bytes(pid: int) -> int:
    with open("/proc/%d/statm" % pid) as f:
        return int(f.read().split()[1]) * PAGE


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (children of all its threads, recursively),
    from /proc/PID/task/*/children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir("/proc/%d/task" % parent)
        except OSError:
            continue
        for task in tasks:
            try:
                with open("/proc/%d/task/%s/children" % (parent, task)) as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                if kid not in out:
                    out.append(kid)
                    todo.append(kid)
    return out


def tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    return [pid, *descendants(pid)]


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process tree: utime + stime + cutime + cstime of every live member, so
    a child that exits (and is reaped by a member) between two reads keeps counting."""
    total = 0.0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += cpu_seconds(p, reaped_children=True)
    return total


def tree_rss_bytes(pid: int) -> int:
    """RSS summed over a process tree (pages shared between members count once per
    member, as `top` would add them up; tree_pss_bytes() splits them)."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += rss_bytes(p)
    return total


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size summed over a process tree (shared pages split between
    the processes mapping them), from /proc/PID/smaps_rollup."""
    total = 0
    for p in tree(pid):
        with contextlib.suppress(OSError), open("/proc/%d/smaps_rollup" % p) as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


COMPILER_LIBS = ("libLLVM", "libclang")


def compiler_mappings(pid: int) -> dict[int, list[str]]:
    """{pid: [mapped libLLVM/libclang files]} over a process tree (from
    /proc/PID/maps); empty when no member maps BCC's compiler."""
    out: dict[int, list[str]] = {}
    for p in tree(pid):
        found: set[str] = set()
        with contextlib.suppress(OSError), open("/proc/%d/maps" % p) as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and any(lib in parts[5] for lib in COMPILER_LIBS):
                    found.add(os.path.basename(parts[5].strip()))
        if found:
            out[p] = sorted(found)
    return out


def rss_breakdown(pid: int) -> dict[str, float]:
    """RssAnon (heap, Python objects), RssFile (mapped libraries, e.g. LLVM), RssShmem, MB."""
    out: dict[str, float] = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def machine_info() -> dict[str, object]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "memory_gib": round(mem_kb / 1048576, 1),
        "python": platform.python_version(),
        "hostname": platform.node(),
    }


def versions() -> dict[str, str]:
    """Versions of the peers, so a table can be reproduced."""
    out: dict[str, str] = {}
    for name, argv in (("nginx", ["nginx", "-v"]), ("wrk", ["wrk", "--version"]),
                       ("node", ["node", "--version"])):
        try:
            res = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            text = (res.stdout + res.stderr).strip().splitlines()
            first = text[0] if text else "?"
        except (OSError, subprocess.TimeoutExpired):
            first = "missing"
        # "nginx version: nginx/1.22.1", "wrk debian/4.1.0-3+b2 [epoll] ...", "v20.20.2"
        out[name] = first.split()[-1] if name == "nginx" else \
            " ".join(first.split()[:2]) if name == "wrk" else "node " + first
    try:
        import bcc
        out["bcc"] = "bcc " + getattr(bcc, "__version__", "?")
    except ImportError:
        out["bcc"] = "bcc missing"
    try:
        from importlib.metadata import version
        out["rotel"] = "rotel " + version("rotel")
    except Exception:  # noqa: BLE001  (metadata of an optional peer; never fatal)
        out["rotel"] = "rotel ?"
    return out
