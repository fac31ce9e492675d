"""Service discovery with real programs: which processes are reported, under which name.

Servers are copies of the Python interpreter under their own executable names
(svc-alpha, svc-beta, svc-gamma: /proc/PID/exe names the copy), plus nginx and curl.
Some start before the daemon, some after it; the daemon runs with discovery selectors
and exports over OTLP to a real receiver (rotel) or to jsonl, and the test asserts
exactly which processes' exchanges come out, with the service.name/namespace overrides.
A second test shows a process judged not reported is silenced in the kernel (a wrk
load against it costs almost no ring-buffer records), and that the same pid, once it
execs a selected program, is judged again and reported.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import require_or_fail
from tests.integration.peers import Daemon, Nginx, curl, free_port, process, settle, wait_for_port
from tests.receiver import Receiver

pytestmark = pytest.mark.usefixtures("bpf_available")

N = 7  # requests per server: exact counts


def interpreter_copy(directory: Path, name: str) -> str:
    """A copy of this Python interpreter named `name` (a copy, not a symlink: the kernel
    resolves symlinks, so /proc/PID/exe would name the real interpreter)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    shutil.copy2(os.path.realpath(sys.executable), path)
    return str(path)


def http_server(exe: str, port: int, www: Path, env: dict | None = None):
    return process([exe, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                    "--directory", str(www)], port=port, env=env)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which("/usr/sbin/" + name)
    if path is None:
        require_or_fail("%s is not installed (scripts/bootstrap.sh --test-peers installs it)"
                        % name)
    return path


def _stats(port: int) -> dict:
    with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=5) as resp:
        return _flatten(json.load(resp))


def _flatten(obj: object, prefix: str = "") -> dict:
    out: dict = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            key = "%s.%s" % (prefix, k) if prefix else str(k)
            out.update(_flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def _stat(stats: dict, name: str) -> int:
    hits = [v for k, v in stats.items() if k == name or k.endswith("." + name)]
    return int(hits[0]) if hits else 0


def test_selectors_overrides_and_processes_started_before_and_after(tmp_path):
    _tool("nginx")
    bin_dir = tmp_path / "bin"
    alpha, beta = interpreter_copy(bin_dir, "svc-alpha"), interpreter_copy(bin_dir, "svc-beta")
    gamma = interpreter_copy(bin_dir, "svc-gamma")
    www = tmp_path / "www"
    (www / "ignored-root").mkdir(parents=True)
    for d in (www, www / "ignored-root"):
        (d / "x").write_text("x\n")
    ports = {name: free_port() for name in
             ("alpha", "alpha_ignored", "beta", "beta_other", "gamma", "nginx")}
    config = tmp_path / "discovery.yaml"
    config.write_text(textwrap.dedent("""\
        discovery:
          instrument:
            - exe_name: svc-alpha
              service_name: alpha-svc
              service_namespace: shop
            - exe_path: "*/svc-beta"
              open_ports: "%d"
              name: beta-svc
            - exe_name: nginx
          exclude_instrument:
            - cmd_args_regex: "ignored-roo[t]"
        """ % ports["beta"]))
    nginx = Nginx(tmp_path, ports["nginx"])
    (nginx.dir / "www" / "x").write_text("x\n")

    with Receiver() as rx, \
            http_server(alpha, ports["alpha"], www) as alpha_proc, \
            http_server(alpha, ports["alpha_ignored"], www / "ignored-root"):
        env = {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
               "OTEL_EXPORTER_OTLP_ENDPOINT": rx.grpc_endpoint,
               "OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRIC_EXPORT_INTERVAL": "1000"}
        with Daemon(tmp_path, "--config", str(config), exporter="otlp", env=env) as daemon, \
                http_server(beta, ports["beta"], www) as beta_proc, \
                http_server(beta, ports["beta_other"], www), \
                http_server(gamma, ports["gamma"], www), nginx:
            for i in range(N):
                for name, port in ports.items():
                    assert curl("http://127.0.0.1:%d/x?%s=%d" % (port, name, i)).stdout == "200"
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and sum(
                    s.kind == "SPAN_KIND_SERVER" for s in rx.spans) < 3 * N:
                time.sleep(0.2)
            settle(2.0)  # anything more (a wrongly reported process) would show
            assert daemon.stop() == 0, daemon.log[-3000:]
        spans = list(rx.spans)

    ours = [s for s in spans if s.attributes.get("server.port") in ports.values()
            or s.attributes.get("url.query", "").split("=")[0] in ports]
    summary = Counter((s.kind, s.resource.get("service.name"), s.attributes.get("server.port"))
                      for s in ours)
    assert set(summary) == {("SPAN_KIND_SERVER", "alpha-svc", ports["alpha"]),
                            ("SPAN_KIND_SERVER", "beta-svc", ports["beta"]),
                            ("SPAN_KIND_SERVER", "nginx", ports["nginx"])}, summary
    for name, service, pid in (("alpha", "alpha-svc", alpha_proc.pid),
                               ("beta", "beta-svc", beta_proc.pid),
                               ("nginx", "nginx", None)):
        got = [s for s in ours if s.resource.get("service.name") == service]
        assert sorted(s.attributes["url.query"] for s in got) == sorted(
            "%s=%d" % (name, i) for i in range(N)), (service, summary)
        if pid is not None:
            assert {s.resource.get("process.pid") for s in got} == {pid}
    alpha_resource = next(s.resource for s in ours if s.resource.get("service.name") == "alpha-svc")
    assert alpha_resource["service.namespace"] == "shop"
    assert alpha_resource["process.executable.name"] == "svc-alpha"
    beta_resource = next(s.resource for s in ours if s.resource.get("service.name") == "beta-svc")
    assert "service.namespace" not in beta_resource


EXEC_LATER = textwrap.dedent('''
    import functools, http.server, os, sys, threading, time
    first, second, trigger, then_exe, www = sys.argv[1:]
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=www)
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", int(first)), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    while not os.path.exists(trigger):
        time.sleep(0.05)
    server.server_close()
    os.execv(then_exe, [then_exe, "-m", "http.server", second, "--bind", "127.0.0.1",
                        "--directory", www])
''')


def test_excluded_process_is_silenced_in_the_kernel_and_judged_again_after_exec(tmp_path):
    wrk = _tool("wrk")
    bin_dir = tmp_path / "bin"
    alpha, gamma = interpreter_copy(bin_dir, "svc-alpha"), interpreter_copy(bin_dir, "svc-gamma")
    www = tmp_path / "www"
    www.mkdir()
    (www / "x").write_text("x\n")
    script = tmp_path / "exec_later.py"
    script.write_text(EXEC_LATER)
    trigger = tmp_path / "exec-now"
    first, second, health = free_port(), free_port(), free_port()
    with Daemon(tmp_path, "--exe", "svc-alpha", "--health-listen", "127.0.0.1:%d" % health) \
            as daemon:
        # Started after the daemon, as svc-gamma: not selected.
        with process([gamma, str(script), str(first), str(second), str(trigger), alpha,
                      str(www)], port=first) as proc:
            assert curl("http://127.0.0.1:%d/x?before=warmup" % first).stdout == "200"
            settle(1.0)  # its verdict reaches the kernel
            before = _stats(health)
            load = subprocess.run([wrk, "-t1", "-c2", "-d2s", "http://127.0.0.1:%d/x" % first],
                                  capture_output=True, text=True, timeout=60)
            assert load.returncode == 0, load.stdout + load.stderr
            settle(1.0)
            after = _stats(health)
            requests = int(next(line.split()[0] for line in load.stdout.splitlines()
                                if "requests in" in line))
            # Same pid, another program: svc-alpha, selected.
            trigger.write_text("go")
            wait_for_port(second)
            settle(0.5)
            assert os.path.basename(os.readlink("/proc/%d/exe" % proc.pid)) == "svc-alpha"
            for i in range(N):
                assert curl("http://127.0.0.1:%d/x?after=%d" % (second, i)).stdout == "200"
            settle(2.0)
            assert daemon.stop() == 0, daemon.log[-3000:]

    got = daemon.exchanges()
    from_proc = [e for e in got if e["process.pid"] == proc.pid]
    records = _stat(after, "capture.events") - _stat(before, "capture.events")
    summary = ("wrk sent %d requests to the excluded server; ring-buffer records meanwhile: "
               "%d; exchanges dropped in user space: %d; rejudged execs: %d; reported from "
               "its pid: %s" % (requests, records,
                                _stat(after, "discovery.dropped_exchanges"),
                                _stat(after, "discovery.rejudged_execs"),
                                Counter(e.get("url.query") for e in from_proc)))
    print(summary)
    assert requests >= 500, summary
    # Without the kernel's deny-list each exchange would be two records (server and
    # wrk); other agents' traffic on this host may add a few.
    assert records < max(200, requests // 20), summary
    # Before the exec: nothing of it reported; after: exactly the N, as svc-alpha.
    assert sorted(e["url.query"] for e in from_proc) == sorted("after=%d" % i for i in range(N)), \
        summary
    assert {e["kind"] for e in from_proc} == {"SERVER"}
    assert {e["process.executable.name"] for e in from_proc} == {"svc-alpha"}
    # curl and wrk are not selected: no CLIENT exchange toward these servers
    assert not [e for e in got if e["kind"] == "CLIENT"
                and e.get("server.port") in (first, second)], summary
