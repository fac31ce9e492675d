"""Random-cardinality traffic (random methods, paths, queries, Host headers and user
agents, as tests/integration/test_cardinality.py sends through nginx) through the span
encoder and Telemetry: the encoded spans are pinned byte for byte (the encoder's caches
are an optimization and must never change a byte), and the per-connection and
per-request caches stay bounded by what repeats, not by what the client invents.

`python tests/unit/test_telemetry_cardinality.py [N]` prints CPU per exchange of
Telemetry.record for this traffic and for a fixed `GET /` (the micro-harness for the
cost of cache misses).
"""

from __future__ import annotations

import hashlib
import random
import statistics
import sys
import time

from otel_ebpf.exchange import HttpExchange, Outcome, Role
from otel_ebpf.stats import Stats
from otel_ebpf.telemetry import Telemetry, TelemetryOptions
from otel_ebpf.telemetry.redact import QueryRedactor
from otel_ebpf.telemetry.spans import IdGenerator, SpanEncoder

T0 = 1_700_000_000_000_000_000
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
KNOWN = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


class SeededIds(IdGenerator):
    """Deterministic trace/span ids, so that whole spans can be compared."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._rng = random.Random(seed)

    def ids(self) -> tuple[bytes, bytes]:
        return self._rng.randbytes(16), self._rng.randbytes(8)

    def span_id(self) -> bytes:
        return self._rng.randbytes(8)


def _word(r: random.Random, n: int) -> str:
    return "".join(r.choice(LETTERS) for _ in range(n))


def random_exchanges(n: int, seed: int = 1) -> list[HttpExchange]:
    """The cardinality attack's traffic, both sides of each request (nginx's SERVER
    record and the client's), 4 keep-alive connections and new ones, plus what the attack does
    not vary but a span must carry: now and then a traceparent, a secret in the
    query, an unfinished exchange, a long user agent, a Host without a port."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        # 4 keep-alive connections, and every 3rd request on a new one (nginx closes
        # a connection after some error responses)
        conn = i % 4 if i % 3 else 4 + i
        method = _word(r, r.randint(3, 9)) if r.randint(1, 4) == 1 else r.choice(KNOWN)
        query = ("token=%d&id=%d" % (i, r.randint(0, 2**30)) if i % 7 == 0
                 else "id=%d" % r.randint(0, 2**30))
        target = "/%x/%x/%s?%s" % (r.randint(0, 2**30), r.randint(0, 2**30),
                                   _word(r, 6).lower(), query)
        if i % 11 == 0:
            target = "/users/%d/orders" % r.randint(0, 50)  # templated, repeats
        host = _word(r, 8).lower() + ".example" + (":%d" % r.randint(1, 65535)
                                                   if i % 5 else "")
        agent = "agent-" + _word(r, 12 if i % 13 else 200)
        known = method in KNOWN
        outcome = Outcome.OK if i % 17 else Outcome.CONNECTION_RESET
        start = T0 + i * 20_000
        for role in (Role.SERVER, Role.CLIENT):
            out.append(HttpExchange(
                pid=4242 if role is Role.SERVER else 5151, tid=7, role=role,
                local_address="127.0.0.1", local_port=8080 if role is Role.SERVER
                else 40000 + conn, remote_address="127.0.0.1",
                remote_port=40000 + conn if role is Role.SERVER else 8080,
                scheme="http", protocol_version="1.1", method=method, target=target,
                host=host, user_agent=agent,
                traceparent=("00-%032x-%016x-0%d" % (i + 1, i + 7, i % 2)) if i % 9 == 0
                else None,
                tracestate="k=v" if i % 18 == 0 else None,
                request_body_size=0 if known else r.randint(0, 300),
                response_body_size=None if outcome is not Outcome.OK
                else 157 if known else 166,
                status_code=None if outcome is not Outcome.OK
                else 404 if method == "GET" else 405,
                start_time_unix_nano=start, end_time_unix_nano=start + 80_000 + i,
                outcome=outcome, error_reason=None if outcome is Outcome.OK else "reset"))
    return out


def fixed_exchanges(n: int) -> list[HttpExchange]:
    """`GET /` on 4 keep-alive connections: every cache hits."""
    return [HttpExchange(
        pid=4242, tid=7, role=Role.SERVER, local_address="127.0.0.1", local_port=8080,
        remote_address="127.0.0.1", remote_port=40000 + i % 4, scheme="http",
        protocol_version="1.1", method="GET", target="/", host="127.0.0.1:8080",
        user_agent=None, traceparent=None, tracestate=None, request_body_size=0,
        response_body_size=615, status_code=200, start_time_unix_nano=T0 + i * 20_000,
        end_time_unix_nano=T0 + i * 20_000 + 80_000 + i) for i in range(n)]


def encode_all(encoder: SpanEncoder, exchanges: list[HttpExchange]) -> list[bytes | None]:
    out = []
    for ex in exchanges:
        route = ex.target.partition("?")[0]  # the route is an input here, not under test
        out.append(encoder.encode(ex, route))
    return out


# sha256 of the spans of random_exchanges(6000) (12,000 spans, None written as b"-"),
# encoded by the encoder before its caches were reworked for random traffic.
PINNED_SPANS_SHA256 = "3581b691fb6b724cd3fd96a7d27576595279191fea940f91b9f6f37c744ab7f5"


def spans_digest(spans: list[bytes | None]) -> str:
    h = hashlib.sha256()
    for span in spans:
        h.update(b"-" if span is None else span)
    return h.hexdigest()


def test_random_traffic_spans_are_byte_identical_to_the_pinned_encoding():
    encoder = SpanEncoder(QueryRedactor(), SeededIds(3))
    spans = encode_all(encoder, random_exchanges(6000))
    assert sum(span is None for span in spans) > 0  # unsampled parents were in it
    assert spans_digest(spans) == PINNED_SPANS_SHA256


def test_cached_and_cold_encodings_agree_span_for_span():
    """One encoder with warm caches vs a new encoder per span (every cache cold)."""
    exchanges = random_exchanges(400, seed=9)
    warm = encode_all(SpanEncoder(QueryRedactor(), SeededIds(5)), exchanges)
    ids = SeededIds(5)
    cold = []
    for ex in exchanges:
        cold.extend(encode_all(SpanEncoder(QueryRedactor(), ids), [ex]))
    assert warm == cold


def test_caches_hold_what_repeats_not_what_the_client_invents():
    encoder = SpanEncoder(QueryRedactor(), SeededIds(1))
    exchanges = random_exchanges(3000)
    encode_all(encoder, exchanges)
    # One entry per socket (seen from the server and the client side): the random Host
    # headers and user agents replace a connection's entry.
    sockets = {(ex.role, ex.local_port, ex.remote_port) for ex in exchanges}
    assert len(sockets) == 2 * (4 + 1000)
    # (at most: a block with a 200-character user agent is over the size kept)
    assert len(sockets) // 2 < len(encoder._connections) <= len(sockets)
    # Peer addresses are cached per address, not per connection.
    assert len(encoder._peers) == 2
    # Invented methods are not cache keys: requests of unknown methods are cached per
    # (route, status, outcome, role) only.
    assert all(key[0] in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
               for key in encoder._requests)
    assert not any(key[0] == "http.request.method_original" for key in encoder._attr._cache)
    assert not any(key[0] in ("server.port", "server.address", "user_agent.original")
                   for key in encoder._attr._cache)


def test_random_traffic_metrics_count_every_exchange_within_the_cardinality_limit():
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
        ExportMetricsServiceRequest,
    )

    payloads: list[bytes] = []

    class Sink:
        def export_traces(self, payload: bytes, spans: int = 1) -> None:
            pass

        def export_metrics(self, payload: bytes, points: int = 1) -> None:
            payloads.append(payload)

    stats = Stats()
    telemetry = Telemetry(TelemetryOptions(max_routes=20, metric_cardinality_limit=10),
                          resource_for_pid=lambda pid: {"service.name": "s%d" % pid},
                          daemon_resource={"service.name": "otel-ebpf"}, sink=Sink(),
                          stats=stats)
    exchanges = random_exchanges(3000)
    for ex in exchanges:
        telemetry.record(ex)
    telemetry.flush()
    request = ExportMetricsServiceRequest.FromString(payloads[-1])
    counts: dict[str, list[tuple[int, bool]]] = {}
    for rm in request.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                if metric.name.endswith("request.duration"):
                    counts.setdefault(metric.name, []).extend(
                        (p.count, any(a.key == "otel.metric.overflow" for a in p.attributes))
                        for p in metric.histogram.data_points)
    for name in ("http.server.request.duration", "http.client.request.duration"):
        points = counts[name]
        assert sum(c for c, _ in points) == 3000  # one per request and side
        assert len(points) == 10 and sum(overflow for _, overflow in points) == 1
    overflowed = sum(c for points in counts.values() for c, overflow in points if overflow)
    assert stats.snapshot()["telemetry.metric_overflow"] == overflowed


def _record_cost(exchanges: list[HttpExchange]) -> float:
    """CPU microseconds per exchange of Telemetry.record (+ the final flush)."""
    sink = _NullSink()
    telemetry = Telemetry(TelemetryOptions(max_routes=20, metric_cardinality_limit=10),
                          resource_for_pid=lambda pid: {"service.name": "s%d" % pid},
                          daemon_resource={"service.name": "otel-ebpf"}, sink=sink,
                          stats=Stats())
    record = telemetry.record
    start = time.process_time()
    for ex in exchanges:
        record(ex)
    telemetry.flush()
    elapsed = time.process_time() - start
    assert sink.spans == sum(1 for ex in exchanges if not (
        ex.traceparent and ex.traceparent.endswith("-00")))
    return elapsed / len(exchanges) * 1e6


class _NullSink:
    def __init__(self) -> None:
        self.spans = 0

    def export_traces(self, payload: bytes, spans: int = 1) -> None:
        self.spans += spans

    def export_metrics(self, payload: bytes, points: int = 1) -> None:
        pass


def test_record_cost_of_random_and_fixed_traffic():
    """Prints the two costs (no timing assertion: a shared machine is noisy); asserts
    that every span was exported."""
    random_cost = _record_cost(random_exchanges(1000))
    fixed_cost = _record_cost(fixed_exchanges(2000))
    print("\nTelemetry.record: random traffic %.2f us/exchange, GET / %.2f us/exchange"
          % (random_cost, fixed_cost))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--digest"]:
        print(spans_digest(encode_all(SpanEncoder(QueryRedactor(), SeededIds(3)),
                                      random_exchanges(6000))))
        sys.exit(0)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    rnd, fixed = random_exchanges(n // 2), fixed_exchanges(n)
    costs: dict[str, list[float]] = {"random": [], "GET /": []}
    for _ in range(5):  # interleaved: noise hits both alike
        costs["random"].append(_record_cost(rnd))
        costs["GET /"].append(_record_cost(fixed))
    for name, values in costs.items():
        print("%-7s %6.2f us/exchange (median of 5, min %.2f), %d exchanges"
              % (name, statistics.median(values), min(values), n))
