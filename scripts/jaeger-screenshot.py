"""Take the README's picture of a trace in the Jaeger UI, from a real run.

Runs what tests/integration/test_jaeger.py runs (Jaeger v2 with in-memory storage, the
daemon exporting OTLP to it, curl -> a Python front service -> nginx with a caller's
traceparent), this time with the Jaeger UI's assets, waits until the caller's trace
holds its four spans, and has headless Chromium (Debian's `chromium`) render that
trace's page to a PNG. Run it through scripts/jaeger-screenshot.sh, which installs
Chromium and builds the UI assets first; as root, from the repository's .venv:

    .venv/bin/python scripts/jaeger-screenshot.py --ui-assets DIR [--out docs/jaeger-trace.png]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.jaeger_peer import (  # noqa: E402
    FRONT_SERVICE,
    JAEGER_BIN,
    Jaeger,
    checkout,
    front_service,
    wait_for,
)
from tests.integration.peers import Daemon, Nginx, free_port  # noqa: E402

WARM_UP = 3  # requests before the one pictured, so the service list is not empty


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4, JSON
    messages ended by NUL), so the page can be clicked before the picture is taken."""

    def __init__(self) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if not binary:
            sys.exit("jaeger-screenshot: chromium not found (apt-get install chromium)")
        self.profile = tempfile.TemporaryDirectory()
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def at_fds_3_and_4():
            r, w = os.dup(to_chrome_r), os.dup(from_chrome_w)  # above 4, then placed
            os.dup2(r, 3)
            os.dup2(w, 4)

        # Root needs --no-sandbox.
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--remote-debugging-pipe", "--user-data-dir=" + self.profile.name, "about:blank"],
            preexec_fn=at_fds_3_and_4, close_fds=False,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.session: str | None = None

    def call(self, method: str, **params):
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:  # skip events until our reply
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed its DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError("%s: %s" % (method, reply["error"]))
                return reply["result"]

    def open(self, url: str, width: int, height: int) -> None:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target,
                                 flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression,
                         returnByValue=True)["result"].get("value")

    def screenshot(self, out: Path) -> None:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        out.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)
        self.profile.cleanup()


def picture_trace(url: str, out: Path, width: int, height: int, service: str,
                  operation: str) -> None:
    """The trace page once its spans are drawn, with one span's details open."""
    chromium = Chromium()
    try:
        chromium.open(url, width, height)
        wait_for(lambda: chromium.evaluate(
            "document.querySelectorAll('.span-view').length") == 4,
            30, "four span rows drawn by the Jaeger UI")
        opened = chromium.evaluate(
            "(() => { const row = [...document.querySelectorAll('.span-row')].find(r =>"
            " r.querySelector('.span-svc-name').textContent.trim() === %s &&"
            " r.querySelector('.endpoint-name').textContent.trim() === %s);"
            " if (!row) return false; row.querySelector('.span-view').click(); return true; })()"
            % (json.dumps(service), json.dumps(operation)))
        if not opened:
            raise RuntimeError("no span row of %s %s in the Jaeger UI" % (service, operation))
        wait_for(lambda: chromium.evaluate(
            "document.querySelectorAll('.detail-row').length") == 1,
            10, "the span's details opened")
        # Open its tags (the semantic-convention attributes) as a table.
        chromium.evaluate("document.querySelector('.detail-row .AccordianKeyValues--header')"
                          ".click()")
        time.sleep(1.0)  # fonts and the details' layout settle
        chromium.screenshot(out)
    finally:
        chromium.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ui-assets", type=Path, required=True,
                        help="a built Jaeger UI (its index.html and static/)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "jaeger-trace.png")
    parser.add_argument("--jaeger", type=Path, default=JAEGER_BIN)
    parser.add_argument("--size", default="1400x1000", help="WIDTHxHEIGHT of the picture")
    args = parser.parse_args()
    if not (args.ui_assets / "index.html").is_file():
        sys.exit("jaeger-screenshot: --ui-assets %s has no index.html" % args.ui_assets)
    if not args.jaeger.is_file():
        sys.exit("jaeger-screenshot: no Jaeger at %s (scripts/bootstrap.sh --test-peers)"
                 % args.jaeger)
    width, height = (int(x) for x in args.size.split("x"))
    args.out.parent.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        front_port, nginx_port = free_port(), free_port()
        with Jaeger(workdir, ui_assets=args.ui_assets.resolve(), binary=args.jaeger) as jaeger, \
                Nginx(workdir, nginx_port), front_service(workdir, front_port, nginx_port), \
                Daemon(workdir, "--port", str(front_port), "--port", str(nginx_port),
                       "--otlp-endpoint", jaeger.otlp_grpc_endpoint, "--otlp-protocol", "grpc",
                       env={"OTEL_BSP_SCHEDULE_DELAY": "200", "OTEL_METRICS_EXPORTER": "none"},
                       exporter="otlp"):
            since_ns = time.time_ns()
            for i in range(WARM_UP):
                checkout(front_port, 1000 + i)
            trace_id, _ = checkout(front_port, 42)
            wait_for(lambda: len(jaeger.traces(FRONT_SERVICE, since_ns)) == WARM_UP + 1
                     and len(jaeger.trace(trace_id)["spans"]) == 4,
                     30, "complete trace %s in Jaeger" % trace_id)
            url = "%s/trace/%s" % (jaeger.ui_url, trace_id)
            # Details open on the front service's SERVER span, the one joined to the caller.
            picture_trace(url, args.out, width, height, FRONT_SERVICE, "GET /checkout/{id}")
    print("jaeger-screenshot: %s -> %s" % (url, args.out))


if __name__ == "__main__":
    main()
