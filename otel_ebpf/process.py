"""Who is pid N: the OpenTelemetry resource attributes of an observed process.

Contract. In: a pid (tgid) seen in an HttpExchange. Out: a cached `ProcessInfo` whose
`resource_attributes` dict is built directly (not with `Resource.create`, which would
add the daemon's own attributes) and encoded by otel_ebpf/telemetry:

  service.name         the target's own OTEL_SERVICE_NAME, else service.name from its
                       OTEL_RESOURCE_ATTRIBUTES (both read from /proc/PID/environ), else
                       its executable name
  service.instance.id  the target's own, else uuid5(host.id, pid, start time): stable
                       for the life of the process, new when the pid is reused
  (other keys of the target's OTEL_RESOURCE_ATTRIBUTES, e.g. deployment.environment)
  process.pid / parent_pid / executable.name / executable.path / command_args /
  command_line / owner / creation.time (ISO 8601, UTC), host.name, host.id (/etc/machine-id), os.type,
  container.id (from /proc/PID/cgroup, v1 and v2 layouts), telemetry.sdk.* and
  telemetry.distro.* naming this daemon.

process.command_args is argv as /proc/PID/cmdline holds it (what the semantic
conventions define for Linux), process.command_line the same arguments as one string
(kept for the readers that expect it); both are redacted by default with the shared
rules of telemetry/redact.py (the redacted_query_params list: `--password X`,
`TOKEN=...`, URL credentials, ...), lose the trailing empty arguments a rewritten argv
leaves (`nginx: worker process`), and are bounded to _MAX_COMMAND_LINE characters.

Discovery (otel_ebpf/discovery.py), when given: each process is judged once, as its
ProcessInfo is built (so per pid and start time, like the cache), from the attributes
just read; `ProcessInfo.selected` holds the verdict and a matching selector's
service.name / service.namespace override the resource. `forget(pid)` (the daemon calls
it when the kernel reports an exec) makes the next lookup read and judge it again.

A process that vanished yields None; one that denies access (environ, exe of another
user's process without root) yields the attributes that could be read. Neither raises;
both are counted: process.vanished, process.access_denied. Memory is bounded: at most
`max_entries` processes are cached; `forget(pid)` on exec and `sweep()` (drops entries
whose pid was reused, by comparing the kernel start time, and those gone for longer
than _EXITED_GRACE_S) keep it small.

Short-lived processes. A one-shot client (curl) often exits before user space has
emitted its exchanges: the kernel is ahead of us by a ring buffer. So an exited
process keeps its identity: its cached ProcessInfo stays for _EXITED_GRACE_S after a
sweep first finds it gone, and the kernel's task name (`note_name`, from CONN_OPEN and
EXCHANGE records) stays until evicted by newer names or the pid is reused, so a lookup
after that still names the process (process.executable.name = the task name) instead
of giving None. A name noted after a failed lookup wins over the negative cache.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from urllib.parse import unquote

import psutil

from otel_ebpf import __version__
from otel_ebpf.discovery import Discovery, ProcessFacts
from otel_ebpf.telemetry.redact import QueryRedactor

log = logging.getLogger(__name__)

AttributeValue = str | int | list[str]

_default_redactor = QueryRedactor()

DISTRO_NAME = "otel-ebpf"
# A fixed namespace so that service.instance.id is reproducible from (host, pid, start).
_INSTANCE_NAMESPACE = uuid.UUID("6f1c2a1e-0b7a-5d3e-9a52-3e0c1f0e8b4d")
_MAX_COMMAND_LINE = 1024  # a resource is sent with every batch: keep it small
_NEGATIVE_TTL_S = 5.0  # how long "pid N is gone" is remembered
# How long an exited process's cached identity outlives it: its exchanges may still be
# in the ring buffer or in conntrack (a response read just before the exit).
_EXITED_GRACE_S = 30.0

# The container id is the 64-hex segment of the cgroup path, bare (cgroup v1:
# /docker/<id>, /kubepods/.../<id>) or wrapped by the runtime's systemd scope (v2 or the
# systemd driver: docker-<id>.scope, cri-containerd-<id>.scope, crio-<id>.scope,
# libpod-<id>.scope). conmon's own scope (crio-conmon-<id>) is not the container.
_CONTAINER_ID = re.compile(
    r"(?:^|/)(?:docker-|cri-containerd-|crio-|libpod-|containerd-)?([0-9a-f]{64})(?:\.scope)?(?=/|$)"
)


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    pid: int
    service_name: str
    executable_name: str
    resource_attributes: dict[str, AttributeValue]
    start_ticks: int  # /proc/PID/stat starttime: with pid, identifies the process
    selected: bool = True  # discovery's verdict: are its exchanges reported?


def container_id_from_cgroup(text: str) -> str | None:
    """The container id in a /proc/PID/cgroup file's text, or None."""
    for line in text.splitlines():
        # hierarchy-ID:controller-list:cgroup-path ; the path may itself contain ':'.
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2]
        if "conmon" in path:
            continue
        matches = _CONTAINER_ID.findall(path)
        if matches:
            return matches[-1]
    return None


def parse_resource_attributes(value: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES: comma-separated key=value, values percent-decoded (spec).
    Malformed members are skipped, as the SDKs do."""
    result: dict[str, str] = {}
    for member in value.split(","):
        key, sep, val = member.partition("=")
        key = key.strip()
        if not sep or not key:
            continue
        result[key] = unquote(val.strip())
    return result


def _iso8601(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def read_machine_id() -> str | None:
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as f:
                value = f.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            return value
    return None


def _sdk_version() -> str:
    try:
        from opentelemetry.sdk.version import __version__ as sdk_version
    except ImportError:  # the SDK is a dependency; this only guards odd installs
        return "unknown"
    return sdk_version


class ProcessResolver:
    """pid -> ProcessInfo, cached; see the module docstring."""

    def __init__(self, stats, max_entries: int = 4096, proc_root: str = "/proc",
                 container_attributes: Callable[[str], Mapping[str, str]] | None = None,
                 redact: QueryRedactor | None = None,
                 redact_command_line: bool = True,
                 discovery: Discovery | None = None,
                 pod_labels: Callable[[str], Mapping[str, str]] | None = None) -> None:
        self._stats = stats
        # Which processes are reported (None: all); pod_labels: container id -> labels.
        self._discovery = discovery if discovery is not None and discovery.active else None
        self._pod_labels = pod_labels
        # Called with each process judged not reported (the daemon silences it in the
        # kernel); set once capture has started.
        self.on_excluded: Callable[[ProcessInfo], object] | None = None
        # The same redactor (same sensitive names) as the exchange outputs use.
        self._redact = redact or _default_redactor
        self._redact_command_line = redact_command_line
        # container.id -> extra resource attributes (k8s.* from kubernetes_metadata).
        self._container_attributes = container_attributes
        self._max_entries = max_entries
        self._proc = proc_root
        self._cache: dict[int, ProcessInfo] = {}
        self._gone: dict[int, float] = {}  # pid -> monotonic time it was found missing
        # pid -> monotonic time a sweep first found the cached process gone (see above)
        self._exited: dict[int, float] = {}
        # pid -> task name the kernel reported (ConnOpenEvent.comm): the identity of a
        # process that exited before /proc could be read (a one-shot curl).
        self._names: dict[int, str] = {}
        self._host_name = socket.gethostname()
        self._host_id = read_machine_id()
        self._common: dict[str, AttributeValue] = {
            "host.name": self._host_name,
            "os.type": "linux",
            "telemetry.sdk.name": "opentelemetry",
            "telemetry.sdk.language": "python",
            "telemetry.sdk.version": _sdk_version(),
            "telemetry.distro.name": DISTRO_NAME,
            "telemetry.distro.version": __version__,
        }
        if self._host_id:
            self._common["host.id"] = self._host_id

    def __len__(self) -> int:
        return len(self._cache)

    def get(self, pid: int) -> ProcessInfo | None:
        info = self._cache.get(pid)
        if info is not None:
            return info
        gone_at = self._gone.get(pid)
        recently_gone = gone_at is not None and time.monotonic() - gone_at < _NEGATIVE_TTL_S
        info = None if recently_gone else self._build(pid)
        if info is None:
            # Gone: the kernel's task name, even if it was noted after the lookup that
            # found the process missing.
            name = self._names.get(pid)
            if name is not None:
                self._gone.pop(pid, None)
                info = self._from_name(pid, name)
                self._cache[pid] = info
                return info
            if not recently_gone:
                if len(self._gone) >= self._max_entries:
                    self._gone.clear()
                self._gone[pid] = time.monotonic()
            return None
        self._gone.pop(pid, None)
        if len(self._cache) >= self._max_entries:
            self.sweep()
            while len(self._cache) >= self._max_entries:  # still full: evict the oldest
                oldest = next(iter(self._cache))
                del self._cache[oldest]
                self._exited.pop(oldest, None)
        self._cache[pid] = info
        return info

    def note_name(self, pid: int, name: str | None) -> None:
        """Remember the kernel's name for pid, used only if /proc is gone by lookup (the
        latest one: a pid reused by another program gets its own)."""
        if name:
            names = self._names
            names.pop(pid, None)  # re-inserted last: the newest is evicted last
            while len(names) >= self._max_entries:  # evict the oldest, not all at once
                del names[next(iter(names))]
            names[pid] = name

    def _from_name(self, pid: int, name: str) -> ProcessInfo:
        self._stats.add("process.identified_by_comm")
        attrs: dict[str, AttributeValue] = {
            "service.name": name,
            "service.instance.id": str(uuid.uuid5(uuid.NAMESPACE_OID,
                                                  "%s/%d/%s" % (self._host_id, pid, name))),
            "process.pid": pid,
            "process.executable.name": name,
        }
        attrs.update(self._common)
        # start_ticks -1 never matches a live process: the next sweep() forgets it.
        return self._judged(ProcessInfo(pid, name, name, attrs, -1))

    def _judged(self, info: ProcessInfo) -> ProcessInfo:
        """info with discovery's verdict and overrides applied (as is without discovery)."""
        if self._discovery is None:
            return info
        verdict = self._discovery.decide(
            ProcessFacts.from_attributes(info.pid, info.resource_attributes, self._pod_labels))
        self._stats.add("discovery.selected_processes" if verdict.selected
                        else "discovery.excluded_processes")
        log.debug("pid %d (%s): %s, %s", info.pid, info.executable_name,
                  "reported" if verdict.selected else "not reported", verdict.reason)
        overrides = verdict.overrides()
        if not verdict.selected and self.on_excluded is not None:
            self.on_excluded(info)
        if not overrides and verdict.selected:
            return info
        info.resource_attributes.update(overrides)
        return ProcessInfo(info.pid, str(info.resource_attributes["service.name"]),
                           info.executable_name, info.resource_attributes, info.start_ticks,
                           verdict.selected)

    def cached(self, pid: int) -> ProcessInfo | None:
        """The cached ProcessInfo of pid, without resolving it."""
        return self._cache.get(pid)

    @property
    def cached_lookup(self) -> Callable[[int], ProcessInfo | None]:
        """`cached` without its Python frame (the cache's own dict.get), for callers that
        check a kept verdict per exchange. It stays valid for the resolver's lifetime:
        the cache is only ever changed in place, never replaced."""
        return self._cache.get

    def start_ticks(self, pid: int) -> int | None:
        """The kernel start time of pid (None when gone): with pid, the process's identity."""
        return self._start_ticks(pid)

    def program_changed(self, pid: int) -> bool:
        """Whether pid now runs another program (executable or arguments) than its cached
        ProcessInfo says: after an exec. False when not cached, gone or unreadable."""
        info = self._cache.get(pid)
        if info is None or info.start_ticks < 0:
            return False
        try:
            proc = psutil.Process(pid)  # as _build reads them, so that they compare
            exe, argv = proc.exe(), proc.cmdline()
        except (psutil.Error, OSError):
            return False
        attrs = info.resource_attributes
        args = self._command_args(argv) if argv else []
        return (exe != attrs.get("process.executable.path", exe)
                or (args or None) != attrs.get("process.command_args"))

    def forget(self, pid: int) -> None:
        self._cache.pop(pid, None)
        self._names.pop(pid, None)
        self._exited.pop(pid, None)

    def sweep(self) -> list[int]:
        """Drop entries whose pid now names another process, and those of processes
        gone for _EXITED_GRACE_S (their late exchanges keep the identity until then);
        returns their pids (so that per-pid state elsewhere can be forgotten too). The
        task name of an exited process is kept (see the module docstring)."""
        now = time.monotonic()
        stale = []
        for pid, info in self._cache.items():
            ticks = self._start_ticks(pid)
            if ticks == info.start_ticks:
                continue
            if ticks is None:  # exited: kept for a while, for its late exchanges
                exited_at = self._exited.setdefault(pid, now)
                if now - exited_at < _EXITED_GRACE_S:
                    continue
            else:  # the pid names another process now: its name is not this one's
                self._names.pop(pid, None)
            stale.append(pid)
        for pid in stale:
            del self._cache[pid]
            self._exited.pop(pid, None)
        for pid in [p for p, t in self._gone.items() if now - t >= _NEGATIVE_TTL_S]:
            del self._gone[pid]
        return stale

    def daemon_resource_attributes(self) -> dict[str, AttributeValue]:
        """Resource of the daemon's own health metrics: service.name "otel-ebpf"."""
        info = self._build(os.getpid(), own=True)
        attrs = dict(info.resource_attributes) if info else dict(self._common)
        attrs["service.name"] = DISTRO_NAME
        attrs["service.version"] = __version__
        return attrs


    # ---- building ----

    def _start_ticks(self, pid: int) -> int | None:
        try:
            with open("%s/%d/stat" % (self._proc, pid), "rb") as f:
                stat = f.read()
        except OSError:
            return None
        # comm (field 2) may contain spaces and ')': split after the last ')'.
        fields = stat[stat.rfind(b")") + 2:].split()
        try:
            return int(fields[19])  # field 22, starttime, in clock ticks since boot
        except (IndexError, ValueError):
            return None

    def _command_args(self, argv: list[str]) -> list[str]:
        """argv redacted (unless configured off), trailing empties dropped, bounded."""
        if self._redact_command_line:
            args = self._redact.command_args(argv)
        else:
            end = len(argv)
            while end and not argv[end - 1]:
                end -= 1
            args = list(argv[:end])
        budget = _MAX_COMMAND_LINE
        for i, arg in enumerate(args):
            if len(arg) >= budget:
                del args[i + 1:]
                args[i] = arg[:budget]
                break
            budget -= len(arg) + 1  # + the separator a joined line would have
        return args

    def _read_environ(self, pid: int) -> dict[str, str] | None:
        try:
            with open("%s/%d/environ" % (self._proc, pid), "rb") as f:
                raw = f.read()
        except PermissionError:
            return None
        except OSError:
            return {}
        env: dict[str, str] = {}
        for item in raw.split(b"\0"):
            if item.startswith(b"OTEL_"):
                key, _, value = item.partition(b"=")
                env[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        return env

    def _read_cgroup(self, pid: int) -> str | None:
        try:
            with open("%s/%d/cgroup" % (self._proc, pid), encoding="utf-8",
                      errors="replace") as f:
                return container_id_from_cgroup(f.read())
        except OSError:
            return None

    def _build(self, pid: int, own: bool = False) -> ProcessInfo | None:
        self._stats.add("process.lookups")
        start_ticks = self._start_ticks(pid)
        if start_ticks is None:
            self._stats.add("process.vanished")
            return None
        try:
            proc = psutil.Process(pid)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            self._stats.add("process.vanished")
            return None
        except psutil.Error:
            proc = None
        denied = gone = False
        attrs: dict[str, AttributeValue] = {"process.pid": pid}
        exe_name = ""

        def read(getter):
            nonlocal denied, gone
            try:
                return getter()
            except psutil.AccessDenied:
                denied = True
            except psutil.NoSuchProcess:  # includes ZombieProcess: it exited meanwhile
                gone = True
            except (psutil.Error, OSError):
                pass
            return None

        if proc is not None:
            with proc.oneshot():
                ppid = read(proc.ppid)
                name = read(proc.name)
                exe = read(proc.exe)
                cmdline = read(proc.cmdline)
                owner = read(proc.username)
                created = read(proc.create_time)
            if ppid is not None:
                attrs["process.parent_pid"] = ppid
            exe_name = os.path.basename(exe) if exe else (name or "")
            if exe_name:
                attrs["process.executable.name"] = exe_name
            if exe:
                attrs["process.executable.path"] = exe
            if cmdline:
                args = self._command_args(cmdline)
                if args:
                    attrs["process.command_args"] = args
                    attrs["process.command_line"] = (
                        self._redact.command_line(args)[:_MAX_COMMAND_LINE])
            if owner is None:
                uids = read(proc.uids)
                if uids is not None:
                    owner = str(uids.real)
            if owner:
                attrs["process.owner"] = owner
            if created is not None:
                attrs["process.creation.time"] = _iso8601(created)
            if gone:
                # A half-read exiting process would be cached with a wrong identity
                # (no executable: service.name unknown); report it as gone instead.
                self._stats.add("process.vanished")
                return None
        container_id = self._read_cgroup(pid)
        if container_id:
            attrs["container.id"] = container_id
            if self._container_attributes is not None:
                attrs.update(self._container_attributes(container_id))
        attrs.update(self._common)

        env = {} if own else self._read_environ(pid)
        if env is None:
            denied = True
            env = {}
        target_attrs = parse_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
        service_name = (env.get("OTEL_SERVICE_NAME", "").strip()
                        or target_attrs.get("service.name", "")
                        or exe_name or "unknown_service")
        # The target's own attributes describe it (deployment.environment, service.version,
        # its own service.instance.id); what we measured (process.*, host.*, telemetry.*)
        # stays authoritative.
        for key, value in target_attrs.items():
            if not key.startswith(("process.", "host.", "telemetry.", "os.")):
                attrs[key] = value
        attrs["service.name"] = service_name
        if "service.instance.id" not in attrs:
            attrs["service.instance.id"] = str(uuid.uuid5(
                _INSTANCE_NAMESPACE, "%s:%d:%d" % (self._host_id or self._host_name, pid,
                                                   start_ticks)))
        if denied:
            self._stats.add("process.access_denied")
            log.debug("pid %d: some attributes were not readable (access denied)", pid)
        return self._judged(ProcessInfo(pid, service_name, exe_name, attrs, start_ticks))


def daemon_resource_attributes(stats=None) -> dict[str, AttributeValue]:
    """The daemon's own resource (service.name "otel-ebpf"), for its health metrics."""
    from otel_ebpf.stats import Stats

    return ProcessResolver(stats if stats is not None else Stats()).daemon_resource_attributes()
