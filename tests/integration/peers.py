"""Real peers for the integration tests: the daemon itself, servers and clients.

Everything here starts real programs on loopback in a temp dir and stops them after:
`otel-ebpf run` as a subprocess, Python http.server, nginx, Node.js, Go net/http,
curl, wrk, and raw sockets for the byte-level cases (pipelining, one byte per write).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

from tests.receiver import free_port  # noqa: F401 (re-exported to the tests)

REPO = Path(__file__).resolve().parents[2]
READY_MARKER = "capturing;"


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class Daemon:
    """`otel-ebpf run` in a subprocess, ready once it logs that probes are attached."""

    def __init__(self, workdir: Path, *args: str, env: dict[str, str] | None = None,
                 exporter: str = "jsonl") -> None:
        self.workdir = workdir
        self.output = workdir / "exchanges.jsonl"
        self.stderr_path = workdir / "daemon.stderr"
        self.args = ["run", *args]
        if exporter == "jsonl":
            self.args += ["--exporter", "jsonl", "--output", str(self.output)]
        elif exporter:
            self.args += ["--exporter", exporter]
        # Each test's own export spool (kept across a restart of this Daemon): payloads
        # another test left for its absent receiver must never reach this one's.
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "OTEL_EBPF_EXPORT_SPOOL_DIRECTORY": str(workdir / "spool"), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Daemon:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.stop()

    def start(self, timeout: float = 120.0) -> None:
        self._stderr = open(self.stderr_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "otel_ebpf.cli", *self.args],
            stdout=subprocess.PIPE if "-" in self.args else subprocess.DEVNULL,
            stderr=self._stderr, env=self.env, cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_MARKER in self.stderr_path.read_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"otel-ebpf exited with {self.proc.returncode} before it was ready:\n"
                    + self.stderr_path.read_text()[-4000:])
            time.sleep(0.1)
        self.stop()
        raise TimeoutError("otel-ebpf not ready after %ss:\n%s"
                           % (timeout, self.stderr_path.read_text()[-4000:]))

    def stop(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("otel-ebpf did not stop within %ss of SIGTERM:\n%s"
                                   % (timeout, self.stderr_path.read_text()[-4000:])) from None
        self._stderr.close()
        return self.proc.returncode

    @property
    def log(self) -> str:
        return self.stderr_path.read_text()

    def exchanges(self) -> list[dict]:
        if not self.output.exists():
            return []
        return [json.loads(line) for line in self.output.read_text().splitlines() if line]


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for localhost and 127.0.0.1 in `directory`, made with the
    openssl CLI (a P-256 key, valid two days)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60)
    return cert, key


def poll_until_quiet(capture, quiet_s: float, limit_s: float) -> None:
    """Poll a Capture until no record arrived for quiet_s (at most limit_s in all)."""
    deadline = time.monotonic() + limit_s
    last = time.monotonic()
    while time.monotonic() < deadline:
        if capture.poll(50):
            last = time.monotonic()
        elif time.monotonic() - last > quiet_s:
            return


def settle(seconds: float = 1.5) -> None:
    """Let the ring buffer drain and the daemon's loop emit before it is stopped."""
    time.sleep(seconds)


@contextlib.contextmanager
def process(args: list[str], port: int | None = None, cwd: Path | None = None,
            env: dict[str, str] | None = None, log_path: Path | None = None
            ) -> Iterator[subprocess.Popen]:
    out = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(args, cwd=cwd, env={**os.environ, **(env or {})},
                            stdout=out, stderr=subprocess.STDOUT)
    try:
        if port is not None:
            wait_for_port(port)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log_path:
            out.close()


def python_http_server(directory: Path, port: int):
    """Python's http.server: HTTP/1.0, one request per connection."""
    return process([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                    "--directory", str(directory)], port=port)


PY_SERVER = textwrap.dedent('''
    import sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # keep-alive
        def log_message(self, *a): pass
        def _body(self):
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""
        def do_GET(self):
            if self.path.startswith("/status/"):
                code = int(self.path.split("/")[2])
                self.send_response(code)
                if code in (204, 304):
                    self.end_headers(); return
                body = b"status %d" % code
                self.send_header("Content-Length", str(len(body))); self.end_headers()
                self.wfile.write(body); return
            if self.path.startswith("/never"):
                time.sleep(3600); return
            body = b"x" * int(self.path.split("?")[0].split("/")[-1]) if self.path.startswith("/bytes/") else b"hello"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body))); self.end_headers()
            self.wfile.write(body)
        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", "12345"); self.end_headers()
        def do_POST(self):
            body = self._body()
            reply = b"got %d" % len(body)
            self.send_response(201)
            self.send_header("Content-Length", str(len(reply))); self.end_headers()
            self.wfile.write(reply)
        do_PURGE = do_GET

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
''')


def python_keepalive_server(workdir: Path, port: int):
    """A Python HTTP/1.1 keep-alive server with /status/N, /bytes/N, /never, POST echo."""
    script = workdir / "py_server.py"
    script.write_text(PY_SERVER)
    return process([sys.executable, str(script), str(port)], port=port)


NODE_SERVER = textwrap.dedent('''
    const http = require("http");
    const port = parseInt(process.argv[2]);
    http.createServer((req, res) => {
      let received = 0;
      req.on("data", (c) => { received += c.length; });
      req.on("end", () => {
        if (req.url.startsWith("/chunked/")) {
          // Transfer-Encoding: chunked, written as many chunks (libuv uses writev).
          const total = parseInt(req.url.split("/")[2]);
          const piece = Buffer.alloc(16384, 0x61);
          res.writeHead(200, {"Content-Type": "application/octet-stream"});
          let left = total;
          while (left > 0) { const n = Math.min(left, piece.length); res.write(piece.subarray(0, n)); left -= n; }
          res.end();
        } else {
          const body = "received " + received;
          res.writeHead(200, {"Content-Length": Buffer.byteLength(body)});
          res.end(body);
        }
      });
    }).listen(port, "127.0.0.1");
''')


def node_server(workdir: Path, port: int):
    script = workdir / "server.js"
    script.write_text(NODE_SERVER)
    return process(["node", str(script), str(port)], port=port)


NGINX_CONF = textwrap.dedent('''
    user root;
    worker_processes 1;
    pid {dir}/nginx.pid;
    error_log {dir}/error.log warn;
    events {{ worker_connections 1024; }}
    http {{
        log_format jsonlog escape=json '{{"method":"$request_method","uri":"$request_uri",'
            '"status":$status,"bytes":$body_bytes_sent,"request_length":$request_length}}';
        access_log {dir}/access.jsonl jsonlog;
        client_body_temp_path {dir}/body;
        proxy_temp_path {dir}/proxy;
        fastcgi_temp_path {dir}/fastcgi;
        uwsgi_temp_path {dir}/uwsgi;
        scgi_temp_path {dir}/scgi;
        keepalive_requests 100000;
        server {{
            listen 127.0.0.1:{port}{tls};
            root {dir}/www;
            location / {{ }}
        }}
    }}
''')


class Nginx:
    """nginx from Debian with its own config and a JSON access log; HTTPS with `certs`
    (certificate and key paths)."""

    def __init__(self, workdir: Path, port: int, certs: tuple[Path, Path] | None = None,
                 index: bytes = b"<html>hello from nginx</html>\n") -> None:
        self.dir = workdir / "nginx"
        self.port = port
        (self.dir / "www").mkdir(parents=True)
        self.conf = self.dir / "nginx.conf"
        tls = (" ssl;\n            ssl_certificate %s;\n            ssl_certificate_key %s"
               % certs) if certs else ""
        self.conf.write_text(NGINX_CONF.format(dir=self.dir, port=port, tls=tls))
        (self.dir / "www" / "index.html").write_bytes(index)
        (self.dir / "www" / "big.bin").write_bytes(os.urandom(1 << 20))

    def __enter__(self) -> Nginx:
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self._ctx = process([nginx, "-c", str(self.conf), "-p", str(self.dir), "-g", "daemon off;"],
                            port=self.port)
        self.proc = self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def access_log(self) -> list[dict]:
        path = self.dir / "access.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def curl(url: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *extra, url],
                          capture_output=True, text=True, timeout=30, check=True)


def raw_exchange(port: int, payload: bytes | list[bytes], read_until_close: bool = False,
                 expect_responses: int = 1, delay: float = 0.0, timeout: float = 10.0) -> bytes:
    """Send bytes (a list: one send per element) and read the reply."""
    chunks = payload if isinstance(payload, list) else [payload]
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        for chunk in chunks:
            sock.sendall(chunk)
            if delay:
                time.sleep(delay)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not read_until_close and received.count(b"HTTP/1.") >= expect_responses \
                    and _complete(received, expect_responses):
                break
            data = sock.recv(65536)
            if not data:
                break
            received += data
        return received


def _complete(received: bytes, responses: int) -> bool:
    """Whether `received` holds `responses` complete Content-Length-framed responses."""
    pos = 0
    for _ in range(responses):
        head_end = received.find(b"\r\n\r\n", pos)
        if head_end < 0:
            return False
        head = received[pos:head_end].lower()
        length = 0
        for line in head.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        pos = head_end + 4 + length
        if pos > len(received):
            return False
    return True


def go_grpc_greeter() -> Path:
    """The grpc-go Greeter (tests/peers/go-grpc: `serve PORT`, `call PORT N`), built by
    scripts/bootstrap.sh --test-peers into the cache under its source's hash."""
    import hashlib

    src = REPO / "tests" / "peers" / "go-grpc"
    rev = hashlib.sha256(b"".join((src / name).read_bytes()
                                  for name in ("go.mod", "go.sum", "main.go"))).hexdigest()[:12]
    cache = Path(os.environ.get("OTEL_EBPF_CACHE", "/var/cache/otel-ebpf"))
    binary = cache / ("go-grpc-greeter-%s" % rev) / "greeter"
    if not os.access(binary, os.X_OK):
        raise FileNotFoundError("%s is missing: run scripts/bootstrap.sh --test-peers (it builds "
                                "tests/peers/go-grpc)" % binary)
    return binary
