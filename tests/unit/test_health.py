"""Health: file, HTTP endpoint and systemd notification, with a fake clock where time matters."""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.error
import urllib.request

import pytest

from otel_ebpf import health as health_mod
from otel_ebpf.health import Health, HealthError, check_file, parse_listen


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def get(health: Health, path: str) -> tuple[int, str]:
    host, port = health.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture(autouse=True)
def no_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("127.0.0.1:8686", ("127.0.0.1", 8686)),
        ("8686", ("127.0.0.1", 8686)),
        (":8686", ("127.0.0.1", 8686)),
        ("[::1]:9000", ("::1", 9000)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_parse_listen(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["localhost:http", "1.2.3.4:70000", "abc"])
def test_parse_listen_rejects_with_example(text):
    with pytest.raises(HealthError, match="health listen"):
        parse_listen(text)


def test_http_endpoints_follow_loop_state():
    clock = FakeClock()
    stats = {"capture.events": 23, "http.exchanges": 23}
    with Health(listen="127.0.0.1:0", stats_snapshot=lambda: dict(stats), clock=clock) as h:
        assert h.address[0] == "127.0.0.1" and h.address[1] > 0
        # Start-up is a grace period: alive before the loop's first iteration.
        assert get(h, "/healthz")[0] == 200
        code, body = get(h, "/readyz")
        assert (code, body) == (503, "not ready: probes not attached yet\n")
        h.set_ready(True)
        assert get(h, "/readyz") == (200, "ready\n")

        code, body = get(h, "/stats")
        assert code == 200 and json.loads(body) == {"capture.events": 23, "http.exchanges": 23}

        clock.now += 31  # the loop hung for longer than stale_after
        code, body = get(h, "/healthz")
        assert code == 503 and "31.0 s ago (limit 30 s)" in body
        h.mark_alive()
        assert get(h, "/healthz")[0] == 200
        assert get(h, "/nope")[0] == 404


def test_stats_error_is_500_and_server_survives():
    def broken() -> dict:
        raise ValueError("boom")

    with Health(listen="127.0.0.1:0", stats_snapshot=broken) as h:
        assert get(h, "/stats") == (500, "stats unavailable: boom\n")
        assert get(h, "/healthz")[0] == 200


def test_port_in_use_is_a_clear_error():
    with Health(listen="127.0.0.1:0") as first:
        port = first.address[1]
        with pytest.raises(HealthError, match=f"cannot serve health endpoint on 127.0.0.1:{port}"):
            Health(listen=f"127.0.0.1:{port}")


def test_close_is_idempotent_and_stops_serving(tmp_path):
    h = Health(file=str(tmp_path / "health"), listen="127.0.0.1:0")
    host, port = h.address
    h.close()
    h.close()
    assert not (tmp_path / "health").exists()
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=1).close()


def test_file_is_touched_at_most_every_interval(tmp_path):
    clock = FakeClock()
    path = tmp_path / "health"
    h = Health(file=str(path), clock=clock, touch_interval=5.0)
    try:
        assert path.read_text() == "starting\n"
        os.utime(path, (0, 0))
        h.mark_alive()  # first call publishes at once
        assert path.stat().st_mtime > 0
        os.utime(path, (0, 0))
        clock.now += 4.9
        h.mark_alive()  # inside the interval: no syscall on the hot path
        assert path.stat().st_mtime == 0
        clock.now += 0.2
        h.mark_alive()
        assert path.stat().st_mtime > 0
        h.set_ready(True)
        assert path.read_text() == "ready\n"
        assert not path.with_name("health.tmp").exists()
    finally:
        h.close()
    assert not path.exists()


def test_missing_directory_says_how_to_fix(tmp_path):
    with pytest.raises(HealthError, match="RuntimeDirectory=otel-ebpf"):
        Health(file=str(tmp_path / "nope" / "health"))


def test_write_failure_is_counted_not_raised(tmp_path, caplog):
    path = tmp_path / "health"
    clock = FakeClock()
    h = Health(file=str(path), clock=clock, touch_interval=1.0)
    try:
        # Make the temp file name a directory: the atomic write then fails.
        path.with_name("health.tmp").mkdir()
        for _ in range(3):
            clock.now += 2
            h.mark_alive()
        assert h.write_failures == 3
        assert sum("could not write health file" in r.getMessage() for r in caplog.records) == 1
    finally:
        h.close()


def test_check_file_for_exec_probes(tmp_path, capsys):
    path = tmp_path / "health"
    assert check_file(path, 30, False)[0] is False
    with Health(file=str(path)) as h:
        assert check_file(path, 30, False)[0] is True
        ok, reason = check_file(path, 30, True)
        assert not ok and "starting" in reason
        h.set_ready(True)
        assert health_mod.main(["check", str(path), "--ready"]) == 0
        assert capsys.readouterr().out.startswith("ok: ready")
        old = time.time() - 60
        os.utime(path, (old, old))
        assert health_mod.main(["check", str(path), "--max-age", "30"]) == 1
        assert "stale" in capsys.readouterr().out


def test_systemd_notifications(tmp_path, monkeypatch):
    sock_path = str(tmp_path / "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(sock_path)
    receiver.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", sock_path)
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")  # WatchdogSec=4 -> ping every 2 s
    clock = FakeClock()
    try:
        h = Health(clock=clock, touch_interval=5.0)
        assert h.touch_interval == 2.0
        assert receiver.recv(64) == b"WATCHDOG=1"  # at construction: compile takes a while
        h.mark_alive()
        assert receiver.recv(64) == b"WATCHDOG=1"
        clock.now += 1
        h.mark_alive()  # within the interval: nothing sent
        h.set_ready(True)
        assert receiver.recv(64) == b"READY=1"
        h.set_ready(True)  # unchanged: no second READY
        clock.now += 1.5
        h.mark_alive()
        assert receiver.recv(64) == b"WATCHDOG=1"
        h.close()
        assert receiver.recv(64) == b"STOPPING=1"
        h.close()
        receiver.setblocking(False)
        with pytest.raises(BlockingIOError):
            receiver.recv(64)
    finally:
        receiver.close()


def test_mark_alive_is_cheap():
    """mark_alive runs on every loop iteration: it must stay far below a microsecond-ish."""
    import timeit

    h = Health()
    try:
        h.mark_alive()
        n = 100_000
        per_call = timeit.timeit(h.mark_alive, number=n) / n
    finally:
        h.close()
    assert per_call < 5e-6, f"mark_alive took {per_call * 1e6:.2f} us"
