"""Console and jsonl sinks redact the query like the OTLP export does (one redactor)."""

from __future__ import annotations

import dataclasses
import io

import orjson

from otel_ebpf.capture.events import Role
from otel_ebpf.exchange import HttpExchange, Outcome
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


# ---------------------------------------------------------------- HTTP/2 and gRPC

def make_grpc(rpc, **kw) -> HttpExchange:
    base = dict(protocol_version="2", method="POST", target="/%s/%s" % (rpc.service, rpc.method),
                host="127.0.0.1:50051", stream_id=5, rpc=rpc, status_code=200)
    base.update(kw)
    return dataclasses.replace(make("/"), **base)


def test_console_line_of_a_grpc_call():
    from otel_ebpf.exchange import RpcCall
    ok = make_grpc(RpcCall("grpc", "helloworld.Greeter", "SayHello", 0, 1, 1),
                   end_time_unix_nano=T0 + 1_234_000)
    line = format_exchange(ok, "python3")
    assert line.endswith("SERVER gRPC helloworld.Greeter/SayHello OK(0) 1.234ms msgs=1/1")
    late = make_grpc(RpcCall("grpc", "a.B", "C", 4, 3, 0), role=Role.CLIENT)
    assert "CLIENT gRPC a.B/C DEADLINE_EXCEEDED(4) 1.000ms msgs=3/0" in format_exchange(late, "p")
    reset = make_grpc(RpcCall("grpc", "a.B", "C", None, 1, 0), outcome=Outcome.STREAM_RESET,
                      error_reason="cancel")
    assert "gRPC a.B/C --- (stream_reset) 1.000ms msgs=1/0" in format_exchange(reset, "p")


def test_jsonl_record_of_a_grpc_call_and_of_plain_http2():
    from otel_ebpf.exchange import RpcCall
    record = exchange_record(make_grpc(RpcCall("grpc", "a.B", "C", 14, 2, 0)), "python3")
    assert record["rpc.system"] == "grpc" and record["rpc.service"] == "a.B"
    assert record["rpc.method"] == "C" and record["rpc.grpc.status_code"] == 14
    assert record["error.type"] == "UNAVAILABLE"
    assert record["otel_ebpf.rpc.request_messages"] == 2
    assert record["otel_ebpf.rpc.response_messages"] == 0
    assert record["otel_ebpf.stream_id"] == 5 and record["network.protocol.version"] == "2"
    assert not [k for k in record if k.startswith("http.") or k.startswith("url.")]
    plain = exchange_record(dataclasses.replace(make("/x?token=abc"), protocol_version="2",
                                                stream_id=7), "p")
    assert plain["otel_ebpf.stream_id"] == 7 and plain["url.query"] == "token=REDACTED"
    assert "otel_ebpf.stream_id" not in exchange_record(make("/"), "p")  # HTTP/1


def test_grpc_lines_never_show_a_query():
    """A gRPC :path has no query; if one ever carries one, no sink shows it."""
    from otel_ebpf.exchange import RpcCall
    ex = make_grpc(RpcCall("grpc", "a.B", "C", 0, 1, 1), target="/a.B/C?token=abc")
    assert "abc" not in format_exchange(ex, "p")
    assert "abc" not in orjson.dumps(exchange_record(ex, "p")).decode()
