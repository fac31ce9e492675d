"""Console and jsonl sinks redact the query like the OTLP export does (one redactor)."""

from __future__ import annotations

import io

import orjson

from otel_ebpf.capture.events import Role
from otel_ebpf.exchange import HttpExchange
from otel_ebpf.sinks import ConsoleSink, JsonlSink, exchange_record, format_exchange
from otel_ebpf.stats import Stats
from otel_ebpf.telemetry.attributes import http_attributes
from otel_ebpf.telemetry.redact import QueryRedactor

T0 = 1_700_000_000_000_000_000


def make(target: str) -> HttpExchange:
    return HttpExchange(
        pid=4242, tid=4243, role=Role.SERVER, local_address="127.0.0.1", local_port=18555,
        remote_address="127.0.0.1", remote_port=51234, scheme="http", protocol_version="1.1",
        method="GET", target=target, host="127.0.0.1:18555", user_agent="curl/8",
        traceparent=None, tracestate=None, request_body_size=0, response_body_size=2,
        status_code=200, start_time_unix_nano=T0, end_time_unix_nano=T0 + 1_000_000)


def test_console_line_redacts_like_jsonl_and_otlp():
    ex = make("/?q=1&token=abc")
    line = format_exchange(ex, "python3")
    assert "GET http://127.0.0.1:18555/?q=1&token=REDACTED 200" in line
    assert "abc" not in line
    assert exchange_record(ex, "python3")["url.query"] == "q=1&token=REDACTED"
    assert http_attributes(ex, None)["url.query"] == "q=1&token=REDACTED"
    # no query / no sensitive name: the target as on the wire
    assert "GET http://127.0.0.1:18555/a/b?x=1&y 200" in format_exchange(make("/a/b?x=1&y"), "p")
    assert "GET http://127.0.0.1:18555/a 200" in format_exchange(make("/a"), "p")


def test_sinks_use_the_configured_redactor(tmp_path):
    redact = QueryRedactor(("q",))
    out = io.StringIO()
    console = ConsoleSink(lambda pid: "python3", Stats(), stream=out, redact=redact)
    console.handle(make("/?q=1&token=abc"))
    assert "/?q=REDACTED&token=abc 200" in out.getvalue()

    path = tmp_path / "x.jsonl"
    sink = JsonlSink(str(path), lambda pid: "python3", Stats(), redact=redact)
    sink.handle(make("/?q=1&token=abc"))
    sink.close()
    record = orjson.loads(path.read_bytes())
    assert record["url.query"] == "q=REDACTED&token=abc"
