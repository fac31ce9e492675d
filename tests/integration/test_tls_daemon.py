"""HTTPS through the whole daemon: `otel-ebpf run --exporter jsonl` with its own TLS
wiring (TlsAttacher in the daemon loop), real nginx/node/curl over TLS, jsonl records
with url.scheme = https and exact counts.

Node is started AFTER the daemon: the daemon must find the statically linked OpenSSL in
the new `node` process by itself (exec tracepoint / periodic rescan) before traffic.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.integration.peers import Daemon, settle
from tests.integration.test_tls import (  # noqa: F401  (certs is a fixture)
    INDEX,
    N,
    certs,
    nginx_tls,
    node_exports_openssl,
    node_tls_server,
    tree_pids,
)

pytestmark = pytest.mark.usefixtures("bpf_available")


def curl_keepalive(urls: list[str], cert) -> tuple[int, list[str]]:
    args = ["curl", "--http1.1", "-sS", "--cacert", str(cert)]
    for url in urls:
        args += ["-o", "/dev/null", "-w", "%{http_code}\\n", url]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    return proc.returncode, proc.stdout.split()


def wait_for_log(daemon: Daemon, pattern: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if re.search(pattern, daemon.log):
            return
        time.sleep(0.05)
    pytest.fail("daemon never logged %r:\n%s" % (pattern, daemon.log[-3000:]))


def test_daemon_reports_https_exchanges_from_nginx_curl_and_node(tmp_path, certs):  # noqa: F811
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed (scripts/bootstrap.sh --test-peers installs it)")
    with Daemon(tmp_path, "--log-level", "info") as daemon:
        with nginx_tls(tmp_path, certs) as (port, ndir):
            nginx_pids = tree_pids(int((ndir / "nginx.pid").read_text()))
            _, codes = curl_keepalive(
                ["https://127.0.0.1:%d/index.html?d=%d" % (port, i) for i in range(N)], certs[0])
            assert codes == ["200"] * N
            with node_tls_server(tmp_path, certs) as (node_port, node_proc):
                if node_exports_openssl():  # else it uses the system libssl
                    wait_for_log(daemon, r"TLS: attached \d+ probes to %s"
                                 % re.escape(os.path.realpath(node)))
                _, codes = curl_keepalive(
                    ["https://127.0.0.1:%d/n/%d" % (node_port, i) for i in range(N)], certs[0])
                assert codes == ["200"] * N
                settle()
        daemon.stop()
    got = daemon.exchanges()
    nginx = [e for e in got if e["process.pid"] in nginx_pids]
    node_x = [e for e in got if e["process.pid"] == node_proc.pid]
    curl_x = [e for e in got if e["kind"] == "CLIENT" and e.get("server.port") in (port, node_port)]
    print("daemon: nginx %d/%d, node %d/%d, curl %d/%d" % (len(nginx), N, len(node_x), N,
                                                           len(curl_x), 2 * N))
    assert len(nginx) == N, daemon.log[-3000:]
    assert len(node_x) == N, daemon.log[-3000:]
    assert len(curl_x) == 2 * N, daemon.log[-3000:]
    for e in nginx + node_x + curl_x:
        assert e["url.scheme"] == "https"
        assert e["http.request.method"] == "GET"
        assert e["http.response.status_code"] == 200
        assert "otel_ebpf.outcome" not in e
    assert sorted(e["url.path"] for e in nginx) == ["/index.html"] * N
    assert all(e["http.response.body.size"] == len(INDEX) for e in nginx)
    assert all(e["kind"] == "SERVER" and e["server.port"] == port for e in nginx)
    assert sorted(e["url.path"] for e in node_x) == sorted("/n/%d" % i for i in range(N))
    assert all(e["kind"] == "SERVER" for e in node_x)
