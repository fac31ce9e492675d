"""A real OTLP receiver process for tests: rotel (a Rust OpenTelemetry collector, PyPI
package `rotel`, test extra), started with its debug exporter at detailed verbosity,
and a parser of what it prints into plain Python structures so tests can assert exact
values.

    with Receiver() as rx:                        # free ports, both gRPC and HTTP
        ...send to rx.grpc_endpoint / rx.http_endpoint...
        spans = rx.wait_for_spans(23)             # list[ReceivedSpan]
        points = rx.wait_for_points("http.server.request.duration", 1)

Attribute values are decoded from rotel's notation: Str(x) -> "x", Int(5) -> 5,
Double(0.5) -> 0.5, Bool(true) -> True, Slice(Str(a), Str(b)) -> ["a", "b"].
A port picked free can be lost to a race before rotel binds it; start() retries with
new ports when rotel exits early.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

AttrValue = str | int | float | bool | list


def rotel_binary() -> str:
    """Path of the rotel-agent binary shipped inside the `rotel` wheel."""
    try:
        import rotel
    except ImportError as exc:
        raise RuntimeError(
            "the `rotel` package is not installed in this Python; it is in the test extra: "
            "pip install -e '.[test]' (scripts/bootstrap.sh does it)"
        ) from exc
    path = Path(rotel.__file__).parent / "rotel-agent"
    if not os.access(path, os.X_OK):
        raise RuntimeError("rotel-agent binary missing or not executable at %s" % path)
    return str(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ReceivedSpan:
    resource: dict[str, AttrValue]
    scope_name: str
    scope_version: str
    fields: dict[str, str]  # "Trace ID", "Parent ID", "ID", "Name", "Kind", "Status code", ...
    attributes: dict[str, AttrValue] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.fields.get("Name", "")

    @property
    def kind(self) -> str:
        return self.fields.get("Kind", "")

    @property
    def trace_id(self) -> str:
        return self.fields.get("Trace ID", "")

    @property
    def span_id(self) -> str:
        return self.fields.get("ID", "")

    @property
    def parent_id(self) -> str:
        return self.fields.get("Parent ID", "")

    @property
    def status_code(self) -> str:
        return self.fields.get("Status code", "STATUS_CODE_UNSET")

    @property
    def start_time_unix_nano(self) -> int:
        return int(self.fields["Start time"])

    @property
    def end_time_unix_nano(self) -> int:
        return int(self.fields["End time"])


@dataclass
class ReceivedPoint:
    resource: dict[str, AttrValue]
    scope_name: str
    metric: str
    descriptor: dict[str, str]  # Name, Description, Unit, DataType, AggregationTemporality, ...
    attributes: dict[str, AttrValue] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)  # Count, Sum, Value, Min, Max, ...
    explicit_bounds: list[float] = field(default_factory=list)
    bucket_counts: list[int] = field(default_factory=list)  # explicit or exponential buckets

    @property
    def count(self) -> int:
        return int(self.fields["Count"])

    @property
    def value(self) -> float:
        return float(self.fields["Value"])

    @property
    def sum(self) -> float:
        return float(self.fields["Sum"])


_ATTR = re.compile(r"^\s+-> ([^:]+): (\w+)\((.*)$")
_KV = re.compile(r"^\s*([A-Za-z][A-Za-z ]*?)\s*: ?(.*)$")
_BOUND = re.compile(r"^ExplicitBounds #\d+: (.*)$")
_BUCKET = re.compile(r"^Buckets #\d+, Count: (\d+)$")
_EXP_BUCKET = re.compile(r"^Bucket [\[(].*, Count: (\d+)$")
_LOG_LINE = re.compile(r"^(\x1b\[[0-9;]*m)?\d{4}-\d\d-\d\dT|^\{\"")


def decode_value(kind: str, text: str) -> AttrValue:
    if kind == "Str":
        return text
    if kind == "Int":
        return int(text)
    if kind == "Double":
        return float(text)
    if kind == "Bool":
        return text == "true"
    if kind == "Slice":
        return [decode_value(m.group(1), m.group(2))
                for m in re.finditer(r"(\w+)\(([^()]*)\)", text)]
    return "%s(%s)" % (kind, text)


class RotelOutputParser:
    """Line-by-line state machine over rotel's debug exporter output."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.points: list[ReceivedPoint] = []
        self._resource: dict[str, AttrValue] = {}
        self._scope = ("", "")
        self._attr_target: dict[str, AttrValue] | None = None
        self._span: ReceivedSpan | None = None
        self._point: ReceivedPoint | None = None
        self._descriptor: dict[str, str] = {}
        self._in_descriptor = False
        self._open_str: tuple[dict[str, AttrValue], str] | None = None  # multi-line Str(
        self._raw: list[str] = []

    def feed(self, line: str) -> None:
        line = line.rstrip("\n")
        if self._open_str is not None:
            target, key = self._open_str
            if line.endswith(")"):
                target[key] = str(target[key]) + "\n" + line[:-1]
                self._open_str = None
            else:
                target[key] = str(target[key]) + "\n" + line
            return
        if not line or _LOG_LINE.match(line):
            return
        if line.startswith(("ResourceSpans #", "ResourceMetrics #")):
            self._resource, self._scope = {}, ("", "")
            self._attr_target = None
            self._span = self._point = None
            return
        if line == "Resource attributes:":
            self._attr_target = self._resource
            return
        if line.startswith("InstrumentationScope "):
            parts = line[len("InstrumentationScope "):].split(" ", 1)
            self._scope = (parts[0], parts[1].strip() if len(parts) > 1 else "")
            return
        if line.startswith(("ScopeSpans ", "ScopeMetrics ")):
            self._attr_target = None
            return
        if line.startswith("Span #"):
            self._span = ReceivedSpan(dict(self._resource), self._scope[0], self._scope[1], {})
            self.spans.append(self._span)
            self._attr_target = None
            return
        if line.startswith("Metric #"):
            self._descriptor = {}
            self._point = None
            self._attr_target = None
            return
        if line == "Descriptor:":
            self._in_descriptor = True
            return
        if re.match(r"^\w*DataPoints #\d+$", line):
            self._in_descriptor = False
            self._point = ReceivedPoint(dict(self._resource), self._scope[0],
                                        self._descriptor.get("Name", ""), dict(self._descriptor))
            self.points.append(self._point)
            self._attr_target = None
            return
        if line == "Data point attributes:" and self._point is not None:
            self._attr_target = self._point.attributes
            return
        if line == "Attributes:" and self._span is not None:
            self._attr_target = self._span.attributes
            return
        m = _ATTR.match(line)
        if m:
            key, kind, rest = m.groups()
            if self._in_descriptor and self._point is None:
                self._descriptor[key] = line.split(": ", 1)[1]
                return
            if self._attr_target is None:
                return
            if kind == "Str" and not rest.endswith(")"):
                self._attr_target[key] = rest
                self._open_str = (self._attr_target, key)
                return
            self._attr_target[key] = decode_value(kind, rest[:-1])
            return
        if line.startswith("     -> ") and self._in_descriptor:
            key, _, value = line.lstrip()[3:].partition(":")
            value = value.strip()
            self._descriptor[key] = value
            return
        if self._point is not None:
            m = _BOUND.match(line)
            if m:
                self._point.explicit_bounds.append(float(m.group(1)))
                return
            m = _BUCKET.match(line) or _EXP_BUCKET.match(line)
            if m:
                self._point.bucket_counts.append(int(m.group(1)))
                return
        m = _KV.match(line)
        if m:
            self._attr_target = None
            key, value = m.group(1), m.group(2).strip()
            if self._point is not None:
                self._point.fields[key] = value
            elif self._span is not None:
                self._span.fields[key] = value


class Receiver:
    """A rotel-agent process listening on free loopback ports; see the module docstring."""

    def __init__(self, grpc_port: int | None = None, http_port: int | None = None) -> None:
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._parser = RotelOutputParser()
        self._lock = threading.Condition()
        self.output: list[str] = []

    @property
    def grpc_endpoint(self) -> str:
        return "http://127.0.0.1:%d" % self.grpc_port

    @property
    def http_endpoint(self) -> str:
        return "http://127.0.0.1:%d" % self.http_port

    def start(self, timeout_s: float = 10.0) -> Receiver:
        cmd = [
            rotel_binary(), "start",
            "--otlp-grpc-endpoint", "127.0.0.1:%d" % self.grpc_port,
            "--otlp-http-endpoint", "127.0.0.1:%d" % self.http_port,
            "--debug-log", "traces", "--debug-log", "metrics",
            "--debug-log-verbosity", "detailed",
            "--exporter", "blackhole",
            # Print each request as it arrives, so tests need not wait for a batch timer.
            "--disable-batching",
            "--log-format", "json",
        ]
        env = dict(os.environ, NO_COLOR="1")
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            errors="replace",
        )
        self._reader = threading.Thread(target=self._read, name="rotel-reader", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(
                    "rotel-agent exited with %s before listening:\n%s"
                    % (self._proc.returncode, "".join(self.output[-20:]))
                )
            if self._listening(self.grpc_port) and self._listening(self.http_port):
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("rotel-agent did not listen on %d/%d within %.0f s"
                           % (self.grpc_port, self.http_port, timeout_s))

    @staticmethod
    def _listening(port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._lock:
                self.output.append(line)
                self._parser.feed(line)
                self._lock.notify_all()
        with self._lock:
            self._lock.notify_all()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(timeout_s)
        if self._reader is not None:
            self._reader.join(timeout_s)

    def __enter__(self) -> Receiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what was received ----

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._parser.spans)

    @property
    def points(self) -> list[ReceivedPoint]:
        with self._lock:
            return list(self._parser.points)

    def _wait(self, probe, timeout_s: float):
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                result = probe()
                if result is not None:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._lock.wait(min(remaining, 0.2))

    def wait_for_spans(self, count: int, timeout_s: float = 10.0,
                       settle_s: float = 0.3) -> list[ReceivedSpan]:
        """At least `count` spans, or whatever arrived by the timeout. Waits `settle_s`
        more so that duplicates beyond `count` would show up in an exact assertion."""
        self._wait(lambda: True if len(self._parser.spans) >= count else None, timeout_s)
        time.sleep(settle_s)
        return self.spans

    def wait_for_points(self, metric: str, count: int = 1, timeout_s: float = 10.0,
                        settle_s: float = 0.3) -> list[ReceivedPoint]:
        def probe():
            got = [p for p in self._parser.points if p.metric == metric]
            return True if len(got) >= count else None

        self._wait(probe, timeout_s)
        time.sleep(settle_s)
        return [p for p in self.points if p.metric == metric]


if __name__ == "__main__":  # manual use: python -m tests.receiver, then send to the ports
    with Receiver() as rx:
        print("grpc", rx.grpc_endpoint, "http", rx.http_endpoint, file=sys.stderr)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
