"""Microbenchmark (run by hand): us per keep-alive exchange through ConnectionTable.handle.

    .venv/bin/python tests/unit/golden/bench_handle.py

A typical 5-header request and a small Content-Length response, one DataEvent each,
on one server connection; best of 400 rounds of 500 exchanges, CPU time of this
thread (the machines are shared and noisy: the best round is the honest number).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from otel_ebpf.capture.events import ConnOpenEvent, DataEvent, Direction, Role, Source  # noqa: E402
from otel_ebpf.conntrack import ConnectionTable, ConntrackOptions  # noqa: E402
from otel_ebpf.stats import Stats  # noqa: E402

REQUEST = (b"GET /api/items?id=42 HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/7.88.1\r\n"
           b"Accept: */*\r\nAccept-Encoding: gzip\r\nConnection: keep-alive\r\n\r\n")
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 15:00:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
            b"Hello, world!")


def main(rounds: int = 400, per_round: int = 500) -> float:
    table = ConnectionTable(ConntrackOptions(), Stats(), resolve_addresses=None, clock_offset_ns=0)
    table.handle(ConnOpenEvent(100, 1, 1, 5, 0, Role.SERVER, Source.SYSCALL,
                               "127.0.0.1", 8080, "127.0.0.1", 5000))
    pos_in = pos_out = 0
    ts = 1000
    best = float("inf")
    for _ in range(rounds):
        events = []
        for _ in range(per_round):
            ts += 10
            events.append(DataEvent(ts, 1, 1, 5, 0, Direction.INGRESS, Source.SYSCALL,
                                    pos_in, len(REQUEST), REQUEST))
            events.append(DataEvent(ts + 5, 1, 1, 5, 0, Direction.EGRESS, Source.SYSCALL,
                                    pos_out, len(RESPONSE), RESPONSE))
            pos_in += len(REQUEST)
            pos_out += len(RESPONSE)
        handle = table.handle
        produced = 0
        start = time.thread_time()
        for event in events:
            produced += len(handle(event))
        best = min(best, (time.thread_time() - start) / per_round * 1e6)
        assert produced == per_round
    return best


if __name__ == "__main__":
    print(f"{main():.2f} us per exchange (2 DataEvents through ConnectionTable.handle)")
