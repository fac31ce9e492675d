"""Golden replays: real server/client byte streams (tests/unit/golden/, recorded by
record_golden.py through a TCP proxy) through ConnectionTable, checked against the
servers' own logs (nginx's access log, the Node.js server's record of what it wrote).

Variants: as recorded; every chunk re-split at random; and every chunk cut to the
kernel's 4096-byte capture prefix (size says the rest moved). The proxy's chunks are
what a reader's read() gets (TCP coalesces writes), so with the capture prefix a
chunked body's framing can fall in bytes nobody saw: that exchange must then be
TRUNCATED ("gap_in_chunked_framing") with a body no larger than the real one, and the
following exchanges must still be exact (resynchronisation)."""

from __future__ import annotations

import base64
import gzip
import json
import random
from pathlib import Path

import pytest

from otel_ebpf.capture.events import (
    ConnCloseEvent,
    ConnOpenEvent,
    DataEvent,
    Direction,
    Role,
    Source,
)
from otel_ebpf.exchange import Outcome
from tests.unit.test_http1_support import make_table

GOLDEN = Path(__file__).resolve().parent / "golden"


def load(name: str) -> tuple[list[dict], list[dict]]:
    text = gzip.decompress((GOLDEN / f"{name}.events.jsonl.gz").read_bytes()).decode()
    events = [json.loads(line) for line in text.splitlines()]
    log = [json.loads(line) for line in (GOLDEN / f"{name}.log.jsonl").read_text().splitlines()]
    return events, log


CAPTURE = 4096  # MAX_CAPTURE_BYTES default (bpf/include/events.h)


def replay(events: list[dict], role: Role, rng: random.Random | None, capture: int | None = None):
    """Feed the recording as kernel events; `rng` re-splits every chunk, `capture`
    keeps only that prefix of each chunk's bytes (its size still counts them all)."""
    table, stats = make_table()
    positions: dict[int, list[int]] = {}
    out = []
    for e in events:
        conn, ts = e["conn"], e["ts"]
        if e["kind"] == "open":
            positions[conn] = [0, 0]
            out += table.handle(ConnOpenEvent(ts, 500, 500, conn, 1, role, Source.SYSCALL,
                                              "127.0.0.1", 8080, "127.0.0.1", 40000 + conn))
        elif e["kind"] == "close":
            out += table.handle(ConnCloseEvent(ts, 500, 500, conn, 1))
        else:
            incoming = e["dir"] == "in"  # bytes the server received
            if role == Role.SERVER:
                direction = Direction.INGRESS if incoming else Direction.EGRESS
            else:  # the same bytes seen from the client's side
                direction = Direction.EGRESS if incoming else Direction.INGRESS
            data = base64.b64decode(e["b64"])
            size = len(data)
            if capture is not None:
                data = data[:capture]
            pieces = [(data, size)]
            if rng is not None and len(data) > 1:
                cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 6))))
                bounds = [0, *cuts, len(data)]
                pieces = [(data[a:b], b - a) for a, b in zip(bounds, bounds[1:])]
                last, _ = pieces[-1]
                pieces[-1] = (last, len(last) + size - len(data))  # the uncaptured rest
            for chunk, chunk_size in pieces:
                pos = positions[conn][direction]
                positions[conn][direction] = pos + chunk_size
                out += table.handle(DataEvent(ts, 500, 501, conn, 1, direction, Source.SYSCALL,
                                              pos, chunk_size, chunk))
    return out, stats, table


def expected(log: list[dict]) -> list[tuple]:
    return sorted((r["method"], r["uri"], r["status"], r["body_bytes_sent"]) for r in log)


@pytest.mark.parametrize("name", ["nginx", "node"])
@pytest.mark.parametrize("role", [Role.SERVER, Role.CLIENT], ids=["server", "client"])
@pytest.mark.parametrize("seed", [None, 1, 2, 3], ids=["as-recorded", "split1", "split2", "split3"])
def test_golden_replay_matches_the_server_log(name, role, seed):
    events, log = load(name)
    out, stats, table = replay(events, role, None if seed is None else random.Random(seed))
    got = sorted((x.method, x.target, x.status_code, x.response_body_size) for x in out)
    assert got == expected(log)
    assert {x.outcome for x in out} == {Outcome.OK}
    assert {x.role for x in out} == {role}
    assert stats.get("http.parse_failures") == 0
    assert len(table) == 0 and table.active_server_requests() == {}
    if name == "node":  # the server counted the (de-chunked) request body it read
        bodies = sorted((x.target, x.request_body_size) for x in out)
        assert bodies == sorted((r["uri"], r["request_body"]) for r in log)


@pytest.mark.parametrize("name", ["nginx", "node"])
@pytest.mark.parametrize("seed", [None, 4, 5])
def test_golden_replay_with_the_kernel_capture_prefix(name, seed):
    events, log = load(name)
    out, stats, table = replay(events, Role.SERVER, None if seed is None else random.Random(seed),
                               capture=CAPTURE)
    # nothing lost, nothing doubled: one exchange per logged request
    assert sorted((x.method, x.target) for x in out) == sorted((r["method"], r["uri"]) for r in log)
    remaining = expected(log)
    truncated = 0
    for x in out:
        if x.outcome is Outcome.OK:
            remaining.remove((x.method, x.target, x.status_code, x.response_body_size))  # exact
            continue
        truncated += 1
        assert x.outcome is Outcome.TRUNCATED
        real = [r for r in remaining if r[:2] == (x.method, x.target)]
        if x.error_reason == "gap_in_chunked_framing":  # body counted up to the lost framing
            assert any(x.status_code == r[2] and x.response_body_size <= r[3] for r in real)
        elif x.error_reason == "gap_in_headers":  # status line seen, the rest of the head not
            assert any(x.status_code == r[2] for r in real)
        else:  # the whole response fell in uncaptured bytes
            assert (x.error_reason, x.status_code) == ("response_lost", None)
    # The recording's chunks are a reader's reads, which coalesce the server's writes:
    # nginx's 24 pipelined responses arrive as one 5 KiB read (past the 4096-byte prefix
    # 1 is cut in its head, 7 unseen); Node's chunked bodies of 28000, 120000 and 6000
    # bytes (and 3000 for /upload) come in reads whose chunk-size lines lie beyond the
    # prefix. A server's own writes (what the kernel sees on the server side) start each
    # head and chunk in a capture; a client's reads are exactly this case.
    assert truncated == {"nginx": 8, "node": 4}[name]
    assert stats.get("http.parse_failures") == 0
    assert len(table) == 0


def test_golden_recordings_cover_the_interesting_cases():
    """Guard against a re-recording that silently lost a scenario."""
    nginx_events, nginx_log = load("nginx")
    node_events, node_log = load("node")
    assert len(nginx_log) == 35 and len(node_log) == 6
    statuses = {r["status"] for r in nginx_log}
    assert {200, 304, 404, 405} <= statuses
    assert {"HEAD", "PURGE", "FOO", "POST"} <= {r["method"] for r in nginx_log}
    # bodies far larger than the 4096-byte capture prefix, on both servers
    def largest(events):
        return max(len(base64.b64decode(e["b64"])) for e in events)

    assert largest(nginx_events) > CAPTURE and largest(node_events) > CAPTURE
    node_out = b"".join(base64.b64decode(e["b64"]) for e in node_events if e["dir"] == "out")
    assert b"Transfer-Encoding: chunked" in node_out and b"100 Continue" in node_out
