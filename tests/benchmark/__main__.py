"""`python -m tests.benchmark [--quick] [--only SECTION,...] [--out FILE]`

Runs the sections of tests/benchmark (overhead, capacity, memory, freshness) in that
order, prints the table, writes the JSON (default bench-results/bench-<UTC time>.json).
Needs root, BCC and the peers from `scripts/bootstrap.sh --test-peers`. Exit status: 0
when every section ran (targets met or not: the table says), 1 when a section failed
to run, 2 on bad usage or a missing prerequisite.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from tests.benchmark import report
from tests.benchmark.proc import machine_info, versions
from tests.benchmark.scenarios import SECTIONS, Plan, run_section

log = logging.getLogger("tests.benchmark")
REPO = Path(__file__).resolve().parents[2]


def prerequisites() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("not root: loading eBPF programs needs root")
    try:
        import bcc  # noqa: F401
    except ImportError:
        problems.append("bcc is not importable: use .venv/bin/python made by scripts/bootstrap.sh")
    for tool in ("nginx", "wrk", "node"):
        if not shutil.which(tool) and not os.path.exists("/usr/sbin/" + tool):
            problems.append("%s is missing: run scripts/bootstrap.sh --test-peers" % tool)
    try:
        import rotel  # noqa: F401
    except ImportError:
        problems.append("the rotel receiver is missing: pip install -e '.[test]'")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.benchmark",
                                     description="Measure otel-ebpf against issue 5's targets.")
    parser.add_argument("--quick", action="store_true",
                        help="about two minutes: 1 round, short arms, 1,000 connections, "
                        "30k exchanges (a smoke run; its numbers are not the benchmark's)")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds per section: checks the harness works (used by "
                        "tests/integration/test_benchmark_smoke.py)")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help="comma-separated sections (default: all): %s" % ", ".join(SECTIONS))
    parser.add_argument("--out", type=Path, help="JSON output path")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir (peer logs, configs) even when all went well")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s bench: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error("unknown section(s) %s; choose from %s" % (", ".join(unknown),
                                                                 ", ".join(SECTIONS)))
    problems = prerequisites()
    if problems:
        for p in problems:
            print("benchmark: %s" % p, file=sys.stderr)
        return 2

    plan = Plan.smoke() if args.smoke else Plan.quick() if args.quick else Plan()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    workdir = Path(tempfile.mkdtemp(prefix="otel-ebpf-bench-"))
    # nginx runs as root here but its config/tmp paths live under this dir.
    os.chmod(workdir, 0o755)
    log.info("work dir %s (peer logs); sections %s", workdir, ", ".join(sections))
    results: dict = {"started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                     "mode": mode,
                     "machine": machine_info(), "versions": versions(),
                     "plan": plan.__dict__, "sections": {}}
    t0 = time.monotonic()
    failed = False
    try:
        for name in sections:
            log.info("section %s ...", name)
            results["sections"][name] = run_section(name, plan, workdir)
            failed |= "error" in results["sections"][name]
    except KeyboardInterrupt:
        log.warning("interrupted; reporting what was measured")
        failed = True
    results["wall_s"] = round(time.monotonic() - t0, 1)
    results["verdicts"] = [dict(zip(("measurement", "value", "target", "verdict"), row,
                                    strict=True)) for row in report.rows(results)]
    out = report.write_json(results, args.out, REPO)
    print(report.table(results))
    block = report.profile_block(results)
    if block:
        print("\n" + block)
    print("\nJSON: %s" % out)
    if failed or args.keep:
        print("peer logs kept in %s" % workdir)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
