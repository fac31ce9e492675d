"""Service discovery: which processes are reported, and under which service name.

Configuration (YAML section `discovery:`, the shape OBI/Beyla users know):

    discovery:
      instrument:                 # report only processes matching one of these (empty: all)
        - exe_name: nginx         # criteria of one selector are ANDed ...
          open_ports: 80,8000-8099
          service_name: frontend  # ... and the first matching selector names the service
        - k8s_namespace: shop     # ... selectors are ORed
      exclude_instrument:         # never report processes matching one of these
        - cmd_args_regex: "--role=batch"
      default_exclude_instrument: # the daemon itself, collectors and backends; [] = none
        - ...

Criteria (each optional; a list value means any of its items):
  exe_name        glob on the executable's file name (/proc/PID/exe; the kernel's task
                  name when the process is already gone)
  exe_path        glob on the executable's full path ("*/node", "/usr/sbin/*")
  exe_path_regex  regular expression searched in the executable's full path
  cmd_args        glob on the command line (arguments joined by spaces, redacted as
                  process.command_line is)
  cmd_args_regex  regular expression searched in that command line
  open_ports      the process listens on one of these TCP ports ("80,443,8000-8099")
  container_id    glob on the container id (a bare id also matches as a prefix: the
                  12-character short id works)
  containers_only true: only processes in a container
  k8s_namespace, k8s_pod_name, k8s_container_name, k8s_owner_name (any owner kind:
                  deployment, replicaset, daemonset, statefulset, job): globs
  k8s_pod_labels  {label: glob}, every label given must match
Overrides: service_name / service_namespace (Beyla's `name` / `namespace` are accepted
too) replace service.name / service.namespace in the resource of matched processes,
winning over the process's own OTEL_SERVICE_NAME.

A process is reported when it matches no exclude selector (exclude_instrument and
default_exclude_instrument) and, if `instrument` is not empty, at least one of those.

When the verdict is made, and where it is applied. The verdict is made once per process
(pid and start time) when the daemon first hears of it: the first connection or
kernel-settled exchange of that pid, at the moment otel_ebpf/process.py resolves its
resource (ProcessResolver._judged), from the attributes it has just read. Processes
started after the daemon are therefore picked up like any other. A process found not
reported is then silenced in the kernel: its pid goes into the BPF map `pid_ignored`
(bpf/include/maps.h, Capture.ignore_pid), and every syscall and OpenSSL program returns
at its first check (traced_tgid), so its later traffic costs no ring-buffer record and
no user-space work. What it emitted before the verdict reached the kernel is dropped in
user space: the daemon's output asks the cached verdict (daemon.reported_only). The
kernel forgets an ignored pid when the process exits (sched_process_exit: a reused pid
starts unjudged) and when it execs (sched_process_exec, which also lists the pid in
`select_execs`); the daemon drains that list every loop pass and, when the pid now runs
another executable or command line, forgets its resource so that its next event judges
the new program (an exchange within that pass, ~100 ms, still gets the old verdict).

Costs, measured on the project's shared 2-core machine: judging a process ~13 us (beside
the ~470 us of /proc reads its resource costs anyway); `open_ports` adds ~100 us (it
reads the process's fds and the namespace's TCP tables), so it is evaluated last, only
when the other criteria of its selector matched; the output filter ~0.25 us per
exchange; in the kernel one hash lookup per syscall once any pid is ignored. A wrk load
of ~3,800 requests against an excluded server cost 81 ring-buffer records in all
(tests/integration/test_discovery.py), against two per exchange without the deny-list.

Why a deny-list fed at first sight, not the alternatives: feeding the kernel's allow-list
(pid_filter) with the pids of matching processes would need every new process found and
judged before its first byte (an exec watcher racing the program's first connect), or
its first exchanges are lost; judging in user space only would leave every excluded
process's traffic crossing the ring buffer forever (a collector taking OTLP/HTTP from
many agents: records per request, all thrown away).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import psutil


class SelectorError(ValueError):
    """A selector that cannot be used; the message names the key and the fix."""


# Criteria keys -> what the documentation calls their values (for error messages).
_GLOB_KEYS = ("exe_name", "exe_path", "cmd_args", "container_id", "k8s_namespace",
              "k8s_pod_name", "k8s_container_name", "k8s_owner_name")
_REGEX_KEYS = ("exe_path_regex", "cmd_args_regex")
_OVERRIDE_KEYS = {"service_name": "service_name", "service_namespace": "service_namespace",
                  "name": "service_name", "namespace": "service_namespace"}
_OTHER_KEYS = ("open_ports", "containers_only", "k8s_pod_labels")
KNOWN_KEYS = _GLOB_KEYS + _REGEX_KEYS + _OTHER_KEYS + tuple(_OVERRIDE_KEYS)
_OWNER_ATTRIBUTES = ("k8s.deployment.name", "k8s.replicaset.name", "k8s.daemonset.name",
                     "k8s.statefulset.name", "k8s.job.name", "k8s.cronjob.name")


def _glob_regex(patterns: tuple[str, ...], prefix: bool = False) -> re.Pattern | None:
    """One compiled regex matching any of the globs (fnmatch syntax, case-sensitive).
    prefix: a pattern without wildcards also matches as a prefix (short container ids)."""
    if not patterns:
        return None
    parts = []
    for p in patterns:
        body = fnmatch.translate(p)  # "(?s:...)\\Z"
        if prefix and not any(c in p for c in "*?["):
            body = fnmatch.translate(p + "*")
        parts.append(body)
    return re.compile("|".join("(?:%s)" % b for b in parts))


@dataclass(frozen=True)
class Selector:
    """One selector: criteria ANDed; empty criteria match everything."""

    where: str  # "discovery.instrument[0]": how logs and errors name it
    exe_name: tuple[str, ...] = ()
    exe_path: tuple[str, ...] = ()
    exe_path_regex: str | None = None
    cmd_args: tuple[str, ...] = ()
    cmd_args_regex: str | None = None
    open_ports: tuple[tuple[int, int], ...] = ()  # inclusive ranges
    container_id: tuple[str, ...] = ()
    containers_only: bool = False
    k8s_namespace: tuple[str, ...] = ()
    k8s_pod_name: tuple[str, ...] = ()
    k8s_container_name: tuple[str, ...] = ()
    k8s_owner_name: tuple[str, ...] = ()
    k8s_pod_labels: tuple[tuple[str, str], ...] = ()
    service_name: str | None = None
    service_namespace: str | None = None
    # Compiled forms (not part of equality: the sources above are).
    _compiled: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        c = self._compiled
        for key in _GLOB_KEYS:
            c[key] = _glob_regex(getattr(self, key), prefix=key == "container_id")
        for key in _REGEX_KEYS:
            source = getattr(self, key)
            c[key] = re.compile(source) if source is not None else None
        c["labels"] = tuple((k, _glob_regex((v,))) for k, v in self.k8s_pod_labels)

    @property
    def needs_kubernetes(self) -> bool:
        return bool(self.k8s_namespace or self.k8s_pod_name or self.k8s_container_name
                    or self.k8s_owner_name or self.k8s_pod_labels)

    def matches(self, facts: ProcessFacts) -> bool:
        c = self._compiled
        if c["exe_name"] is not None and not c["exe_name"].match(facts.exe_name):
            return False
        if c["exe_path"] is not None and not c["exe_path"].match(facts.exe_path):
            return False
        if c["exe_path_regex"] is not None and not c["exe_path_regex"].search(facts.exe_path):
            return False
        if c["cmd_args"] is not None and not c["cmd_args"].match(facts.command_line):
            return False
        if c["cmd_args_regex"] is not None and not c["cmd_args_regex"].search(facts.command_line):
            return False
        if self.containers_only and not facts.container_id:
            return False
        if c["container_id"] is not None and not (
                facts.container_id and c["container_id"].match(facts.container_id)):
            return False
        if self.needs_kubernetes and not self._kubernetes_matches(facts):
            return False
        if self.open_ports:  # last: it reads the process's fds
            ports = facts.listening_ports()
            if not any(lo <= p <= hi for p in ports for lo, hi in self.open_ports):
                return False
        return True

    def _kubernetes_matches(self, facts: ProcessFacts) -> bool:
        c, k8s = self._compiled, facts.kubernetes
        for key, attribute in (("k8s_namespace", "k8s.namespace.name"),
                               ("k8s_pod_name", "k8s.pod.name"),
                               ("k8s_container_name", "k8s.container.name")):
            # absent (not in Kubernetes, pod not indexed yet): no match, even for "*"
            if c[key] is not None and not (attribute in k8s and c[key].match(str(k8s[attribute]))):
                return False
        if c["k8s_owner_name"] is not None:
            owners = [str(k8s[a]) for a in _OWNER_ATTRIBUTES if a in k8s]
            if not any(c["k8s_owner_name"].match(o) for o in owners):
                return False
        if c["labels"]:
            labels = facts.pod_labels()
            for key, pattern in c["labels"]:
                if key not in labels or not pattern.match(labels[key]):
                    return False
        return True


@dataclass
class ProcessFacts:
    """What selectors look at, for one process; the costly parts are read on demand."""

    pid: int
    exe_name: str = ""
    exe_path: str = ""
    command_line: str = ""
    container_id: str = ""
    kubernetes: Mapping[str, object] = field(default_factory=dict)  # k8s.* attributes
    labels_of: Callable[[str], Mapping[str, str]] | None = None  # container id -> labels
    _ports: frozenset[int] | None = None

    @classmethod
    def from_attributes(cls, pid: int, attrs: Mapping[str, object],
                        labels_of: Callable[[str], Mapping[str, str]] | None = None
                        ) -> ProcessFacts:
        """From a resource built by otel_ebpf/process.py."""
        return cls(pid=pid,
                   exe_name=str(attrs.get("process.executable.name", "") or ""),
                   exe_path=str(attrs.get("process.executable.path", "") or ""),
                   command_line=str(attrs.get("process.command_line", "") or ""),
                   container_id=str(attrs.get("container.id", "") or ""),
                   kubernetes={k: v for k, v in attrs.items() if k.startswith("k8s.")},
                   labels_of=labels_of)

    def listening_ports(self) -> frozenset[int]:
        if self._ports is None:
            self._ports = listening_ports(self.pid)
        return self._ports

    def pod_labels(self) -> Mapping[str, str]:
        if self.labels_of is None or not self.container_id:
            return {}
        return self.labels_of(self.container_id) or {}


def listening_ports(pid: int) -> frozenset[int]:
    """TCP ports pid listens on (its fds against its namespace's tcp tables); empty
    when it is gone or unreadable."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return frozenset()
    return frozenset(c.laddr.port for c in conns
                     if c.status == psutil.CONN_LISTEN and c.laddr)


@dataclass(frozen=True)
class Verdict:
    selected: bool
    selector: Selector | None = None  # the instrument selector that matched (overrides)
    reason: str = ""  # for logs: which selector decided

    def overrides(self) -> dict[str, str]:
        s = self.selector
        if s is None:
            return {}
        out = {}
        if s.service_name:
            out["service.name"] = s.service_name
        if s.service_namespace:
            out["service.namespace"] = s.service_namespace
        return out


SELECTED = Verdict(True, None, "no discovery.instrument selectors: every process")


@dataclass(frozen=True)
class DiscoveryOptions:
    """The `discovery:` section (validated by parse_selectors via otel_ebpf/config.py)."""

    instrument: tuple[Selector, ...] = ()
    exclude_instrument: tuple[Selector, ...] = ()
    default_exclude_instrument: tuple[Selector, ...] = field(
        default_factory=lambda: DEFAULT_EXCLUDES)

    @property
    def excludes(self) -> tuple[Selector, ...]:
        return self.exclude_instrument + self.default_exclude_instrument

    @property
    def active(self) -> bool:
        """Whether any process can be deselected at all."""
        return bool(self.instrument or self.excludes)


class Discovery:
    """Selectors -> verdict for a process; see the module docstring."""

    def __init__(self, options: DiscoveryOptions) -> None:
        self.options = options
        self._instrument = options.instrument
        self._excludes = options.excludes

    @property
    def active(self) -> bool:
        return self.options.active

    def decide(self, facts: ProcessFacts) -> Verdict:
        for selector in self._excludes:
            if selector.matches(facts):
                return Verdict(False, None, "matches %s" % selector.where)
        if not self._instrument:
            return SELECTED
        for selector in self._instrument:
            if selector.matches(facts):
                return Verdict(True, selector, "matches %s" % selector.where)
        return Verdict(False, None, "matches no discovery.instrument selector")

    def summary(self) -> str:
        """One line for the start-up log: what is reported."""
        return "%s; excluded: %s" % (
            "report processes matching %s" % describe(self._instrument) if self._instrument
            else "report every process", describe(self._excludes))

    def decide_unknown(self) -> bool:
        """Verdict for a process of which nothing is known (gone before /proc was read,
        kernel name unknown): reported unless only selected processes are wanted."""
        return not self._instrument


# ---- parsing ---------------------------------------------------------------------------


def _strings(value: object, where: str) -> tuple[str, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise SelectorError("%s: %r is not a pattern; use a string or a list of strings"
                                % (where, item))
        text = str(item).strip()
        if not text:
            raise SelectorError("%s: an empty pattern matches nothing; remove it" % where)
        out.append(text)
    if not out:
        raise SelectorError("%s: an empty list matches nothing; remove the key" % where)
    return tuple(out)


def _regex(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise SelectorError("%s: %r is not a regular expression; use a non-empty string"
                            % (where, value))
    try:
        re.compile(value)
    except re.error as exc:
        raise SelectorError("%s: %r is not a valid regular expression: %s" % (where, value, exc)) \
            from None
    return value


def parse_ports(value: object, where: str) -> tuple[tuple[int, int], ...]:
    """"80,443,8000-8099" (or a YAML list of numbers and ranges) -> inclusive ranges."""
    items: list = value if isinstance(value, (list, tuple)) else [value]
    ranges = []
    for item in items:
        parts = str(item).split(",") if isinstance(item, str) else [item]
        for part in parts:
            if isinstance(part, bool):
                part = "%r" % part
            text = str(part).strip()
            lo, sep, hi = text.partition("-")
            try:
                low, high = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise SelectorError("%s: %r is not a port or port range; use e.g. "
                                    "80,443,8000-8099" % (where, text)) from None
            if not (1 <= low <= high <= 65535):
                raise SelectorError("%s: %r is not a port range within 1-65535 (low-high)"
                                    % (where, text))
            ranges.append((low, high))
    if not ranges:
        raise SelectorError("%s: no ports given; use e.g. 80,443,8000-8099" % where)
    return tuple(ranges)


def parse_selector(item: object, where: str) -> Selector:
    if not isinstance(item, Mapping):
        raise SelectorError("%s: %r is not a selector; use a mapping of criteria, e.g. "
                            "{exe_name: nginx}" % (where, item))
    kwargs: dict[str, object] = {}
    for raw_key, value in item.items():
        key = str(raw_key)
        at = "%s.%s" % (where, key)
        if key in _GLOB_KEYS:
            kwargs[key] = _strings(value, at)
        elif key in _REGEX_KEYS:
            kwargs[key] = _regex(value, at)
        elif key == "open_ports":
            kwargs[key] = parse_ports(value, at)
        elif key == "containers_only":
            if not isinstance(value, bool):
                raise SelectorError("%s: %r is not a boolean; use true or false" % (at, value))
            kwargs[key] = value
        elif key == "k8s_pod_labels":
            if not isinstance(value, Mapping) or not value:
                raise SelectorError("%s: use a mapping of label: glob, e.g. {app: shop-*}" % at)
            kwargs[key] = tuple(sorted((str(k), _strings(v, "%s.%s" % (at, k))[0])
                                       for k, v in value.items()))
        elif key in _OVERRIDE_KEYS:
            if not isinstance(value, str) or not value.strip():
                raise SelectorError("%s: %r is not a name; use a non-empty string" % (at, value))
            kwargs[_OVERRIDE_KEYS[key]] = value.strip()
        else:
            import difflib

            close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
            raise SelectorError("%s: unknown criterion%s; known: %s"
                                % (at, "; did you mean %s?" % close[0] if close else "",
                                   ", ".join(KNOWN_KEYS)))
    if not any(k not in ("service_name", "service_namespace") for k in kwargs):
        raise SelectorError("%s: a selector needs at least one criterion (exe_name, "
                            "exe_path, open_ports, k8s_namespace, ...)" % where)
    return Selector(where=where, **kwargs)  # type: ignore[arg-type]


def parse_selectors(value: object, key: str) -> tuple[Selector, ...]:
    """A YAML list of selectors (or a YAML/JSON string of one, from the environment)."""
    if value is None:
        return ()
    if isinstance(value, str):
        import yaml

        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise SelectorError("%s: not a YAML list of selectors (%s); use e.g. "
                                "[{exe_name: nginx}]" % (key, str(exc).splitlines()[0])) \
                from None
        if value is None:
            return ()
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise SelectorError("%s: %r is not a list of selectors; use e.g. "
                            "[{exe_name: nginx}, {open_ports: 8080}]" % (key, value))
    return tuple(parse_selector(item, "%s[%d]" % (key, i)) for i, item in enumerate(value))


def exe_selector(pattern: str) -> dict[str, str]:
    """The selector mapping for a --exe / --exclude-exe pattern: a pattern with a "/"
    is a glob on the executable path, one without on the executable name."""
    return {"exe_path" if "/" in pattern else "exe_name": pattern}


# Processes never reported unless default_exclude_instrument says otherwise: this daemon
# (another instance of it, or `otel-ebpf top`; the running daemon is also excluded in the
# kernel by its pid), and the OpenTelemetry collectors and backends it exports to, whose
# OTLP/HTTP intake would otherwise be traced, exported and traced again.
DEFAULT_EXCLUDES_YAML: tuple[dict, ...] = (
    {"exe_name": ["otel-ebpf"]},
    {"cmd_args_regex": r"(^| )(-m otel_ebpf(\.cli)?|\S*/otel-ebpf)( |$)"},
    {"exe_name": ["otelcol*", "rotel", "rotel-agent", "jaeger*", "prometheus", "tempo",
                  "alloy", "grafana-agent", "beyla", "ebpf-instrument"]},
)
DEFAULT_EXCLUDES: tuple[Selector, ...] = parse_selectors(list(DEFAULT_EXCLUDES_YAML),
                                                         "discovery.default_exclude_instrument")


def describe(selectors: Iterable[Selector]) -> str:
    return "; ".join(s.where for s in selectors) or "none"
