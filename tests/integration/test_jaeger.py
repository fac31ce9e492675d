"""The daemon into a real Jaeger v2, read back through Jaeger's query API.

Real eBPF, real programs: curl -> a Python front service (its own OTEL_SERVICE_NAME,
forwarding the caller's traceparent) -> nginx, with the daemon exporting OTLP to Jaeger
v2 (built by scripts/bootstrap.sh --test-peers, in-memory storage). What Jaeger then
serves to its UI must show the services by service.name, the SERVER and CLIENT spans
with their semantic-convention attributes, each caller's trace joined, and exactly one
span of each kind per request. Under CI=true a Jaeger that was not built, or that does
not start, fails the test.
"""

from __future__ import annotations

import time

import pytest

from tests.conftest import require_or_fail
from tests.integration.jaeger_peer import (
    FRONT_SERVICE,
    JAEGER_BIN,
    Jaeger,
    checkout,
    front_service,
    spans_of,
    wait_for,
)
from tests.integration.peers import Daemon, Nginx, free_port

pytestmark = pytest.mark.usefixtures("bpf_available")

N = 7  # prime: off-by-one and duplicates show


@pytest.fixture(scope="module")
def jaeger_binary():
    require_or_fail(None if JAEGER_BIN.is_file() else
                    "Jaeger v2 is not built at %s (scripts/bootstrap.sh --test-peers builds it)"
                    % JAEGER_BIN)
    return JAEGER_BIN


def daemon_env(protocol: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans reach Jaeger quickly
        "OTEL_METRICS_EXPORTER": "none",  # Jaeger takes traces only
        "OTEL_EBPF_EXPORT_OTLP_RETRY_MAX_BACKOFF_S": "1",
    }


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_two_tier_flow_reads_back_from_jaeger(tmp_path, jaeger_binary, protocol):
    front_port, nginx_port = free_port(), free_port()
    with Jaeger(tmp_path, binary=jaeger_binary) as jaeger, \
            Nginx(tmp_path, nginx_port) as nginx, \
            front_service(tmp_path, front_port, nginx_port) as front:
        endpoint = jaeger.otlp_grpc_endpoint if protocol == "grpc" else jaeger.otlp_http_endpoint
        with Daemon(tmp_path, "--port", str(front_port), "--port", str(nginx_port),
                    "--otlp-endpoint", endpoint, "--otlp-protocol", protocol,
                    env=daemon_env(protocol), exporter="otlp") as daemon:
            since_ns = time.time_ns()
            callers = {}  # trace id -> (request number, the caller's span id)
            for i in range(N):
                trace_id, parent_id = checkout(front_port, i)
                callers[trace_id] = (i, parent_id)

            # Until Jaeger holds the N traces with their four spans each.
            def complete():
                traces = jaeger.traces(FRONT_SERVICE, since_ns)
                return traces if len(traces) >= N and all(
                    len(t["spans"]) >= 4 for t in traces) else None
            try:
                wait_for(complete, 30, "%d complete traces in Jaeger" % N)
            except TimeoutError as e:
                raise AssertionError("%s\ndaemon log:\n%s\nJaeger log:\n%s" % (
                    e, daemon.log[-3000:], jaeger.log[-3000:])) from None
            time.sleep(1.0)  # a duplicate span, arriving late, would show below
            traces = jaeger.traces(FRONT_SERVICE, since_ns)
            services = jaeger.services()
            assert daemon.stop() == 0, daemon.log[-3000:]
        assert len(nginx.access_log()) == N

    # Services, by the service.name each process resource carried.
    assert services == sorted([FRONT_SERVICE, "curl", "nginx"]), services

    # Every caller's trace id is in Jaeger, and each of its traces is one of ours.
    assert sorted(t["traceID"] for t in traces) == sorted(callers)
    for trace in traces:
        i, caller_span = callers[trace["traceID"]]
        spans = spans_of(trace)
        # Exactly four spans, one per hop and side.
        assert sorted((s.service, s.kind) for s in spans) == [
            (FRONT_SERVICE, "client"), (FRONT_SERVICE, "server"),
            ("curl", "client"), ("nginx", "server")], [(s.service, s.kind, s.name) for s in spans]
        by = {(s.service, s.kind): s for s in spans}

        # The front's SERVER span: a child of the caller's span, in the caller's trace.
        server = by[(FRONT_SERVICE, "server")]
        assert server.trace_id == trace["traceID"]
        assert server.parent_id == caller_span
        assert server.name == "GET /checkout/{id}"
        assert server.tags["http.request.method"] == "GET"
        assert server.tags["url.path"] == "/checkout/%d" % i
        assert server.tags["http.route"] == "/checkout/{id}"
        assert server.tags["http.response.status_code"] == 200
        assert server.tags["server.address"] == "127.0.0.1"
        assert server.tags["server.port"] == front_port
        assert server.tags["client.address"] == "127.0.0.1"
        assert server.tags["url.scheme"] == "http"
        assert server.tags["network.protocol.version"] == "1.1"
        assert server.tags["user_agent.original"].startswith("curl/")
        assert server.process_tags["process.pid"] == front.pid
        assert "otel.status_code" not in server.tags  # a 200 is not an error

        # The front's CLIENT span: its call to nginx, with the forwarded context.
        client = by[(FRONT_SERVICE, "client")]
        assert client.parent_id == caller_span
        assert client.name == "GET /index.html"
        assert client.tags["http.request.method"] == "GET"
        assert client.tags["url.path"] == "/index.html"
        assert client.tags["http.response.status_code"] == 200
        assert client.tags["server.address"] == "127.0.0.1"
        assert client.tags["server.port"] == nginx_port
        assert client.tags["network.peer.port"] == nginx_port
        assert client.process_tags["process.pid"] == front.pid
        assert client.tags["http.response.body.size"] == len(
            b"<html>hello from nginx</html>\n")

        # nginx's SERVER span for the same request, and curl's CLIENT span.
        backend = by[("nginx", "server")]
        assert backend.tags["url.path"] == "/index.html"
        assert backend.tags["server.port"] == nginx_port
        assert backend.tags["http.response.status_code"] == 200
        assert backend.process_tags["process.executable.name"] == "nginx"
        caller = by[("curl", "client")]
        assert caller.tags["url.path"] == "/checkout/%d" % i
        assert caller.tags["server.port"] == front_port
