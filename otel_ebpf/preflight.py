"""What this kernel and machine allow: the diagnosis behind `otel-ebpf check`.

Contract: `diagnose()` returns one `Check` per capability (privileges, bcc, libbpf, tracefs,
each syscall tracepoint, the sock/tcp tracepoints, uprobes, ring buffer, BTF, kernel
headers, kprobes), each saying what was seen, what happens without it and how to fix
it; `capture_possible(checks)` says whether `otel-ebpf run` can start. Diagnosis only
reads, except two idempotent fixes the daemon's start-up also applies (and `check`
applies too, so its answer matches what `run` will do): mounting tracefs and linking
the installed Debian kernel headers where BCC looks for them (`ensure_tracefs`,
`ensure_kernel_headers`, used by capture/loader.py; failures raise CaptureError).
Nothing here loads a BPF program.
"""

from __future__ import annotations

import glob
import gzip
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from otel_ebpf.capture import CaptureError

log = logging.getLogger(__name__)

TRACEFS_DIRS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
BTF_PATH = "/sys/kernel/btf/vmlinux"
BCC_MISSING = (
    "the bcc Python module is not importable: install Debian's python3-bpfcc "
    "(apt-get install python3-bpfcc bpfcc-tools) and run with /usr/bin/python3 or a venv "
    "made with --system-site-packages (scripts/bootstrap.sh does both)"
)
HEADERS_FIX = ("apt-get install linux-headers-amd64, then ln -s /usr/src/linux-headers-<ver>-amd64 "
               "/lib/modules/$(uname -r)/build (scripts/bootstrap.sh does both)")
# Why each optional tracepoint matters (also used by the loader's warnings).
OPTIONAL_CONSEQUENCE = {
    "sock_send_length": "sockets older than the daemon are recognised by their bytes only "
                        "(a regular file starting with 'GET ' could be mistaken for one)",
    "sock_recv_length": "sockets older than the daemon are recognised by their bytes only",
    "tcp_rcv_space_adjust": "addresses of connections older than the daemon come from /proc "
                            "instead of the kernel",
    "inet_sock_set_state": "connection addresses come from accept/connect arguments and /proc "
                           "instead of the kernel",
}
# The syscalls whose enter+exit tracepoints capture requires (checked here and by the
# loader before compiling).
SYSCALLS: tuple[str, ...] = (
    "accept", "accept4", "connect", "close", "read", "readv", "recvfrom", "recvmsg",
    "recvmmsg", "write", "writev", "sendto", "sendmsg", "sendmmsg", "sendfile64",
)
# Optional tracepoints: (category, event, -D flag that compiles the program in).
OPTIONAL_TRACEPOINTS: tuple[tuple[str, str, str], ...] = (
    ("sock", "sock_send_length", "HAVE_SOCK_LENGTH"),
    ("sock", "sock_recv_length", "HAVE_SOCK_LENGTH"),
    ("tcp", "tcp_rcv_space_adjust", "HAVE_TCP_RCV_SPACE_ADJUST"),
    ("sock", "inet_sock_set_state", "HAVE_INET_SOCK_SET_STATE"),
)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str  # what was seen
    consequence: str = ""  # what will not work without it (when not ok)
    fix: str = ""  # how to get it (when not ok)
    required: bool = True  # capture is impossible without it


# -- fixes applied at start-up ----------------------------------------------------------


def tracefs_path() -> str | None:
    for path in TRACEFS_DIRS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


def ensure_tracefs() -> str:
    """The tracefs mount point, mounting it at /sys/kernel/tracing when missing."""
    path = tracefs_path()
    if path:
        return path
    if os.geteuid() != 0:
        raise CaptureError("tracefs is not mounted and only root can mount it: "
                           "sudo mount -t tracefs tracefs /sys/kernel/tracing")
    result = subprocess.run(["mount", "-t", "tracefs", "tracefs", TRACEFS_DIRS[0]],
                            capture_output=True, text=True, check=False)
    path = tracefs_path()
    if path is None:
        raise CaptureError("tracefs is not mounted and mounting it failed (%s): is "
                           "CONFIG_TRACING enabled? try: mount -t tracefs tracefs %s"
                           % ((result.stderr or "").strip() or "exit %d" % result.returncode,
                              TRACEFS_DIRS[0]))
    log.info("mounted tracefs at %s", path)
    return path


def headers_link() -> Path:
    return Path("/lib/modules") / os.uname().release / "build"


def installed_headers() -> list[str]:
    """Debian kernel header trees, oldest first."""
    trees = glob.glob("/usr/src/linux-headers-*-amd64") + glob.glob("/usr/src/linux-headers-*-arm64")

    def version_key(path: str) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", path)]

    return sorted(trees, key=version_key)


def ensure_kernel_headers() -> Path:
    """Headers where BCC looks; links the newest Debian tree there when missing.

    The running kernel (Firecracker) ships none; the 6.1 headers serve tracepoint and
    uprobe programs because their argument structs come from tracefs, not headers.
    """
    link = headers_link()
    if (link / "include").is_dir() or (link / "Makefile").is_file():
        return link
    trees = installed_headers()
    if not trees:
        raise CaptureError("no kernel headers at %s and none installed under /usr/src: %s"
                           % (link, HEADERS_FIX))
    if os.geteuid() != 0:
        raise CaptureError("no kernel headers at %s; as root: ln -s %s %s" % (link, trees[-1], link))
    try:
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            link.unlink()  # a dangling link from an uninstalled headers package
        link.symlink_to(trees[-1])
        common = trees[-1][: -len("-amd64")] + "-common" if trees[-1].endswith("-amd64") else None
        source = link.parent / "source"
        if common and os.path.isdir(common) and not source.exists():
            source.symlink_to(common)
    except OSError as exc:
        raise CaptureError("cannot link kernel headers %s -> %s (%s): %s"
                           % (link, trees[-1], exc.strerror, HEADERS_FIX)) from None
    log.info("linked kernel headers %s -> %s", link, trees[-1])
    return link


# -- the diagnosis ----------------------------------------------------------------------


def _kernel_config() -> dict[str, str]:
    for path in ("/proc/config.gz", "/boot/config-%s" % os.uname().release):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:  # type: ignore[operator]
                out = {}
                for line in f:
                    if line.startswith("CONFIG_"):
                        key, _, value = line.strip().partition("=")
                        out[key] = value
                    elif line.startswith("# CONFIG_") and line.rstrip().endswith("is not set"):
                        out[line.split()[1]] = "n"
                return out
        except OSError:
            continue
    return {}


def _tracepoint_exists(tracefs: str | None, category: str, event: str) -> bool:
    return bool(tracefs) and os.path.isdir(os.path.join(tracefs, "events", category, event))


def diagnose() -> list[Check]:
    checks: list[Check] = []
    from otel_ebpf.privileges import capture_privilege_problem, kernel_version, privilege_warnings

    problem = capture_privilege_problem()
    who = "root" if os.geteuid() == 0 else "uid %d" % os.geteuid()
    checks.append(Check(
        "privileges", problem is None,
        "running as %s with the capabilities capture needs" % who if problem is None else problem,
        "no BPF program can be loaded",
        "run as root (sudo otel-ebpf ...) or with packaging/systemd/otel-ebpf.service's "
        "capabilities"))
    for warning in privilege_warnings():
        checks.append(Check("privileges (partial)", True, warning))

    try:
        import bcc  # noqa: F401

        checks.append(Check("bcc", True, "bcc Python module importable"))
    except ImportError:
        checks.append(Check("bcc", False, "bcc Python module not importable",
                            "BPF programs cannot be compiled or loaded", BCC_MISSING))

    try:
        from otel_ebpf.capture.bpfmap import libbpf

        libbpf()
        checks.append(Check("libbpf", True, "libbpf.so.1 loadable (the daemon reads BPF maps "
                            "through it; BCC runs only in the compile step)"))
    except CaptureError as exc:
        checks.append(Check("libbpf", False, str(exc), "the daemon cannot read its BPF maps",
                            "apt-get install libbpf1"))

    tracefs = tracefs_path()
    if tracefs is None and os.geteuid() == 0:
        try:
            tracefs = ensure_tracefs()
        except CaptureError as exc:
            log.debug("mounting tracefs failed: %s", exc)
    checks.append(Check(
        "tracefs", tracefs is not None,
        "mounted at %s" % tracefs if tracefs else "not mounted",
        "no tracepoint can be attached",
        "mount -t tracefs tracefs /sys/kernel/tracing (otel-ebpf run does it as root)"))

    missing = [s for s in SYSCALLS
               if not (_tracepoint_exists(tracefs, "syscalls", "sys_enter_" + s)
                       and _tracepoint_exists(tracefs, "syscalls", "sys_exit_" + s))]
    checks.append(Check(
        "syscall tracepoints", bool(tracefs) and not missing,
        "all %d present (enter+exit): %s" % (len(SYSCALLS), " ".join(SYSCALLS)) if tracefs and not missing
        else "missing: %s" % (", ".join(missing) if tracefs else "tracefs not mounted"),
        "plaintext HTTP cannot be captured", "a kernel with CONFIG_FTRACE_SYSCALLS=y"))

    for category, event, _ in OPTIONAL_TRACEPOINTS:
        ok = _tracepoint_exists(tracefs, category, event)
        checks.append(Check(
            "tracepoint %s:%s" % (category, event), ok, "present" if ok else "absent",
            OPTIONAL_CONSEQUENCE[event], "a newer kernel (optional)", required=False))

    config = _kernel_config()
    uprobes = os.path.exists(os.path.join(tracefs or TRACEFS_DIRS[0], "uprobe_events")) \
        or config.get("CONFIG_UPROBE_EVENTS") == "y"
    pmu = os.path.exists("/sys/bus/event_source/devices/uprobe/type")
    detail = "uprobe_events available" if uprobes else "no uprobe_events in tracefs"
    if uprobes:
        detail += ("; uprobe PMU present (used with CAP_SYS_ADMIN, else tracefs events)"
                   if pmu else "; no uprobe PMU: tracefs events")
    checks.append(Check(
        "uprobes", uprobes, detail,
        "HTTPS (OpenSSL) plaintext is not captured; plaintext HTTP still is",
        "a kernel with CONFIG_UPROBE_EVENTS=y", required=False))

    version = kernel_version()
    ringbuf = version >= (5, 8)
    checks.append(Check(
        "ring buffer", ringbuf, "kernel %d.%d (BPF ring buffer needs >= 5.8)" % version,
        "events cannot be delivered to user space", "a kernel >= 5.8"))

    btf = os.path.exists(BTF_PATH)
    checks.append(Check(
        "BTF", btf, "%s present" % BTF_PATH if btf else "%s absent" % BTF_PATH,
        "nothing today (our programs read only tracepoint fields and user memory)",
        "a kernel with CONFIG_DEBUG_INFO_BTF=y", required=False))

    link = headers_link()
    have = (link / "include").is_dir() or (link / "Makefile").is_file()
    trees = installed_headers()
    if have:
        detail = "%s -> %s" % (link, os.path.realpath(link))
        if os.path.basename(os.path.realpath(link)).find(os.uname().release) < 0:
            detail += " (another kernel's headers: fine, we use no kernel structs)"
    elif trees:
        detail = "no %s; %s is installed and will be linked at start-up" % (link, trees[-1])
    else:
        detail = "no %s and none installed under /usr/src" % link
    checks.append(Check("kernel headers", have or bool(trees), detail,
                        "BCC cannot compile the BPF programs", HEADERS_FIX))

    kprobes = config.get("CONFIG_KPROBES") == "y" or os.path.exists(
        os.path.join(tracefs or TRACEFS_DIRS[0], "kprobe_events"))
    checks.append(Check(
        "kprobes", kprobes, "available" if kprobes else "absent (CONFIG_KPROBES not set)",
        "nothing: otel-ebpf uses tracepoints and uprobes only", "not needed", required=False))
    return checks


def capture_possible(checks: list[Check]) -> bool:
    """True when every required check passed."""
    return all(c.ok for c in checks if c.required)
