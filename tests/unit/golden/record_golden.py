"""Record real HTTP/1.x byte streams for the golden replay tests (run by hand, not by pytest).

    .venv/bin/python tests/unit/golden/record_golden.py

Starts real servers (nginx with a JSON access log; a Node.js `http` server that logs
what it wrote) behind a recording TCP proxy, drives them with real clients (curl,
raw Python sockets for pipelining and one-byte writes), and writes, per scenario:
  <name>.events.jsonl.gz  one line per proxy-side socket event, from the server's point of
                       view: {"conn", "kind": open|data|close, "dir": in|out, "ts", "b64"}
  <name>.log.jsonl     the server's own record of each request (the oracle the replay
                       test compares against: method, uri, status, body bytes).
The proxy sees the same bytes the server's socket does, with the chunking a reader
gets (TCP coalesces the server's writes): like a client's read() calls. The replay
test re-splits chunks at random and truncates them like the kernel's capture prefix.
"""

from __future__ import annotations

import base64
import gzip
import json
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class RecordingProxy:
    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(64)
        self.conn_ids = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def record(self, conn: int, kind: str, direction: str | None = None, data: bytes = b"") -> None:
        with self.lock:
            self.events.append({
                "conn": conn, "kind": kind, "dir": direction, "ts": time.monotonic_ns(),
                "b64": base64.b64encode(data).decode(),
            })

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.conn_ids += 1
            threading.Thread(target=self._pump, args=(client, self.conn_ids), daemon=True).start()

    def _pump(self, client: socket.socket, conn: int) -> None:
        server = socket.create_connection(("127.0.0.1", self.upstream))
        self.record(conn, "open")
        peers = {client: (server, "in"), server: (client, "out")}
        try:
            while True:
                ready, _, _ = select.select(list(peers), [], [], 10)
                if not ready:
                    break
                done = False
                for sock in ready:
                    data = sock.recv(65536)
                    other, direction = peers[sock]
                    if not data:
                        done = True
                        break
                    self.record(conn, "data", direction, data)
                    other.sendall(data)
                if done:
                    break
        finally:
            self.record(conn, "close")
            client.close()
            server.close()

    def save(self, name: str) -> None:
        with self.lock:
            lines = [json.dumps(e) for e in self.events]
        (HERE / f"{name}.events.jsonl.gz").write_bytes(
            gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))


def raw(port: int, payload: bytes, *, one_byte: bool = False, read_for: float = 1.0) -> None:
    with socket.create_connection(("127.0.0.1", port)) as s:
        if one_byte:
            for b in payload:
                s.sendall(bytes([b]))
                time.sleep(0.001)
        else:
            s.sendall(payload)
        s.settimeout(read_for)
        try:
            while s.recv(65536):
                pass
        except TimeoutError:
            pass


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 128; }}
http {{
    access_log off;
    client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
    log_format j escape=json '{{"method":"$request_method","uri":"$request_uri",'
        '"status":$status,"body_bytes_sent":$body_bytes_sent,"request_length":$request_length}}';
    server {{
        listen 127.0.0.1:{port};
        root {d}/www;
        access_log {d}/access.log j;
        keepalive_requests 1000;
        location /echo {{ return 200 "echo\\n"; }}
    }}
}}
"""


def record_nginx() -> None:
    d = Path(tempfile.mkdtemp(prefix="golden-nginx-"))
    d.chmod(0o755)  # nginx workers run unprivileged and must read www/
    (d / "www").mkdir()
    (d / "www" / "small.txt").write_bytes(b"small file\n")
    # far larger than the 4096-byte capture prefix; text so the recording compresses
    (d / "www" / "big.bin").write_bytes(b"".join(b"line %06d of big.bin\n" % i for i in range(3000)))
    (d / "www" / "index.html").write_bytes(b"<html>hello</html>\n")
    port = free_port()
    (d / "nginx.conf").write_text(NGINX_CONF.format(d=d, port=port))
    proc = subprocess.Popen(["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)])
    try:
        wait_port(port)
        proxy = RecordingProxy(port)
        base = f"http://127.0.0.1:{proxy.port}"
        # keep-alive: several URLs on one connection
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                        "-o", "/dev/null", f"{base}/small.txt", f"{base}/big.bin",
                        f"{base}/missing", f"{base}/index.html"], check=True)
        subprocess.run(["curl", "-s", "-I", f"{base}/big.bin"], check=True, capture_output=True)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-X", "PURGE", f"{base}/small.txt"],
                       check=True)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-X", "FOO", f"{base}/small.txt"],
                       check=True)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "--data-binary", "@" + str(d / "www" / "big.bin"),
                        f"{base}/echo"], check=True)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", "Transfer-Encoding: chunked",
                        "--data-binary", "@" + str(d / "www" / "small.txt"), f"{base}/echo?chunked=1"],
                       check=True)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-z", str(d / "www" / "index.html"),
                        f"{base}/index.html"], check=True)  # If-Modified-Since: its mtime -> 304
        pipelined = b"".join(
            b"GET /small.txt?p=%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(23))
        raw(proxy.port, pipelined + b"GET /index.html HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        raw(proxy.port, b"GET /echo?onebyte=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            one_byte=True)
        time.sleep(0.5)
        proxy.save("nginx")
        logs = (d / "access.log").read_text()
        (HERE / "nginx.log.jsonl").write_text(logs)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


NODE_SERVER = r"""
const http = require('http');
const fs = require('fs');
const log = fs.openSync(process.argv[3], 'w');
http.createServer((req, res) => {
  let received = 0;
  req.on('data', (c) => { received += c.length; });
  req.on('end', () => {
    const n = parseInt(new URL(req.url, 'http://x').searchParams.get('chunks') || '3');
    let sent = 0;
    res.writeHead(200, {'Content-Type': 'text/plain'});
    for (let i = 0; i < n; i++) { const s = 'x'.repeat(1000 * (i + 1)); res.write(s); sent += s.length; }
    res.end();
    fs.writeSync(log, JSON.stringify({method: req.method, uri: req.url, status: 200,
      body_bytes_sent: sent, request_body: received}) + '\n');
  });
}).listen(parseInt(process.argv[2]), '127.0.0.1');
"""


def record_node() -> None:
    d = Path(tempfile.mkdtemp(prefix="golden-node-"))
    (d / "server.js").write_text(NODE_SERVER)
    port = free_port()
    proc = subprocess.Popen(["node", str(d / "server.js"), str(port), str(d / "log.jsonl")])
    try:
        wait_port(port)
        proxy = RecordingProxy(port)
        base = f"http://127.0.0.1:{proxy.port}"
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
                        f"{base}/a?chunks=1", f"{base}/b?chunks=7", f"{base}/c?chunks=15"], check=True)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", "Transfer-Encoding: chunked",
                        "--data-binary", "@/etc/services", f"{base}/upload?chunks=2"], check=True)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-X", "PURGE", f"{base}/purge"], check=True)
        subprocess.run(["curl", "-s", "-o", "/dev/null", "-H", "Expect: 100-continue",
                        "--data-binary", "@/etc/services", f"{base}/continue?chunks=1"], check=True)
        time.sleep(0.5)
        deadline = time.monotonic() + 5
        while len((d / "log.jsonl").read_text().splitlines()) < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        proxy.save("node")
        (HERE / "node.log.jsonl").write_text((d / "log.jsonl").read_text())
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    record_nginx()
    record_node()
    for p in sorted(HERE.glob("*.jsonl*")):
        print(p.name, p.stat().st_size)
