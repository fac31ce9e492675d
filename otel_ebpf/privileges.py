"""Does this process hold what capture needs? Capabilities, not "are we root".

Contract: `capture_privilege_problem(tls)` returns None when the process can load and
attach the BPF programs, else a one-line diagnosis with the fix (for CaptureError);
`privilege_warnings(tls)` lists what works but degrades (for logs and `check`).
Both read the effective capability set from /proc/self/status, so root in a container
with every capability dropped is refused, and an unprivileged user with the systemd
unit's capabilities (packaging/systemd/otel-ebpf.service) is accepted.

What is needed, measured on 6.18 as uid nobody (tests/integration/test_capabilities.py):
- CAP_BPF + CAP_PERFMON (kernel >= 5.8; before that only CAP_SYS_ADMIN): load, attach;
- file access to tracefs (mode 0700, root-owned): root by ownership, anyone else
  CAP_DAC_OVERRIDE or CAP_DAC_READ_SEARCH;
- TLS (OpenSSL uprobes): root, CAP_SYS_ADMIN (the kernel's uprobe PMU refuses
  CAP_PERFMON alone) or CAP_DAC_OVERRIDE (the daemon then writes tracefs' uprobe_events,
  otel_ebpf/capture/attach.py);
- CAP_SYS_PTRACE to read other users' /proc/PID/{environ,root} (service.name,
  libssl inside containers): without it capture works with less metadata;
- kernels < 5.11 charge BPF maps to RLIMIT_MEMLOCK: CAP_SYS_RESOURCE or a high limit.
"""

from __future__ import annotations

import os
import re
import resource

# Linux capability numbers (include/uapi/linux/capability.h).
CAPABILITIES = {
    "CAP_DAC_OVERRIDE": 1,
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}
UNIT_HINT = ("run as root, or grant the capabilities (systemd: AmbientCapabilities= as in "
             "packaging/systemd/otel-ebpf.service; containers: --cap-add / capabilities.add)")
MEMLOCK_NEEDED = 64 << 20


def effective_capabilities(status_text: str | None = None) -> set[str]:
    """Names from CAPABILITIES held in the effective set (CapEff of /proc/self/status)."""
    if status_text is None:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                status_text = f.read()
        except OSError:
            return set()
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)$", status_text, re.M)
    if not match:
        return set()
    bits = int(match.group(1), 16)
    return {name for name, bit in CAPABILITIES.items() if bits >> bit & 1}


def kernel_version() -> tuple[int, int]:
    """(major, minor) of the running kernel; (0, 0) when unparsable."""
    match = re.match(r"(\d+)\.(\d+)", os.uname().release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def capture_privilege_problem(
    tls: bool = True,
    caps: set[str] | None = None,
    euid: int | None = None,
    kernel: tuple[int, int] | None = None,
) -> str | None:
    """None when capture can start, else what is missing and how to fix it."""
    caps = effective_capabilities() if caps is None else caps
    euid = os.geteuid() if euid is None else euid
    kernel = kernel_version() if kernel is None else kernel
    admin = "CAP_SYS_ADMIN" in caps
    missing: list[str] = []
    if kernel < (5, 8):
        if not admin:
            missing.append("CAP_SYS_ADMIN (kernel %d.%d predates CAP_BPF/CAP_PERFMON)" % kernel)
    elif not admin:
        missing += [c for c in ("CAP_BPF", "CAP_PERFMON") if c not in caps]
    if euid != 0 and not caps & {"CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH"}:
        missing.append("CAP_DAC_READ_SEARCH (tracefs is readable by root only)")
    if tls and euid != 0 and not admin and "CAP_DAC_OVERRIDE" not in caps:
        missing.append("CAP_DAC_OVERRIDE for OpenSSL uprobes (or run with --no-tls)")
    if not missing:
        return None
    who = "root" if euid == 0 else "uid %d" % euid
    return "running as %s without %s: %s" % (who, ", ".join(missing), UNIT_HINT)


def privilege_warnings(
    caps: set[str] | None = None,
    euid: int | None = None,
    kernel: tuple[int, int] | None = None,
    memlock: tuple[int, int] | None = None,
    tls: bool = True,
) -> list[str]:
    """What works without these privileges, but less well."""
    caps = effective_capabilities() if caps is None else caps
    euid = os.geteuid() if euid is None else euid
    kernel = kernel_version() if kernel is None else kernel
    warnings: list[str] = []
    if tls and "CAP_SYS_ADMIN" not in caps:
        warnings.append(
            "no CAP_SYS_ADMIN: OpenSSL uprobes go through tracefs, so a function another "
            "tool already probes through the uprobe PMU cannot be attached, and the "
            "daemon's tracefs uprobe events outlive it until its next start removes them; "
            "add CAP_SYS_ADMIN (packaging/systemd/tls-containers.conf) for those")
    if "CAP_SYS_PTRACE" not in caps:
        warnings.append(
            "no CAP_SYS_PTRACE: other users' /proc/PID/environ and /proc/PID/root are "
            "unreadable, so their OTEL_SERVICE_NAME and containerised libssl are missed")
    if kernel < (5, 11) and "CAP_SYS_RESOURCE" not in caps:
        soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK) if memlock is None else memlock
        if hard != resource.RLIM_INFINITY and hard < MEMLOCK_NEEDED:
            warnings.append(
                "kernel %d.%d charges BPF maps to RLIMIT_MEMLOCK (hard limit %d bytes) and "
                "CAP_SYS_RESOURCE is missing: loading may fail; set LimitMEMLOCK=infinity"
                % (kernel[0], kernel[1], hard))
    return warnings
