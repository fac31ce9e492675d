"""The whole daemon, end to end: real eBPF, real servers and clients, jsonl output.

Each test starts `otel-ebpf run --exporter jsonl` selecting the test's own server port,
drives real traffic, stops the daemon with SIGTERM and checks the exchanges it wrote
against what was really sent (exact counts, methods, paths, statuses, body sizes).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.integration.peers import (
    Daemon,
    Nginx,
    curl,
    free_port,
    node_server,
    python_http_server,
    python_keepalive_server,
    raw_exchange,
    settle,
)

pytestmark = pytest.mark.usefixtures("bpf_available")

N = 23  # prime: off-by-one and duplicates show


def servers(exchanges: list[dict], port: int) -> list[dict]:
    """SERVER exchanges on `port` (the daemon runs with --port, so only the test's own)."""
    return [e for e in exchanges if e["kind"] == "SERVER"]


def clients(exchanges: list[dict], port: int) -> list[dict]:
    return [e for e in exchanges if e["kind"] == "CLIENT" and e.get("network.peer.port") == port]


def test_python_http_server_and_curl_counts_both_sides(tmp_path):
    port = free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "hello.txt").write_bytes(b"hello world\n" * 100)
    with python_http_server(tmp_path / "www", port) as server, \
            Daemon(tmp_path, "--port", str(port)) as daemon:
        for i in range(N):
            assert curl(f"http://127.0.0.1:{port}/hello.txt?i={i}").stdout == "200"
        settle()
        daemon.stop()
    got = daemon.exchanges()
    srv = servers(got, port)
    assert len(srv) == N, daemon.log[-3000:]
    for e in srv:
        assert e["http.request.method"] == "GET"
        assert e["url.path"] == "/hello.txt"
        assert e["http.response.status_code"] == 200
        assert e["http.response.body.size"] == 1200
        assert e["process.pid"] == server.pid
        assert e["network.protocol.version"] == "1.1"
        assert e["user_agent.original"].startswith("curl/")
        assert 0 < e["end_time_unix_nano"] - e["start_time_unix_nano"] < 5e9
    assert sorted(e["url.query"] for e in srv) == sorted(f"i={i}" for i in range(N))
    cli = clients(got, port)
    assert len(cli) == N
    assert all(e["process.executable.name"] == "curl" for e in cli)
    assert all(e["http.response.body.size"] == 1200 for e in cli)


def test_nginx_keepalive_pipelining_and_access_log_agree(tmp_path):
    port = free_port()
    with Nginx(tmp_path, port) as nginx, Daemon(tmp_path, "--port", str(port)) as daemon:
        # 23 requests pipelined in ONE write on one keep-alive connection.
        pipelined = b"".join(
            b"GET /index.html?p=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % i for i in range(N))
        reply = raw_exchange(port, pipelined, expect_responses=N)
        assert reply.count(b"HTTP/1.1 200") == N
        # A client that writes its request one byte at a time.
        slow = b"GET /index.html?slow=1 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        raw_exchange(port, [bytes([b]) for b in slow], read_until_close=True, delay=0.002)
        # A body far larger than the captured prefix.
        assert curl(f"http://127.0.0.1:{port}/big.bin").stdout == "200"
        assert curl(f"http://127.0.0.1:{port}/missing").stdout == "404"
        settle()
        daemon.stop()
    srv = servers(daemon.exchanges(), port)
    log_lines = nginx.access_log()
    assert len(srv) == len(log_lines) == N + 3, daemon.log[-3000:]
    piped = [e for e in srv if (e.get("url.query") or "").startswith("p=")]
    assert [e["url.query"] for e in piped] == [f"p={i}" for i in range(N)]  # answered in order
    assert [e for e in srv if e.get("url.query") == "slow=1"][0]["http.response.status_code"] == 200
    big = [e for e in srv if e["url.path"] == "/big.bin"]
    assert big[0]["http.response.body.size"] == 1 << 20
    missing = [e for e in srv if e["url.path"] == "/missing"]
    assert missing[0]["http.response.status_code"] == 404
    assert missing[0]["http.response.body.size"] == \
        [x for x in log_lines if x["uri"] == "/missing"][0]["bytes"]


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed")
def test_nginx_under_wrk_loss_is_never_silent(tmp_path):
    """At full wrk speed the daemon may fall behind; every miss must then be counted."""
    port = free_port()
    with Nginx(tmp_path, port) as nginx, Daemon(tmp_path, "--port", str(port)) as daemon:
        subprocess.run(["wrk", "-t2", "-c8", "-d3s", f"http://127.0.0.1:{port}/index.html"],
                       capture_output=True, check=True, timeout=60)
        settle(3)
        daemon.stop()
    reported = len(servers(daemon.exchanges(), port))
    served = len(nginx.access_log())
    lost = final_stat(daemon.log, "lost_total")
    assert reported <= served
    if lost == 0:
        assert reported == served, daemon.log[-3000:]
    else:
        assert reported < served, "kernel counted losses but every request was reported"


def final_stat(log: str, name: str) -> int:
    line = [x for x in log.splitlines() if "final stats:" in x][-1]
    return int(line.split(f" {name}=")[1].split()[0])


def test_node_chunked_writev_and_large_request_body(tmp_path):
    port = free_port()
    with node_server(tmp_path, port), Daemon(tmp_path, "--port", str(port)) as daemon:
        for size in (10, 100_000, 3_000_000):
            assert curl(f"http://127.0.0.1:{port}/chunked/{size}").stdout == "200"
        body = tmp_path / "upload.bin"
        body.write_bytes(b"u" * 250_000)
        assert curl(f"http://127.0.0.1:{port}/upload", "--data-binary", f"@{body}").stdout == "200"
        settle()
        daemon.stop()
    srv = servers(daemon.exchanges(), port)
    chunked = sorted((e for e in srv if e["url.path"].startswith("/chunked/")),
                     key=lambda e: e["http.response.body.size"])
    assert [e["http.response.body.size"] for e in chunked] == [10, 100_000, 3_000_000]
    upload = [e for e in srv if e["url.path"] == "/upload"]
    assert len(upload) == 1
    assert upload[0]["http.request.method"] == "POST"
    assert upload[0]["http.request.body.size"] == 250_000
    assert upload[0]["http.response.body.size"] == len(b"received 250000")


def test_head_204_304_100_continue_and_unknown_method(tmp_path):
    port = free_port()
    with python_keepalive_server(tmp_path, port), \
            Daemon(tmp_path, "--port", str(port)) as daemon:
        assert curl(f"http://127.0.0.1:{port}/head", "-I").stdout == "200"
        assert curl(f"http://127.0.0.1:{port}/status/204").stdout == "204"
        assert curl(f"http://127.0.0.1:{port}/status/304").stdout == "304"
        assert curl(f"http://127.0.0.1:{port}/status/503").stdout == "503"
        assert curl(f"http://127.0.0.1:{port}/purge", "-X", "PURGE").stdout == "200"
        # curl sends Expect: 100-continue for bodies over 1 MiB; Python answers 100 first.
        big = tmp_path / "big.bin"
        big.write_bytes(b"b" * (1 << 20) + b"c")
        assert curl(f"http://127.0.0.1:{port}/upload", "--data-binary", f"@{big}",
                    "-H", "Expect: 100-continue").stdout == "201"
        settle()
        daemon.stop()
    srv = {e["url.path"]: e for e in servers(daemon.exchanges(), port)}
    assert srv["/head"]["http.request.method"] == "HEAD"
    assert srv["/head"]["http.response.body.size"] == 0
    assert srv["/status/204"]["http.response.status_code"] == 204
    assert srv["/status/304"]["http.response.status_code"] == 304
    assert srv["/status/503"]["error.type"] == "503"
    assert srv["/purge"]["http.request.method"] == "_OTHER"
    assert srv["/purge"]["http.request.method_original"] == "PURGE"
    assert srv["/upload"]["http.response.status_code"] == 201
    assert srv["/upload"]["http.request.body.size"] == (1 << 20) + 1


def test_unanswered_request_times_out_and_garbage_is_counted(tmp_path):
    port = free_port()
    with python_keepalive_server(tmp_path, port), \
            Daemon(tmp_path, "--port", str(port),
                   env={"OTEL_EBPF_CONNTRACK_REQUEST_TIMEOUT_S": "2"}) as daemon:
        never = socket.create_connection(("127.0.0.1", port))
        never.sendall(b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
        # Binary garbage on the same port, then a valid request on a new connection.
        junk = socket.create_connection(("127.0.0.1", port))
        junk.sendall(bytes(range(256)) * 4)
        junk.close()
        assert curl(f"http://127.0.0.1:{port}/after-garbage").stdout == "200"
        time.sleep(4)  # past the 2 s timeout, and at least one expiry pass
        never.close()
        settle()
        daemon.stop()
    srv = servers(daemon.exchanges(), port)
    timed_out = [e for e in srv if e["url.path"] == "/never"]
    assert len(timed_out) == 1, daemon.log[-3000:]
    assert timed_out[0]["error.type"] == "timeout"
    assert "http.response.status_code" not in timed_out[0] or \
        timed_out[0]["http.response.status_code"] is None
    assert [e["http.response.status_code"] for e in srv if e["url.path"] == "/after-garbage"] == [200]


def test_connection_opened_before_the_daemon_started(tmp_path):
    port = free_port()
    with python_keepalive_server(tmp_path, port):
        early = socket.create_connection(("127.0.0.1", port))
        early_port = early.getsockname()[1]
        early.sendall(b"GET /bytes/7 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(early).endswith(b"xxxxxxx")
        with Daemon(tmp_path, "--port", str(port)) as daemon:
            for _ in range(3):
                early.sendall(b"GET /bytes/11 HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(early).endswith(b"x" * 11)
            settle()
            daemon.stop()
        early.close()
    srv = servers(daemon.exchanges(), port)
    assert len(srv) == 3, daemon.log[-3000:]
    assert all(e["http.response.body.size"] == 11 for e in srv)
    assert all(e["client.port"] == early_port for e in srv)


def read_response(sock: socket.socket) -> bytes:
    """One Content-Length-framed response (headers and body may come in two reads)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(4096)
        if not more:
            raise ConnectionError(f"server closed the connection; got {data!r}")
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        more = sock.recv(4096)
        if not more:
            raise ConnectionError("server closed the connection mid-body")
        body += more
    return head + b"\r\n\r\n" + body


def test_pid_selection_only_reports_that_process(tmp_path):
    port_a, port_b = free_port(), free_port()
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "a").write_text("a")
    with python_http_server(tmp_path / "www", port_a) as a, \
            python_http_server(tmp_path / "www", port_b), \
            Daemon(tmp_path, "--pid", str(a.pid)) as daemon:
        for _ in range(5):
            curl(f"http://127.0.0.1:{port_a}/a")
            curl(f"http://127.0.0.1:{port_b}/a")
        settle()
        daemon.stop()
    got = daemon.exchanges()
    assert {e["process.pid"] for e in got} == {a.pid}
    assert len(got) == 5


@pytest.mark.skipif(shutil.which("go") is None, reason="golang-go not installed")
def test_go_net_http_server(tmp_path):
    port = free_port()
    src = tmp_path / "main.go"
    src.write_text(
        'package main\nimport ("fmt"; "net/http"; "os")\n'
        'func main() { http.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {'
        ' fmt.Fprintf(w, "go %s", r.URL.Path) });'
        ' http.ListenAndServe("127.0.0.1:"+os.Args[1], nil) }\n')
    binary = tmp_path / "server"
    subprocess.run(["go", "build", "-o", str(binary), str(src)], check=True, timeout=300,
                   env={"GOCACHE": str(tmp_path / "gocache"), "HOME": str(tmp_path),
                        "PATH": "/usr/bin:/bin", "GO111MODULE": "off"})
    from tests.integration.peers import process
    with process([str(binary), str(port)], port=port), \
            Daemon(tmp_path, "--port", str(port)) as daemon:
        for i in range(N):
            assert curl(f"http://127.0.0.1:{port}/go/{i}").stdout == "200"
        settle()
        daemon.stop()
    srv = servers(daemon.exchanges(), port)
    assert sorted(e["url.path"] for e in srv) == sorted(f"/go/{i}" for i in range(N))
    assert all(e["http.response.body.size"] == len(e["url.path"]) + 3 for e in srv)


def test_check_command_reports_this_machine():
    result = subprocess.run([sys.executable, "-m", "otel_ebpf.cli", "check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kprobes" in result.stdout.lower()
    assert "capture: possible" in result.stdout
