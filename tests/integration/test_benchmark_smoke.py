"""Smoke run of the benchmark harness (tests/benchmark, `--smoke`: seconds per section).

It proves the harness, its real peers (nginx, Node.js, wrk, rotel, the empty-probe
floor) and the daemon work together, and checks what must hold at any speed: every
request a client completed was seen by the daemon or a loss counter says why not,
exact counts (211 held connections -> 211 exchanges), every exchange of the freshness
run reached the receiver, and no span arrived before its exchange ended. No timing
assertion: speed is the benchmark's table, not a test verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _silent_loss(section: dict) -> str | None:
    """A traced run where completed requests went unseen and no loss counter moved."""
    unseen = section["requests"] - section["exchanges"]
    if unseen > 0 and not section["loss"]:
        return "%d requests completed but unseen, and no loss counted" % unseen
    return None


def test_benchmark_smoke(bpf_available, tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "500"}   # a short freshness wait
    res = subprocess.run([sys.executable, "-m", "tests.benchmark", "--smoke", "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    results = json.loads(out.read_text())
    sections = results["sections"]
    assert set(sections) == {"overhead", "capacity", "memory", "freshness", "http2"}
    for name, section in sections.items():
        assert "error" not in section, (name, section.get("error"))

    # The table names every target and gives each a verdict.
    for label in ("1a nginx traced / empty-probes", "1b 1ms-CPU traced / untraced p99",
                  "2 max sustained", "3 RSS idle", "4 exchange end -> span"):
        assert label in res.stdout, res.stdout

    overhead = sections["overhead"]
    for server in ("nginx", "busy_1ms"):
        traced = overhead[server]["rounds"][0]["traced"]
        assert traced["requests"] > 0 and traced["rps"] > 0
        problem = _silent_loss({"requests": traced["requests"],
                                "exchanges": traced["daemon_exchanges"],
                                "loss": traced["daemon_loss"]})
        assert problem is None, (server, problem)
    assert overhead["nginx"]["rounds"][0]["empty_probes"]["requests"] > 0
    assert overhead["nginx"]["empty_probes"].startswith("attached ")

    capacity = sections["capacity"]
    for step in capacity["steps"]:
        assert step["exchanges"] > 0
        assert _silent_loss(step) is None, step
    assert capacity["cpu_us_per_exchange"] > 0
    # By the time the daemon stopped, every exchange reached the receiver as a span or
    # was counted as a dropped span.
    dropped = sum(v for k, v in capacity["daemon_loss_totals"].items() if "span" in k)
    assert capacity["receiver_spans"] + dropped == capacity["daemon_final_exchanges"], capacity

    memory = sections["memory"]
    assert memory["held_connections"] == 211
    assert memory["held_exchanges_seen"] == 211
    assert memory["idle_rss_mb"] > 0
    assert memory["requests_served"] >= 1000
    assert _silent_loss({"requests": memory["requests_served"],
                         "exchanges": memory["exchanges_seen"],
                         "loss": memory["loss_totals"]}) is None, memory

    fresh = sections["freshness"]
    assert fresh["exchanges"] > 0
    assert fresh["spans"] == fresh["exchanges"], fresh
    assert fresh["min_s"] > 0, "a span arrived before its exchange ended: clock conversion?"

    h2 = sections["http2"]
    for proto in ("http1", "http2", "grpc"):
        traced = h2["rounds"][0][proto]["traced"]
        assert traced["requests"] > 0 and traced["rps"] > 0, (proto, traced)
        problem = _silent_loss({"requests": traced["requests"],
                                "exchanges": traced["daemon_exchanges"],
                                "loss": traced["daemon_loss"]})
        assert problem is None, (proto, problem)
