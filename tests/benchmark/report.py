"""Issue 5's targets, and the table and JSON a benchmark run ends with.

Contract: `rows(results)` turns the sections' dicts into (measurement, value, target,
verdict) rows; a verdict is "meets", "MISSES", or "n/a" when the section did not run or
failed (its error is shown instead). Nothing here measures; nothing raises on a miss.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

# Issue 5, "Targets".
BUSY_THROUGHPUT_MIN = 0.99
BUSY_P99_MAX = 1.02
NGINX_VS_FLOOR_MIN = 0.95
CAPACITY_MIN = 50_000
IDLE_RSS_MAX_MB = 60
HELD_RSS_MAX_MB = 150
# "Flat": the least-squares RSS trend over the last 3/4 of the run, per million
# exchanges. A leak of even 2 bytes per exchange shows as 2 MB/M.
FLAT_MB_PER_MILLION_MAX = 2.0
FRESHNESS_SLACK_S = 1.0


def _fmt(v: object, unit: str = "", digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return ("%.*g%s" % (digits, v, unit)) if abs(v) < 1000 else ("%.0f%s" % (v, unit))
    return "%s%s" % (v, unit)


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("meets" if ok else "MISSES")


def rows(results: dict) -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    sec = results.get("sections", {})

    def failed(name: str, label: str) -> bool:
        s = sec.get(name)
        if s is None:
            return True
        if "error" in s:
            out.append((label, "ERROR: " + s["error"].splitlines()[0][:70], "", "n/a"))
            return True
        return False

    if not failed("overhead", "1. overhead"):
        o = sec["overhead"]
        n = o["nginx"]
        med = n["median"]
        out.append(("1a nginx req/s untraced / empty / traced",
                    "%.0f / %.0f / %.0f" % (med["untraced"]["rps"], med["empty_probes"]["rps"],
                                            med["traced"]["rps"]), "", ""))
        out.append(("1a nginx traced / untraced throughput",
                    _fmt(n["traced_vs_untraced"]["throughput"]), "(info)", ""))
        out.append(("1a nginx empty-probes / untraced throughput",
                    _fmt(n["empty_probes_vs_untraced"]["throughput"]), "(floor)", ""))
        tf = n["traced_vs_empty_probes"]["throughput"]
        out.append(("1a nginx traced / empty-probes throughput", _fmt(tf),
                    ">= %.2f" % NGINX_VS_FLOOR_MIN, _verdict(tf >= NGINX_VS_FLOOR_MIN)))
        seen = sum(r["traced"]["daemon_exchanges"] for r in n["rounds"])
        reqs = sum(r["traced"]["requests"] for r in n["rounds"])
        lost = sum(v for r in n["rounds"] for k, v in r["traced"]["daemon_loss"].items()
                   if not k.endswith("_bytes"))
        out.append(("1a nginx traced arm: exchanges seen / requests",
                    "%d / %d (loss events %d)" % (seen, reqs, lost), "(info)", ""))
        out.append(("1a nginx traced / untraced p50, p99",
                    "%s, %s" % (_fmt(n["traced_vs_untraced"]["p50"]),
                                _fmt(n["traced_vs_untraced"]["p99"])), "(info)", ""))
        b = o["busy_1ms"]
        bt, bp = b["traced_vs_untraced"]["throughput"], b["traced_vs_untraced"]["p99"]
        out.append(("1b 1ms-CPU req/s untraced / traced",
                    "%.0f / %.0f" % (b["median"]["untraced"]["rps"], b["median"]["traced"]["rps"]),
                    "", ""))
        out.append(("1b 1ms-CPU traced / untraced throughput", _fmt(bt, digits=4),
                    ">= %.2f" % BUSY_THROUGHPUT_MIN, _verdict(bt >= BUSY_THROUGHPUT_MIN)))
        out.append(("1b 1ms-CPU traced / untraced p99 (p50)",
                    "%s (%s)" % (_fmt(bp, digits=4), _fmt(b["traced_vs_untraced"]["p50"], digits=4)),
                    "<= %.2f" % BUSY_P99_MAX, _verdict(bp <= BUSY_P99_MAX)))

    if not failed("capacity", "2. capacity"):
        c = sec["capacity"]
        best = c["max_sustained_exchanges_per_s"]
        ok = best >= CAPACITY_MIN and not math.isnan(c["export_ratio"]) \
            and c["export_ratio"] >= 1.0
        # Bounded by the daemon when loss began on the ladder, else by what CPU 0 could offer.
        note = (" (daemon-bound)" if c.get("loss_begins_at") else " (load-bound)")
        out.append(("2 max sustained exchanges/s, 1 core, 0 loss", _fmt(best) + note,
                    ">= %d" % CAPACITY_MIN, _verdict(ok)))
        out.append(("2 daemon CPU us per exchange (at %.0f ex/s)" % c.get("cpu_us_per_exchange_at", 0),
                    _fmt(c["cpu_us_per_exchange"]),
                    "<= %.0f" % (1e6 / CAPACITY_MIN),
                    _verdict(c["cpu_us_per_exchange"] <= 1e6 / CAPACITY_MIN)))
        out.append(("2 projected exchanges/s on one core", _fmt(c["projected_exchanges_per_s_one_core"]),
                    "(1e6 / us)", ""))
        out.append(("2 spans received / exchanges", "%d / %d" % (
                        c["receiver_spans"], c.get("daemon_final_exchanges",
                                                   c["daemon_total_exchanges"])),
                    "100 %", _verdict(c["export_ratio"] >= 1.0)))
        lb = c["loss_begins_at"]
        out.append(("2 loss begins at", "not reached" if lb is None else
                    "%.0f req/s offered" % lb["offered_rps"], "", ""))
        st = c["stall"]
        # Events and gaps, not bytes: a byte counter would dwarf the rest.
        counted = sum(v for k, v in st["loss"].items() if not k.endswith("_bytes"))
        out.append(("2 daemon stopped %.0fs under load: loss counted" % st["stopped_s"],
                    "%d (%s)" % (counted, ", ".join(sorted(k for k in st["loss"]
                                                           if not k.endswith("_bytes")))
                                 or "none"),
                    "> 0", _verdict(counted > 0)))

    if not failed("memory", "3. memory"):
        m = sec["memory"]
        out.append(("3 RSS idle", _fmt(m["idle_rss_mb"], " MB"), "<= %d MB" % IDLE_RSS_MAX_MB,
                    _verdict(m["idle_rss_mb"] <= IDLE_RSS_MAX_MB)))
        out.append(("3 RSS with %d open connections" % m["held_connections"],
                    _fmt(m["held_rss_mb"], " MB"), "<= %d MB" % HELD_RSS_MAX_MB,
                    _verdict(m["held_rss_mb"] <= HELD_RSS_MAX_MB
                             and m["held_connections"] >= 10_000)))
        full = m["requests_served"] >= m["exchanges_target"]
        g = m["growth_mb_per_million"]
        out.append(("3 RSS over %d requests (%d exchanges seen): start -> end (max)"
                    % (m["requests_served"], m["exchanges"]),
                    "%s -> %s (%s)" % (_fmt(m["rss_start_mb"], " MB"), _fmt(m["rss_end_mb"], " MB"),
                                       _fmt(m["rss_max_mb"], " MB")), "", ""))
        out.append(("3 RSS trend, MB per million exchanges", _fmt(g),
                    "<= %.0f (flat)" % FLAT_MB_PER_MILLION_MAX,
                    _verdict(g <= FLAT_MB_PER_MILLION_MAX and full) if not math.isnan(g) else "n/a"))

    if not failed("freshness", "4. freshness"):
        f = sec["freshness"]
        limit = f["batch_delay_s"] + FRESHNESS_SLACK_S
        out.append(("4 exchange end -> span at receiver p50 / p99",
                    "%s / %s" % (_fmt(f["p50_s"], " s"), _fmt(f["p99_s"], " s")),
                    "p99 <= %.1f s" % limit, _verdict(f["p99_s"] <= limit)))
        out.append(("4 spans received / exchanges", "%d / %d" % (f["spans"], f["exchanges"]),
                    "", ""))
    return out


def table(results: dict) -> str:
    r = rows(results)
    head = ("measurement", "value", "target", "verdict")
    widths = [max(len(x[i]) for x in [head, *r]) for i in range(4)]
    line = "| " + " | ".join("%-*s" % (w, h) for w, h in zip(widths, head, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join("%-*s" % (w, c) for w, c in zip(widths, row, strict=True)) + " |"
            for row in r]
    m = results["machine"]
    caption = ("Machine: %s CPUs (%s), kernel %s, %s GiB; %s; run %s, %s mode, %.0f s"
               % (m["nproc"], m["cpu_model"], m["kernel"], m["memory_gib"],
                  ", ".join("%s" % v for v in results.get("versions", {}).values()),
                  results["started_utc"], results["mode"], results.get("wall_s", 0)))
    return "\n".join([caption, "", line, sep, *body])


def profile_block(results: dict, top: int = 10) -> str:
    prof = results.get("sections", {}).get("capacity", {}).get("profile")
    if not prof or "error" in prof:
        return "" if not prof else "Daemon profile: %s" % prof["error"]
    lines = ["Daemon profile (pyinstrument, main thread, %s, %.0f req/s offered, %s s "
             "sampled; CPU %.1f us/exchange under the profiler)"
             % (prof.get("scope", "?"), prof["rps"], prof["profiled_s"],
                prof["cpu_us_per_exchange_profiled"]),
             "  self %   function"]
    lines += ["  %5.1f   %s" % (pct, name) for name, pct in prof["self_pct"][:top]]
    lines += ["  incl %   function"]
    lines += ["  %5.1f   %s" % (pct, name) for name, pct in prof["inclusive_pct"][:top]]
    return "\n".join(lines)


def write_json(results: dict, out: Path | None, repo: Path) -> Path:
    if out is None:
        out = repo / "bench-results" / ("bench-%s.json" % time.strftime("%Y%m%dT%H%M%SZ",
                                                                           time.gmtime()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str))
    return out
