"""The export spool: OTLP payloads kept on disk while the collector is down or slow.

The exporter (otel_ebpf/export.py) keeps a small in-memory queue. When the collector
fails or falls behind, payloads go here instead, and the exporter sends them from here,
oldest first, once it answers again. The spool outlives the daemon: a daemon stopped
during an outage leaves its payloads here and the next one sends them.

Store. One SQLite database (standard library) in WAL mode, `spool.sqlite` in the spool
directory. SQLite gives us atomic, crash-safe commits (a write torn by a crash or a
power cut is rolled back by the WAL's own checksums when the file is next opened) and
reuses freed pages, so we do not need a file format, a compactor or a recovery pass of
our own. synchronous=NORMAL: a commit is not fsync'd (an outage must not turn into an
fsync per payload), so a power cut may lose the last commits but never corrupts the file.

Rows. One row per payload, in delivery order (the rowid): signal, item count (spans or
points), creation time (wall clock: it must mean the same after a restart), the stored
size, a CRC-32 of the stored body, and the body: the payload compressed with zlib level
1 (spans compress ~5-10x, so the cap holds that much more outage). A row whose CRC,
size or compression does not check out is deleted, counted and skipped, never fatal; a
database file SQLite itself cannot read is renamed aside (`spool.sqlite.corrupt`) and a
new one started, counted and logged.

Bounds. `max_bytes` caps the sum of stored bodies and `max_age_s` their age; what
exceeds either is dropped oldest first and counted (the newest data is what a collector
coming back wants). Counters (otel_ebpf/stats.py):

  export.spool.payloads / export.spool.bytes / export.spool.oldest_age_s   gauges
  export.spool.written           payloads written to the spool
  export.spool.delivered         payloads delivered from the spool (counted by the exporter)
  export.spool.dropped.max_bytes / .max_age / .corrupt / .write_error   payloads dropped,
      also counted in export.payloads_dropped and export.spans_dropped / points_dropped
  export.spool.files_set_aside   unreadable database files renamed aside

Concurrency. One `Spool` per directory (an exclusive flock on `spool.lock`: a second
daemon pointed at the same directory is refused with a clear error). Within the daemon
the capture thread appends and the export thread reads and deletes, so every method
takes one lock around one connection.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DB_NAME = "spool.sqlite"
LOCK_NAME = "spool.lock"
FORMAT_VERSION = 1  # PRAGMA user_version: a file written by a future format is set aside

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
DEFAULT_MAX_AGE_S = 24 * 3600.0
# Where packaging/systemd/otel-ebpf.service's StateDirectory= puts the daemon's state.
DEFAULT_STATE_DIRECTORY = "/var/lib/otel-ebpf"

_SIGNALS = ("traces", "metrics")
_ITEM_NAME = {"traces": "spans", "metrics": "points"}
DROP_REASONS = ("max_bytes", "max_age", "corrupt", "write_error")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payloads (
    id      INTEGER PRIMARY KEY,  -- delivery order
    signal  TEXT    NOT NULL,     -- traces | metrics
    items   INTEGER NOT NULL,     -- spans or metric points in the payload
    created REAL    NOT NULL,     -- unix time the payload was made
    size    INTEGER NOT NULL,     -- len(body)
    crc     INTEGER NOT NULL,     -- zlib.crc32(body)
    body    BLOB    NOT NULL      -- last: reading the other columns skips its pages
)
"""


class SpoolError(Exception):
    """The spool cannot be used (directory not writable, held by another daemon...)."""


@dataclass(frozen=True, slots=True)
class SpooledPayload:
    id: int
    signal: str
    payload: bytes  # the OTLP bytes as the exporter got them (decompressed)
    items: int
    created: float


def default_directory(environ: dict[str, str] | None = None) -> tuple[Path, str]:
    """(directory, how it was chosen) for an unset export.spool.directory.

    $STATE_DIRECTORY (systemd's StateDirectory=) first, then /var/lib/otel-ebpf when it
    can be created or written, else the user's state directory ($XDG_STATE_HOME or
    ~/.local/state) for a daemon run by hand without root."""
    env = os.environ if environ is None else environ
    state = env.get("STATE_DIRECTORY", "").split(":")[0]
    if state:
        return Path(state) / "spool", "$STATE_DIRECTORY (systemd StateDirectory=)"
    system = Path(DEFAULT_STATE_DIRECTORY) / "spool"
    if writable_or_creatable(system):
        return system, "the default state directory"
    xdg = env.get("XDG_STATE_HOME") or os.path.join(env.get("HOME") or "/", ".local", "state")
    return (Path(xdg) / "otel-ebpf" / "spool",
            "%s is not writable by this user; using the user's state directory"
            % DEFAULT_STATE_DIRECTORY)


def writable_or_creatable(path: Path) -> bool:
    """True when `path` is a writable directory, or its nearest existing ancestor is a
    writable directory (so that it can be created)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            return False
        probe = probe.parent
    return probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)


class Spool:
    """Payloads on disk in delivery order; see the module docstring."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES,
                 max_age_s: float = DEFAULT_MAX_AGE_S, stats=None,
                 clock: Callable[[], float] = time.time) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._stats = stats
        self._clock = clock
        self._lock = threading.Lock()
        self._lock_file = self._take_directory()
        self._db: sqlite3.Connection | None = None
        self._count = 0
        self._bytes = 0
        self._oldest_created: float | None = None
        self._last_warning: dict[str, float] = {}  # reason -> monotonic time: rate limit
        try:
            try:
                self._open()
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError):
                    raise  # locked, unwritable, I/O: the file may be fine, keep it
                self._set_aside(exc)
        except (sqlite3.Error, OSError) as exc:  # the fresh file fails too: disk, perms
            self._lock_file.close()
            raise SpoolError("cannot open %s: %s" % (self.path, exc)) from None
        if stats is not None:
            stats.gauge("export.spool.payloads", lambda: self._count)
            stats.gauge("export.spool.bytes", lambda: self._bytes)
            stats.gauge("export.spool.oldest_age_s", self.oldest_age_s)
        if self._count:
            log.info("export spool %s holds %d payload(s), %d bytes, the oldest %.0f s old: "
                     "they are sent first", self.path, self._count, self._bytes,
                     self.oldest_age_s())

    # ---- set-up ----

    def _take_directory(self):
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock_file = open(self.directory / LOCK_NAME, "a+")  # noqa: SIM115
        except OSError as exc:
            raise SpoolError("cannot use %s: %s" % (self.directory, exc.strerror or exc)) from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock_file.seek(0)
            holder = lock_file.read().strip() or "?"
            lock_file.close()
            raise SpoolError("%s is in use by another otel-ebpf (pid %s); give each daemon "
                             "its own export.spool.directory" % (self.directory, holder)) \
                from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(str(os.getpid()))
        lock_file.flush()
        return lock_file

    def _open(self) -> None:
        db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db = db
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, FORMAT_VERSION):
                raise sqlite3.DatabaseError("spool format %d is not %d (written by another "
                                            "version of otel-ebpf)" % (version, FORMAT_VERSION))
            if version == 0:  # a new file: free pages can be given back (see _delete_row)
                db.execute("PRAGMA auto_vacuum=INCREMENTAL")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # The WAL is truncated back to this after a checkpoint: disk stays near the cap.
            db.execute("PRAGMA journal_size_limit=%d" % (8 * 1024 * 1024))
            db.execute(_SCHEMA)
            db.execute("PRAGMA user_version=%d" % FORMAT_VERSION)
            count, total = db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM payloads").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            self._db = None
            raise
        self._count, self._bytes = count, total
        self._oldest_created = self._head_created()

    def _set_aside(self, exc: Exception) -> None:
        """The file is not a database SQLite can read: keep it for a post-mortem under
        another name (replacing an older one) and start an empty spool."""
        aside = self.path.with_name(DB_NAME + ".corrupt")
        log.error("export spool %s is unreadable (%s); moved to %s, starting an empty spool; "
                  "what it held is lost (counted in export.spool.dropped.corrupt)",
                  self.path, exc, aside)
        lost = self._count  # what we knew it held (0 when it was unreadable at start)
        if self._stats is not None:
            self._stats.add("export.spool.files_set_aside")
        if self._db is not None:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
            self._db = None
        for suffix in ("-wal", "-shm"):
            try:
                os.unlink(str(self.path) + suffix)
            except FileNotFoundError:
                pass
        os.replace(self.path, aside)
        self._count = self._bytes = 0
        self._oldest_created = None
        if lost:
            self._count_drop("corrupt", None, None, lost)
        self._open()

    # ---- what the exporter calls ----

    def append(self, signal: str, payload: bytes, items: int, created: float) -> None:
        """Write one payload at the tail; then drop from the head what exceeds the bounds."""
        self._write([(signal, payload, items, created)], at_head=False)

    def extend(self, entries: Iterable[tuple[str, bytes, int, float]]) -> None:
        """`append` for several payloads, oldest first, in one transaction."""
        self._write(list(entries), at_head=False)

    def prepend(self, entries: Iterable[tuple[str, bytes, int, float]]) -> None:
        """Write payloads, oldest first, *ahead* of everything spooled: the exporter's
        in-memory queue (older than the spool by construction) when it spills."""
        self._write(list(entries), at_head=True)

    def oldest(self) -> SpooledPayload | None:
        """The next payload to send (left in the spool until `remove`); corrupt rows and
        rows past max age are deleted and counted on the way."""
        with self._lock:
            while self._count and self._db is not None:  # closed: a late export thread
                try:
                    self._expire()
                    row = self._db.execute(  # type: ignore[union-attr]
                        "SELECT id, signal, items, created, size, crc, body FROM payloads "
                        "ORDER BY id LIMIT 1").fetchone()
                except sqlite3.OperationalError as exc:  # I/O, locked: the file may be fine
                    self._warn_once("read", "export spool %s: cannot read: %s; retrying",
                                    self.path, exc)
                    return None
                except sqlite3.DatabaseError as exc:  # "database disk image is malformed"
                    self._set_aside(exc)
                    return None
                if row is None:
                    self._count, self._bytes = 0, 0
                    return None
                entry = self._decode(row)
                if entry is not None:
                    return entry
                self._delete_row(row[0], row[4] if isinstance(row[4], int) else 0)
                self._count_drop("corrupt", row[1], row[2])
            return None

    def remove(self, payload_id: int) -> None:
        """Forget a payload once it was delivered (or given up for good)."""
        with self._lock:
            if self._db is None:
                return
            row = self._db.execute("SELECT size FROM payloads WHERE id = ?",  # type: ignore[union-attr]
                                   (payload_id,)).fetchone()
            if row is not None:
                self._delete_row(payload_id, row[0] if isinstance(row[0], int) else 0)

    def contains(self, payload_id: int) -> bool:
        """False once the payload was dropped (cap, age) while the exporter retried it."""
        with self._lock:
            if self._db is None:
                return False
            return self._db.execute("SELECT 1 FROM payloads WHERE id = ?",  # type: ignore[union-attr]
                                    (payload_id,)).fetchone() is not None

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        return self._bytes

    def oldest_age_s(self) -> float:
        oldest = self._oldest_created
        return 0.0 if oldest is None or not self._count else max(0.0, self._clock() - oldest)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                try:
                    # Fold the WAL into the database file: one file to copy or inspect.
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    log.debug("spool checkpoint failed", exc_info=True)
                self._db.close()
                self._db = None
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    # ---- internals (called with the lock held) ----

    def _write(self, entries: list[tuple[str, bytes, int, float]], at_head: bool) -> None:
        if not entries:
            return
        rows = []
        for signal, payload, items, created in entries:
            body = zlib.compress(payload, 1)
            if len(body) > self.max_bytes:  # would evict everything and still not fit
                self._count_drop("max_bytes", signal, items)
                continue
            rows.append((signal, items, created, len(body), zlib.crc32(body), body))
        if not rows:
            return
        with self._lock:
            db = self._db
            if db is None:  # closed (shutdown): the exporter spools before it closes
                for r in rows:
                    self._count_drop("write_error", r[0], r[1])
                return
            try:
                db.execute("BEGIN IMMEDIATE")
                if at_head and self._count:
                    first = db.execute("SELECT min(id) FROM payloads").fetchone()[0]
                    ids: list[int | None] = list(range(first - len(rows), first))
                else:
                    ids = [None] * len(rows)  # rowid = max + 1: the tail
                db.executemany(
                    "INSERT INTO payloads (id, signal, items, created, size, crc, body) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", [(i, *r) for i, r in zip(ids, rows)])
                db.execute("COMMIT")
            except sqlite3.Error as exc:  # disk full, I/O error: these payloads are lost
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                log.error("export spool %s: cannot write %d payload(s): %s", self.path,
                          len(rows), exc)
                for r in rows:
                    self._count_drop("write_error", r[0], r[1])
                return
            self._count += len(rows)
            self._bytes += sum(r[3] for r in rows)
            if at_head or self._oldest_created is None:
                self._oldest_created = self._head_created()
            if self._stats is not None:
                self._stats.add("export.spool.written", len(rows))
            self._expire()
            self._enforce_cap()

    def _decode(self, row: tuple) -> SpooledPayload | None:
        payload_id, signal, items, created, size, crc, body = row
        if (signal not in _SIGNALS or not isinstance(items, int) or not isinstance(body, bytes)
                or not isinstance(created, (int, float)) or len(body) != size
                or zlib.crc32(body) != crc):
            log.warning("export spool %s: payload %d is damaged (torn or corrupt write); "
                        "skipped", self.path, payload_id)
            return None
        try:
            payload = zlib.decompress(body)
        except zlib.error:
            log.warning("export spool %s: payload %d does not decompress; skipped",
                        self.path, payload_id)
            return None
        return SpooledPayload(payload_id, signal, payload, items, float(created))

    def _head_created(self) -> float | None:
        row = self._db.execute(  # type: ignore[union-attr]
            "SELECT created FROM payloads ORDER BY id LIMIT 1").fetchone()
        return float(row[0]) if row and isinstance(row[0], (int, float)) else None

    def _delete_row(self, payload_id: int, size: int) -> None:
        db = self._db
        db.execute("DELETE FROM payloads WHERE id = ?", (payload_id,))  # type: ignore[union-attr]
        self._count = max(0, self._count - 1)
        self._bytes = max(0, self._bytes - size)
        self._oldest_created = self._head_created() if self._count else None
        if not self._count:
            # The outage is over: give the disk back (the file keeps its peak size else).
            # executescript: it runs to completion (a plain execute frees one page).
            db.executescript("PRAGMA incremental_vacuum;")  # type: ignore[union-attr]

    def _drop_head(self, reason: str) -> None:
        row = self._db.execute(  # type: ignore[union-attr]
            "SELECT id, signal, items, size FROM payloads ORDER BY id LIMIT 1").fetchone()
        if row is None:
            self._count, self._bytes = 0, 0
            return
        self._delete_row(row[0], row[3] if isinstance(row[3], int) else 0)
        self._count_drop(reason, row[1], row[2])

    def _expire(self) -> None:
        cutoff = self._clock() - self.max_age_s
        while self._count and self._oldest_created is not None and self._oldest_created < cutoff:
            self._drop_head("max_age")

    def _enforce_cap(self) -> None:
        while self._count and self._bytes > self.max_bytes:
            self._drop_head("max_bytes")

    def _warn_once(self, key: str, msg: str, *args: object) -> None:
        """A warning at most every 10 s per key."""
        now = time.monotonic()
        if now - self._last_warning.get(key, -1e9) >= 10.0:
            self._last_warning[key] = now
            log.warning(msg, *args)

    def _count_drop(self, reason: str, signal: object, items: object, payloads: int = 1) -> None:
        stats = self._stats
        if stats is not None:
            stats.add("export.spool.dropped." + reason, payloads)
            stats.add("export.payloads_dropped", payloads)
            if signal in _ITEM_NAME and isinstance(items, int):
                stats.add("export.%s_dropped" % _ITEM_NAME[signal], items)
        now = time.monotonic()
        if reason != "corrupt" and now - self._last_warning.get(reason, -1e9) >= 10.0:
            # corrupt rows are logged where they are found; the rest at most every 10 s
            self._last_warning[reason] = now
            log.warning("export spool %s: dropped %d payload(s) (%s)%s", self.path, payloads,
                        {"max_bytes": "over export.spool.max_bytes, oldest first",
                         "max_age": "older than export.spool.max_age",
                         "write_error": "could not be written"}[reason],
                        "" if stats is None else " (total %d)"
                        % stats.get("export.spool.dropped." + reason))
