"""The kernel's head parser against the chunk stream, on the heads that stress it.

bpf/http1_fast.h parses request and response heads 8 bytes at a time (CR LF and the
empty line found by word arithmetic, LFs recorded per word, plain words skipped). This
sends heads built to land every structure at every offset of a word: header lines of
3..15 bytes, the empty line's CR LF straddling words, 60-70 header lines, and the malformed
heads the parser must refuse (tabs and double spaces in the request line, obs-fold, bare
CR or LF, control bytes, DEL). Each goes on its own connection from a raw-socket client to
a raw-socket server, both traced by two captures at once (test_path_parity's Pipeline):
one with the fast path, one forced onto the chunk stream. Whatever the fast path takes or
hands over, the two must report the same exchanges, field by field.

Whitespace between a field name and its colon ("Host : x", invalid by RFC 9112 section
5.1) is not that field for either parser (the kernel's name compares, the chunk stream's
regexes): both report no Host.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from otel_ebpf.capture.events import Role

from .peers import free_port, process
from .test_path_parity import FIELDS, SAME_SYSCALL_NS, Pipeline

pytestmark = pytest.mark.usefixtures("bpf_available")

# The server answers each request with the response head its target names (/r/<k>),
# after reading the head and a Content-Length body; it never parses anything else.
SERVER = textwrap.dedent(r'''
    import socket, sys
    RESPONSES = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-P: " + b"p" * 0 + b"\r\nContent-Length: 2\r\n\r\nok",
    ]
    for k in range(16):   # every offset of the empty line and the CR LFs in a word
        RESPONSES.append(b"HTTP/1.1 200 OK\r\nX-Pad: " + b"p" * k + b"\r\na:b\r\n"
                         b"Content-Length: 3\r\n\r\nabc")
    RESPONSES += [
        b"HTTP/1.1 404 Not Found\r\ncontent-length:   5  \r\n\r\nnope!",
        b"HTTP/1.1 200 OK\r\nX-T:\tv\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nX-Fold: a\r\n  b\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nX-C: a\x01b\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 204 No Content\r\nA:\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(60))
        + b"Content-Length: 1\r\n\r\nx",
    ]
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", int(sys.argv[1])))
    srv.listen(64)
    while True:
        c, _ = srv.accept()
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            got = c.recv(65536)
            if not got:
                break
            data += got
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length" and value.strip().isdigit():
                length = int(value.strip())
        while len(body) < length:
            got = c.recv(65536)
            if not got:
                break
            body += got
        k = 0
        parts = head.split(b" ")
        if len(parts) > 1 and parts[1].startswith(b"/r/"):
            k = int(parts[1][3:].split(b"?")[0] or 0)
        c.sendall(RESPONSES[k % len(RESPONSES)])
        c.close()
''')

CLIENT = textwrap.dedent(r'''
    import socket, sys
    port = int(sys.argv[1])
    heads = [bytes.fromhex(h) for h in sys.stdin.read().split()]
    for head in heads:
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        got = b""
        while True:
            d = s.recv(65536)
            if not d:
                break
            got += d
        s.close()
    print(len(heads))
''')


def heads() -> list[bytes]:
    out: list[bytes] = []
    n_resp = 2 + 16 + 6

    def req(target: bytes, lines: list[bytes], method: bytes = b"GET", body: bytes = b"",
            version: bytes = b"HTTP/1.1", eol: bytes = b"\r\n") -> bytes:
        return (method + b" " + target + b" " + version + eol + b"".join(l + eol for l in lines)
                + eol + body)

    for k in range(n_resp):
        out.append(req(b"/r/%d" % k, [b"Host: x"]))
    for k in range(16):   # request heads with the structure at every offset in a word
        out.append(req(b"/r/%d?%s" % (k, b"q" * k), [b"Host: h", b"a:b", b"X:" + b"y" * k]))
        out.append(req(b"/r/0", [b"Host: h" + b"o" * k, b"User-Agent:  ua" + b"u" * k + b"  "]))
        out.append(req(b"/r/1", [b"Content-Length: %d" % k], method=b"POST", body=b"b" * k))
    out += [
        req(b"/r/2", [b"host:   spaced   ", b"USER-AGENT:\tt\t", b"TraceParent: "
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", b"tracestate: a=b"]),
        req(b"/r/3", [b"Host: x"], method=b"PROPFIND"),
        req(b"/r/4", [b"Host: x"], version=b"HTTP/1.0"),
        req(b"/" + b"t" * 500, [b"Host: x"]),
        req(b"/r/5", [b"Host: x", b"X-\xc3\xa9: v\xc3\xa9"]),
        req(b"/r/7", [b"X:"]),
        req(b"/r/14", [b"Host : x", b"User-Agent\t: u"]),
        req(b"/r/8", [b"Content-Length:  3 "], method=b"PUT", body=b"abc"),
        req(b"/r/9", [b"H%d: v" % i for i in range(60)]),
        req(b"/r/10", [b"H%d: v" % i for i in range(61)]),
        req(b"/r/11", [b"H%d: v" % i for i in range(62)]),
        req(b"/r/12", [b"H%d: v" % i for i in range(63)]),
        req(b"/r/13", [b"H%d: v" % i for i in range(70)]),
        # malformed: the fast path must refuse them (the chunk stream judges)
        b"GET\t/r/0 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET  /r/0 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /r/0 HTTP/1.1\r\nHost: x\r\n  folded\r\n\r\n",
        b"GET /r/0 HTTP/1.1\r\nUser-Agent: a\x01b\r\n\r\n",
        b"GET /r/0 HTTP/1.1\r\nUser-Agent: a\x7fb\r\n\r\n",
        b"GET /r/0 HTTP/1.1\r\nHost: x\ry\r\n\r\n",
        b"GET /r/0 HTTP/1.1\r\nHost: x\r\nA: 1\nB: 2\r\n\r\n",
        b"GET /r/0 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nz",
    ]
    return out


def test_fast_path_and_chunk_stream_agree_on_every_head(tmp_path):
    port = free_port()
    fast = Pipeline(port, fast_path=True)
    slow = Pipeline(port, fast_path=False)
    try:
        script = tmp_path / "raw_server.py"
        script.write_text(SERVER)
        client = tmp_path / "raw_client.py"
        client.write_text(CLIENT)
        sent = heads()
        with process([sys.executable, str(script), str(port)], port=port):
            out = subprocess.run([sys.executable, str(client), str(port)],
                                 input=" ".join(h.hex() for h in sent), capture_output=True,
                                 text=True, timeout=120, check=True).stdout
            assert out.split() == [str(len(sent))]
            for pipeline in (fast, slow):
                pipeline.drain()
    finally:
        fast.close()
        slow.close()
    print("fast path took %d of %d exchanges" % (fast.decoder.exchanges, len(fast.exchanges)))
    assert fast.decoder.exchanges > len(sent)   # most valid heads, both sides
    for role in (Role.SERVER, Role.CLIENT):
        mine = sorted((x for x in fast.exchanges if x.role == role),
                      key=lambda x: x.start_time_unix_nano)
        theirs = sorted((x for x in slow.exchanges if x.role == role),
                        key=lambda x: x.start_time_unix_nano)
        assert len(mine) == len(theirs), (role, len(mine), len(theirs))
        for f, s in zip(mine, theirs):
            assert [getattr(f, n) for n in FIELDS] == [getattr(s, n) for n in FIELDS], (f, s)
            assert abs(f.start_time_unix_nano - s.start_time_unix_nano) < SAME_SYSCALL_NS
            assert abs(f.end_time_unix_nano - s.end_time_unix_nano) < SAME_SYSCALL_NS
