"""The two things that go on the tracepoints in the benchmark: otel-ebpf itself, and the
empty-probe floor.

Contract: `Agent` runs `otel-ebpf run` exactly as a user would (the package's CLI, OTLP
to the given receiver through the standard OTEL_EXPORTER_OTLP_* variables, a health
endpoint for /stats), waits until it says it is capturing, and reads its counters from
/stats; CPU and RSS come from /proc of its pid. `EmptyProbes` holds empty programs on
the same tracepoints (tests/benchmark/empty_probes.py). Counters whose name says loss
(lost, dropped, overflow, truncated, gap, failure) are what "zero loss" is judged on:
their names come from the daemon, so new loss counters are picked up without a change
here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import time
import urllib.request
from pathlib import Path

from tests.benchmark.proc import (BenchmarkError, Proc, cpu_seconds, free_port, rss_breakdown,
                                  rss_bytes)

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
READY_MARKER = "capturing;"
LOSS_WORDS = ("lost", "drop", "overflow", "truncat", "gap", "fail", "evict", "reject", "full",
              "skipped", "fault")
# Counters with a loss-like word that are not loss of HTTP data (a TLS library skipped).
NOT_LOSS_PREFIXES = ("tls.",)
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
    """`otel-ebpf run --exporter otlp` against `endpoint`, pinned to `cpus` if given."""

    def __init__(self, workdir: Path, endpoint: str, pids: list[int] | None = None,
                 cpus: set[int] | None = None, protocol: str = "grpc",
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 name: str = "otel-ebpf", profile_to: Path | None = None) -> None:
        self.health_port = free_port()
        # Under pyinstrument (sampling, 1 ms) when a profile is wanted: a JSON call tree
        # written at exit.
        prefix = (["-m", "pyinstrument", "-r", "json", "-o", str(profile_to)]
                  if profile_to else [])
        argv = [sys.executable, *prefix, "-m", "otel_ebpf.cli", "run", "--exporter", "otlp",
                "--health-listen", "127.0.0.1:%d" % self.health_port]
        for pid in pids or ():
            argv += ["--pid", str(pid)]
        argv += extra_args or []
        # gRPC (HTTP/2) for our own export traffic: an HTTP/1 exporter would be traced
        # by the daemon itself when it runs host-wide (--scope host).
        self.env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                    "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                    "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = Proc(name, argv, workdir, cpus=cpus, env=self.env, cwd=REPO)
        self.started_at = 0.0
        self.ready_after_s = 0.0
        self._log_offset = 0
        # From the daemon's "final stats" log line: exchanges including those its
        # shutdown produced (pending requests), which /stats can no longer show.
        self.final_exchanges: int | None = None
        self.stop_s = 0.0

    @property
    def pid(self) -> int:
        return self.proc.pid

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> None:
        self.started_at = time.monotonic()
        # Logs before this point belong to earlier runs of the same name.
        offset = self.proc.log_path.stat().st_size if self.proc.log_path.exists() else 0
        self._log_offset = offset
        self.proc.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.proc.log_path, errors="replace") as f:
                f.seek(offset)
                if READY_MARKER in f.read():
                    break
            if not self.proc.running():
                raise BenchmarkError("otel-ebpf exited with %s before it was capturing:\n%s"
                                     % (self.proc.proc.returncode, self.proc.tail()))
            time.sleep(0.1)
        else:
            self.proc.stop()
            raise BenchmarkError("otel-ebpf not capturing after %.0fs:\n%s"
                                 % (timeout, self.proc.tail()))
        self.ready_after_s = time.monotonic() - self.started_at
        self.stats()   # the health endpoint must answer, or every number would be blind

    def stop(self) -> int | None:
        if not self.proc.running():
            return self.proc.stop()
        t0 = time.monotonic()
        rc = self.proc.stop(signal.SIGTERM, timeout=60)
        self.stop_s = time.monotonic() - t0
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

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def rss_breakdown(self) -> dict[str, float]:
        return rss_breakdown(self.pid)

    def suspend(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)


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
