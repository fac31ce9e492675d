"""Golden replay: event streams recorded from the OpenSSL uprobes (bpf/openssl.h) fed
to conntrack + http1, no kernel needed.

NODE_EVENTS was recorded from a Node.js https server (static OpenSSL, memory BIOs)
answering two POSTs from curl on one kept-alive connection: a synthetic key (negative
fd derived from the SSL*, generation = first sight), ROLE_UNKNOWN, no addresses, and a
CONN_CLOSE from SSL_free. The tied-fd variant is the same plaintext on a real socket
key with ciphertext from the syscall path interleaved, which must be ignored.
"""

from __future__ import annotations

from otel_ebpf.capture.events import (
    ConnCloseEvent,
    ConnOpenEvent,
    DataEvent,
    Direction,
    Role,
    Source,
)
from otel_ebpf.conntrack import ConnectionTable, ConntrackOptions
from otel_ebpf.exchange import Outcome
from otel_ebpf.stats import Stats

# [kind, tgid, fd, generation, ts, ...]: O(pen) role; D(ata) direction, role, position,
# size, captured bytes; C(lose). Recorded 2026-11-23 on libssl 3.0 / node 20.
NODE_EVENTS = [
    ["O", 4242, -751640689, 1217668153191, 6673564, 0],
    ["D", 4242, -751640689, 1217668153191, 6675107, 0, 0, 0, 154, "POST /a HTTP/1.1\r\nHost: 127.0.0.1:18445\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Length: 5\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\nhello"],
    ["D", 4242, -751640689, 1217668153191, 24465401, 1, 0, 0, 143, "HTTP/1.1 200 OK\r\nContent-Length: 20\r\nDate: Mon, 23 Nov 2026 15:37:05 GMT\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nnode says /a after 5"],
    ["D", 4242, -751640689, 1217668153191, 33334624, 0, 0, 154, 158, "POST /b?x=1 HTTP/1.1\r\nHost: 127.0.0.1:18445\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nContent-Length: 5\r\nContent-Type: application/x-www-form-urlencoded\r\n\r\nhello"],
    ["D", 4242, -751640689, 1217668153191, 34002947, 1, 0, 143, 147, "HTTP/1.1 200 OK\r\nContent-Length: 24\r\nDate: Mon, 23 Nov 2026 15:37:05 GMT\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\nnode says /b?x=1 after 5"],
    ["C", 4242, -751640689, 1217668153191, 47058777],
]


def build(records, fd=None, generation=None, role=None, addresses=None):
    out = []
    for r in records:
        kind, tgid, rfd, gen, ts = r[:5]
        rfd = rfd if fd is None else fd
        gen = gen if generation is None else generation
        if kind == "O":
            extra = {}
            if addresses:
                extra = dict(zip(("local_address", "local_port", "remote_address", "remote_port"),
                                 addresses))
            out.append(ConnOpenEvent(ts, tgid, tgid, rfd, gen, Role(r[5] if role is None else role),
                                     Source.OPENSSL, **extra))
        elif kind == "D":
            data = r[9].encode("latin1")
            out.append(DataEvent(ts, tgid, tgid, rfd, gen, Direction(r[5]), Source.OPENSSL,
                                 r[7], r[8], data))
        else:
            out.append(ConnCloseEvent(ts, tgid, tgid, rfd, gen, Source.OPENSSL))
    return out


def run(events):
    stats = Stats()
    table = ConnectionTable(ConntrackOptions(), stats, resolve_addresses=None, clock_offset_ns=0)
    exchanges = []
    for ev in events:
        exchanges += table.handle(ev)
    exchanges += table.close_all()
    return exchanges, stats


def test_node_synthetic_key_gives_server_https_exchanges_without_invented_addresses():
    exchanges, stats = run(build(NODE_EVENTS))
    got = [(x.method, x.target, x.status_code, x.request_body_size, x.response_body_size)
           for x in exchanges]
    assert got == [("POST", "/a", 200, 5, 20), ("POST", "/b?x=1", 200, 5, 24)]
    for x in exchanges:
        assert x.pid == 4242
        assert x.scheme == "https"
        assert x.role == Role.SERVER  # inferred: it read a request first
        assert x.outcome == Outcome.OK
        assert (x.local_address, x.local_port, x.remote_address, x.remote_port) == (
            None, None, None, None)
    assert stats.get("http.parse_failures") == 0


def test_tied_fd_plaintext_wins_over_ciphertext_on_the_same_key():
    fd, gen = 7, 99
    events = build(NODE_EVENTS, fd=fd, generation=gen, role=Role.SERVER,
                   addresses=("127.0.0.1", 8443, "127.0.0.1", 50123))
    # ciphertext the syscall path saw before the hook (TLS application-data records)
    cipher = [DataEvent(ev.timestamp_ns - 1, ev.tgid, ev.tid, fd, gen, ev.direction,
                        Source.SYSCALL, 1000 + i, 64, b"\x17\x03\x03\x00\x3b" + bytes(59))
              for i, ev in enumerate(events) if isinstance(ev, DataEvent)]
    merged = [events[0]]
    for c, d in zip(cipher, events[1:-1]):
        merged += [c, d]
    merged.append(events[-1])
    exchanges, stats = run(merged)
    assert [(x.method, x.target, x.status_code) for x in exchanges] == [
        ("POST", "/a", 200), ("POST", "/b?x=1", 200)]
    assert all(x.local_port == 8443 and x.remote_port == 50123 and x.scheme == "https"
               for x in exchanges)
    # the OPENSSL open event already marks the key as TLS: every ciphertext chunk ignored
    assert stats.get("conntrack.ciphertext_ignored") == len(cipher) == 4
    assert stats.get("http.parse_failures") == 0


def test_reused_ssl_address_is_a_new_stream():
    """An SSL* freed and reallocated at the same address: new generation, new stream."""
    first = build(NODE_EVENTS[:3] + [NODE_EVENTS[-1]])
    second = build(NODE_EVENTS[:3] + [NODE_EVENTS[-1]], generation=1217668153191 + 10**9)
    second = [type(e)(**{**{s: getattr(e, s) for s in e.__slots__},
                         "timestamp_ns": e.timestamp_ns + 10**8}) for e in second]
    exchanges, _ = run(first + second)
    assert [(x.target, x.status_code) for x in exchanges] == [("/a", 200), ("/a", 200)]
