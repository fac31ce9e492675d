"""The daemon's liveness and readiness signal, for systemd, Kubernetes and people.

Contract: the daemon's main loop calls `mark_alive()` on every iteration (cheap: one
clock read and a compare) and `set_ready(True)` once its probes are attached. From
that, `Health` publishes, each part opt-in:

- a file (`file=`): rewritten atomically at most every `touch_interval` seconds while
  the loop is alive. Its mtime is the liveness signal, its content `ready` or
  `starting` the readiness signal. `python -m otel_ebpf.health check FILE
  [--max-age S] [--ready]` turns it into an exit code for exec probes. The file is
  removed by `close()`.
- systemd notification, automatically when `NOTIFY_SOCKET` is set (Type=notify):
  `READY=1` on `set_ready(True)`, `WATCHDOG=1` on each touch (at least twice per
  `WatchdogSec`), `STOPPING=1` on `close()`.
- an HTTP endpoint (`listen=`, e.g. `127.0.0.1:8686`; a bare port binds 127.0.0.1):
  `/healthz` 200 while the loop marked itself alive within `stale_after` seconds
  else 503, `/readyz` 200 once ready else 503, `/stats` the JSON of
  `stats_snapshot()`. Served by a stdlib server in one daemon thread.

Start-up problems the operator can fix (missing directory, address in use) raise
`HealthError` with the fix in the message; failures while running (disk full, a
vanished notify socket) are logged once and counted, never raised into the loop.
`close()` is idempotent.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_STALE_AFTER = 30.0
DEFAULT_TOUCH_INTERVAL = 5.0
DEFAULT_LISTEN_HOST = "127.0.0.1"


class HealthError(RuntimeError):
    """The health signal cannot be set up as configured (operator-fixable)."""


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:8686', '[::1]:8686', ':8686' or '8686' -> (host, port)."""
    text = listen.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or DEFAULT_LISTEN_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise HealthError(
            f"health listen address {listen!r} is not HOST:PORT or PORT (e.g. 127.0.0.1:8686)"
        ) from None
    if not 0 <= port <= 65535:
        raise HealthError(f"health listen port {port} is outside 0-65535")
    return host, port


class Health:
    """Liveness/readiness publisher; see the module docstring."""

    def __init__(
        self,
        file: str | None = None,
        listen: str | None = None,
        stats_snapshot: Callable[[], dict] | None = None,
        *,
        stale_after: float = DEFAULT_STALE_AFTER,
        touch_interval: float = DEFAULT_TOUCH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._stats_snapshot = stats_snapshot or dict
        self.stale_after = stale_after
        self._last_alive = clock()  # start-up counts as alive: a grace period
        self._next_touch = 0.0  # the first mark_alive publishes at once
        self._ready = False
        self._closed = False
        self._lock = threading.Lock()
        self.write_failures = 0
        self.notify_failures = 0

        self._notify_addr = _notify_address(os.environ.get("NOTIFY_SOCKET"))
        self._notify_sock: socket.socket | None = None
        watchdog_usec = os.environ.get("WATCHDOG_USEC", "")
        if self._notify_addr is not None and watchdog_usec.isdigit():
            # systemd restarts us when no WATCHDOG=1 arrives within WatchdogSec:
            # ping at least twice per period so one slow iteration is not fatal.
            touch_interval = min(touch_interval, int(watchdog_usec) / 1e6 / 2)
        self.touch_interval = touch_interval
        if self._notify_addr is not None:
            self._notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

        self.file = Path(file) if file else None
        if self.file is not None and not self.file.parent.is_dir():
            self._close_notify()
            raise HealthError(
                f"health file directory {self.file.parent} does not exist: create it "
                "(systemd: RuntimeDirectory=otel-ebpf; Kubernetes: an emptyDir mount) "
                "or choose another health file path"
            )

        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        if listen:
            self._start_server(*parse_listen(listen))
        # Publish at once: the daemon compiles its BPF programs (seconds) before its
        # loop first calls mark_alive, and systemd's watchdog runs from exec.
        self._publish_alive()

    # ---- called by the daemon loop -------------------------------------------------

    def mark_alive(self) -> None:
        """The loop made progress. Cheap enough for every iteration."""
        now = self._clock()
        self._last_alive = now
        if now >= self._next_touch:
            self._next_touch = now + self.touch_interval
            self._publish_alive()

    def set_ready(self, ready: bool = True) -> None:
        """Probes attached (True) or being torn down (False)."""
        if ready == self._ready:
            return
        self._ready = ready
        if self.file is not None:
            self._write_file()
        if ready:
            self._notify("READY=1")

    # ---- state, for the HTTP handler and tests -------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    def seconds_since_alive(self) -> float:
        return max(0.0, self._clock() - self._last_alive)

    def alive(self) -> bool:
        return self.seconds_since_alive() <= self.stale_after

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) the HTTP endpoint is bound to (port 0 resolves here)."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def stats(self) -> dict:
        return self._stats_snapshot()

    # ---- shutdown --------------------------------------------------------------------

    def close(self) -> None:
        """Stop serving, tell systemd, remove the file. Safe to call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._ready = False
        self._notify("STOPPING=1")
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.file is not None:
            try:
                self.file.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove health file %s: %s", self.file, exc)
        self._close_notify()

    def __enter__(self) -> Health:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- internals -------------------------------------------------------------------

    def _publish_alive(self) -> None:
        if self.file is not None:
            self._write_file()
        self._notify("WATCHDOG=1")

    def _write_file(self) -> None:
        """Write the state to a temp file and rename it, so readers never see half."""
        if self._closed or self.file is None:
            return
        tmp = self.file.with_name(self.file.name + ".tmp")
        try:
            tmp.write_text("ready\n" if self._ready else "starting\n")
            os.replace(tmp, self.file)
        except OSError as exc:
            self.write_failures += 1
            if self.write_failures == 1:
                log.warning(
                    "could not write health file %s: %s; liveness probes reading it will "
                    "fail until this is fixed (retrying every %.0f s)",
                    self.file,
                    exc,
                    self.touch_interval,
                )

    def _notify(self, message: str) -> None:
        if self._notify_sock is None or self._notify_addr is None:
            return
        try:
            self._notify_sock.sendto(message.encode(), self._notify_addr)
        except OSError as exc:
            self.notify_failures += 1
            if self.notify_failures == 1:
                log.warning("could not notify systemd (%s): %s", message, exc)

    def _close_notify(self) -> None:
        if self._notify_sock is not None:
            self._notify_sock.close()
            self._notify_sock = None

    def _start_server(self, host: str, port: int) -> None:
        handler = type("BoundHealthHandler", (_HealthHandler,), {"health": self})
        server_cls = ThreadingHTTPServer
        if ":" in host:
            server_cls = type("V6Server", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
        try:
            self._server = server_cls((host, port), handler)
        except OSError as exc:
            self._close_notify()
            raise HealthError(
                f"cannot serve health endpoint on {host}:{port}: {exc.strerror or exc}; "
                "choose a free port or disable the health endpoint"
            ) from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="otel-ebpf-health",
            daemon=True,
        )
        self._thread.start()
        log.info("health endpoint on http://%s:%d (/healthz /readyz /stats)", host, self.address[1])


class _HealthHandler(BaseHTTPRequestHandler):
    health: Health  # set on the per-instance subclass
    server_version = "otel-ebpf-health"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        health = self.health
        if path == "/healthz":
            age = health.seconds_since_alive()
            if health.alive():
                self._send(200, f"ok: loop alive {age:.1f} s ago\n")
            else:
                self._send(
                    503,
                    f"stale: loop last alive {age:.1f} s ago (limit {health.stale_after:.0f} s)\n",
                )
        elif path == "/readyz":
            if health.ready:
                self._send(200, "ready\n")
            else:
                self._send(503, "not ready: probes not attached yet\n")
        elif path == "/stats":
            try:
                body = json.dumps(health.stats(), sort_keys=True, default=str) + "\n"
            except Exception as exc:  # a stats bug must not kill the health thread
                self._send(500, f"stats unavailable: {exc}\n")
                return
            self._send(200, body, "application/json")
        else:
            self._send(404, "not found: try /healthz, /readyz or /stats\n")

    def _send(self, code: int, body: str, content_type: str = "text/plain; charset=utf-8") -> None:
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # Probes hit this every few seconds: keep them out of the daemon's log.
        log.debug("health %s " + format, self.client_address[0], *args)


def _notify_address(value: str | None) -> str | bytes | None:
    """NOTIFY_SOCKET as a sendto() address; '@name' is Linux's abstract namespace."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not used for a host daemon


def check_file(path: str | Path, max_age: float, require_ready: bool) -> tuple[bool, str]:
    """Judge a health file as a probe would: (healthy, one-line reason)."""
    path = Path(path)
    try:
        st = path.stat()
        state = path.read_text().strip()
    except FileNotFoundError:
        return False, f"{path} does not exist: the daemon is not running or has not started"
    except OSError as exc:
        return False, f"cannot read {path}: {exc}"
    age = time.time() - st.st_mtime
    if age > max_age:
        return False, f"stale: {path} last updated {age:.0f} s ago (limit {max_age:.0f} s)"
    if require_ready and state != "ready":
        return False, f"not ready: {path} says {state!r}"
    return True, f"ok: {state}, updated {age:.0f} s ago"


def main(argv: list[str] | None = None) -> int:
    """`python -m otel_ebpf.health check FILE [--max-age S] [--ready]`: 0 healthy, 1 not."""
    parser = argparse.ArgumentParser(
        prog="python -m otel_ebpf.health",
        description="Exit 0 when the otel-ebpf health file is fresh (and ready), else 1.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    chk = sub.add_parser("check", help="judge a health file (for exec probes)")
    chk.add_argument("file")
    chk.add_argument("--max-age", type=float, default=DEFAULT_STALE_AFTER)
    chk.add_argument("--ready", action="store_true", help="also require readiness")
    args = parser.parse_args(argv)
    ok, reason = check_file(args.file, args.max_age, args.ready)
    print(reason)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
