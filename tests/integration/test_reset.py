"""CONNECTION_RESET from the kernel's reset flag (real eBPF; needs root).

A Python server answers with a response head promising more body than it sends, then
either resets the connection (SO_LINGER {1, 0}: close sends RST) or closes it normally
(FIN). The client keeps reading: after the reset its read returns ECONNRESET, which the
kernel remembers on the connection and carries in the close event, so the client's
exchange must end `connection_reset`; after the normal close its read returns 0 and the
exchange ends `connection_closed`. Run with the kernel fast path on (the client's
exchange is in flight there when the reset comes, and is replayed at the close) and off
(the chunk stream).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.integration.peers import Daemon, free_port, process, settle

pytestmark = pytest.mark.usefixtures("bpf_available")

PROMISED, SENT = 1000, 100  # Content-Length vs the body bytes really sent

SERVER = textwrap.dedent("""
    import socket, struct, sys, time
    port = int(sys.argv[1])
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(16)
    while True:
        c, _ = ls.accept()
        req = b""
        while b"\\r\\n\\r\\n" not in req:
            got = c.recv(4096)
            if not got:
                break
            req += got
        c.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\n"
                  b"Content-Type: text/plain\\r\\n\\r\\n" % {promised} + b"x" * {sent})
        time.sleep(0.3)  # the client has read what was sent and waits for more
        if req.startswith(b"GET /reset"):
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
""").format(promised=PROMISED, sent=SENT)

CLIENT = textwrap.dedent("""
    import errno, json, socket, sys
    port, path = int(sys.argv[1]), sys.argv[2]
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET %s HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n" % path.encode())
    got, error = 0, None
    while True:
        try:
            b = s.recv(65536)
        except OSError as e:
            error = errno.errorcode.get(e.errno, str(e.errno))
            break
        if not b:
            break
        got += len(b)
    s.close()
    print(json.dumps({"received": got, "error": error}))
""")


def run_client(port: int, path: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CLIENT, str(port), path], capture_output=True,
                         text=True, timeout=20, check=True)
    return json.loads(out.stdout)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "chunk_stream"])
def test_reset_mid_response_is_connection_reset_and_a_close_is_connection_closed(
        tmp_path, fast_path):
    port = free_port()
    args = ["--port", str(port)] + ([] if fast_path else ["--no-fast-path"])
    with process([sys.executable, "-c", SERVER, str(port)], port=port), \
            Daemon(tmp_path, *args) as daemon:
        reset = run_client(port, "/reset")
        closed = run_client(port, "/fin")
        settle()
        daemon.stop()
    # what the client itself saw: the premise of the test
    assert reset["error"] == "ECONNRESET", reset
    assert closed == {"received": closed["received"], "error": None}, closed
    assert reset["received"] == closed["received"] > SENT
    got = daemon.exchanges()
    cli = {e["url.path"]: e for e in got
           if e["kind"] == "CLIENT" and e.get("network.peer.port") == port}
    assert sorted(cli) == ["/fin", "/reset"], (got, daemon.log[-3000:])
    assert cli["/reset"]["otel_ebpf.outcome"] == "connection_reset", cli["/reset"]
    assert cli["/fin"]["otel_ebpf.outcome"] == "connection_closed", cli["/fin"]
    for e in cli.values():
        assert e["http.request.method"] == "GET"
        assert e["http.response.status_code"] == 200
