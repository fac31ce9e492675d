"""HTTP/2 responses far larger than one chunk's capture (MAX_CAPTURE_BYTES, 4096): exact.

A server writes a 100 KB or 1 MB response as 16 KiB DATA frames, several per write; a
client reads them 16 KiB or more at a time. The frame headers past each call's first
4096 bytes are never captured; the kernel's frame walk (bpf/http2_walk.h) hands them
over, so user space keeps the framing: every exchange is OK with the exact body size,
on the server's and on the client's side (before the walk, h2load -c2 -m4 against
nghttpd with 100 KB bodies had 102 of 200 client-side exchanges TRUNCATED).

Peers: nghttpd (h2c and TLS: OpenSSL on the socket fd) driven by h2load (several
connections, several streams each) and nghttp; nginx over TLS driven by curl --http2;
Node.js http2 server and client, h2c and TLS (OpenSSL on memory BIOs: fd-less streams).
`otel-ebpf run` as users run it; counting tests: N sent, N reported, each OK with
http.response.body.size == the file's size.
"""

from __future__ import annotations

import subprocess
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from .peers import free_port, self_signed_certificate
from .test_http2_capture import need, plain_server, reported

SIZES = {"100k": 100_000, "1m": 1_048_576}


# The servers' ports, and the daemon selects only them (--port): on a busy machine the
# traffic of every other process would share the ring buffer and could overflow it.
PORTS = {"h2c": free_port(), "tls": free_port(), "nghttp": free_port(), "nginx": free_port()}
# h2load moves 20 MB in a fraction of a second (some 10 MB of 4 KiB records): a ring
# buffer that holds them all, so a daemon slowed by a busy machine loses none.
RINGBUF_KIB = 65536


@pytest.fixture(scope="module")
def daemon(bpf_available, tmp_path_factory) -> Iterator:
    from .peers import Daemon

    ports = sum((["--port", str(port)] for port in PORTS.values()), [])
    with Daemon(tmp_path_factory.mktemp("h2large"), *ports,
                env={"OTEL_EBPF_CAPTURE_RINGBUF_KIB": str(RINGBUF_KIB)}) as d:
        yield d


def www(tmp_path: Path) -> Path:
    root = tmp_path / "www"
    root.mkdir()
    for name, size in SIZES.items():
        # not one repeated byte: a frame walk that lost step cannot find fake headers
        (root / name).write_bytes((bytes(range(256)) * (size // 256 + 1))[:size])
    return root


def check_exact(records: list[dict], n: int, size: int, path: str, connections: int) -> None:
    """n records, each OK with the exact size; one per stream of each connection (a
    client's records carry no local port: each stream id once per connection)."""
    assert len(records) == n
    for x in records:
        assert "otel_ebpf.outcome" not in x, x  # OK: not TRUNCATED
        assert (x["http.request.method"], x["url.path"], x["http.response.status_code"],
                x["network.protocol.version"]) == ("GET", path, 200, "2"), x
        assert x["http.response.body.size"] == size, x
    per_stream = Counter((x.get("client.port"), x["otel_ebpf.stream_id"]) for x in records)
    if records[0]["kind"] == "SERVER":
        assert set(per_stream.values()) == {1}
    else:
        assert set(per_stream.values()) == {connections}
        assert sorted(sid for _, sid in per_stream) == list(range(1, 2 * n // connections, 2))


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_h2load_against_nghttpd(daemon, tmp_path, tls):
    root = www(tmp_path)
    port = PORTS["tls" if tls else "h2c"]
    args = [need("nghttpd"), "-a", "127.0.0.1", "-d", str(root)]
    if tls:
        cert, key = self_signed_certificate(tmp_path / "certs")
        args += [str(port), str(key), str(cert)]
    else:
        args += ["--no-tls", str(port)]
    scheme = "https" if tls else "http"
    with plain_server(tmp_path, args, port) as srv:
        for name, n in (("100k", 200), ("1m", 16)):
            url = "%s://127.0.0.1:%d/%s" % (scheme, port, name)
            client = subprocess.Popen([need("h2load"), "-n", str(n), "-c", "2", "-m", "4", url],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            out, _ = client.communicate(timeout=120)
            assert client.returncode == 0, out
            assert b"%d succeeded" % n in out, out
            servers = [x for x in reported(daemon, {srv.pid}, "SERVER", n)
                       if x["url.path"] == "/" + name]
            clients = reported(daemon, {client.pid}, "CLIENT", n)
            check_exact(servers, n, SIZES[name], "/" + name, 2)
            check_exact(clients, n, SIZES[name], "/" + name, 2)


def test_nghttp_many_streams_on_one_connection(daemon, tmp_path):
    """nghttp: several large responses interleaved on one connection (h2c)."""
    root = www(tmp_path)
    port = PORTS["nghttp"]
    with plain_server(tmp_path, [need("nghttpd"), "--no-tls", "-a", "127.0.0.1", "-d",
                                 str(root), str(port)], port) as srv:
        n = 6
        # (distinct URLs: nghttp sends one request per distinct URL)
        urls = ["http://127.0.0.1:%d/%s?%d" % (port, "1m" if i % 3 == 0 else "100k", i)
                for i in range(n)]
        client = subprocess.Popen([need("nghttp"), "-n", *urls])
        assert client.wait(120) == 0
        servers = reported(daemon, {srv.pid}, "SERVER", n)
        clients = reported(daemon, {client.pid}, "CLIENT", n)
    for records in (servers, clients):
        assert len(records) == n
        assert sorted(int(x["url.query"]) for x in records) == list(range(n))
        for x in records:
            assert "otel_ebpf.outcome" not in x, x
            assert x["http.response.body.size"] == SIZES[x["url.path"][1:]], x


@pytest.mark.parametrize("tls", [False, True], ids=["h2c", "tls"])
def test_curl_to_nginx(daemon, tmp_path, monkeypatch, tls):
    """nginx (h2c: frames written with writev, a segment per header and per buffer; TLS:
    SSL_write per buffer) and curl (h2c prior knowledge: one connection per curl, as
    curl 7.88 does not reuse it; TLS: one curl, one connection)."""
    from . import test_http2_capture
    from .test_http2_capture import nginx_h2

    monkeypatch.setattr(test_http2_capture, "free_port", lambda: PORTS["nginx"])
    certs = self_signed_certificate(tmp_path / "certs")
    root = tmp_path / "nginx"
    n = 4
    with nginx_h2(None, root, certs if tls else None, gated=False) as (spid, port):
        docroot = root / "nginx" / "www"
        for name, size in SIZES.items():
            (docroot / name).write_bytes((bytes(range(256)) * (size // 256 + 1))[:size])
        urls = ["%s://127.0.0.1:%d/%s?%d" % ("https" if tls else "http", port,
                                             "1m" if i % 2 else "100k", i) for i in range(n)]
        curl = [need("curl"), "-sS"]
        if tls:
            calls = [curl + ["--http2", "--cacert", str(certs[0])]
                     + sum((["-o", "/dev/null", url] for url in urls), [])]
        else:
            calls = [curl + ["--http2-prior-knowledge", "-o", "/dev/null", url] for url in urls]
        pids = set()
        for args in calls:
            client = subprocess.Popen(args)
            assert client.wait(120) == 0
            pids.add(client.pid)
        clients = reported(daemon, pids, "CLIENT", n)
        servers = reported(daemon, {spid}, "SERVER", n)
    for records in (servers, clients):
        assert sorted(int(x["url.query"]) for x in records) == list(range(n))
        for x in records:
            assert "otel_ebpf.outcome" not in x, x
            assert x["http.response.body.size"] == SIZES[x["url.path"][1:]], x


NODE_BIG = textwrap.dedent('''
    // serve: 100 KB at /100k, 1 MB at /1m; call: after a line on stdin (the daemon is
    // up), N requests on one connection, alternating, each body's size checked.
    const http2 = require('http2'), fs = require('fs');
    const [mode, tls, port, cert, key, n] = process.argv.slice(2);
    const sizes = {'/100k': 100000, '/1m': 1048576};
    if (mode === 'serve') {
      const opts = tls === 'tls' ? {key: fs.readFileSync(key), cert: fs.readFileSync(cert)} : {};
      const srv = tls === 'tls' ? http2.createSecureServer(opts) : http2.createServer(opts);
      srv.on('stream', (s, h) => {
        const path = h[':path'].split('?')[0];
        s.respond({':status': 200});
        s.end(Buffer.alloc(sizes[path], 0x5a));
      });
      srv.listen(+port, '127.0.0.1');
    } else {
      process.stdin.once('data', () => {
        const c = http2.connect((tls === 'tls' ? 'https' : 'http') + '://127.0.0.1:' + port,
                                {ca: tls === 'tls' ? fs.readFileSync(cert) : undefined});
        let left = +n, bad = 0;
        for (let i = 0; i < +n; i++) {
          const path = i % 2 ? '/1m' : '/100k';
          const r = c.request({':path': path + '?' + i});
          let got = 0;
          r.on('data', (d) => { got += d.length; });
          r.on('end', () => {
            if (got !== sizes[path]) bad++;
            if (--left === 0) { c.close(); process.exitCode = bad ? 1 : 0; process.stdin.destroy(); }
          });
          r.end();
        }
      });
    }
''')


@pytest.mark.parametrize("tls", ["h2c", "tls"])
def test_node_http2(bpf_available, tmp_path, tls):
    """Node's TLS runs OpenSSL on memory BIOs: its plaintext streams have no fd, no
    addresses, so the daemon selects the two processes (--pid) instead of a port; it
    starts once both run (the client connects when told)."""
    from .peers import Daemon

    cert, key = self_signed_certificate(tmp_path / "certs")
    script = tmp_path / "node_big.js"
    script.write_text(NODE_BIG)
    node = need("node")
    port = free_port()
    n = 12
    common = [tls, str(port), str(cert), str(key)]
    with plain_server(tmp_path, [node, str(script), "serve", *common], port) as srv:
        client = subprocess.Popen([node, str(script), "call", *common, str(n)],
                                  stdin=subprocess.PIPE)
        workdir = tmp_path / "daemon"
        workdir.mkdir()
        try:
            with Daemon(workdir, "--pid", str(srv.pid), "--pid", str(client.pid),
                        env={"OTEL_EBPF_CAPTURE_RINGBUF_KIB": str(RINGBUF_KIB)}) as daemon:
                client.stdin.write(b"go\n")
                client.stdin.flush()
                assert client.wait(60) == 0
                servers = reported(daemon, {srv.pid}, "SERVER", n)
                clients = reported(daemon, {client.pid}, "CLIENT", n)
        finally:
            if client.poll() is None:
                client.kill()
    for records in (servers, clients):
        assert sorted(int(x["url.query"]) for x in records) == list(range(n))
        for x in records:
            assert "otel_ebpf.outcome" not in x, x
            assert x["http.response.body.size"] == SIZES[x["url.path"][1:]], x
