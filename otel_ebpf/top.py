"""`otel-ebpf top`: a live table of requests/s, errors and latency per service and route.

Three parts, one job each:

- `TopModel` (no terminal, unit-tested): one `RouteStats` per (service.name, role,
  method, http.route). The route comes from the same `RouteResolver` the telemetry
  uses (configured patterns, default `{id}` templating, per-process overflow into
  `/*`), and unknown methods fold into `_OTHER` as in the metrics, so the table has
  the metrics' cardinality bounds.
- `render(...)`: a `rich` Table of the model's rows, plain (no colour, no box) when
  the output is not a terminal so `--once` is easy to script.
- `TopScreen`: the `daemon.ExchangeSink` the capture loop drives. Live mode redraws
  once a second and reads sort keys from the terminal; `--once` measures for a given
  number of seconds, prints one table and asks the loop to stop.

Time is counted in whole seconds since the capture became ready. The window is the
last `window_s` *complete* seconds (fewer during the first ones): requests/s is the
exchanges reported in those seconds divided by their number, so with --once over N
seconds it is exactly count / N. An exchange is placed in the second in which the
daemon reported it (a response's last byte, or a timeout when it expired).

Latency quantiles come from a log-scale histogram per key and second (32 buckets per
power of two): memory per key is bounded whatever the rate, and a reported p50/p99
is within 1.1 % of a duration that was really measured (it is the geometric middle of
the bucket holding the nearest-rank sample).
"""

from __future__ import annotations

import io
import math
import os
import select
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from otel_ebpf.exchange import HttpExchange, Outcome, Role
from otel_ebpf.telemetry.attributes import KNOWN_METHODS, OTHER_METHOD, url_path
from otel_ebpf.telemetry.routes import RouteResolver

if TYPE_CHECKING:  # rich is imported where a table is drawn: `run` never loads it
    from rich.console import Console, Group
    from rich.table import Table

# Histogram resolution: buckets per power of two. Bucket i holds durations in
# [2**(i/32), 2**((i+1)/32)) seconds; its middle is within 1.1 % of both ends.
_SUB_BUCKETS = 32
_ZERO_BUCKET = -(1 << 30)  # durations of 0 (clock granularity): sorted before all others

_TIMEOUT = Outcome.TIMEOUT
_OK = Outcome.OK
_ROLE_NAMES = {Role.SERVER: "server", Role.CLIENT: "client", Role.UNKNOWN: "unknown"}


def _bucket(duration_s: float) -> int:
    if duration_s <= 0.0:
        return _ZERO_BUCKET
    return math.floor(math.log2(duration_s) * _SUB_BUCKETS)


def _bucket_value(index: int) -> float:
    if index == _ZERO_BUCKET:
        return 0.0
    return 2.0 ** ((index + 0.5) / _SUB_BUCKETS)


class _Second:
    """What one key saw in one second."""

    __slots__ = ("count", "c4xx", "c5xx", "timeouts", "other", "latency")

    def __init__(self) -> None:
        self.count = 0
        self.c4xx = 0
        self.c5xx = 0
        self.timeouts = 0
        # Any other failure: a non-OK outcome but a timeout (connection closed or reset,
        # truncated, HTTP/2 stream reset or GOAWAY), or a gRPC status other than OK.
        self.other = 0
        self.latency: dict[int, int] = {}  # histogram bucket -> exchanges


@dataclass(frozen=True, slots=True)
class Key:
    service: str
    role: str  # "server", "client" or "unknown"
    method: str
    route: str


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: totals since the start, the rest over the window."""

    key: Key
    total: int  # exchanges since top started
    count: int  # exchanges in the window
    rps: float
    errors: float | None  # percentages of `count`; None when the window is empty
    pct_4xx: float | None
    pct_5xx: float | None
    pct_timeout: float | None
    pct_other: float | None
    p50: float | None  # seconds
    p99: float | None


class RouteStats:
    """Counters of one key: the total and the recent seconds (index -> _Second)."""

    __slots__ = ("total", "seconds")

    def __init__(self) -> None:
        self.total = 0
        self.seconds: dict[int, _Second] = {}

    def record(self, second: int, exchange: HttpExchange) -> None:
        self.total += 1
        bucket = self.seconds.get(second)
        if bucket is None:
            bucket = self.seconds[second] = _Second()
        bucket.count += 1
        outcome = exchange.outcome
        if outcome is _OK:
            code = exchange.status_code or 0
            if 400 <= code < 500:
                bucket.c4xx += 1
            elif code >= 500:
                bucket.c5xx += 1
            elif exchange.rpc is not None and exchange.rpc.status_code:
                bucket.other += 1  # gRPC fails with a grpc-status under HTTP 200
        elif outcome is _TIMEOUT:
            bucket.timeouts += 1
        else:
            bucket.other += 1
        index = _bucket((exchange.end_time_unix_nano - exchange.start_time_unix_nano) / 1e9)
        latency = bucket.latency
        latency[index] = latency.get(index, 0) + 1

    def prune(self, oldest: int) -> None:
        for second in [s for s in self.seconds if s < oldest]:
            del self.seconds[second]

    def row(self, key: Key, first: int, end: int) -> Row:
        """The row over seconds [first, end)."""
        count = c4xx = c5xx = timeouts = other = 0
        latency: dict[int, int] = {}
        for second, b in self.seconds.items():
            if first <= second < end:
                count += b.count
                c4xx += b.c4xx
                c5xx += b.c5xx
                timeouts += b.timeouts
                other += b.other
                for index, n in b.latency.items():
                    latency[index] = latency.get(index, 0) + n
        span = end - first
        rps = count / span if span > 0 else 0.0
        if not count:
            return Row(key, self.total, 0, rps, None, None, None, None, None, None, None)

        def pct(n: int) -> float:
            return 100.0 * n / count

        p50, p99 = quantiles(latency, count, (0.50, 0.99))
        return Row(key, self.total, count, rps, pct(c4xx + c5xx + timeouts + other),
                   pct(c4xx), pct(c5xx), pct(timeouts), pct(other), p50, p99)


def quantiles(histogram: dict[int, int], count: int, qs: Iterable[float]) -> list[float]:
    """Nearest-rank quantiles (q in (0, 1]) of a bucket -> count histogram."""
    ordered = sorted(histogram.items())
    out = []
    for q in qs:
        rank = max(1, math.ceil(q * count))
        seen = 0
        for index, n in ordered:
            seen += n
            if seen >= rank:
                out.append(_bucket_value(index))
                break
    return out


# --sort name -> (what to sort on, largest first?)
SORT_KEYS: dict[str, tuple[Callable[[Row], object], bool]] = {
    "rps": (lambda r: r.rps, True),
    "total": (lambda r: r.total, True),
    "errors": (lambda r: r.errors or 0.0, True),
    "4xx": (lambda r: r.pct_4xx or 0.0, True),
    "5xx": (lambda r: r.pct_5xx or 0.0, True),
    "timeouts": (lambda r: r.pct_timeout or 0.0, True),
    "other": (lambda r: r.pct_other or 0.0, True),
    "p50": (lambda r: r.p50 or 0.0, True),
    "p99": (lambda r: r.p99 or 0.0, True),
    "route": (lambda r: (r.key.route, r.key.method), False),
    "service": (lambda r: r.key.service, False),
}

# Keys of the live view -> sort name.
SORT_BY_KEY = {"r": "rps", "t": "total", "e": "errors", "4": "4xx", "5": "5xx",
               "o": "timeouts", "x": "other", "m": "p50", "p": "p99", "n": "route",
               "s": "service"}
KEY_HELP = "r rps  t total  e errors  4 4xx  5 5xx  o timeouts  x other  m p50  p p99  " \
    "n route  s service  q quit"


class TopModel:
    """Exchanges -> per-key counters and latency windows. `now` is time.monotonic()."""

    def __init__(self, window_s: int, service_of: Callable[[int], str],
                 route_patterns: Iterable[str] = (), max_routes: int = 200,
                 route_cache_size: int = 4096) -> None:
        if window_s < 1:
            raise ValueError("window_s must be at least 1 second")
        self.window_s = window_s
        self._service_of = service_of
        self._routes = RouteResolver(route_patterns, max_routes, route_cache_size)
        self._stats: dict[tuple[str, str, str, str], RouteStats] = {}
        self._pids: set[int] = set()  # whose routes the resolver counts (see forget_exited)
        self.started: float | None = None

    def start(self, now: float) -> None:
        if self.started is None:
            self.started = now

    def second(self, now: float) -> int:
        """Whole seconds since the start (the bucket an exchange reported now goes to)."""
        if self.started is None:
            self.start(now)
        return int(now - self.started)

    def record(self, exchange: HttpExchange, now: float) -> None:
        pid = exchange.pid
        self._pids.add(pid)
        path = exchange.target.partition("?")[0]
        if path[:1] != "/":
            path = url_path(exchange)
        method = exchange.method if exchange.method in KNOWN_METHODS else OTHER_METHOD
        # A plain tuple (Key's fields in order): the Key itself is built per row, not
        # per exchange.
        key = (self._service_of(pid), _ROLE_NAMES.get(exchange.role, "unknown"), method,
               self._routes.route(pid, path))
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = RouteStats()
        stats.record(self.second(now), exchange)

    def rows(self, completed: int, sort: str = "rps") -> list[Row]:
        """The table after `completed` whole seconds: the window is the last window_s of
        them (all of them when fewer). Older seconds are dropped as no longer needed."""
        end = max(completed, 0)
        first = max(0, end - self.window_s)
        rows = []
        for key, stats in self._stats.items():
            stats.prune(first)
            rows.append(stats.row(Key(*key), first, end))
        return sort_rows(rows, sort)

    def window_seconds(self, completed: int) -> int:
        return min(max(completed, 0), self.window_s)

    def forget_exited(self, alive: Callable[[int], bool]) -> None:
        """Drop the per-process route budgets of processes that exited: every short-lived
        client (each curl) has one, and top may run for days. Rows are per service and
        stay."""
        for pid in [p for p in self._pids if not alive(p)]:
            self._pids.discard(pid)
            self._routes.forget(pid)


def sort_rows(rows: list[Row], sort: str) -> list[Row]:
    what, descending = SORT_KEYS[sort]
    # Stable: by service and route first, then the chosen column.
    rows = sorted(rows, key=lambda r: (r.key.service, r.key.route, r.key.method, r.key.role))
    return sorted(rows, key=what, reverse=descending)


# ---------------------------------------------------------------------- rendering

def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return "%.0fus" % (seconds * 1e6)
    if seconds < 1.0:
        return "%.3gms" % (seconds * 1e3)
    return "%.3gs" % seconds


def _pct(value: float | None) -> str:
    return "-" if value is None else "%.1f" % value


COLUMNS = ("SERVICE", "ROLE", "ROUTE", "TOTAL", "REQ/S", "ERR%", "4XX%", "5XX%",
           "TIMEOUT%", "OTHER%", "P50", "P99")


def header(rows: list[Row], window: int, sort: str, live: bool) -> str:
    text = ("otel-ebpf top - %d rows - rates, errors and latency over the last %d s "
            "(TOTAL: since start) - sort: %s" % (len(rows), window, sort))
    if live:
        text += "\nkeys: " + KEY_HELP
    return text


def table(rows: list[Row], plain: bool) -> Table:
    from rich import box
    from rich.table import Table

    t = Table(box=None if plain else box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              header_style="" if plain else "bold")
    for name in COLUMNS:
        t.add_column(name, justify="left" if name in ("SERVICE", "ROLE", "ROUTE") else "right",
                     no_wrap=True)
    for r in rows:
        # On a terminal a row with errors in the window stands out.
        style = "red" if r.errors and not plain else None
        t.add_row(r.key.service, r.key.role, "%s %s" % (r.key.method, r.key.route),
                  str(r.total), "%.2f" % r.rps, _pct(r.errors), _pct(r.pct_4xx),
                  _pct(r.pct_5xx), _pct(r.pct_timeout), _pct(r.pct_other),
                  format_duration(r.p50), format_duration(r.p99), style=style)
    return t


def render(rows: list[Row], window: int, sort: str, plain: bool, live: bool = False) -> Group:
    from rich.console import Group
    from rich.text import Text

    return Group(Text(header(rows, window, sort, live)), table(rows, plain))


def render_text(rows: list[Row], window: int, sort: str, width: int = 400) -> str:
    """The plain table as a string (what --once prints when stdout is not a terminal)."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(render(rows, window, sort, plain=True))
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n"


# ---------------------------------------------------------------------- the sink

class TopScreen:
    """The daemon's ExchangeSink for `otel-ebpf top`.

    Live (once_after_s None): redraws every second through rich's Live display and
    reads single keys from the terminal (sort keys, q). Once: after `once_after_s`
    seconds, stops recording, returns False from tick (the daemon stops) and prints
    the table at close.
    """

    def __init__(self, model: TopModel, sort: str = "rps", once_after_s: int | None = None,
                 out: IO[str] | None = None, console: Console | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model = model
        self.sort = sort
        self._once = once_after_s
        self._out = out or sys.stdout
        self._console = console
        self._live = None
        self._shown = -1  # the last second drawn
        self._done = False
        self._keys = _Keyboard() if once_after_s is None else None
        self._clock = clock
        self._next_forget = 0.0

    # ExchangeSink

    def handle(self, exchange: HttpExchange) -> None:
        if not self._done:
            self.model.record(exchange, self._clock())

    def flush(self) -> None:
        pass

    def tick(self, now: float) -> bool:
        model = self.model
        model.start(now)
        completed = model.second(now)
        if self._once is not None:
            if self._shown < 0:  # the capture is ready: say so (scripts wait for it)
                self._shown = 0
                print("otel-ebpf top: capturing for %d s" % self._once, file=sys.stderr,
                      flush=True)
            if completed >= self._once:
                self._done = True
            return not self._done
        if now >= self._next_forget:
            self._next_forget = now + FORGET_INTERVAL_S
            model.forget_exited(_process_alive)
        if self._keys is not None:
            self.press(self._keys.read())
        if self._done:  # q
            return False
        if completed != self._shown:
            self._shown = completed
            self._draw(completed)
        return True

    def press(self, keys: str) -> bool:
        """Keys typed in the live view; False when one of them was q (quit)."""
        for key in keys:
            if key == "q":
                self._done = True
                return False
            if key in SORT_BY_KEY:
                self.sort = SORT_BY_KEY[key]
                self._shown = -1  # redraw at this tick
        return True

    def close(self) -> None:
        if self._keys is not None:
            self._keys.close()
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._once is not None:
            self.print_once()

    # drawing

    def _draw(self, completed: int) -> None:
        from rich.live import Live

        rows = self.model.rows(completed, self.sort)
        view = render(rows, self.model.window_seconds(completed), self.sort,
                      plain=False, live=True)
        if self._live is None:
            self._live = Live(view, console=self._console, auto_refresh=False,
                              redirect_stdout=False, redirect_stderr=False)
            self._live.start(refresh=True)
        else:
            self._live.update(view, refresh=True)

    def print_once(self) -> None:
        """The table over the whole --once interval."""
        completed = self._once if self._done else self.model.second(self._clock())
        rows = self.model.rows(completed, self.sort)
        window = self.model.window_seconds(completed)
        if self._out.isatty():
            from rich.console import Console

            Console(file=self._out).print(render(rows, window, self.sort, plain=False))
        else:
            self._out.write(render_text(rows, window, self.sort))
        self._out.flush()


FORGET_INTERVAL_S = 10.0


def _process_alive(pid: int) -> bool:
    return os.path.exists("/proc/%d" % pid)


class _Keyboard:
    """Single key presses from the controlling terminal, without Enter (cbreak mode);
    nothing when stdin is not a terminal. The terminal mode is restored at close."""

    def __init__(self) -> None:
        self._fd = None
        self._saved = None
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            return
        if not os.isatty(fd):
            return
        import atexit
        import termios
        import tty

        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._fd = fd
        atexit.register(self.close)  # even if the daemon dies before its shutdown

    def read(self) -> str:
        if self._fd is None:
            return ""
        keys = ""
        while select.select([self._fd], [], [], 0)[0]:
            data = os.read(self._fd, 64)
            if not data:
                break
            keys += data.decode("utf-8", "replace").lower()
        return keys

    def close(self) -> None:
        if self._fd is not None and self._saved is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._fd = None
