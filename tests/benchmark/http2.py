"""Section 5, HTTP/2 and gRPC beside HTTP/1: what tracing costs per protocol.

Three loads, each against a real server, untraced and traced:
  http1  wrk -t2 -c16 against nginx (the same small static file as section 1)
  http2  h2load (nghttp2) against the same nginx's h2c port (prior knowledge, HTTP/2
         multiplexing: -c16 clients x -m10 streams)
  grpc   h2load sending unary gRPC calls (POST /helloworld.Greeter/SayHello, a
         length-prefixed message, content-type application/grpc) to the grpc-go
         Greeter (tests/peers/go-grpc, built by scripts/bootstrap.sh --test-peers)
"Traced" is `otel-ebpf run --exporter none --pid <servers>` (our BPF programs, the
drain and the decoding, nothing exported: section 1's traced-none arm), one daemon for
the round's three traced arms, CPU and exchanges taken as deltas around each arm. Per
protocol: throughput traced / untraced (median of rounds, arms in alternating order),
daemon CPU per exchange (all daemon processes), ring-buffer records per exchange,
exchanges seen vs. requests completed.
HTTP/2 never takes the kernel fast path: its number is the chunk stream's cost.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import time
from pathlib import Path

from tests.benchmark.agent import Agent, loss_counters, delta
from tests.benchmark.peers import NGINX_CONF, Nginx, run_wrk
from tests.benchmark.proc import BenchmarkError, Proc, free_port, wait_port

log = logging.getLogger(__name__)

GRPC_PATH = "/helloworld.Greeter/SayHello"
H2_CLIENTS, H2_STREAMS = 16, 10


class NginxH2(Nginx):
    """Section 1's nginx with a second, h2c listener (`listen ... http2`)."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, workers=1)
        self.h2_port = free_port()
        conf = NGINX_CONF.format(dir=self.dir, port=self.port, workers=1).replace(
            "backlog=4096;", "backlog=4096;\n        listen 127.0.0.1:%d http2;" % self.h2_port)
        (self.dir / "nginx.conf").write_text(conf)
        self.h2_url = "http://127.0.0.1:%d/index.html" % self.h2_port


class GoGreeter:
    """The grpc-go Greeter server (tests/peers/go-grpc)."""

    def __init__(self, workdir: Path) -> None:
        from tests.integration.peers import go_grpc_greeter

        try:
            binary = go_grpc_greeter()
        except FileNotFoundError as exc:
            raise BenchmarkError(str(exc)) from None
        self.port = free_port()
        self.proc = Proc("go-greeter", [str(binary), "serve", str(self.port)], workdir)
        self.url = "http://127.0.0.1:%d%s" % (self.port, GRPC_PATH)

    def __enter__(self) -> GoGreeter:
        self.proc.start()
        wait_port(self.port, proc=self.proc.proc, what="grpc-go greeter")
        return self

    def __exit__(self, *exc) -> None:
        self.proc.stop(timeout=15)


FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                      r"(\d+) failed, (\d+) errored, (\d+) timeout")
MEAN = re.compile(r"time for request:\s+\S+\s+\S+\s+([\d.]+)(us|ms|s)")


def run_h2load(url: str, duration_s: float, workdir: Path, grpc_body: Path | None = None) -> dict:
    """h2load for `duration_s` (-c16 -m10 -t2); gRPC calls when grpc_body is given."""
    exe = shutil.which("h2load")
    if not exe:
        raise BenchmarkError("h2load is not installed: run scripts/bootstrap.sh --test-peers")
    argv = [exe, "-c%d" % H2_CLIENTS, "-m%d" % H2_STREAMS, "-t2",
            "-D%d" % max(1, round(duration_s)), url]
    if grpc_body is not None:
        argv += ["-d", str(grpc_body), "-H", "content-type: application/grpc",
                 "-H", "te: trailers"]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60)
    with open(workdir / "h2load.log", "a") as f:
        f.write(" ".join(argv) + "\n" + res.stdout + res.stderr + "\n")
    fin, req, mean = FINISHED.search(res.stdout), REQUESTS.search(res.stdout), MEAN.search(res.stdout)
    if not (fin and req):
        raise BenchmarkError("h2load against %s printed no result (exit %s): %s"
                             % (url, res.returncode, (res.stderr or res.stdout)[-500:]))
    scale = {"us": 1.0, "ms": 1e3, "s": 1e6}
    return {"requests": int(req.group(4)), "rps": float(fin.group(3)),
            "errors": int(req.group(5)) + int(req.group(6)) + int(req.group(7)),
            "mean_us": float(mean.group(1)) * scale[mean.group(2)] if mean else float("nan")}


def _load(proto: str, nginx: NginxH2, greeter: GoGreeter, body: Path, seconds: float,
          workdir: Path) -> dict:
    if proto == "http1":
        r = run_wrk(nginx.url, seconds, 16, 2, logdir=workdir).as_dict()
        return {"requests": r["requests"], "rps": r["rps"], "errors": r["errors"],
                "mean_us": r["mean_us"]}
    if proto == "http2":
        return run_h2load(nginx.h2_url, seconds, workdir)
    return run_h2load(greeter.url, seconds, workdir, grpc_body=body)


PROTOCOLS = ("http1", "http2", "grpc")


def http2(plan, workdir: Path) -> dict:
    import statistics

    body = workdir / "grpc-body.bin"
    message = b"world"
    body.write_bytes(b"\x00" + len(message).to_bytes(4, "big") + message)
    rounds: list[dict] = []
    with NginxH2(workdir) as nginx, GoGreeter(workdir) as greeter:
        pids = [*nginx.pids(), greeter.proc.pid]
        for i in range(plan.rounds):
            rec: dict = {p: {} for p in PROTOCOLS}
            order = ["untraced", "traced"] if i % 2 == 0 else ["traced", "untraced"]
            for arm in order:
                if arm == "untraced":
                    for proto in PROTOCOLS:
                        rec[proto]["untraced"] = _load(proto, nginx, greeter, body, plan.arm_s,
                                                       workdir)
                    continue
                with Agent(workdir, None, pids=pids, exporter="none",
                           name="otel-ebpf-h2-%d" % i) as agent:
                    for proto in PROTOCOLS:
                        before, cpu0 = agent.stats(), agent.cpu_s()
                        res = _load(proto, nginx, greeter, body, plan.arm_s, workdir)
                        after = _drained(agent)
                        res["daemon_cpu_s"] = agent.cpu_s() - cpu0
                        res["daemon_exchanges"] = agent.exchanges(after) - agent.exchanges(before)
                        # ring-buffer records decoded (chunk-stream events and fast-path
                        # records alike): what the daemon's CPU per exchange pays for
                        res["daemon_records"] = (after.get("capture.events", 0)
                                                 - before.get("capture.events", 0))
                        res["daemon_loss"] = delta(loss_counters(after), loss_counters(before))
                        rec[proto]["traced"] = res
            for proto in PROTOCOLS:
                log.info("http2 round %d %s: untraced %.0f req/s, traced %.0f req/s, "
                         "%d exchanges / %d requests", i + 1, proto,
                         rec[proto]["untraced"]["rps"], rec[proto]["traced"]["rps"],
                         rec[proto]["traced"]["daemon_exchanges"],
                         rec[proto]["traced"]["requests"])
            rounds.append(rec)
    out: dict = {"plan": {"rounds": plan.rounds, "arm_s": plan.arm_s,
                          "h2load": "-c%d -m%d -t2" % (H2_CLIENTS, H2_STREAMS),
                          "wrk": "-t2 -c16"}, "rounds": rounds}
    for proto in PROTOCOLS:
        un = statistics.median(r[proto]["untraced"]["rps"] for r in rounds)
        tr = statistics.median(r[proto]["traced"]["rps"] for r in rounds)
        cpu = sum(r[proto]["traced"]["daemon_cpu_s"] for r in rounds)
        seen = sum(r[proto]["traced"]["daemon_exchanges"] for r in rounds)
        records = sum(r[proto]["traced"]["daemon_records"] for r in rounds)
        out[proto] = {
            "untraced_rps": un, "traced_rps": tr,
            "traced_vs_untraced": tr / un if un else float("nan"),
            "daemon_us_per_exchange": cpu * 1e6 / seen if seen else float("nan"),
            "exchanges": seen,
            "records_per_exchange": records / seen if seen else float("nan"),
            "requests": sum(r[proto]["traced"]["requests"] for r in rounds),
            "loss_events": sum(v for r in rounds
                               for k, v in r[proto]["traced"]["daemon_loss"].items()
                               if not k.endswith("_bytes")),
        }
    return out


def _drained(agent: Agent, quiet_s: float = 1.0, timeout_s: float = 30.0) -> dict:
    """The daemon's stats once its exchange count stopped moving."""
    t0 = time.monotonic()
    snap = agent.stats()
    last, since = agent.exchanges(snap), time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        time.sleep(0.25)
        snap = agent.stats()
        now = agent.exchanges(snap)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return snap
