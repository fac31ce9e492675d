"""Run by test_capabilities.py as an unprivileged user: do what capture does at start-up.

argv: CERT KEY OTHER_PID LIBSSL [--no-tls]. Prints one `RESULT {json}` line and exits 0
when everything worked; any failure raises (exit 1) with the error on stderr.

LIBSSL is the libssl this process loads (the test runs it with LD_LIBRARY_PATH set to a
private copy): uprobes are keyed by inode, and the kernel refuses a tracefs-created
uprobe (what BCC falls back to without CAP_SYS_ADMIN) at an offset where another
process already holds a perf-created one, e.g. a root BCC tool or test probing the
system libssl at the same moment. A private copy keeps this proof independent of them.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

from bcc import BPF

PROGRAM = r"""
#include <uapi/linux/ptrace.h>
struct probe_event { u32 pid; u32 kind; };
BPF_RINGBUF_OUTPUT(probe_events, 8);

static int emit(u32 kind) {
    struct probe_event *e = probe_events.ringbuf_reserve(sizeof(*e));
    if (!e)
        return 0;
    e->pid = bpf_get_current_pid_tgid() >> 32;
    e->kind = kind;
    probe_events.ringbuf_submit(e, 0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return emit(1); }
int on_ssl_write(struct pt_regs *ctx) { return emit(2); }
"""


def tls_round_trip(cert: str, key: str) -> None:
    """One TLS request and response in this process, through LIBSSL."""
    # Imported here, after the uprobes are attached: until then libssl is not mapped, so
    # an agent scanning /proc (another test's daemon) has no reason to probe our copy.
    import ssl

    server_sock, client_sock = socket.socketpair()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE

    def serve() -> None:
        with server_ctx.wrap_socket(server_sock, server_side=True) as s:
            s.recv(100)
            s.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(client_sock) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        c.recv(100)
    thread.join(10)


def main() -> int:
    cert, key, other_pid, libssl = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    with_tls = "--no-tls" not in sys.argv[5:]
    bpf = BPF(text=PROGRAM)
    if with_tls:
        # Python's ssl module calls SSL_write_ex; older callers use SSL_write.
        bpf.attach_uprobe(name=libssl, sym="SSL_write", fn_name="on_ssl_write")
        bpf.attach_uprobe(name=libssl, sym="SSL_write_ex", fn_name="on_ssl_write")
    kinds: list[int] = []
    bpf["probe_events"].open_ring_buffer(
        lambda _ctx, data, _size: kinds.append(bpf["probe_events"].event(data).kind)
    )
    os.getppid()
    tls_round_trip(cert, key)
    maps = open("/proc/self/maps").read()
    if with_tls and libssl not in maps:
        raise RuntimeError(f"the TLS round trip did not use {libssl} (LD_LIBRARY_PATH?)")
    bpf.ring_buffer_poll(timeout=500)
    environ = open(f"/proc/{other_pid}/environ", "rb").read()
    other_maps = open(f"/proc/{other_pid}/maps").read().splitlines()
    root_entries = os.listdir(f"/proc/{other_pid}/root/")
    if kinds.count(1) == 0 or (with_tls and kinds.count(2) == 0):
        raise RuntimeError(f"probes attached but saw no events: {kinds}")
    result = {
        "uid": os.getuid(),
        "tracepoint_events": kinds.count(1),
        "uprobe_events": kinds.count(2),
        "environ_hex": environ.hex(),
        "maps_lines": len(other_maps),
        "root_entries": len(root_entries),
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
