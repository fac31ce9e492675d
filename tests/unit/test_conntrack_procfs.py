"""procfs.resolve: /proc/PID/fd -> socket inode -> /proc/PID/net/tcp{,6} addresses."""

from __future__ import annotations

import os
import socket

import pytest

from otel_ebpf.conntrack import procfs

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 42424 1 0000000000000000 20 4 30 10 -1
   2: garbage line
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0050 00000000000000000000000001000000:D431 01 00000000:00000000 00:00000000 00000000     0        0 555 1 0000000000000000 20 4 1 10 -1
   1: 0000000000000000FFFF00000100007F:1F90 0000000000000000FFFF00000200007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 556 1 0000000000000000 20 4 1 10 -1
   2: 000080FE00000000FF0A4B12FE3DD0A8:0016 000080FE00000000FF0A4B12FE3DD0A9:E2A0 01 00000000:00000000 00:00000000 00000000     0        0 557 1 0000000000000000 20 4 1 10 -1
"""


def test_parse_ipv4_table():
    table = procfs.parse_table(TCP, ipv6=False)
    assert table == {
        31337: ("127.0.0.1", 8080, "0.0.0.0", 0),
        42424: ("127.0.0.1", 8080, "127.0.0.1", 50000),
    }


def test_parse_ipv6_table_and_v4_mapped():
    table = procfs.parse_table(TCP6, ipv6=True)
    assert table[555] == ("::1", 80, "::1", 54321)
    assert table[556] == ("127.0.0.1", 8080, "127.0.0.2", 40000)
    # four 32-bit words, each little-endian: FE800000 00000000 124B0AFF A8D03DFE
    assert table[557] == ("fe80::124b:aff:a8d0:3dfe", 22, "fe80::124b:aff:a9d0:3dfe", 58016)


def test_resolve_a_real_loopback_connection_of_this_process():
    procfs.clear_cache()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        port = server.getsockname()[1]
        client_port = client.getsockname()[1]
        assert procfs.resolve(os.getpid(), accepted.fileno()) == (
            "127.0.0.1", port, "127.0.0.1", client_port)
        assert procfs.resolve(os.getpid(), client.fileno()) == (
            "127.0.0.1", client_port, "127.0.0.1", port)
    finally:
        for s in (client, accepted, server):
            s.close()


def test_resolve_ipv6_connection_when_available():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")
    procfs.clear_cache()
    try:
        server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        server.bind(("::1", 0))
    except OSError as exc:
        pytest.skip(f"no ::1 here: {exc}")
    server.listen(1)
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    try:
        port = server.getsockname()[1]
        assert procfs.resolve(os.getpid(), accepted.fileno()) == (
            "::1", port, "::1", client.getsockname()[1])
    finally:
        for s in (client, accepted, server):
            s.close()


def test_resolve_non_socket_and_missing_process_is_none():
    with open(os.devnull, "rb") as f:
        assert procfs.resolve(os.getpid(), f.fileno()) is None
    assert procfs.resolve(os.getpid(), 99999) is None
    assert procfs.resolve(2**22 + 12345, 3) is None  # beyond pid_max: never exists


def test_cached_table_is_reloaded_for_a_newer_connection():
    procfs.clear_cache()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    first = socket.create_connection(server.getsockname())
    a1, _ = server.accept()
    assert procfs.resolve(os.getpid(), a1.fileno()) is not None  # loads the cache
    second = socket.create_connection(server.getsockname())
    a2, _ = server.accept()
    try:
        # Within the reload window a miss may be served from cache; after it, reloaded.
        import time

        time.sleep(procfs.RELOAD_AFTER_S + 0.01)
        assert procfs.resolve(os.getpid(), a2.fileno()) == (
            "127.0.0.1", server.getsockname()[1], "127.0.0.1", second.getsockname()[1])
    finally:
        for s in (first, second, a1, a2, server):
            s.close()
