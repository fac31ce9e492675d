"""The export spool (otel_ebpf/spool.py) alone, and the exporter with a spool in front of
a scripted collector: order, bounds, damage, restarts, threads."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from otel_ebpf.export import (
    METRICS,
    SPOOLED_MEMORY_BYTES,
    TRACES,
    OtlpExporter,
    OtlpOptions,
    OtlpSignalOptions,
    SpoolOptions,
)
from otel_ebpf.spool import DB_NAME, Spool, SpoolError, default_directory
from otel_ebpf.stats import Stats
from tests.receiver import free_port

# ---- the spool alone -----------------------------------------------------------------


def drain(spool: Spool) -> list[tuple[str, bytes, int]]:
    out = []
    while (entry := spool.oldest()) is not None:
        out.append((entry.signal, entry.payload, entry.items))
        spool.remove(entry.id)
    return out


def test_payloads_come_back_in_order_with_their_signal_and_items(tmp_path):
    stats = Stats()
    spool = Spool(tmp_path, stats=stats)
    sent = [(TRACES if i % 3 else METRICS, b"payload %d " % i * 50, i) for i in range(23)]
    for signal, payload, items in sent:
        spool.append(signal, payload, items, time.time())
    assert len(spool) == 23
    assert stats.get("export.spool.written") == 23
    assert 0 < stats.snapshot()["export.spool.bytes"] < sum(len(p) for _, p, _ in sent)
    assert drain(spool) == sent
    assert len(spool) == 0 and spool.bytes == 0
    assert stats.snapshot()["export.spool.payloads"] == 0


def test_prepend_goes_ahead_of_what_is_spooled_in_its_own_order(tmp_path):
    spool = Spool(tmp_path)
    for i in range(3):
        spool.append(TRACES, b"new%d" % i, 1, time.time())
    spool.prepend([(TRACES, b"old%d" % i, 1, time.time()) for i in range(4)])
    spool.prepend([(METRICS, b"older", 2, time.time())])
    assert [p for _, p, _ in drain(spool)] == [
        b"older", b"old0", b"old1", b"old2", b"old3", b"new0", b"new1", b"new2"]
    spool.prepend([(TRACES, b"into-empty", 1, time.time())])  # empty spool: just written
    assert [p for _, p, _ in drain(spool)] == [b"into-empty"]


def test_cap_drops_oldest_first_and_counts(tmp_path):
    stats = Stats()
    payloads = [os.urandom(30_000) for _ in range(23)]  # random: does not compress
    spool = Spool(tmp_path, max_bytes=100_000, stats=stats)
    for i, p in enumerate(payloads):
        spool.append(TRACES if i % 2 else METRICS, p, 5 if i % 2 else 7, time.time())
        assert spool.bytes <= 100_000
    kept = drain(spool)
    assert [p for _, p, _ in kept] == payloads[-3:]  # the newest three fit
    assert stats.get("export.spool.dropped.max_bytes") == 20
    assert stats.get("export.payloads_dropped") == 20
    assert stats.get("export.spans_dropped") == 5 * 10  # odd i among the first 20
    assert stats.get("export.points_dropped") == 7 * 10
    # One payload larger than the whole cap: dropped itself, the others stay.
    spool.append(TRACES, payloads[0], 1, time.time())
    spool.append(TRACES, os.urandom(200_000), 9, time.time())
    assert stats.get("export.spool.dropped.max_bytes") == 21
    assert [p for _, p, _ in drain(spool)] == [payloads[0]]


def test_max_age_drops_oldest_and_reports_the_oldest_age(tmp_path):
    now = [1_000_000.0]
    stats = Stats()
    spool = Spool(tmp_path, max_age_s=60, stats=stats, clock=lambda: now[0])
    spool.append(TRACES, b"a", 1, now[0] - 50)
    spool.append(TRACES, b"b", 2, now[0] - 10)
    spool.append(TRACES, b"c", 3, now[0])
    assert stats.snapshot()["export.spool.oldest_age_s"] == pytest.approx(50)
    now[0] += 20  # a is 70 s old, b 30 s
    entry = spool.oldest()
    assert entry is not None and entry.payload == b"b"
    assert stats.get("export.spool.dropped.max_age") == 1
    assert stats.get("export.spans_dropped") == 1
    assert stats.snapshot()["export.spool.oldest_age_s"] == pytest.approx(30)
    now[0] += 1000
    assert spool.oldest() is None
    assert stats.get("export.spool.dropped.max_age") == 3
    assert stats.snapshot()["export.spool.oldest_age_s"] == 0


def test_the_file_shrinks_back_once_the_spool_is_drained(tmp_path):
    spool = Spool(tmp_path)
    for _ in range(100):
        spool.append(TRACES, os.urandom(50_000), 1, time.time())
    spool.close()
    full = (tmp_path / DB_NAME).stat().st_size
    assert full > 5_000_000
    spool = Spool(tmp_path)
    assert len(drain(spool)) == 100
    spool.close()
    assert (tmp_path / DB_NAME).stat().st_size < full / 20


def test_reopened_after_a_restart_it_holds_what_was_written(tmp_path):
    spool = Spool(tmp_path)
    for i in range(23):
        spool.append(TRACES, b"x%d" % i, i, time.time())
    first = spool.oldest()
    spool.remove(first.id)
    spool.close()
    stats = Stats()
    again = Spool(tmp_path, stats=stats)
    assert len(again) == 22
    assert stats.snapshot()["export.spool.payloads"] == 22
    assert [(p, n) for _, p, n in drain(again)] == [(b"x%d" % i, i) for i in range(1, 23)]


def test_a_process_killed_mid_run_leaves_a_readable_spool(tmp_path):
    """No close(): the WAL is left as a crash leaves it; the next open recovers it."""
    import subprocess
    import sys

    code = ("import time, os; from otel_ebpf.spool import Spool\n"
            "s = Spool(%r)\n"
            "[s.append('traces', b'p%%d' %% i, 1, time.time()) for i in range(50)]\n"
            "os._exit(0)\n" % str(tmp_path))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert os.path.exists(tmp_path / (DB_NAME + "-wal"))
    assert [p for _, p, _ in drain(Spool(tmp_path))] == [b"p%d" % i for i in range(50)]


def _damage(tmp_path, sql: str) -> None:
    db = sqlite3.connect(str(tmp_path / DB_NAME))
    db.execute(sql)
    db.commit()
    db.close()


@pytest.mark.parametrize("damage", [
    "UPDATE payloads SET body = substr(body, 1, length(body) - 3) WHERE items = 2",  # torn
    "UPDATE payloads SET crc = crc + 1 WHERE items = 2",
    "UPDATE payloads SET body = x'00112233', size = 4, crc = 616706413 WHERE items = 2",  # valid CRC, not zlib
    "UPDATE payloads SET signal = 'logs' WHERE items = 2",
])
def test_a_damaged_row_is_skipped_and_counted_never_fatal(tmp_path, damage, caplog):
    spool = Spool(tmp_path)
    for i in range(1, 5):
        spool.append(TRACES, b"row%d" % i * 20, i, time.time())
    spool.close()
    _damage(tmp_path, damage)
    stats = Stats()
    again = Spool(tmp_path, stats=stats)
    with caplog.at_level(logging.WARNING, logger="otel_ebpf.spool"):
        assert [n for _, _, n in drain(again)] == [1, 3, 4]
    assert stats.get("export.spool.dropped.corrupt") == 1
    assert "skipped" in caplog.text


def test_a_database_file_sqlite_cannot_read_is_set_aside(tmp_path, caplog):
    (tmp_path / DB_NAME).write_bytes(b"\x00garbage, not SQLite\x00" * 500)
    stats = Stats()
    with caplog.at_level(logging.ERROR, logger="otel_ebpf.spool"):
        spool = Spool(tmp_path, stats=stats)
    assert "unreadable" in caplog.text
    assert (tmp_path / (DB_NAME + ".corrupt")).read_bytes().startswith(b"\x00garbage")
    assert stats.get("export.spool.files_set_aside") == 1
    spool.append(TRACES, b"fresh", 1, time.time())
    assert drain(spool) == [(TRACES, b"fresh", 1)]


def test_a_truncated_database_file_is_never_fatal(tmp_path):
    spool = Spool(tmp_path)
    for i in range(200):
        spool.append(TRACES, os.urandom(3000), 1, time.time())
    spool.close()
    path = tmp_path / DB_NAME
    with open(path, "r+b") as f:  # a torn file: the tail of it gone
        f.truncate(path.stat().st_size // 2)
    again = Spool(tmp_path)
    got = drain(again)  # whatever SQLite can still read, then an empty, working spool
    assert len(got) < 200
    again.append(TRACES, b"after", 1, time.time())
    assert drain(again) == [(TRACES, b"after", 1)]


def test_one_daemon_per_directory(tmp_path):
    first = Spool(tmp_path)
    with pytest.raises(SpoolError, match="in use by another otel-ebpf .pid %d" % os.getpid()):
        Spool(tmp_path)
    first.close()
    Spool(tmp_path).close()  # free again once closed


def test_unusable_directory_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SpoolError, match="cannot use .*file/spool"):
        Spool(tmp_path / "file" / "spool")


def test_default_directory():
    assert default_directory({"STATE_DIRECTORY": "/var/lib/otel-ebpf"})[0].as_posix() == \
        "/var/lib/otel-ebpf/spool"
    path, why = default_directory({"HOME": "/home/u"})
    if os.access("/var/lib", os.W_OK):
        assert path.as_posix() == "/var/lib/otel-ebpf/spool"
    else:
        assert path.as_posix() == "/home/u/.local/state/otel-ebpf/spool"
        assert "not writable" in why


def test_concurrent_writer_and_reader_lose_and_duplicate_nothing(tmp_path):
    spool = Spool(tmp_path)
    n = 2000
    got: list[bytes] = []

    def reader():
        deadline = time.monotonic() + 30
        while len(got) < n and time.monotonic() < deadline:
            entry = spool.oldest()
            if entry is None:
                time.sleep(0.0005)
                continue
            got.append(entry.payload)
            spool.remove(entry.id)

    thread = threading.Thread(target=reader)
    thread.start()
    for i in range(n):
        spool.append(TRACES, b"%d" % i, 1, time.time())
    thread.join(60)
    assert got == [b"%d" % i for i in range(n)]
    assert len(spool) == 0


# ---- the exporter with a spool ---------------------------------------------------------


class SwitchableCollector:
    """An OTLP/HTTP endpoint that answers 503 while `down`, else 200, and keeps the
    bodies it accepted in arrival order."""

    def __init__(self) -> None:
        self.down = False
        self.accepted: list[bytes] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = 503 if outer.down else 200
                if status == 200:
                    outer.accepted.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        port = self.server.server_address[1]
        self.options = OtlpOptions(
            traces=OtlpSignalOptions(endpoint="http://127.0.0.1:%d/v1/traces" % port,
                                     compression="none", timeout_s=2),
            metrics=OtlpSignalOptions(endpoint="http://127.0.0.1:%d/v1/metrics" % port,
                                      compression="none", timeout_s=2),
            retry_initial_backoff_s=0.02, retry_max_backoff_s=0.05, retry_max_elapsed_s=0.2)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def collector():
    c = SwitchableCollector()
    yield c
    c.close()


def wait_until(probe, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if probe():
            return True
        time.sleep(0.01)
    return False


def test_an_outage_longer_than_the_retry_deadline_loses_nothing_and_keeps_order(
        tmp_path, collector):
    stats = Stats()
    ex = OtlpExporter(collector.options, stats, SpoolOptions(directory=str(tmp_path)))
    collector.down = True
    for i in range(60):
        ex.export_traces(b"span-batch-%03d" % i, 3)
    # Far past retry_max_elapsed_s (0.2 s): without a spool these would be given up.
    assert wait_until(lambda: stats.get("export.retries") >= 10)
    time.sleep(0.5)
    assert ex._queued_bytes == 0 and len(ex._queue) == 0  # memory is empty: all on disk
    assert stats.snapshot()["export.spool.payloads"] == 60
    collector.down = False
    assert ex.force_flush(10)
    ex.shutdown(1)
    assert collector.accepted == [b"span-batch-%03d" % i for i in range(60)]
    assert stats.get("export.spans_sent") == 180
    assert stats.get("export.spool.delivered") == 60
    assert stats.get("export.failures") == 0 and stats.get("export.payloads_dropped") == 0


def test_a_slow_collector_spills_beyond_a_small_memory_buffer(tmp_path, collector):
    stats = Stats()
    ex = OtlpExporter(collector.options, stats, SpoolOptions(directory=str(tmp_path)))
    gate = threading.Event()
    real_send = None

    def slow_send(payload):  # the first send hangs until released: a slow collector
        gate.wait(10)
        return real_send(payload)

    transport = ex._transport(TRACES)
    real_send = transport.send
    transport.send = slow_send
    big = 512 * 1024
    for i in range(40):  # 20 MiB: five times the memory buffer
        ex.export_traces(bytes([i]) * big, 1)
        assert ex._queued_bytes <= SPOOLED_MEMORY_BYTES
    assert len(ex._spool) > 0
    gate.set()
    assert ex.force_flush(20)
    ex.shutdown(1)
    assert [p[0] for p in collector.accepted] == list(range(40))
    assert stats.get("export.payloads_dropped") == 0


def test_shutdown_during_an_outage_is_quick_and_the_next_exporter_delivers(tmp_path, collector):
    stats = Stats()
    ex = OtlpExporter(collector.options, stats, SpoolOptions(directory=str(tmp_path)))
    collector.down = True
    for i in range(23):
        ex.export_traces(b"p%02d" % i, 2)
    time.sleep(0.3)  # the outage is on: the export thread retries from the spool
    ex.export_traces(b"p23", 2)  # the telemetry's last batch, at shutdown
    started = time.monotonic()
    ex.shutdown(10)
    # Memory is moved to disk at once, not after the shutdown bound (SPOOL_SHUTDOWN_FLUSH_S).
    assert time.monotonic() - started < 1.5
    assert stats.get("export.payloads_dropped") == 0 and stats.get("export.failures") == 0
    collector.down = False
    stats2 = Stats()
    ex2 = OtlpExporter(collector.options, stats2, SpoolOptions(directory=str(tmp_path)))
    assert ex2.force_flush(10)
    ex2.export_traces(b"after-restart", 1)
    assert ex2.force_flush(10)
    ex2.shutdown(1)
    assert collector.accepted == [b"p%02d" % i for i in range(24)] + [b"after-restart"]
    assert stats2.get("export.spool.delivered") == 24


def test_shutdown_with_a_collector_that_never_answers_spools_the_hanging_payload(tmp_path):
    """A blackholed collector: the send hangs past the shutdown bound; the payload is kept
    (at least once) instead of lost."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(100)  # accepts connections, never answers
    port = listener.getsockname()[1]
    sig = OtlpSignalOptions(endpoint="http://127.0.0.1:%d/v1/traces" % port, timeout_s=30)
    ex = OtlpExporter(OtlpOptions(traces=sig, metrics=sig), Stats(),
                      SpoolOptions(directory=str(tmp_path)))
    for i in range(5):
        ex.export_traces(b"h%d" % i, 1)
    time.sleep(0.3)  # h0 is in flight, hanging
    started = time.monotonic()
    ex.shutdown(10)
    assert time.monotonic() - started < 3.0
    listener.close()
    assert [p for _, p, _ in drain(Spool(tmp_path))] == [b"h%d" % i for i in range(5)]


def test_spool_that_cannot_be_opened_falls_back_to_memory_with_a_clear_log(tmp_path, caplog):
    holder = Spool(tmp_path)
    port = free_port()
    sig = OtlpSignalOptions(endpoint="http://127.0.0.1:%d/v1/traces" % port)
    with caplog.at_level(logging.WARNING, logger="otel_ebpf.export"):
        ex = OtlpExporter(OtlpOptions(traces=sig, metrics=sig), Stats(),
                          SpoolOptions(directory=str(tmp_path)))
    assert ex._spool is None
    assert "export spool disabled" in caplog.text and "in use by another" in caplog.text
    ex.shutdown(0.1)
    holder.close()


def test_in_an_outage_the_export_thread_writes_the_spool_not_the_caller(tmp_path, collector):
    """The caller is the capture thread: during an outage it only appends to memory."""
    stats = Stats()
    ex = OtlpExporter(collector.options, stats, SpoolOptions(directory=str(tmp_path)))
    writers: list[str] = []
    spool = ex._spool
    for name in ("append", "extend", "prepend"):
        real = getattr(spool, name)

        def spy(*args, _real=real, **kwargs):
            writers.append(threading.current_thread().name)
            return _real(*args, **kwargs)

        setattr(spool, name, spy)
    collector.down = True
    ex.export_traces(b"first", 1)
    assert wait_until(lambda: len(spool) == 1)  # failed once: spilled, outage begins
    for i in range(20):  # fewer than the memory buffer holds
        ex.export_traces(b"p%02d" % i, 1)
        time.sleep(0.01)
    assert wait_until(lambda: len(spool) == 21 and not ex._queue)
    assert set(writers) == {"otlp-export"}, writers
    collector.down = False
    assert ex.force_flush(10)
    ex.shutdown(1)
    assert collector.accepted == [b"first"] + [b"p%02d" % i for i in range(20)]


# ---- configuration -----------------------------------------------------------------------


def test_config_default_is_on_in_the_state_directory_and_flags_override(tmp_path):
    from otel_ebpf.cli import build_parser, run_overrides
    from otel_ebpf.config import load

    empty = tmp_path / "c.yaml"
    empty.write_text("")
    spool = load(str(empty), {"STATE_DIRECTORY": "/var/lib/otel-ebpf"}, {}).spool
    assert spool == SpoolOptions(directory="/var/lib/otel-ebpf/spool",
                                 max_bytes=256 * 1024 * 1024, max_age_s=86400.0,
                                 directory_source="$STATE_DIRECTORY (systemd StateDirectory=)")
    args = build_parser().parse_args(["run", "--spool-dir", str(tmp_path / "s")])
    spool = load(str(empty), {}, run_overrides(args)).spool
    assert spool.directory == str(tmp_path / "s")
    assert spool.directory_source == "export.spool.directory"
    assert load(str(empty), {}, run_overrides(build_parser().parse_args(
        ["run", "--no-spool"]))).spool is None
    env = {"OTEL_EBPF_EXPORT_SPOOL_MAX_BYTES": "1048576", "OTEL_EBPF_EXPORT_SPOOL_MAX_AGE_S": "90"}
    spool = load(str(empty), env, {}).spool
    assert (spool.max_bytes, spool.max_age_s) == (1048576, 90.0)


@pytest.mark.parametrize("key, value, message", [
    ("OTEL_EBPF_EXPORT_SPOOL_MAX_BYTES", "10",
     "export.spool.max_bytes: '10' is too small (from OTEL_EBPF_EXPORT_SPOOL_MAX_BYTES); "
     "use a whole number >= 65536"),
    ("OTEL_EBPF_EXPORT_SPOOL_MAX_AGE_S", "0",
     "export.spool.max_age_s: '0' is too small (from OTEL_EBPF_EXPORT_SPOOL_MAX_AGE_S); "
     "use a number >= 1"),
    ("OTEL_EBPF_EXPORT_SPOOL_ENABLED", "maybe",
     "export.spool.enabled: 'maybe' is not a boolean"),
    ("OTEL_EBPF_EXPORT_SPOOL_DIRECTORY", "{tmp}/a-file/spool",  # under a regular file
     "export.spool.directory: '{tmp}/a-file/spool' is not a directory this user can create "
     "or write (from OTEL_EBPF_EXPORT_SPOOL_DIRECTORY); give a writable directory"),
])
def test_config_errors_name_the_key_and_what_is_allowed(tmp_path, key, value, message):
    from otel_ebpf.config import ConfigError, load

    empty = tmp_path / "c.yaml"
    empty.write_text("")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError) as info:
        load(str(empty), {key: value.replace("{tmp}", str(tmp_path))}, {})
    assert message.replace("{tmp}", str(tmp_path)) in str(info.value)
