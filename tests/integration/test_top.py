"""`otel-ebpf top` against real traffic: real eBPF, a real Python HTTP server, curl.

The live view is driven in tmux like a person would: started in a detached session,
read with capture-pane, sorted and quit with send-keys. `--once` is run with its stdout
on a pipe, as a script would, with two selectors of `run` (--port, --exclude-exe). Both
check the exact numbers of the traffic sent: per route 20 x 200, 5 x 404 and 3 x 500,
plus 2 requests that are never answered (timeouts after the 1 s
conntrack.request_timeout_s given in the environment), on the server and (live) on the
curl client side, rates being those counts over the window.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import require_or_fail
from tests.integration.peers import PY_SERVER, REPO, curl, free_port, process

pytestmark = pytest.mark.usefixtures("bpf_available")

STATUSES = ((200, 20), (404, 5), (500, 3))  # 28 requests on /status/{id}
NEVER = 2  # unanswered requests on /never
ENV = {"OTEL_EBPF_CONNTRACK_REQUEST_TIMEOUT_S": "1"}

# (service, role, method, route) -> TOTAL .. OTHER% as shown, over a window of W s.
W = 6


def expected_rows() -> dict[tuple[str, ...], list[str]]:
    status = ["28", "%.2f" % (28 / W), "28.6", "17.9", "10.7", "0.0", "0.0"]
    never = [str(NEVER), "%.2f" % (NEVER / W), "100.0", "0.0", "0.0", "100.0", "0.0"]
    return {
        ("shop", "server", "GET", "/status/{id}"): status,
        ("shop", "server", "GET", "/never"): never,
        ("curl", "client", "GET", "/status/{id}"): status,
        ("curl", "client", "GET", "/never"): never,
    }


def shop_server(workdir: Path, port: int):
    """PY_SERVER (/status/N, /never) with OTEL_SERVICE_NAME=shop, as top names it."""
    script = workdir / f"py_server_{port}.py"
    script.write_text(PY_SERVER)
    return process([sys.executable, str(script), str(port)], port=port,
                   env={"OTEL_SERVICE_NAME": "shop"})


def drive_traffic(port: int) -> list[subprocess.Popen]:
    """The known traffic; returns the curls still waiting on /never (kill them after)."""
    waiting = [subprocess.Popen(["curl", "-sS", "-o", "/dev/null", "--max-time", "8",
                                 f"http://127.0.0.1:{port}/never"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
               for _ in range(NEVER)]
    for code, n in STATUSES:
        for _ in range(n):
            assert curl(f"http://127.0.0.1:{port}/status/{code}").stdout == str(code)
    return waiting


def table_rows(text: str) -> dict[tuple[str, ...], list[str]]:
    """Data rows of a rendered table: (service, role, method, route) -> the other cells."""
    rows = {}
    for line in text.splitlines():
        cells = line.split()
        if len(cells) == 13 and cells[1] in ("server", "client", "unknown"):
            rows[tuple(cells[:4])] = cells[4:]
    return rows


def seconds(shown: str) -> float:
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if shown.endswith(unit):
            return float(shown[: -len(unit)]) * scale
    assert shown == "-", shown
    return 0.0


class Tmux:
    """A private tmux server (its own socket) with one detached 220x50 session."""

    def __init__(self, workdir: Path) -> None:
        self.socket = str(workdir / "tmux.sock")

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout

    def __enter__(self) -> Tmux:
        self("new-session", "-d", "-s", "top", "-x", "220", "-y", "50", "bash --norc")
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)

    def type(self, text: str, enter: bool = True) -> None:
        self("send-keys", "-t", "top", "-l", text)
        if enter:
            self("send-keys", "-t", "top", "Enter")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def wait_for(self, check, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if check(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not on screen after {timeout} s:\n{text}")
            time.sleep(0.2)


@pytest.fixture
def tmux_available():
    require_or_fail(None if shutil.which("tmux") else
                    "tmux is not installed (scripts/bootstrap.sh --test-peers installs it)")


def test_live_table_in_tmux_shows_the_exact_traffic_sorts_slides_and_quits(
        tmp_path, tmux_available):
    port = free_port()
    env = " ".join(f"{k}={v}" for k, v in ENV.items())
    command = (f"cd {REPO} && {env} {sys.executable} -m otel_ebpf.cli top --port {port} "
               f"--window {W}; echo EXIT=$?")
    with shop_server(tmp_path, port), Tmux(tmp_path) as tmux:
        tmux.type(command)
        tmux.wait_for(lambda s: "otel-ebpf top - " in s, 180, "the live table")
        waiting = drive_traffic(port)
        try:
            want = expected_rows()
            screen = tmux.wait_for(
                lambda s: all(table_rows(s).get(k, [None])[:7] == v for k, v in want.items()),
                30, "the rows %s" % want)
        finally:
            for curl_proc in waiting:
                curl_proc.kill()
                curl_proc.wait()
        rows = table_rows(screen)
        assert set(rows) == set(want), screen  # --port: nothing else
        assert f"over the last {W} s" in screen and "sort: rps" in screen
        for key, cells in rows.items():
            p50, p99 = seconds(cells[7]), seconds(cells[8])
            assert 0 < p50 <= p99, screen
            if key[3] == "/never":  # the time until the 1 s timeout expired them
                assert 1.0 <= p50 < 4.0, screen

        # A key changes the order: by p99, largest first.
        tmux.type("p", enter=False)
        screen = tmux.wait_for(lambda s: "sort: p99" in s, 10, "sort: p99")
        p99s = [seconds(cells[12]) for cells in table_rows_in_order(screen)]
        assert p99s == sorted(p99s, reverse=True) and len(p99s) == 4, screen

        # The window slides: W s later nothing is left in it, the totals stay.
        screen = tmux.wait_for(
            lambda s: table_rows(s).get(("shop", "server", "GET", "/status/{id}"), [None])[:7]
            == ["28", "0.00", "-", "-", "-", "-", "-"], W + 10, "the emptied window")

        tmux.type("q", enter=False)
        tmux.wait_for(lambda s: "EXIT=0" in s, 30, "top's exit status 0 after q")


def table_rows_in_order(text: str) -> list[list[str]]:
    return [cells for cells in (line.split() for line in text.splitlines())
            if len(cells) == 13 and cells[1] in ("server", "client", "unknown")]


def test_once_prints_one_plain_table_of_the_interval_with_the_selectors_of_run(tmp_path):
    port, other_port = free_port(), free_port()
    stderr_path = tmp_path / "top.stderr"
    with shop_server(tmp_path, port), shop_server(tmp_path, other_port), \
            open(stderr_path, "w") as stderr:
        top = subprocess.Popen(
            [sys.executable, "-m", "otel_ebpf.cli", "top", "--once", "--interval", str(W),
             "--port", str(port), "--exclude-exe", "curl", "--sort", "route"],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=REPO,
            env={**os.environ, **ENV})
        waiting: list[subprocess.Popen] = []
        try:
            deadline = time.monotonic() + 180
            while f"capturing for {W} s" not in stderr_path.read_text():
                assert top.poll() is None, stderr_path.read_text()
                assert time.monotonic() < deadline, stderr_path.read_text()
                time.sleep(0.1)
            waiting = drive_traffic(port)
            for _ in range(3):  # another port: --port leaves it out
                assert curl(f"http://127.0.0.1:{other_port}/status/500").stdout == "500"
            out, _ = top.communicate(timeout=60)
        finally:
            if top.poll() is None:
                top.kill()
                top.wait()
            for curl_proc in waiting:
                curl_proc.kill()
                curl_proc.wait()
    assert top.returncode == 0, stderr_path.read_text()
    assert "\x1b" not in out  # plain text off a terminal
    lines = out.splitlines()
    assert lines[0].startswith(f"otel-ebpf top - 2 rows - rates, errors and latency over the "
                               f"last {W} s"), out
    assert lines[1].split() == ["SERVICE", "ROLE", "ROUTE", "TOTAL", "REQ/S", "ERR%", "4XX%",
                                "5XX%", "TIMEOUT%", "OTHER%", "P50", "P99"], out
    rows = table_rows(out)
    # --exclude-exe curl: the server side only (the discovery selectors of `run`)
    assert {k: v[:7] for k, v in rows.items()} == \
        {k: v for k, v in expected_rows().items() if k[0] != "curl"}, out
    # --sort route: /never before /status/{id}
    assert [cells[3] for cells in table_rows_in_order(out)] == ["/never", "/status/{id}"], out
