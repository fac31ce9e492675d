"""Addresses of sockets the daemon never saw open, from /proc.

`resolve(pid, fd)` follows /proc/PID/fd/FD (-> "socket:[INODE]") and looks the inode
up in /proc/PID/net/tcp and tcp6 (the process's own network namespace). It returns
(local_address, local_port, remote_address, remote_port) or None: never raises (the
process may be gone, the fd closed, or not a TCP socket).

Tables are cached per network namespace for a short time: a burst of connections from
one process (e.g. attaching to a busy server) costs one read of the tables, not one
per connection. A missing inode forces a reload when the cached table is older than
RELOAD_AFTER_S (the connection may be newer than the table).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict

logger = logging.getLogger(__name__)

Addresses = tuple[str, int, str, int]

CACHE_TTL_S = 2.0
RELOAD_AFTER_S = 0.05
MAX_CACHED_NAMESPACES = 64

# netns key -> (loaded at, inode -> addresses)
_cache: OrderedDict[str, tuple[float, dict[int, Addresses]]] = OrderedDict()


def _ipv4(hex_addr: str) -> str:
    # /proc prints the 32-bit address in host (little-endian) order.
    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(hex_addr)[::-1])


def _ipv6(hex_addr: str) -> str:
    raw = bytes.fromhex(hex_addr)
    # Four 32-bit words, each in host order.
    packed = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    if packed[:12] == b"\x00" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, packed[12:])  # IPv4-mapped: report IPv4
    return socket.inet_ntop(socket.AF_INET6, packed)


def parse_table(text: str, ipv6: bool) -> dict[int, Addresses]:
    """Parse the body of /proc/net/tcp or tcp6 into inode -> addresses."""
    convert = _ipv6 if ipv6 else _ipv4
    table: dict[int, Addresses] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10:
            continue
        try:
            inode = int(fields[9])
            local_hex, local_port = fields[1].split(":")
            remote_hex, remote_port = fields[2].split(":")
            table[inode] = (
                convert(local_hex),
                int(local_port, 16),
                convert(remote_hex),
                int(remote_port, 16),
            )
        except (ValueError, OSError):
            continue  # a line we do not understand is skipped, not fatal
    return table


def _load(pid: int) -> dict[int, Addresses]:
    table: dict[int, Addresses] = {}
    for name, ipv6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"/proc/{pid}/net/{name}", encoding="ascii", errors="replace") as f:
                table.update(parse_table(f.read(), ipv6))
        except OSError:
            continue  # no IPv6 in this namespace, or the process is gone
    return table


def socket_inode(pid: int, fd: int) -> int | None:
    try:
        target = os.readlink(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    if not target.startswith("socket:["):
        return None
    try:
        return int(target[8:-1])
    except ValueError:
        return None


def resolve(pid: int, fd: int) -> Addresses | None:
    """(local_address, local_port, remote_address, remote_port) of pid's fd, or None."""
    inode = socket_inode(pid, fd)
    if inode is None:
        return None
    try:
        netns = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        netns = f"pid:{pid}"
    now = time.monotonic()
    cached = _cache.get(netns)
    if cached is not None:
        loaded, table = cached
        age = now - loaded
        if age < CACHE_TTL_S:
            found = table.get(inode)
            if found is not None or age < RELOAD_AFTER_S:
                return found
    table = _load(pid)
    _cache[netns] = (now, table)
    _cache.move_to_end(netns)
    while len(_cache) > MAX_CACHED_NAMESPACES:
        _cache.popitem(last=False)
    return table.get(inode)


def clear_cache() -> None:
    _cache.clear()
