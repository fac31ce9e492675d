"""What our BPF programs cost the traced server, per program and per exchange, measured
by the kernel itself rather than by throughput (which is noisy on a shared machine).

usage: sudo .venv/bin/python -m tests.benchmark.bpf_cost [--duration S] [--connections N]
                                                         [--no-empty] [--json FILE]

nginx serves a small static file to wrk at saturation (the benchmark's section 1a
setup) twice: traced by `otel-ebpf run --exporter none` (the daemon draining, exporting
nothing: the "traced-none" arm), then under the empty probes on the same tracepoints
(the floor). For each arm the kernel's BPF statistics (run_time_ns, run_cnt: enabled
with BPF_ENABLE_STATS for as long as this script holds the fd, so nothing global is
left switched on) of exactly the programs that arm's process holds (found through
`bpftool perf show` and /proc/<pid>/fdinfo, so other agents' programs on the same machine never count) are
read before and after the wrk run. Exchanges = requests nginx served in between
(stub_status). Printed per program: runs per exchange, ns per run, ns per exchange;
then the total and our cost beyond the floor. verified_insns is printed beside each
traced program (the verifier's budget is 1M).

ns per run is the program's own time (the kernel times the BPF program only, not the
tracepoint dispatch around it), so it is insensitive to how busy the other core is,
unlike req/s; it does grow with cache misses, so compare runs on the same machine.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.benchmark.agent import Agent, EmptyProbes
from tests.benchmark.peers import Nginx, run_wrk
from tests.benchmark.proc import BenchmarkError, tree

log = logging.getLogger("tests.benchmark.bpf_cost")

BPF_PROG_GET_FD_BY_ID = 13     # enum bpf_cmd
BPF_ENABLE_STATS = 32
BPF_STATS_RUN_TIME = 0         # enum bpf_stats_type
NR_BPF = {"x86_64": 321, "aarch64": 280}


def enable_bpf_stats() -> int:
    """An fd that keeps the kernel's BPF run-time statistics on while it is open."""
    nr = NR_BPF.get(platform.machine())
    if nr is None:
        raise BenchmarkError("bpf_cost: unsupported architecture %s" % platform.machine())
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_uint32) * 32)
    ctypes.c_uint32.from_buffer(attr).value = BPF_STATS_RUN_TIME
    fd = libc.syscall(nr, BPF_ENABLE_STATS, attr, ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise BenchmarkError("bpf_cost: BPF_ENABLE_STATS failed: %s" % os.strerror(err))
    return fd


def verified_insns(prog_id: int) -> int:
    """The verifier's instruction count of a program (its fdinfo; bpftool 7.1 does not
    print it), 0 when the kernel does not say."""
    libc = ctypes.CDLL(None, use_errno=True)
    attr = ctypes.create_string_buffer(ctypes.sizeof(ctypes.c_uint32) * 32)
    ctypes.c_uint32.from_buffer(attr).value = prog_id
    fd = libc.syscall(NR_BPF[platform.machine()], BPF_PROG_GET_FD_BY_ID, attr,
                      ctypes.sizeof(attr))
    if fd < 0:
        return 0
    try:
        found = re.search(r"^verified_insns:\s*(\d+)",
                          Path("/proc/self/fdinfo/%d" % fd).read_text(), re.M)
        return int(found.group(1)) if found else 0
    finally:
        os.close(fd)


@dataclass
class ProgStat:
    prog_id: int
    name: str
    run_time_ns: int
    run_cnt: int
    verified_insns: int


def prog_ids(pids: list[int]) -> set[int]:
    """Ids of the BPF programs the processes hold: attached through a perf event
    (tracepoints, uprobes: `bpftool perf show`) or as a plain program fd (fdinfo)."""
    wanted = set(pids)
    ids: set[int] = set()
    res = subprocess.run(["bpftool", "perf", "show", "-j"], capture_output=True, text=True,
                         timeout=30)
    for link in json.loads(res.stdout or "[]"):
        if link.get("pid") in wanted and "prog_id" in link:
            ids.add(int(link["prog_id"]))
    for pid in pids:
        try:
            fds = os.listdir("/proc/%d/fdinfo" % pid)
        except OSError:
            continue
        for fd in fds:
            try:
                text = Path("/proc/%d/fdinfo/%s" % (pid, fd)).read_text()
            except OSError:
                continue
            found = re.search(r"^prog_id:\s*(\d+)", text, re.M)
            if found and "prog_type:" in text:
                ids.add(int(found.group(1)))
    return ids


def snapshot(pids: list[int]) -> dict[int, ProgStat]:
    """The statistics of the processes' programs now (`bpftool prog show`; its names
    are the full function names, from BTF)."""
    ids = prog_ids(pids)
    res = subprocess.run(["bpftool", "prog", "show", "-j"], capture_output=True, text=True,
                         timeout=30)
    out: dict[int, ProgStat] = {}
    for prog in json.loads(res.stdout or "[]"):
        if prog["id"] in ids:
            out[prog["id"]] = ProgStat(prog["id"], short(prog.get("name", str(prog["id"]))),
                                       prog.get("run_time_ns", 0), prog.get("run_cnt", 0),
                                       verified_insns(prog["id"]))
    if not out:
        raise BenchmarkError("bpf_cost: no BPF program found for pids %s" % pids)
    return out


def short(name: str) -> str:
    for prefix in ("tracepoint__syscalls__", "tracepoint__"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def measure(pids: list[int], nginx: Nginx, duration_s: float, connections: int,
            workdir: Path, agent: Agent | None = None) -> dict:
    """Run wrk at saturation and return per-program deltas and the exchanges served
    (and the daemon's CPU over the run when `agent` is given)."""
    run_wrk(nginx.url, 1, connections=connections, logdir=workdir)   # warm-up
    before = snapshot(pids)
    cpu0 = agent.cpu_s() if agent else 0.0
    served0 = nginx.requests()
    wrk = run_wrk(nginx.url, duration_s, connections=connections, logdir=workdir)
    served = nginx.requests() - served0 - 1   # the second status read counts itself
    cpu = agent.cpu_s() - cpu0 if agent else 0.0
    after = snapshot(pids)
    progs = []
    for i, a in after.items():
        b = before.get(i)
        if b is None:
            continue
        runs = a.run_cnt - b.run_cnt
        ns = a.run_time_ns - b.run_time_ns
        progs.append({"name": a.name, "runs": runs, "ns": ns,
                      "verified_insns": a.verified_insns})
    progs.sort(key=lambda p: -p["ns"])
    return {"served": served, "rps": wrk.rps, "programs": progs,
            "total_ns": sum(p["ns"] for p in progs), "daemon_cpu_s": cpu,
            "wrk_s": wrk.duration_s}


def print_arm(title: str, arm: dict, insns: bool) -> None:
    ex = max(arm["served"], 1)
    print("\n%s: %d exchanges (%.0f req/s)" % (title, arm["served"], arm["rps"]))
    head = "%-28s %10s %10s %12s" % ("program", "runs/ex", "ns/run", "ns/exchange")
    print(head + ("  %14s" % "verified_insns" if insns else ""))
    for p in arm["programs"]:
        if not p["runs"]:
            continue
        line = "%-28s %10.3f %10.1f %12.1f" % (p["name"], p["runs"] / ex,
                                              p["ns"] / p["runs"], p["ns"] / ex)
        print(line + ("  %14d" % p["verified_insns"] if insns else ""))
    print("%-28s %10s %10s %12.1f" % ("total", "", "", arm["total_ns"] / ex))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmark.bpf_cost",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of wrk per arm")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--no-empty", action="store_true", help="skip the empty-probes arm")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bpf_cost: %(message)s")
    if os.geteuid() != 0:
        print("bpf_cost: needs root (loads eBPF programs)", file=sys.stderr)
        return 2
    stats_fd = enable_bpf_stats()
    result: dict = {}
    try:
        with tempfile.TemporaryDirectory(prefix="bpf-cost-") as tmp:
            workdir = Path(tmp)
            with Nginx(workdir) as nginx:
                with Agent(workdir, None, pids=nginx.pids(), exporter="none") as agent:
                    result["traced_none"] = measure(tree(agent.pid), nginx, args.duration,
                                                    args.connections, workdir, agent)
                    stats = agent.stats()
                    result["traced_none"]["daemon_exchanges_total"] = agent.exchanges(stats)
                if not args.no_empty:
                    with EmptyProbes(workdir) as probes:
                        result["empty_probes"] = measure(tree(probes.proc.pid), nginx,
                                                         args.duration, args.connections,
                                                         workdir)
    finally:
        os.close(stats_fd)
    print_arm("traced-none (otel-ebpf run --exporter none)", result["traced_none"], True)
    if "empty_probes" in result:
        print_arm("empty probes (the floor)", result["empty_probes"], False)
        t = result["traced_none"]["total_ns"] / max(result["traced_none"]["served"], 1)
        e = result["empty_probes"]["total_ns"] / max(result["empty_probes"]["served"], 1)
        print("\nBPF ns per exchange: traced-none %.1f, empty %.1f, ours beyond the floor %.1f"
              % (t, e, t - e))
    tn = result["traced_none"]
    if tn["served"] and tn["wrk_s"]:
        # The daemon drains on the same cores: beside the BPF time, what nginx competes with.
        print("daemon CPU (user space, draining, exporting nothing): %.0f ns per exchange, "
              "%.2f cores" % (tn["daemon_cpu_s"] * 1e9 / tn["served"],
                              tn["daemon_cpu_s"] / tn["wrk_s"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
