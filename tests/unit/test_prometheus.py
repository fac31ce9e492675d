"""The Prometheus exposition (otel_ebpf/telemetry/prometheus.py): names and units by
the OpenTelemetry-to-Prometheus rules, histogram buckets, target_info, label names and
escaping, redaction, the loop/scrape hand-over, the HTTP endpoint, and the config key.

Inputs are real: exchanges recorded into a Telemetry, whose metrics_request() is what
the daemon renders; the output is read back with prometheus_client's own parser.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from otel_ebpf.config import ConfigError, load
from otel_ebpf.exchange import Role
from otel_ebpf.process import ProcessResolver
from otel_ebpf.stats import Stats
from otel_ebpf.telemetry import Telemetry, TelemetryOptions
from otel_ebpf.telemetry import otlp_encode as enc
from otel_ebpf.telemetry.metrics import DURATION_BOUNDARIES
from otel_ebpf.telemetry.prometheus import (
    MetricsBridge,
    NoExport,
    PrometheusEndpoint,
    PrometheusError,
    families,
    label_name,
    metric_name,
    parse_listen,
)
from tests.unit.test_telemetry import make

SHOP = {"service.name": "shop", "service.namespace": "prod", "service.instance.id": "i-1",
        "process.pid": 4242, "process.command_args": ["shop", "--port", "8080"],
        "host.name": "node-1"}


def telemetry(stats: Stats | None = None, resources=None, **opts) -> Telemetry:
    resources = resources or {4242: SHOP}
    return Telemetry(TelemetryOptions(**opts), resource_for_pid=resources.get,
                     daemon_resource={"service.name": "otel-ebpf", "service.instance.id": "d-1"},
                     sink=NoExport(), stats=stats or Stats(),
                     active_server_requests=lambda: {(4242, "GET", "http", 8080): 2})


def exposition(request: bytes) -> str:
    """The text format prometheus_client serves for this metrics request."""
    registry = CollectorRegistry(auto_describe=False)

    class Collector:
        def collect(self):
            return families(request)

    registry.register(Collector())  # type: ignore[arg-type]
    return generate_latest(registry).decode()


def parsed(text: str) -> dict:
    """name -> (type, [(sample name, labels, value)])."""
    return {f.name: (f.type, [(s.name, s.labels, s.value) for s in f.samples])
            for f in text_string_to_metric_families(text)}


def samples(fams: dict, family: str, sample: str, **match) -> list[tuple[dict, float]]:
    return [(labels, value) for name, labels, value in fams[family][1]
            if name == sample and all(labels.get(k) == v for k, v in match.items())]


# ---------------------------------------------------------------- names and units

@pytest.mark.parametrize("otel_name, unit, counter, expected", [
    ("http.server.request.duration", "s", False, "http_server_request_duration_seconds"),
    ("http.client.response.body.size", "By", False, "http_client_response_body_size_bytes"),
    ("http.server.active_requests", "{request}", False, "http_server_active_requests"),
    ("rpc.server.duration", "ms", False, "rpc_server_duration_milliseconds"),
    ("otel_ebpf.capture.events", "1", True, "otel_ebpf_capture_events"),
    ("otel_ebpf.export.bytes", "By", True, "otel_ebpf_export_bytes"),  # unit already said
    ("requests.total", "1", True, "requests"),  # _total comes back once, on the sample
    ("net.io", "By/s", False, "net_io_bytes_per_second"),
    ("odd-name..with/chars", "", False, "odd_name_with_chars"),
    ("5xx.count", "", False, "_5xx_count"),
])
def test_metric_names_follow_the_otel_to_prometheus_rules(otel_name, unit, counter, expected):
    assert metric_name(otel_name, unit, counter) == expected


@pytest.mark.parametrize("key, expected", [
    ("http.response.status_code", "http_response_status_code"),
    ("url.scheme", "url_scheme"),
    ("k8s.pod-name", "k8s_pod_name"),
    ("0day", "key_0day"),
    ("_private", "key_private"),
    ("__reserved", "__reserved"),
])
def test_label_names_dots_to_underscores(key, expected):
    assert label_name(key) == expected


def test_red_histograms_names_types_buckets_sum_count():
    t = telemetry()
    durations_ms = [0.4, 3, 7, 20, 90, 600, 12000]  # one per bucket region, one past 10 s
    for ms in durations_ms:
        t.record(make(end_time_unix_nano=make().start_time_unix_nano + int(ms * 1e6),
                      request_body_size=10, response_body_size=612))
    fams = parsed(exposition(t.metrics_request()))

    assert fams["http_server_request_duration_seconds"][0] == "histogram"
    buckets = samples(fams, "http_server_request_duration_seconds",
                      "http_server_request_duration_seconds_bucket")
    les = [labels["le"] for labels, _ in buckets]
    assert les == [str(float(b)) for b in DURATION_BOUNDARIES] + ["+Inf"]
    values = [v for _, v in buckets]
    assert values == sorted(values)  # cumulative
    expected = [sum(1 for ms in durations_ms if ms / 1000 <= b) for b in DURATION_BOUNDARIES]
    assert values == expected + [len(durations_ms)]
    [(_, count)] = samples(fams, "http_server_request_duration_seconds",
                           "http_server_request_duration_seconds_count")
    [(_, total)] = samples(fams, "http_server_request_duration_seconds",
                           "http_server_request_duration_seconds_sum")
    assert count == len(durations_ms)
    assert total == pytest.approx(sum(durations_ms) / 1000)

    for family in ("http_server_request_body_size_bytes", "http_server_response_body_size_bytes"):
        assert fams[family][0] == "histogram"
    [(_, body)] = samples(fams, "http_server_response_body_size_bytes",
                          "http_server_response_body_size_bytes_sum")
    assert body == 612 * len(durations_ms)
    # The up-down counter from the callback is a gauge; its unit is an annotation only.
    assert fams["http_server_active_requests"][0] == "gauge"
    [(labels, active)] = samples(fams, "http_server_active_requests",
                                 "http_server_active_requests")
    assert active == 2 and labels["http_request_method"] == "GET"


def test_labels_from_metric_attributes_and_resource_identity():
    t = telemetry()
    t.record(make(status_code=503))
    t.record(make(role=Role.CLIENT, host="api.example:9000", remote_port=9000))
    fams = parsed(exposition(t.metrics_request()))
    [(labels, _)] = samples(fams, "http_server_request_duration_seconds",
                            "http_server_request_duration_seconds_count")
    assert labels == {
        "http_request_method": "GET", "http_response_status_code": "503",
        "http_route": "/users/{id}", "url_scheme": "http", "network_protocol_version": "1.1",
        "server_port": "8080", "error_type": "503",
        "job": "prod/shop", "instance": "i-1",
        "otel_scope_name": "otel-ebpf", "otel_scope_version": enc.__version__,
    }
    [(client, _)] = samples(fams, "http_client_request_duration_seconds",
                            "http_client_request_duration_seconds_count")
    assert client["server_port"] == "9000" and client["job"] == "prod/shop"


def test_target_info_carries_the_resource_once_per_process():
    resources = {4242: SHOP, 777: {"service.name": "worker", "process.pid": 777}}
    t = telemetry(resources=resources)
    t.record(make())
    t.record(make())
    t.record(make(pid=777))
    fams = parsed(exposition(t.metrics_request()))
    # The text format has no info type: target_info is a gauge of value 1.
    assert fams["target_info"][0] == "gauge"
    infos = {labels["job"]: labels for _, labels, _ in fams["target_info"][1]}
    assert set(infos) == {"prod/shop", "worker", "otel-ebpf"}
    assert infos["prod/shop"] == {
        "job": "prod/shop", "instance": "i-1", "process_pid": "4242", "host_name": "node-1",
        # Arrays as JSON, as the compatibility spec says.
        "process_command_args": '["shop","--port","8080"]',
    }
    # No service.instance.id: the pid keeps the series of two such processes apart.
    assert infos["worker"]["instance"] == "777"
    assert all(value == 1 for _, _, value in fams["target_info"][1])


def test_self_metrics_counters_and_gauges():
    stats = Stats()
    stats.add("capture.events", 41)
    stats.add("export.bytes", 1234)
    stats.gauge("conntrack.connections", lambda: 3)
    t = telemetry(stats=stats)
    t.record(make())
    fams = parsed(exposition(t.metrics_request()))
    # The parser names a counter family without _total; the sample keeps it.
    assert fams["otel_ebpf_capture_events"][0] == "counter"
    assert samples(fams, "otel_ebpf_capture_events", "otel_ebpf_capture_events_total",
                   job="otel-ebpf", instance="d-1")[0][1] == 41
    assert samples(fams, "otel_ebpf_export_bytes", "otel_ebpf_export_bytes_total")[0][1] == 1234
    assert fams["otel_ebpf_conntrack_connections"][0] == "gauge"
    assert samples(fams, "otel_ebpf_conntrack_connections",
                   "otel_ebpf_conntrack_connections")[0][1] == 3
    # Telemetry's own counters reach Stats before the scrape reads them.
    assert samples(fams, "otel_ebpf_telemetry_exchanges",
                   "otel_ebpf_telemetry_exchanges_total")[0][1] == 1


def test_values_are_cumulative_across_scrapes():
    t = telemetry()
    t.record(make())
    first = parsed(exposition(t.metrics_request()))
    t.record(make())
    t.record(make())
    second = parsed(exposition(t.metrics_request()))
    name = "http_server_request_duration_seconds"
    assert samples(first, name, name + "_count")[0][1] == 1
    assert samples(second, name, name + "_count")[0][1] == 3


def test_label_values_are_escaped_and_read_back_exactly():
    tricky = 'we"ird\\name\nwith newline'
    resources = {4242: {"service.name": tricky, "service.instance.id": "i-1",
                        "deployment.environment": "a,b=c}{"}}
    t = telemetry(resources=resources)
    t.record(make())
    text = exposition(t.metrics_request())
    assert '\\"' in text and "\\\\" in text and "\\n" in text
    fams = parsed(text)
    [(_, info, _)] = [s for s in fams["target_info"][1] if s[1]["instance"] == "i-1"]
    assert info["job"] == tricky
    assert info["deployment_environment"] == "a,b=c}{"


def test_colliding_label_names_are_merged_in_key_order():
    attrs = enc.field_attributes(9, {"a.b": "dot", "a_b": "underscore"})
    point = enc.encode_histogram_point(attrs, 1, 2, 1, 0.5, [1, 0], [1.0], 0.5, 0.5)
    request = enc.encode_metrics_request([(enc.encode_resource({"service.name": "x"}), [
        enc.field_histogram_metric("m", "", "s", enc.TEMPORALITY_CUMULATIVE, [point])])])
    fams = parsed(exposition(request))
    [(labels, _)] = samples(fams, "m_seconds", "m_seconds_count")
    assert labels["a_b"] == "dot;underscore"


def test_any_instrument_metrics_py_holds_is_rendered():
    """Nothing here knows rpc.server.duration: the translation is by data type."""
    attrs = enc.field_attributes(9, {"rpc.system": "grpc", "rpc.method": "Get"})
    point = enc.encode_histogram_point(attrs, 1, 2, 3, 42.0, [1, 2, 0], [5.0, 50.0], 1.0,
                                       30.0)
    counter = enc.encode_number_point(b"", 1, 2, 9)
    request = enc.encode_metrics_request([(enc.encode_resource({"service.name": "g"}), [
        enc.field_histogram_metric("rpc.server.duration", "RPC duration.", "ms",
                                   enc.TEMPORALITY_CUMULATIVE, [point]),
        enc.field_sum_metric("rpc.server.requests", "", "{request}",
                             enc.TEMPORALITY_CUMULATIVE, True, [counter]),
    ])])
    fams = parsed(exposition(request))
    name = "rpc_server_duration_milliseconds"
    assert [(lb["le"], v) for lb, v in samples(fams, name, name + "_bucket")] == [
        ("5.0", 1), ("50.0", 3), ("+Inf", 3)]
    assert samples(fams, name, name + "_bucket")[0][0]["rpc_method"] == "Get"
    assert samples(fams, "rpc_server_requests", "rpc_server_requests_total")[0][1] == 9


def test_exponential_histograms_become_cumulative_buckets():
    t = telemetry(histogram_aggregation="base2_exponential_bucket_histogram")
    values_ms = [1, 2, 2, 5, 40, 300]
    for ms in values_ms:
        t.record(make(end_time_unix_nano=make().start_time_unix_nano + int(ms * 1e6)))
    fams = parsed(exposition(t.metrics_request()))
    name = "http_server_request_duration_seconds"
    buckets = [(float(lb["le"]), v) for lb, v in samples(fams, name, name + "_bucket")]
    assert buckets[-1] == (float("inf"), len(values_ms))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)
    for le, count in buckets[:-1]:  # each boundary counts the values at or below it
        below = sum(1 for ms in values_ms if ms / 1000 <= le * (1 + 1e-9))
        above = sum(1 for ms in values_ms if ms / 1000 < le * (1 - 1e-9))
        assert above <= count <= below, (le, count)


# ---------------------------------------------------------------- redaction

def test_secrets_in_command_lines_and_queries_never_reach_the_exposition(tmp_path):
    """The resource comes from the process resolver, which redacts command lines with
    the configured names; the query string is never a metric attribute."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                              "--password", "hunter2", "--api-key=s3cr3t"])
    try:
        deadline = time.monotonic() + 5
        resolver = ProcessResolver(Stats())
        info = resolver.get(child.pid)
        while info is None and time.monotonic() < deadline:
            time.sleep(0.05)
            info = resolver.get(child.pid)
        assert info is not None
        t = telemetry(resources={child.pid: info.resource_attributes})
        t.record(make(pid=child.pid, target="/login?token=tok123&user=bob"))
        text = exposition(t.metrics_request())
    finally:
        child.kill()
        child.wait()
    assert "REDACTED" in text
    for secret in ("hunter2", "s3cr3t", "tok123", "bob"):
        assert secret not in text


# ---------------------------------------------------------------- threads and HTTP

def test_bridge_builds_on_the_loop_thread_for_waiting_scrapes():
    built_on: list[str] = []

    def build() -> bytes:
        built_on.append(threading.current_thread().name)
        return b"payload-%d" % len(built_on)

    bridge = MetricsBridge(build, wait_s=5)
    bridge.serve()  # nobody asked: nothing built
    assert built_on == []
    results: list[bytes] = []
    scrapes = [threading.Thread(target=lambda: results.append(bridge.fetch()))
               for _ in range(3)]
    for s in scrapes:
        s.start()
    serve_until_done(bridge, scrapes)
    assert len(results) == 3
    # Builds happen on the serving thread only, one per serve() that found scrapes
    # waiting: scrapes that wait together share one build.
    assert set(built_on) == {threading.current_thread().name}
    assert len(built_on) <= 3
    assert set(results) <= {b"payload-%d" % i for i in range(1, len(built_on) + 1)}


def serve_until_done(bridge: MetricsBridge, threads: list[threading.Thread]) -> None:
    """The daemon loop's part: serve() every 10 ms until the scrapes returned."""
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        bridge.serve()
        time.sleep(0.01)
    assert not any(t.is_alive() for t in threads)


def test_bridge_fails_the_scrape_when_the_loop_does_not_answer_or_the_build_fails():
    with pytest.raises(PrometheusError, match="did not answer"):
        MetricsBridge(lambda: b"", wait_s=0.1).fetch()

    def broken() -> bytes:
        raise ValueError("boom")

    bridge = MetricsBridge(broken, wait_s=5)
    errors: list[Exception] = []

    def scrape() -> None:
        try:
            bridge.fetch()
        except PrometheusError as exc:
            errors.append(exc)

    thread = threading.Thread(target=scrape)
    thread.start()
    serve_until_done(bridge, [thread])
    assert len(errors) == 1 and "boom" in str(errors[0])


def test_endpoint_serves_metrics_over_http_while_a_loop_answers():
    t = telemetry()
    for _ in range(5):
        t.record(make())
    endpoint = PrometheusEndpoint("127.0.0.1:0", t.metrics_request)
    stop = threading.Event()

    def loop() -> None:  # the daemon loop's part
        while not stop.is_set():
            endpoint.serve_scrapes()
            time.sleep(0.01)

    looper = threading.Thread(target=loop)
    looper.start()
    try:
        url = "http://127.0.0.1:%d/metrics" % endpoint.address[1]
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        request = urllib.request.Request(
            url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        with urllib.request.urlopen(request, timeout=5) as response:
            openmetrics = response.read().decode()
    finally:
        stop.set()
        looper.join()
        endpoint.close()
    fams = parsed(text)
    name = "http_server_request_duration_seconds"
    assert samples(fams, name, name + "_count")[0][1] == 5
    assert "# UNIT http_server_request_duration_seconds seconds" in openmetrics
    assert openmetrics.rstrip().endswith("# EOF")


def test_address_in_use_names_the_key_and_the_flag():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PrometheusError) as exc:
            PrometheusEndpoint("127.0.0.1:%d" % port, lambda: b"")
    message = str(exc.value)
    assert message.startswith("export.prometheus.listen: cannot listen on 127.0.0.1:%d" % port)
    assert "--prometheus-listen" in message


@pytest.mark.parametrize("text, expected", [
    ("9464", ("127.0.0.1", 9464)), (":9464", ("127.0.0.1", 9464)),
    ("0.0.0.0:9464", ("0.0.0.0", 9464)), ("[::1]:9464", ("::1", 9464)),
    ("localhost:1", ("localhost", 1)),
])
def test_listen_addresses(text, expected):
    assert parse_listen(text) == expected


# ---------------------------------------------------------------- configuration

def test_flag_key_and_environment_variable(tmp_path):
    from otel_ebpf.cli import build_parser, run_overrides

    args = build_parser().parse_args(["run", "--prometheus-listen", "0.0.0.0:9464"])
    assert load(None, {}, run_overrides(args)).prometheus.listen == "0.0.0.0:9464"
    env = {"OTEL_EBPF_EXPORT_PROMETHEUS_LISTEN": "9465"}
    assert load(None, env, {}).prometheus.listen == "9465"
    path = tmp_path / "c.yaml"
    path.write_text("export:\n  prometheus:\n    listen: 127.0.0.1:9466\n")
    assert load(str(path), {}, {}).prometheus.listen == "127.0.0.1:9466"
    assert load(None, {}, {}).prometheus.listen is None


@pytest.mark.parametrize("value", ["abc", "host:99999", "::1:9464", "a b:1"])
def test_bad_listen_value_names_key_variable_and_flag(value):
    with pytest.raises(ConfigError) as exc:
        load(None, {}, {"export.prometheus.listen": value})
    message = str(exc.value)
    assert message.startswith("export.prometheus.listen: %r" % value)
    assert "OTEL_EBPF_EXPORT_PROMETHEUS_LISTEN" in message
    assert "--prometheus-listen" in message and "HOST:PORT" in message


def test_delta_temporality_is_refused_only_with_the_otlp_exporter():
    env = {"OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "delta"}
    with pytest.raises(ConfigError, match="export.prometheus.listen needs "
                                          "telemetry.metrics_temporality: cumulative"):
        load(None, env, {"export.prometheus.listen": "9464", "output.exporter": "otlp"})
    # No OTLP export: the daemon builds a cumulative aggregator for Prometheus alone.
    assert load(None, env, {"export.prometheus.listen": "9464",
                            "output.exporter": "none"}).prometheus.listen == "9464"
