"""The two things that go on the tracepoints in the benchmark: otel-ebpf itself, and the
empty-probe floor.

Contract: `Agent` runs `otel-ebpf run` exactly as a user would (the package's CLI, OTLP
to the given receiver through the standard OTEL_EXPORTER_OTLP_* variables, or
`--exporter none` / `jsonl`; a health endpoint for /stats), waits until it says it is
capturing, and reads its counters from /stats. CPU and RSS come from /proc and are
summed over the daemon's whole process tree (the resident daemon plus any child it has
at the time, e.g. a compiler step), since "per core" and "RSS" count every process the
daemon runs. `EmptyProbes` holds empty programs on the same tracepoints
(tests/benchmark/empty_probes.py). Counters whose name says loss (lost, dropped,
overflow, truncated, gap, failure) are what "zero loss" is judged on: their names come
from the daemon, so new loss counters are picked up without a change here. Counters
that may not exist in every version of the daemon (the fast path's, wake-ups) are read
with `stat()`, which answers None when absent, and printed as "n/a".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

from tests.benchmark.proc import (BenchmarkError, Proc, compiler_mappings, free_port,
                                  rss_breakdown, tree, tree_cpu_seconds, tree_pss_bytes,
                                  tree_rss_bytes)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
READY_MARKER = "capturing;"
LOSS_WORDS = ("lost", "drop", "overflow", "truncat", "gap", "fail", "evict", "reject", "full",
              "skipped", "fault")
# Counters with a loss-like word that are not loss of HTTP data: a TLS library skipped;
# the kernel fast path's own diagnostics (capture.fast.pending_full: no room to pair an
# exchange in the kernel, so the connection falls back to the chunk stream, which is
# not a loss; real loss on that path shows in capture.lost.* like any other).
NOT_LOSS_PREFIXES = ("tls.", "capture.fast.")
# Counters of the one-record-per-exchange design; any may be absent (older daemon).
FAST_PATH_KEYS = ("http.exchanges.fast_path", "http.exchanges.slow_path")
KERNEL_FAST_KEYS = ("capture.fast.exchanges", "capture.fast.fallbacks",
                    "capture.fast.pending_full")
WAKEUPS_KEY = "capture.wakeups"
EVENTS_KEY = "capture.events"
# http.exchanges is counted live by the daemon loop; telemetry.exchanges is published
# between polls only (a fallback).
EXCHANGES_KEYS = ("http.exchanges", "telemetry.exchanges")
FINAL_STATS = re.compile(r"final stats: .*?\bexchanges=(\d+)")


def loss_counters(snapshot: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in snapshot.items()
            if any(w in k.lower() for w in LOSS_WORDS) and isinstance(v, int | float)
            and not k.startswith(NOT_LOSS_PREFIXES)}


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if isinstance(after.get(k, 0), int | float) and after.get(k, 0) != before.get(k, 0)}


class Agent:
    """`otel-ebpf run --exporter EXPORTER` (default otlp to `endpoint`), pinned to `cpus`
    if given. Every number about the daemon's resources covers its process tree."""

    def __init__(self, workdir: Path, endpoint: str | None, pids: list[int] | None = None,
                 cpus: set[int] | None = None, protocol: str = "grpc",
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 name: str = "otel-ebpf", profile_to: Path | None = None,
                 exporter: str = "otlp") -> None:
        self.health_port = free_port()
        # Under pyinstrument (sampling, 1 ms) when a profile is wanted: a JSON call tree
        # written at exit.
        prefix = (["-m", "pyinstrument", "-r", "json", "-o", str(profile_to)]
                  if profile_to else [])
        argv = [sys.executable, *prefix, "-m", "otel_ebpf.cli", "run", "--exporter", exporter,
                "--health-listen", "127.0.0.1:%d" % self.health_port]
        for pid in pids or ():
            argv += ["--pid", str(pid)]
        argv += extra_args or []
        # gRPC (HTTP/2) for our own export traffic: an HTTP/1 exporter would be traced
        # by the daemon itself when it runs host-wide (--scope host).
        # Each daemon's own export spool (named after its unique health port): what one
        # could not send by its exit must not reach a later one's collector first (the
        # freshness section measured 13.9 s when it inherited the memory section's spool).
        self.env = {"PYTHONUNBUFFERED": "1",
                    "OTEL_EBPF_EXPORT_SPOOL_DIRECTORY": str(
                        workdir / ("%s-%d-spool" % (name, self.health_port))),
                    **(env or {})}
        if exporter == "otlp":
            if not endpoint:
                raise BenchmarkError("Agent: the otlp exporter needs an endpoint")
            self.env.update({"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                             "OTEL_EXPORTER_OTLP_PROTOCOL": protocol})
        self.exporter = exporter
        self.proc = Proc(name, argv, workdir, cpus=cpus, env=self.env, cwd=REPO)
        self.started_at = 0.0
        self.ready_after_s = 0.0          # spawn -> "capturing;" in the log
        self.readyz_after_s: float | None = None   # spawn -> first /readyz 200
        self.start_peak_rss = 0           # max of the tree's RSS sampled during start-up
        self.start_hwm_kb = 0             # VmHWM of the resident process once ready
        self._log_offset = 0
        # From the daemon's "final stats" log line: exchanges including those its
        # shutdown produced (pending requests), which /stats can no longer show.
        self.final_exchanges: int | None = None
        self.stop_s = 0.0                 # SIGTERM -> every process of the tree gone
        self.stop_rc: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _readyz(self) -> bool:
        url = "http://127.0.0.1:%d/readyz" % self.health_port
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                return resp.status == 200
        except OSError:   # refused while starting, 503 (HTTPError) until ready
            return False

    def start(self, timeout: float = 180.0) -> None:
        self.started_at = time.monotonic()
        # Logs before this point belong to earlier runs of the same name.
        offset = self.proc.log_path.stat().st_size if self.proc.log_path.exists() else 0
        self._log_offset = offset
        self.proc.start()
        deadline = time.monotonic() + timeout
        peak = 0
        while time.monotonic() < deadline:
            # Start-up peak: the whole tree (a compiler child included) every ~50 ms.
            peak = max(peak, tree_rss_bytes(self.pid))
            if self.readyz_after_s is None and self._readyz():
                self.readyz_after_s = time.monotonic() - self.started_at
            with open(self.proc.log_path, errors="replace") as f:
                f.seek(offset)
                if READY_MARKER in f.read():
                    break
            if not self.proc.running():
                raise BenchmarkError("otel-ebpf exited with %s before it was capturing:\n%s"
                                     % (self.proc.proc.returncode, self.proc.tail()))
            time.sleep(0.05)
        else:
            self.proc.stop()
            raise BenchmarkError("otel-ebpf not capturing after %.0fs:\n%s"
                                 % (timeout, self.proc.tail()))
        self.ready_after_s = time.monotonic() - self.started_at
        if self.readyz_after_s is None and self._readyz():
            self.readyz_after_s = time.monotonic() - self.started_at
        self.start_peak_rss = max(peak, tree_rss_bytes(self.pid))
        self.start_hwm_kb = int(self.rss_breakdown().get("VmHWM", 0) * 1024)
        self.stats()   # the health endpoint must answer, or every number would be blind

    def stop(self) -> int | None:
        """SIGTERM; `stop_s` is the time until every process of the daemon's tree (as it
        was when the signal was sent) is gone."""
        if not self.proc.running():
            return self.proc.stop()
        members = tree(self.pid)
        t0 = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = t0 + 60
        while time.monotonic() < deadline:
            if self.proc.proc.poll() is not None and not any(_alive(p) for p in members[1:]):
                break
            time.sleep(0.005)
        self.stop_s = time.monotonic() - t0
        rc = self.proc.stop(signal.SIGTERM, timeout=5)   # reaps; kills what is left
        self.stop_rc = rc
        if rc not in (0, None, -signal.SIGTERM):
            log.warning("otel-ebpf exited with %s; log tail:\n%s", rc, self.proc.tail(1500))
        with open(self.proc.log_path, errors="replace") as f:
            f.seek(self._log_offset)
            found = FINAL_STATS.findall(f.read())
        self.final_exchanges = int(found[-1]) if found else None
        return rc

    def stats(self) -> dict[str, float]:
        url = "http://127.0.0.1:%d/stats" % self.health_port
        last: Exception | None = None
        for _ in range(20):
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    return flatten(json.load(resp))
            except OSError as exc:   # includes URLError, connection refused while starting
                last = exc
                time.sleep(0.1)
        raise BenchmarkError("otel-ebpf /stats at %s did not answer: %s\n%s"
                             % (url, last, self.proc.tail(1500)))

    def exchanges(self, snapshot: dict[str, float] | None = None) -> int:
        snap = snapshot if snapshot is not None else self.stats()
        for key in EXCHANGES_KEYS:
            if key in snap:
                return int(snap[key])
        return 0

    def pids(self) -> list[int]:
        """The resident daemon and every live descendant."""
        return tree(self.pid)

    def cpu_s(self) -> float:
        """CPU seconds of the whole tree (children reaped by a member included)."""
        return tree_cpu_seconds(self.pid)

    def rss(self) -> int:
        """RSS summed over the tree."""
        return tree_rss_bytes(self.pid)

    def pss(self) -> int:
        return tree_pss_bytes(self.pid)

    def rss_breakdown(self) -> dict[str, float]:
        """RssAnon/RssFile/RssShmem/VmHWM (MB) of the resident process."""
        return rss_breakdown(self.pid)

    def compiler_mappings(self) -> dict[int, list[str]]:
        """{pid: [libLLVM/libclang files mapped]} over the tree; {} when none maps them."""
        return compiler_mappings(self.pid)

    def suspend(self) -> None:
        for p in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)

    def resume(self) -> None:
        for p in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGCONT)


def _alive(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stat(snapshot: dict[str, float], key: str) -> float | None:
    """A counter that may not exist in this version of the daemon: None when absent."""
    v = snapshot.get(key)
    return v if isinstance(v, int | float) else None


def stat_delta(after: dict[str, float], before: dict[str, float], key: str) -> float | None:
    """after - before of a counter, None when the daemon does not publish it. A counter
    that appears only in `after` (first increment) counts from 0."""
    a = stat(after, key)
    if a is None:
        return None
    return a - (stat(before, key) or 0)


def path_counters(after: dict[str, float], before: dict[str, float]) -> dict[str, float | None]:
    """Fast-path share and batching of one measured interval: deltas of the fast/slow
    path exchange counters, the kernel fast-path counters, records decoded and
    wake-ups; None for what the daemon does not publish."""
    out: dict[str, float | None] = {}
    for key in (*EXCHANGES_KEYS[:1], *FAST_PATH_KEYS, *KERNEL_FAST_KEYS, EVENTS_KEY,
                WAKEUPS_KEY):
        out[key] = stat_delta(after, before, key)
    fast, total = out["http.exchanges.fast_path"], out["http.exchanges"]
    out["fast_path_share"] = (fast / total if fast is not None and total else None)
    events, wakeups = out[EVENTS_KEY], out[WAKEUPS_KEY]
    out["records_per_wakeup"] = (events / wakeups if events is not None and wakeups
                                 else None)
    return out


def fast_path_switch() -> tuple[dict[str, str] | None, str]:
    """How to force the slow path in this version of the daemon: (env to pass, how),
    or (None, why not). The key is looked up in the daemon's own settings table, so
    the name is the one it really reads (capture.fast_path <-> its env variable)."""
    try:
        from otel_ebpf import config
        setting = next((s for s in config.settings() if s.key == "capture.fast_path"), None)
    except Exception as exc:  # noqa: BLE001 (the daemon's tree is edited concurrently)
        return None, "n/a (settings unreadable: %s)" % exc
    if setting is None:
        return None, "n/a (option not available: no capture.fast_path setting)"
    env_name = getattr(setting, "own_env", None) or "OTEL_EBPF_CAPTURE_FAST_PATH"
    return {env_name: "false"}, "%s=false" % env_name


def flatten(obj: object, prefix: str = "") -> dict[str, float]:
    """/stats may nest ({"capture": {"lost": {...}}}): dotted keys either way."""
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = "%s.%s" % (prefix, k) if prefix else str(k)
            if isinstance(v, dict):
                out.update(flatten(v, key))
            elif isinstance(v, bool):
                out[key] = int(v)
            elif isinstance(v, int | float):
                out[key] = v
    return out


class EmptyProbes:
    """Empty BPF programs on the daemon's tracepoints, held by a child process."""

    def __init__(self, workdir: Path) -> None:
        self.proc = Proc("empty-probes", [sys.executable, "-m", "tests.benchmark.empty_probes"],
                         workdir, cwd=REPO)
        self.attached = ""

    def __enter__(self) -> EmptyProbes:
        log_path = self.proc.log_path
        offset = log_path.stat().st_size if log_path.exists() else 0   # earlier rounds
        self.proc.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with open(log_path, errors="replace") as f:
                f.seek(offset)
                text = f.read()
            for line in text.splitlines():
                if line.startswith("attached "):
                    self.attached = line
                    return self
            if not self.proc.running():
                raise BenchmarkError("empty probes failed to load:\n%s" % self.proc.tail())
            time.sleep(0.1)
        self.proc.stop()
        raise BenchmarkError("empty probes not attached after 120s:\n%s" % self.proc.tail())

    def __exit__(self, *exc) -> None:
        self.proc.stop(timeout=30)
