"""The four measurements of issue 5, each a function from a Plan to a plain dict.

Contract: every function starts its own peers under `workdir`, stops them before it
returns, and returns JSON-ready numbers (raw per-round values and the summary derived
from them); none asserts anything about speed. Ratios are always taken between arms of
the same run, interleaved round by round with a rotating arm order so that drift of a
noisy shared machine lands on every arm alike; the summary uses the median of rounds.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.benchmark.agent import (Agent, EmptyProbes, delta, fast_path_switch, loss_counters,
                                   path_counters)
from tests.benchmark.peers import (BusyServer, HeldConnections, Nginx, Receiver, run_wrk,
                                   start_wrk)
from tests.benchmark.proc import BenchmarkError

log = logging.getLogger(__name__)

MB = 1024 * 1024


@dataclass
class Plan:
    """How long and how hard; `quick()` is the ~1 minute smoke variant."""
    rounds: int = 3
    arm_s: float = 10.0
    warmup_s: float = 1.0
    connections: int = 16
    threads: int = 2
    # (connections, per-connection delay ms) from light to unpaced; see capacity().
    # The paced steps go past what one nginx worker on one core can serve (~20-30k/s
    # here), so the top of the ladder is unpaced at two concurrencies: if the daemon
    # keeps up with all of it, the result is "load-bound", and CPU us per exchange (all
    # daemon processes) is what says how far one core of daemon would go.
    ladder: list[tuple[int, int]] = field(default_factory=lambda: [
        (4, 1), (8, 1), (16, 1), (32, 1), (48, 1), (64, 1), (96, 1), (16, 0), (64, 0)])
    step_s: float = 8.0
    stall_s: float = 5.0
    idle_s: float = 5.0
    held_connections: int = 10_000
    exchanges_target: int = 1_000_000
    exchanges_cap_s: float = 150.0
    freshness_s: float = 15.0
    freshness_delay_ms: int = 10
    # py-spy on the daemon under unpaced load (0 = no profile).
    profile_s: float = 8.0
    # One unpaced capacity step with the fast path forced off (when the daemon has the
    # switch): the slow path's CPU per exchange, side by side with the default's.
    slow_path_step: bool = True
    # One more unpaced capacity step with OTLP gzip on (the default sends uncompressed):
    # what compression costs per exchange, side by side.
    gzip_step: bool = True
    # SIGTERM -> every daemon process gone, under this much unpaced load.
    stop_under_load_s: float = 2.0
    daemon_cpu: int = 1
    load_cpu: int = 0

    @classmethod
    def quick(cls) -> Plan:
        return cls(rounds=1, arm_s=3.0, warmup_s=0.0, ladder=[(8, 1), (16, 0)], step_s=3.0,
                   stall_s=3.0, idle_s=2.0, held_connections=1000, exchanges_target=30_000,
                   exchanges_cap_s=20.0, freshness_s=4.0, profile_s=0.0)

    @classmethod
    def smoke(cls) -> Plan:
        """Seconds per section, for tests/integration/test_benchmark_smoke.py: proves the
        harness and its peers work, measures nothing worth reading. Counts are prime so a
        duplicate or a miss shows (211 held connections -> exactly 211 exchanges)."""
        return cls(rounds=1, arm_s=2.0, warmup_s=0.0, ladder=[(8, 1)], step_s=2.0,
                   stall_s=2.0, idle_s=1.0, held_connections=211, exchanges_target=30011,
                   exchanges_cap_s=10.0, freshness_s=2.0, profile_s=0.0,
                   slow_path_step=False, gzip_step=False, stop_under_load_s=1.0)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def wait_drained(agent: Agent, quiet_s: float = 1.0, timeout_s: float = 30.0) -> tuple[dict, float]:
    """Wait until the daemon's counters (exchanges, events, spans) stop moving;
    (final stats, seconds until the last change)."""
    t0 = time.monotonic()
    snap = agent.stats()

    def progress(sn: dict) -> tuple:
        return (agent.exchanges(sn), sn.get("capture.events"), sn.get("telemetry.spans"),
                sn.get("http.exchanges"))
    last, last_change = progress(snap), time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        time.sleep(0.25)
        snap = agent.stats()
        now = progress(snap)
        if now != last:
            last, last_change = now, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            break
    return snap, max(0.0, last_change - t0)


def cpus_available(*cpus: int) -> set[int] | None:
    """Pinning only where the CPUs exist (a 1-CPU box runs unpinned, and says so)."""
    have = os.sched_getaffinity(0)
    return set(cpus) if all(c in have for c in cpus) else None


# ---------------------------------------------------------------- 1. overhead

def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of every CPU since boot, from /proc/stat's first line
    (idle and iowait are not busy)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _wrk_with_machine_cpu(url: str, plan: Plan, workdir: Path) -> dict:
    """wrk's result plus what the whole machine spent on it: `machine_busy` (share of all
    CPUs busy while wrk ran) and `machine_cpu_us_per_request` (busy CPU time, every
    process and the kernel, per request wrk completed). On a saturated machine the
    throughput ratio between two arms is the inverse ratio of this cost."""
    busy0, total0 = machine_cpu_ticks()
    res = run_wrk(url, plan.arm_s, plan.connections, plan.threads, logdir=workdir).as_dict()
    busy1, total1 = machine_cpu_ticks()
    res["machine_busy"] = ratio(busy1 - busy0, total1 - total0)
    busy_s = (busy1 - busy0) / os.sysconf("SC_CLK_TCK")
    res["machine_cpu_us_per_request"] = ratio(busy_s * 1e6, res["requests"])
    return res


def _measure_arm(url: str, plan: Plan, workdir: Path) -> dict:
    if plan.warmup_s:
        run_wrk(url, plan.warmup_s, plan.connections, plan.threads, logdir=workdir)
    return _wrk_with_machine_cpu(url, plan, workdir)


def _traced_arm(server, rx: Receiver | None, url: str, plan: Plan, workdir: Path,
                exporter: str = "otlp") -> dict:
    """One traced arm: the daemon exporting over OTLP to `rx` ("otlp"), or loaded and
    draining but exporting nothing ("none": our BPF programs + the drain loop, the
    kernel-side cost beyond the empty-probe floor). For nginx, requests served are
    nginx's own count (stub_status), the ground truth for "exchanges seen"."""
    nginx_count = getattr(server, "requests", None)
    with Agent(workdir, rx.grpc_endpoint if rx is not None else None, pids=server.pids(),
               exporter=exporter, name="otel-ebpf-%s" % exporter) as agent:
        before, cpu0 = agent.stats(), agent.cpu_s()
        # The stub_status read is itself a request nginx counts (in the value it returns)
        # and the daemon sees (before `after`): r1 - r0 = wrk's requests + the r1 read,
        # and the daemon's exchanges = the r0 read + wrk's requests. Equal when exact.
        served0 = nginx_count() if nginx_count else None
        if plan.warmup_s:
            run_wrk(url, plan.warmup_s, plan.connections, plan.threads, logdir=workdir)
        cpu1, t1 = agent.cpu_s(), time.monotonic()
        res = _wrk_with_machine_cpu(url, plan, workdir)
        # Cores the daemon used while wrk measured: on 2 shared cores, CPU it took from
        # nginx and wrk (what separates its user-space cost from the kernel's).
        res["daemon_cores"] = (agent.cpu_s() - cpu1) / (time.monotonic() - t1)
        after, _ = wait_drained(agent, quiet_s=1.0, timeout_s=30)
        res["daemon_cpu_s"] = agent.cpu_s() - cpu0
        res["daemon_exchanges"] = agent.exchanges(after) - agent.exchanges(before)
        res["daemon_loss"] = delta(loss_counters(after), loss_counters(before))
        res["daemon_ready_s"] = agent.ready_after_s
        res["daemon_paths"] = path_counters(after, before)
        if nginx_count:
            res["served"] = nginx_count() - served0
    return res


def _summarize(rounds: list[dict], base: str, others: list[str]) -> dict:
    out: dict = {}
    med = {arm: {k: median([r[arm].get(k, float("nan")) for r in rounds])
                 for k in ("rps", "p50_us", "p99_us", "machine_busy",
                           "machine_cpu_us_per_request")}
           for arm in [base, *others]}
    out["median"] = med
    for arm in others:
        out["%s_vs_%s" % (arm, base)] = {
            "throughput": ratio(med[arm]["rps"], med[base]["rps"]),
            "p50": ratio(med[arm]["p50_us"], med[base]["p50_us"]),
            "p99": ratio(med[arm]["p99_us"], med[base]["p99_us"]),
            # Per-round ratios show how much of a difference is noise.
            "throughput_rounds": [ratio(r[arm]["rps"], r[base]["rps"]) for r in rounds],
        }
    return out


def _traced_totals(rounds: list[dict], arm: str) -> dict:
    """Sums over the rounds of one traced arm: exchanges seen vs. requests served
    (nginx's count) and vs. completed (wrk's), loss events, fast-path share."""
    arms = [r[arm] for r in rounds]
    out: dict = {
        "exchanges": sum(a["daemon_exchanges"] for a in arms),
        "wrk_requests": sum(a["requests"] for a in arms),
        "loss_events": sum(v for a in arms for k, v in a["daemon_loss"].items()
                           if not k.endswith("_bytes")),
        "daemon_cores": median([a.get("daemon_cores", float("nan")) for a in arms]),
    }
    if all("served" in a for a in arms):
        out["served"] = sum(a["served"] for a in arms)
    fast = [a["daemon_paths"].get("http.exchanges.fast_path") for a in arms]
    out["fast_path"] = None if any(f is None for f in fast) else sum(fast)
    out["fast_path_share"] = (ratio(out["fast_path"], out["exchanges"])
                              if out["fast_path"] is not None else None)
    return out


def overhead(plan: Plan, workdir: Path) -> dict:
    result: dict = {"plan": {"rounds": plan.rounds, "arm_s": plan.arm_s,
                             "wrk": "-t%d -c%d --latency" % (plan.threads, plan.connections)}}
    with Receiver(workdir) as rx:
        # (a) nginx, small static file: untraced / empty probes / traced exporting
        # nothing / traced exporting over OTLP. Rotating order, one arm per position.
        with Nginx(workdir) as nginx:
            arms = ["untraced", "empty_probes", "traced_none", "traced"]
            rounds: list[dict] = []
            attached = ""
            for i in range(plan.rounds):
                k = i % len(arms)
                order = arms[k:] + arms[:k]
                rec: dict = {"order": order}
                for arm in order:
                    if arm == "untraced":
                        rec[arm] = _measure_arm(nginx.url, plan, workdir)
                    elif arm == "empty_probes":
                        with EmptyProbes(workdir) as probes:
                            attached = probes.attached
                            rec[arm] = _measure_arm(nginx.url, plan, workdir)
                    elif arm == "traced_none":
                        rec[arm] = _traced_arm(nginx, None, nginx.url, plan, workdir,
                                               exporter="none")
                    else:
                        rec[arm] = _traced_arm(nginx, rx, nginx.url, plan, workdir)
                    log.info("overhead nginx round %d %s: %.0f req/s p99 %.0f us%s", i + 1,
                             arm, rec[arm]["rps"], rec[arm]["p99_us"],
                             "" if "served" not in rec[arm] else
                             ", exchanges %d / served %d" % (rec[arm]["daemon_exchanges"],
                                                              rec[arm]["served"]))
                rounds.append(rec)
            result["nginx"] = {"rounds": rounds, "empty_probes": attached,
                               **_summarize(rounds, "untraced",
                                            ["empty_probes", "traced_none", "traced"])}
            med = result["nginx"]["median"]
            for arm in ("traced_none", "traced"):
                result["nginx"]["%s_vs_empty_probes" % arm] = {
                    "throughput": ratio(med[arm]["rps"], med["empty_probes"]["rps"]),
                    "p99": ratio(med[arm]["p99_us"], med["empty_probes"]["p99_us"]),
                    "throughput_rounds": [ratio(r[arm]["rps"], r["empty_probes"]["rps"])
                                          for r in rounds]}
                result["nginx"]["%s_totals" % arm] = _traced_totals(rounds, arm)
        # (b) ~1 ms of CPU per request: untraced / traced.
        with BusyServer(workdir) as busy:
            arms = ["untraced", "traced"]
            rounds = []
            for i in range(plan.rounds):
                order = arms if i % 2 == 0 else arms[::-1]
                rec = {"order": order}
                for arm in order:
                    rec[arm] = (_measure_arm(busy.url, plan, workdir) if arm == "untraced"
                                else _traced_arm(busy, rx, busy.url, plan, workdir))
                    log.info("overhead busy round %d %s: %.0f req/s p99 %.0f us", i + 1, arm,
                             rec[arm]["rps"], rec[arm]["p99_us"])
                rounds.append(rec)
            result["busy_1ms"] = {"rounds": rounds, **_summarize(rounds, "untraced", ["traced"]),
                                  "traced_totals": _traced_totals(rounds, "traced")}
        result["receiver_spans"] = rx.span_count()
    return result


# ---------------------------------------------------------------- 2. capacity

def _capacity_step(agent: Agent, url: str, conns: int, delay_ms: int, plan: Plan,
                   workdir: Path, load_cpus: set[int] | None, label: str = "capacity") -> dict:
    """One rung: wrk at (conns, delay_ms) for step_s; the daemon's CPU (every process
    of it), exchanges, loss, drain time, fast-path share and batching over it."""
    before, cpu0, t0 = agent.stats(), agent.cpu_s(), time.monotonic()
    w = run_wrk(url, plan.step_s, conns, min(2, conns), delay_ms=delay_ms,
                cpus=load_cpus, logdir=workdir)
    cpu_load, wall_load = agent.cpu_s() - cpu0, time.monotonic() - t0
    after, drain_s = wait_drained(agent, quiet_s=1.0, timeout_s=30)
    cpu, wall = agent.cpu_s() - cpu0, time.monotonic() - t0
    seen = agent.exchanges(after) - agent.exchanges(before)
    loss = delta(loss_counters(after), loss_counters(before))
    unseen = max(0, w.requests - seen)
    paths = path_counters(after, before)
    wakeups = paths.get("capture.wakeups")
    step = {"connections": conns, "delay_ms": delay_ms, "offered_rps": w.rps,
            "requests": w.requests, "exchanges": seen, "unseen": unseen,
            "exchanges_per_s": seen / w.duration_s if w.duration_s else 0.0,
            "drain_s": drain_s, "loss": loss,
            "daemon_cpu_s": cpu,
            # While wrk ran (its start-up included: a slight underestimate).
            "daemon_cpu_util": cpu_load / wall_load,
            "daemon_cpu_util_with_drain": cpu / wall,
            "cpu_us_per_exchange": cpu * 1e6 / seen if seen else float("nan"),
            "wrk_errors": w.errors + w.bad_status,
            "paths": paths,
            # Over the whole step (load + drain): the drain loop's wake-up rate.
            "wakeups_per_s": wakeups / wall if wakeups is not None and wall else None,
            "daemon_pids": len(agent.pids())}
    step["sustained"] = (not loss and unseen == 0 and drain_s <= 1.5
                         and step["wrk_errors"] == 0)
    share = paths.get("fast_path_share")
    log.info("%s c=%d delay=%dms: %.0f ex/s, daemon %.0f%% CPU (%d procs), %.1f us/ex, "
             "loss %s, unseen %d, drain %.1fs, fast path %s, records/wake-up %s", label, conns,
             delay_ms, step["exchanges_per_s"], 100 * step["daemon_cpu_util"],
             step["daemon_pids"], step["cpu_us_per_exchange"], loss or 0, unseen, drain_s,
             "n/a" if share is None else "%.1f%%" % (100 * share),
             "n/a" if paths.get("records_per_wakeup") is None
             else "%.1f" % paths["records_per_wakeup"])
    return step


def capacity(plan: Plan, workdir: Path) -> dict:
    """A ladder of offered loads; the daemon alone on `daemon_cpu`, everything else on
    `load_cpu`. A step is sustained when no loss counter moved, every request wrk
    completed was seen as an exchange, and the daemon caught up within 1.5 s of the
    load stopping (no backlog building up). CPU is summed over every daemon process."""
    dcpu = cpus_available(plan.daemon_cpu, plan.load_cpu)
    daemon_cpus = {plan.daemon_cpu} if dcpu else None
    load_cpus = {plan.load_cpu} if dcpu else None
    result: dict = {"pinning": ("daemon on CPU %d; nginx, wrk, rotel on CPU %d"
                                % (plan.daemon_cpu, plan.load_cpu)) if dcpu else "none (1 CPU)"}
    steps: list[dict] = []
    with Receiver(workdir, cpus=load_cpus) as rx, \
            Nginx(workdir, workers=1, cpus=load_cpus) as nginx:
        with Agent(workdir, rx.grpc_endpoint, pids=nginx.pids(), cpus=daemon_cpus) as agent:
            for conns, delay_ms in plan.ladder:
                steps.append(_capacity_step(agent, nginx.url, conns, delay_ms, plan, workdir,
                                            load_cpus))
            # Loss, provoked: the daemon stopped (SIGSTOP) under full load cannot drain the
            # ring buffer; whatever it cannot see must show up in a loss counter.
            before = agent.stats()
            wrk = start_wrk(nginx.url, plan.stall_s + 2, 16, 2, workdir, cpus=load_cpus)
            try:
                time.sleep(1)
                agent.suspend()
                try:
                    time.sleep(plan.stall_s)
                finally:
                    agent.resume()
                wrk.proc.wait(plan.stall_s + 30)
            finally:
                wrk.stop()
            after, drain_s = wait_drained(agent, quiet_s=1.0, timeout_s=60)
            result["stall"] = {"stopped_s": plan.stall_s,
                               "exchanges": agent.exchanges(after) - agent.exchanges(before),
                               "loss": delta(loss_counters(after), loss_counters(before)),
                               "drain_s": drain_s}
            total = agent.exchanges(after)
            loss_total = loss_counters(after)
            result["daemon_total_exchanges"] = total
            result["daemon_loss_totals"] = {k: v for k, v in loss_total.items() if v}
            result["daemon_stats"] = after
        # After the daemon's shutdown flush: every exchange should have reached the
        # receiver (counted before the profiled daemon below adds its own).
        result["receiver_spans"] = rx.settle()
        # Shutdown turns pending requests into exchanges too: the daemon's final count.
        if agent.final_exchanges is not None:
            total = agent.final_exchanges
        result["daemon_final_exchanges"] = total
        result["daemon_stop_s"] = round(agent.stop_s, 2)
        result["export_ratio"] = ratio(result["receiver_spans"], total)
        # The same unpaced step with the fast path forced off, when the daemon has the
        # switch: what the chunk stream costs per exchange, in the same run.
        env, how = fast_path_switch()
        result["slow_path_switch"] = how
        if plan.slow_path_step and env is not None:
            conns, delay_ms = plan.ladder[-1]
            with Agent(workdir, rx.grpc_endpoint, pids=nginx.pids(), cpus=daemon_cpus,
                       env=env, name="otel-ebpf-slow-path") as slow:
                result["slow_path_step"] = _capacity_step(slow, nginx.url, conns, delay_ms,
                                                          plan, workdir, load_cpus,
                                                          label="capacity, fast path off,")
        if plan.gzip_step:
            conns, delay_ms = plan.ladder[-1]
            with Agent(workdir, rx.grpc_endpoint, pids=nginx.pids(), cpus=daemon_cpus,
                       env={"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"},
                       name="otel-ebpf-gzip") as gz:
                result["gzip_step"] = _capacity_step(gz, nginx.url, conns, delay_ms, plan,
                                                     workdir, load_cpus,
                                                     label="capacity, OTLP gzip,")
        if plan.profile_s:
            result["profile"] = profile(rx, nginx, plan, workdir, daemon_cpus, load_cpus)
    result["steps"] = steps
    good = [s for s in steps if s["sustained"]]
    best = max(good, key=lambda s: s["exchanges_per_s"]) if good else None
    result["max_sustained_exchanges_per_s"] = best["exchanges_per_s"] if best else 0.0
    # CPU per exchange where fixed costs (poll wake-ups, rescans, timers) are most
    # amortized: the busiest step. Every step's value is in "steps".
    busiest = max(steps, key=lambda s: s["exchanges"]) if steps else None
    result["cpu_us_per_exchange"] = (busiest["cpu_us_per_exchange"] if busiest
                                     else float("nan"))
    result["cpu_us_per_exchange_at"] = busiest["exchanges_per_s"] if busiest else 0.0
    result["busiest_step"] = busiest
    # What one core could take if CPU per exchange stayed what it is at these rates.
    result["projected_exchanges_per_s_one_core"] = ratio(1e6, result["cpu_us_per_exchange"])
    first_bad = next((s for s in steps if not s["sustained"]), None)
    result["loss_begins_at"] = (None if first_bad is None else
                                {"offered_rps": first_bad["offered_rps"],
                                 "loss": first_bad["loss"], "unseen": first_bad["unseen"],
                                 "daemon_cpu_util": first_bad["daemon_cpu_util"]})
    # Whether the ladder ever saturated the daemon or only the load's own CPU.
    result["daemon_saturated"] = any(s["daemon_cpu_util"] > 0.9 for s in steps)
    # daemon-bound: the daemon lost something or ran out of its core on the ladder;
    # load-bound: it kept up with everything CPU 0 could offer (nginx + wrk).
    result["bound"] = ("daemon-bound" if first_bad is not None or result["daemon_saturated"]
                       else "load-bound")
    result["top_offered_rps"] = max((s["offered_rps"] for s in steps), default=0.0)
    return result


def profile(rx: Receiver, nginx: Nginx, plan: Plan, workdir: Path,
            daemon_cpus: set[int] | None, load_cpus: set[int] | None) -> dict:
    """Where the daemon's CPU goes under unpaced load: a second daemon run under
    pyinstrument (sampling every 1 ms, main thread, where the per-exchange work is),
    folded into the functions with the most self and inclusive time in its loop."""
    out = workdir / "daemon-profile.json"
    with Agent(workdir, rx.grpc_endpoint, pids=nginx.pids(), cpus=daemon_cpus,
               name="otel-ebpf-profiled", profile_to=out) as agent:
        before, cpu0 = agent.stats(), agent.cpu_s()
        w = run_wrk(nginx.url, plan.profile_s, 16, 2, cpus=load_cpus, logdir=workdir)
        after, _ = wait_drained(agent, quiet_s=1.0, timeout_s=30)
        seen = agent.exchanges(after) - agent.exchanges(before)
        cpu = agent.cpu_s() - cpu0
    if not out.exists():
        return {"error": "pyinstrument wrote no profile (see otel-ebpf-profiled.log)"}
    return {"rps": w.rps, "exchanges": seen,
            "cpu_us_per_exchange_profiled": cpu * 1e6 / seen if seen else float("nan"),
            "file": str(out), **fold_profile(out)}


# Children of Daemon._run that are start-up, not the capture loop.
STARTUP_FRAMES = frozenset({"start", "_start_tls", "_start_health", "_build_outputs",
                            "__init__", "_install_signal_handlers"})


def fold_profile(path: Path, top: int = 15) -> dict:
    """pyinstrument's JSON call tree -> the functions with the most self and inclusive
    time inside the daemon's capture loop (Daemon._run minus its start-up calls: BPF
    compilation and shutdown would otherwise dominate a short profile)."""
    tree = json.loads(path.read_text())
    root = tree["root_frame"]
    loops: list[dict] = []

    def find(frame: dict) -> None:
        if frame["function"] == "_run" and frame["file_path"].endswith("daemon.py"):
            loops.append(frame)
            return
        for child in frame.get("children", ()):
            find(child)
    find(root)
    self_t: dict[str, float] = {}
    incl: dict[str, float] = {}

    def walk(frame: dict, above: frozenset) -> None:
        key = "%s (%s:%d)" % (frame["function"], short_path(frame["file_path"]),
                              frame["line_no"])
        # pyinstrument 5 puts a frame's own time in synthetic "[self]" children.
        children = [c for c in frame.get("children", ()) if not c["function"].startswith("[")]
        own = frame["time"] - sum(c["time"] for c in children)
        self_t[key] = self_t.get(key, 0.0) + max(0.0, own)
        if key not in above:   # recursion: count a frame's subtree once
            incl[key] = incl.get(key, 0.0) + frame["time"]
        for child in children:
            walk(child, above | {key})

    total = 0.0
    for loop in loops or [root]:
        for child in loop.get("children", ()):
            if loops and child["function"] in STARTUP_FRAMES:
                continue
            total += child["time"]
            walk(child, frozenset())
    total = total or 1.0

    def share(d: dict[str, float]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1))
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"profiled_s": round(total, 2), "scope": "Daemon._run loop" if loops else "process",
            "self_pct": share(self_t), "inclusive_pct": share(incl)}


def short_path(file: str) -> str:
    for marker in ("/otel_ebpf/", "/site-packages/", "/dist-packages/", "/python3.11/"):
        if marker in file:
            return file.split(marker, 1)[1] if marker != "/otel_ebpf/" else \
                "otel_ebpf/" + file.split(marker, 1)[1]
    return file


# ---------------------------------------------------------------- 3. memory

def memory(plan: Plan, workdir: Path) -> dict:
    """RSS of every daemon process (summed) idle, with held connections, over many
    exchanges; start-up peak and time to ready; SIGTERM -> exit under load; whether a
    resident daemon process maps BCC's compiler (libLLVM/libclang)."""
    result: dict = {}
    with Receiver(workdir) as rx, Nginx(workdir) as nginx, \
            Agent(workdir, rx.grpc_endpoint, pids=nginx.pids()) as agent:
        result["ready_s"] = agent.ready_after_s
        result["readyz_s"] = agent.readyz_after_s
        result["start_peak_rss_mb"] = agent.start_peak_rss / MB
        result["start_hwm_mb"] = agent.start_hwm_kb / 1024
        time.sleep(plan.idle_s)
        idle = [agent.rss() for _ in range(5) if time.sleep(0.2) is None]
        result["idle_rss_mb"] = max(idle) / MB
        result["idle_pss_mb"] = agent.pss() / MB
        result["idle_pids"] = agent.pids()
        result["idle_rss_breakdown_mb"] = agent.rss_breakdown()
        # After start-up, whatever compiled the programs should be gone or never mapped.
        result["compiler_mapped"] = {str(k): v for k, v in agent.compiler_mappings().items()}

        before = agent.exchanges()
        with HeldConnections(workdir, nginx.port, plan.held_connections) as held:
            snap, _ = wait_drained(agent, quiet_s=1.0, timeout_s=60)
            time.sleep(1)
            samples = [agent.rss() for _ in range(5) if time.sleep(0.2) is None]
            result["held_connections"] = held.held
            result["held_rss_mb"] = max(samples) / MB
            result["held_pss_mb"] = agent.pss() / MB
            result["held_rss_breakdown_mb"] = agent.rss_breakdown()
            result["held_exchanges_seen"] = agent.exchanges(snap) - before
        wait_drained(agent, quiet_s=1.0, timeout_s=30)
        result["after_close_rss_mb"] = agent.rss() / MB

        # One million exchanges (or as many as the cap allows), RSS sampled each second.
        # Progress is nginx's own request count: the daemon's counters may only be
        # published between ring-buffer polls, which a sustained load can postpone.
        start, served0 = agent.exchanges(), nginx.requests()
        # (t, requests served, rss MB, exchanges the daemon's /stats shows at that moment)
        series: list[tuple[float, int, float, int]] = []
        t0 = time.monotonic()
        wrk = start_wrk(nginx.url, plan.exchanges_cap_s + 5, 16, 2, workdir)
        try:
            while time.monotonic() - t0 < plan.exchanges_cap_s:
                time.sleep(1.0)
                n = nginx.requests() - served0
                series.append((time.monotonic() - t0, n, agent.rss() / MB,
                               agent.exchanges() - start))
                if n >= plan.exchanges_target:
                    break
        finally:
            wrk.stop()
        snap, _ = wait_drained(agent, quiet_s=2.0, timeout_s=120)
        served = nginx.requests() - served0
        series.append((time.monotonic() - t0, served, agent.rss() / MB,
                       agent.exchanges(snap) - start))
        result["requests_served"] = served
        result["exchanges_seen"] = agent.exchanges(snap) - start
        result["series"] = series
        result["exchanges"] = result["exchanges_seen"]
        result["exchanges_target"] = plan.exchanges_target
        result["rss_start_mb"] = series[0][2]
        result["rss_end_mb"] = series[-1][2]
        result["rss_max_mb"] = max(s[2] for s in series)
        result["end_rss_breakdown_mb"] = agent.rss_breakdown()
        result["loss_totals"] = {k: v for k, v in loss_counters(snap).items() if v}
        # Growth: least-squares slope of RSS over exchanges on the last 3/4 of the run
        # (the first quarter holds warm-up: caches, interpreter arenas, buffers).
        tail = series[len(series) // 4:]
        result["growth_mb_per_million"] = _slope([s[1] for s in tail],
                                                 [s[2] for s in tail]) * 1e6
        result["growth_last_3q_mb"] = tail[-1][2] - tail[0][2] if tail else float("nan")

        # SIGTERM -> every daemon process gone, under unpaced load (probes detached,
        # queued telemetry flushed: the daemon's shutdown path, as a user would stop it).
        wrk = start_wrk(nginx.url, plan.stop_under_load_s + 5, 16, 2, workdir)
        try:
            time.sleep(plan.stop_under_load_s)
            result["stop_under_load_pids"] = len(agent.pids())
            agent.stop()
        finally:
            wrk.stop()
        result["stop_under_load_s"] = agent.stop_s
        result["stop_rc"] = agent.stop_rc
    return result


def _slope(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3:
        return float("nan")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


# ---------------------------------------------------------------- 4. freshness

def freshness(plan: Plan, workdir: Path) -> dict:
    """Paced load (~200 exchanges/s), default batch settings; for every span received,
    its arrival (rotel printed it; we read the line) minus its end_time_unix_nano."""
    # The batch delay in force: OTEL_BSP_SCHEDULE_DELAY (ms) if set, else the daemon's default.
    if os.environ.get("OTEL_BSP_SCHEDULE_DELAY"):
        delay_s = float(os.environ["OTEL_BSP_SCHEDULE_DELAY"]) / 1000
    else:
        from otel_ebpf.telemetry.options import TelemetryOptions
        delay_s = TelemetryOptions().span_schedule_delay_s
    result: dict = {"batch_delay_s": delay_s}
    with Receiver(workdir, mode="detailed") as rx, Nginx(workdir) as nginx:
        with Agent(workdir, rx.grpc_endpoint, pids=nginx.pids()) as agent:
            rx.take_arrivals()
            w = run_wrk(nginx.url, plan.freshness_s, 2, 1, delay_ms=plan.freshness_delay_ms,
                        logdir=workdir)
            snap, _ = wait_drained(agent, quiet_s=1.0, timeout_s=30)
            seen = agent.exchanges(snap)
            deadline = time.monotonic() + delay_s + 10
            while rx.span_count() < seen and time.monotonic() < deadline:
                time.sleep(0.25)
            arrivals = rx.take_arrivals()
        lags = [(arr - end) / 1e9 for end, arr in arrivals]
        result.update({
            "requests": w.requests, "rps": w.rps, "exchanges": seen, "spans": len(lags),
            "p50_s": percentile(lags, 50), "p99_s": percentile(lags, 99),
            "max_s": max(lags) if lags else float("nan"),
            "min_s": min(lags) if lags else float("nan"),
        })
    if not lags:
        raise BenchmarkError("freshness: the receiver got no span (exchanges seen: %d)" % seen)
    return result


from tests.benchmark.http2 import http2  # noqa: E402 (section 5, its own module)

SECTIONS = {"overhead": overhead, "capacity": capacity, "memory": memory,
            "freshness": freshness, "http2": http2}


def run_section(name: str, plan: Plan, workdir: Path) -> dict:
    t0 = time.monotonic()
    try:
        out = SECTIONS[name](plan, workdir)
    except BenchmarkError as exc:
        log.error("section %s failed: %s", name, exc)
        out = {"error": str(exc)}
    out["wall_s"] = round(time.monotonic() - t0, 1)
    return out

