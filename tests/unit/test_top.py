"""otel_ebpf/top.py without a terminal: the table model (counts, error split, sliding
window, latency quantiles, routes, sorting), the plain rendering, and the --once and
key handling of TopScreen, driven with explicit clock values."""

from __future__ import annotations

import io
import re
from dataclasses import replace

import pytest

from otel_ebpf.exchange import HttpExchange, Outcome, Role, RpcCall
from otel_ebpf.top import (
    TopModel,
    TopScreen,
    format_duration,
    quantiles,
    render_text,
    _bucket,
)

T0 = 1000.0  # monotonic time at which the model starts


def exchange(target: str = "/status/200", status: int | None = 200, pid: int = 7,
             role: Role = Role.SERVER, method: str = "GET", duration_s: float = 0.01,
             outcome: Outcome = Outcome.OK) -> HttpExchange:
    start = 1_700_000_000_000_000_000
    return HttpExchange(
        pid=pid, tid=pid, role=role, local_address="127.0.0.1", local_port=8080,
        remote_address="127.0.0.1", remote_port=40000, scheme="http", protocol_version="1.1",
        method=method, target=target, host="localhost", user_agent=None, traceparent=None,
        tracestate=None, request_body_size=0, response_body_size=None if status is None else 5,
        status_code=status, start_time_unix_nano=start,
        end_time_unix_nano=start + round(duration_s * 1e9), outcome=outcome)


def model(window_s: int = 10, **kw) -> TopModel:
    names = {7: "shop", 8: "shop", 9: "curl"}
    m = TopModel(window_s, lambda pid: names.get(pid, "unknown_service:%d" % pid), **kw)
    m.start(T0)
    return m


def only(rows):
    assert len(rows) == 1, rows
    return rows[0]


def test_counts_and_error_split_of_one_route():
    m = model()
    for code, n in ((200, 20), (404, 5), (500, 3)):
        for i in range(n):
            m.record(exchange("/status/%d" % code, code), T0 + 0.5 + i * 0.01)
    m.record(exchange("/status/200", None, outcome=Outcome.TIMEOUT), T0 + 1.2)
    m.record(exchange("/status/200", None, outcome=Outcome.CONNECTION_RESET), T0 + 1.3)
    m.record(exchange("/status/200", 200, outcome=Outcome.TRUNCATED), T0 + 1.4)
    row = only(m.rows(2))
    assert (row.key.service, row.key.role, row.key.method, row.key.route) == \
        ("shop", "server", "GET", "/status/{id}")
    assert row.total == row.count == 31
    assert row.rps == 31 / 2  # two complete seconds
    assert row.pct_4xx == pytest.approx(100 * 5 / 31)
    assert row.pct_5xx == pytest.approx(100 * 3 / 31)
    assert row.pct_timeout == pytest.approx(100 * 1 / 31)
    assert row.pct_other == pytest.approx(100 * 2 / 31)
    assert row.errors == pytest.approx(100 * 11 / 31)


def test_grpc_calls_that_fail_count_as_other_failures():
    m = model()
    for status in (0, 0, 0, 5):  # OK x 3, NOT_FOUND
        call = RpcCall("grpc", "shop.Cart", "Get", status, 1, 1)
        m.record(replace(exchange("/shop.Cart/Get", method="POST"), rpc=call,
                         protocol_version="2"), T0)
    row = only(m.rows(1))
    assert (row.key.method, row.key.route, row.count) == ("POST", "/shop.Cart/Get", 4)
    assert (row.pct_other, row.errors, row.pct_5xx) == (25.0, 25.0, 0.0)


def test_the_window_holds_complete_seconds_only_and_slides():
    m = model(window_s=5)
    for i in range(10):
        m.record(exchange(), T0 + 0.1)  # second 0
    m.record(exchange(status=404), T0 + 3.5)  # second 3
    assert only(m.rows(0)).count == 0  # second 0 is not complete yet
    assert only(m.rows(0)).total == 11
    row = only(m.rows(1))
    assert (row.count, row.rps, row.pct_4xx) == (10, 10.0, 0.0)
    row = only(m.rows(4))
    assert (row.count, row.rps, row.pct_4xx) == (11, 11 / 4, pytest.approx(100 / 11))
    row = only(m.rows(5))  # window [0, 5): all of it, a full window
    assert (row.count, row.rps) == (11, 11 / 5)
    row = only(m.rows(6))  # window [1, 6): second 0 left it
    assert (row.count, row.rps, row.pct_4xx) == (1, 1 / 5, 100.0)
    row = only(m.rows(9))  # nothing left in the window; the total stays
    assert (row.count, row.rps, row.total) == (0, 0.0, 11)
    assert row.errors is None and row.p50 is None and row.p99 is None


def test_latency_quantiles_are_within_their_bucket_of_a_measured_duration():
    m = model()
    durations = [i / 1000 for i in range(1, 101)]  # 1 ms .. 100 ms
    for d in durations:
        m.record(exchange(duration_s=d), T0 + 0.5)
    row = only(m.rows(1))
    assert row.p50 == pytest.approx(0.050, rel=0.011)  # nearest rank 50 of 100
    assert row.p99 == pytest.approx(0.099, rel=0.011)
    assert quantiles({_bucket(0.0): 3}, 3, (0.5,)) == [0.0]


def test_quantile_histogram_resolution():
    for d in (1e-6, 3.3e-4, 0.0123, 1.0, 7.5, 42.0):
        (value,) = quantiles({_bucket(d): 1}, 1, (0.99,))
        assert value == pytest.approx(d, rel=0.011)


def test_rows_by_service_role_method_and_route():
    m = model()
    m.record(exchange("/users/123", pid=7), T0)
    m.record(exchange("/users/456?x=1", pid=8), T0)  # same service, same route
    m.record(exchange("/users/456", pid=9, role=Role.CLIENT), T0)
    m.record(exchange("/users/456", pid=7, method="POST"), T0)
    m.record(exchange("/users/456", pid=7, method="BREW"), T0)  # unknown: _OTHER
    m.record(exchange("http://example.com/users/1", pid=7), T0)  # absolute-form
    rows = {(r.key.service, r.key.role, r.key.method, r.key.route): r.total
            for r in m.rows(1)}
    assert rows == {
        ("shop", "server", "GET", "/users/{id}"): 3,
        ("curl", "client", "GET", "/users/{id}"): 1,
        ("shop", "server", "POST", "/users/{id}"): 1,
        ("shop", "server", "_OTHER", "/users/{id}"): 1,
    }


def test_routes_use_the_configured_patterns_and_overflow_like_the_telemetry():
    m = model(route_patterns=["/api/{version}/items"], max_routes=2)
    m.record(exchange("/api/v1/items"), T0)
    m.record(exchange("/api/v2/items"), T0)
    for word in ("alpha", "beta", "gamma", "delta"):
        m.record(exchange("/" + word), T0)
    rows = {r.key.route: r.total for r in m.rows(1)}
    # two default routes per process, then the rest folds into the catch-all
    assert rows == {"/api/{version}/items": 2, "/alpha": 1, "/beta": 1, "/*": 2}


def test_exited_processes_give_back_their_route_budget():
    m = model(max_routes=1)
    m.record(exchange("/alpha", pid=7), T0)
    m.record(exchange("/beta", pid=7), T0)  # over pid 7's budget of one route
    m.forget_exited(lambda pid: pid != 7)
    m.record(exchange("/beta", pid=7), T0)  # a new process reusing the pid
    rows = {r.key.route: r.total for r in m.rows(1)}
    assert rows == {"/alpha": 1, "/*": 1, "/beta": 1}


def test_sorting():
    m = model()
    for _ in range(3):
        m.record(exchange("/fast", duration_s=0.001), T0)
    m.record(exchange("/slow", duration_s=2.0), T0)
    m.record(exchange("/bad", 500, duration_s=0.01), T0)
    m.record(exchange("/bad", 200, duration_s=0.01), T0)
    order = {sort: [r.key.route for r in m.rows(1, sort)]
             for sort in ("rps", "p99", "errors", "5xx", "route", "total")}
    assert order["rps"] == ["/fast", "/bad", "/slow"]
    assert order["total"] == ["/fast", "/bad", "/slow"]
    assert order["p99"] == ["/slow", "/bad", "/fast"]
    assert order["errors"][0] == order["5xx"][0] == "/bad"
    assert order["route"] == ["/bad", "/fast", "/slow"]


def test_plain_rendering():
    m = model(window_s=4)
    for code, n in ((200, 20), (404, 5), (500, 3)):
        for _ in range(n):
            m.record(exchange("/status/%d" % code, code, duration_s=0.002), T0 + 1)
    text = render_text(m.rows(4), 4, "rps")
    assert "\x1b" not in text  # no terminal escapes
    lines = text.splitlines()
    assert lines[0].startswith("otel-ebpf top - 1 rows - rates, errors and latency over "
                               "the last 4 s")
    assert lines[1].split() == ["SERVICE", "ROLE", "ROUTE", "TOTAL", "REQ/S", "ERR%",
                                "4XX%", "5XX%", "TIMEOUT%", "OTHER%", "P50", "P99"]
    row = lines[2].split()
    assert row[:11] == ["shop", "server", "GET", "/status/{id}", "28", "7.00", "28.6", "17.9",
                        "10.7", "0.0", "0.0"]
    for shown in row[11:]:  # p50, p99: the middle of the 2 ms bucket
        assert shown.endswith("ms") and float(shown[:-2]) == pytest.approx(2.0, rel=0.011)


def test_format_duration():
    assert [format_duration(v) for v in (None, 0.0, 5e-5, 0.0123, 1.5)] == \
        ["-", "0us", "50us", "12.3ms", "1.5s"]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_once_measures_for_the_interval_then_stops_and_prints(capsys):
    clock = Clock(T0)
    out = io.StringIO()
    m = TopModel(3, lambda pid: "shop")
    screen = TopScreen(m, once_after_s=3, out=out, clock=clock)
    assert screen.tick(T0)  # capture ready: the interval starts
    assert "capturing for 3 s" in capsys.readouterr().err
    for i in range(6):
        clock.now = T0 + 0.4 * i
        screen.handle(exchange(status=404 if i % 3 == 0 else 200))
    assert screen.tick(T0 + 2.9)
    assert not screen.tick(T0 + 3.01)  # done: the daemon stops
    clock.now = T0 + 3.2
    screen.handle(exchange())  # drained at shutdown, after the interval: not counted
    screen.close()
    row = out.getvalue().splitlines()[2].split()
    assert row[:8] == ["shop", "server", "GET", "/status/{id}", "6", "2.00", "33.3", "33.3"]


def test_live_keys_change_the_sort_and_q_quits():
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=160, force_terminal=True, color_system=None)
    m = model()
    screen = TopScreen(m, console=console, clock=Clock(T0))
    m.record(exchange("/a", duration_s=0.5), T0)
    m.record(exchange("/b"), T0)
    m.record(exchange("/b"), T0)
    assert screen.tick(T0 + 1.0)
    first = buffer.getvalue()
    assert "sort: rps" in first
    assert first.index("GET /b") < first.index("GET /a")
    assert screen.press("p")
    assert screen.sort == "p99"
    assert screen.tick(T0 + 1.1)  # the same second, redrawn for the new order
    redrawn = buffer.getvalue()[len(first):]
    assert "sort: p99" in redrawn
    assert redrawn.index("GET /a") < redrawn.index("GET /b")
    assert not screen.press("q")
    assert not screen.tick(T0 + 1.2)  # the daemon stops
    screen.close()
    assert re.search(r"keys: r rps", first)
