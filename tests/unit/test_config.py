"""config.load: precedence, standard OTEL_* variables, error messages, the shipped file."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from otel_ebpf import config as config_mod
from otel_ebpf.config import ConfigError, load, settings
from otel_ebpf.conntrack.options import ConntrackOptions
from otel_ebpf.export import OtlpOptions, OtlpSignalOptions
from otel_ebpf.telemetry.options import TelemetryOptions

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "otel-ebpf.yaml"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def empty(tmp_path: Path) -> str:
    return write(tmp_path, "")


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load(*args, **kwargs)
    return str(info.value)


# ---- the shipped file ----------------------------------------------------------------


def _yaml_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in tree.items():
        key = prefix + k
        if isinstance(v, dict) and v and key not in ("export.otlp.headers",):
            keys |= _yaml_keys(v, key + ".")
        else:
            keys.add(key)
    return keys


def _options_classes():
    classes = [("conntrack", ConntrackOptions), ("telemetry", TelemetryOptions),
               ("output", config_mod.OutputOptions), ("health", config_mod.HealthOptions)]
    if config_mod.CaptureOptions is not None:
        classes.append(("capture", config_mod.CaptureOptions))
    return classes


def test_every_field_of_every_options_dataclass_is_in_the_shipped_file():
    keys = _yaml_keys(yaml.safe_load(SHIPPED.read_text()))
    expected = set()
    for section, cls in _options_classes():
        for f in dataclasses.fields(cls):
            # conntrack.ports is fed by capture.ports (one port filter for both stages).
            expected.add("capture.ports" if (section, f.name) == ("conntrack", "ports")
                         else "%s.%s" % (section, f.name))
    for f in dataclasses.fields(OtlpSignalOptions):
        for prefix in ("export.otlp.", "export.otlp.traces.", "export.otlp.metrics."):
            expected.add(prefix + f.name)
    for f in dataclasses.fields(OtlpOptions):
        if f.name not in ("traces", "metrics"):
            expected.add("export.otlp." + f.name)
    expected.add("log_level")
    missing = expected - keys
    assert not missing, "fields not documented in config/otel-ebpf.yaml: %s" % sorted(missing)
    # ... and nothing in the file that load() does not know.
    assert keys <= {s.key for s in settings()}


def test_every_key_in_the_shipped_file_has_a_comment_naming_its_env_var():
    text = SHIPPED.read_text()
    for s in settings():
        if s.key.startswith(("export.otlp.traces.", "export.otlp.metrics.")):
            # Documented once for the block: OTEL_EXPORTER_OTLP_{TRACES,METRICS}_<KEY>.
            assert "OTEL_EBPF_EXPORT_OTLP_%s_<KEY>" % s.key.split(".")[2].upper() in text
            continue
        assert s.own_env in text, "%s: its variable %s is not documented" % (s.key, s.own_env)


def test_loading_the_shipped_file_gives_the_defaults(tmp_path):
    shipped = load(str(SHIPPED), {}, {})
    defaults = load(empty(tmp_path), {}, {})
    assert dataclasses.replace(shipped, source=None) == dataclasses.replace(defaults, source=None)
    assert defaults.conntrack == ConntrackOptions()
    assert defaults.telemetry == TelemetryOptions()
    assert defaults.otlp == OtlpOptions()
    assert defaults.output == config_mod.OutputOptions()
    assert defaults.log_level == "info"


def test_default_search_finds_the_checkout_file():
    assert load(None, {}, {}).source == str(SHIPPED)


# ---- precedence --------------------------------------------------------------------


def test_precedence_defaults_yaml_env_command_line(tmp_path):
    path = write(tmp_path, "conntrack:\n  max_connections: 101\n  idle_timeout_s: 7\n"
                           "  max_pending_requests: 3\n")
    env = {"OTEL_EBPF_CONNTRACK_MAX_CONNECTIONS": "202",
           "OTEL_EBPF_CONNTRACK_IDLE_TIMEOUT_S": "8"}
    c = load(path, env, {"conntrack.max_connections": 303})
    assert c.conntrack.max_connections == 303  # command line over env over YAML
    assert c.conntrack.idle_timeout_s == 8.0  # env over YAML
    assert c.conntrack.max_pending_requests == 3  # YAML over default
    assert c.conntrack.max_header_bytes == ConntrackOptions().max_header_bytes


def test_yaml_null_means_not_set(tmp_path):
    c = load(write(tmp_path, "output:\n  exporter: null\n"), {"OTEL_EBPF_OUTPUT_EXPORTER": "jsonl"},
             {})
    assert c.output.exporter == "jsonl"


def test_standard_variable_wins_over_own_variable(tmp_path):
    c = load(empty(tmp_path), {"OTEL_BSP_MAX_QUEUE_SIZE": "77",
                               "OTEL_EBPF_TELEMETRY_SPAN_QUEUE_SIZE": "88"}, {})
    assert c.telemetry.span_queue_size == 77


# ---- OTLP variables ------------------------------------------------------------------


def test_otlp_defaults_per_protocol(tmp_path):
    c = load(empty(tmp_path), {}, {})
    assert c.otlp.traces.protocol == "http/protobuf"  # the spec's default
    assert c.otlp.traces.endpoint == "http://localhost:4318/v1/traces"
    assert c.otlp.metrics.endpoint == "http://localhost:4318/v1/metrics"
    c = load(empty(tmp_path), {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, {})
    assert c.otlp.traces.endpoint == c.otlp.metrics.endpoint == "http://localhost:4317"


def test_generic_http_endpoint_gets_signal_paths_and_per_signal_is_used_as_is(tmp_path):
    c = load(empty(tmp_path), {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "https://collector.example:4318/base/",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://m.example/custom/path",
    }, {})
    assert c.otlp.traces.endpoint == "https://collector.example:4318/base/v1/traces"
    assert c.otlp.metrics.endpoint == "https://m.example/custom/path"
    assert c.output.exporter == "otlp"


def test_per_signal_variables_override_generic_ones(tmp_path):
    c = load(empty(tmp_path), {
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "a=1",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS": "b=2",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "3000",
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1500",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "none",
    }, {})
    assert c.otlp.traces.protocol == "http/protobuf"
    assert c.otlp.metrics.protocol == "grpc"
    assert c.otlp.traces.headers == (("a", "1"),)
    assert c.otlp.metrics.headers == (("b", "2"),)
    assert c.otlp.traces.timeout_s == 1.5
    assert c.otlp.metrics.timeout_s == 3.0
    assert c.otlp.traces.compression == c.otlp.metrics.compression == "none"


def test_command_line_generic_endpoint_beats_per_signal_environment(tmp_path):
    c = load(empty(tmp_path), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://env:4317"},
             {"export.otlp.endpoint": "http://cli:4317", "export.otlp.protocol": "grpc"})
    assert c.otlp.traces.endpoint == c.otlp.metrics.endpoint == "http://cli:4317"


def test_headers_are_url_decoded_and_yaml_mapping_accepted(tmp_path):
    c = load(empty(tmp_path), {"OTEL_EXPORTER_OTLP_HEADERS":
                               "api-key=a%20b%2Cc , x-tenant=t%3D1,empty="}, {})
    assert c.otlp.traces.headers == (("api-key", "a b,c"), ("x-tenant", "t=1"), ("empty", ""))
    c = load(write(tmp_path, "export:\n  otlp:\n    headers:\n      api-key: secret\n"), {}, {})
    assert c.otlp.metrics.headers == (("api-key", "secret"),)


def test_millisecond_variables_become_seconds(tmp_path):
    c = load(empty(tmp_path), {"OTEL_BSP_SCHEDULE_DELAY": "250",
                               "OTEL_METRIC_EXPORT_INTERVAL": "1500",
                               "OTEL_BSP_EXPORT_TIMEOUT": "4000",
                               "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64"}, {})
    assert c.telemetry.span_schedule_delay_s == 0.25
    assert c.telemetry.metric_export_interval_s == 1.5
    assert c.telemetry.span_batch_size == 64
    assert c.otlp.traces.timeout_s == 4.0  # OTEL_BSP_EXPORT_TIMEOUT: the traces call timeout
    assert c.otlp.metrics.timeout_s == 10.0


def test_temporality_and_histogram_aggregation_variables(tmp_path):
    c = load(empty(tmp_path), {
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "DELTA",
        "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION":
            "base2_exponential_bucket_histogram"}, {})
    assert c.telemetry.metrics_temporality == "delta"
    assert c.telemetry.histogram_aggregation == "base2_exponential_bucket_histogram"


def test_default_exporter_is_console_without_endpoint_and_otlp_with_one(tmp_path):
    assert load(empty(tmp_path), {}, {}).output.exporter == "console"
    for env in ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"},
                {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"},
                {"OTEL_TRACES_EXPORTER": "otlp"}):
        assert load(empty(tmp_path), env, {}).output.exporter == "otlp", env
    yaml_endpoint = write(tmp_path, "export:\n  otlp:\n    endpoint: http://c:4317\n")
    assert load(yaml_endpoint, {}, {}).output.exporter == "otlp"
    assert load(yaml_endpoint, {}, {"output.exporter": "jsonl"}).output.exporter == "jsonl"


def test_sdk_disabled_and_none_exporters_turn_signals_off(tmp_path):
    c = load(empty(tmp_path), {"OTEL_SDK_DISABLED": "true"}, {})
    assert not c.telemetry.spans_enabled and not c.telemetry.metrics_enabled
    c = load(empty(tmp_path), {"OTEL_METRICS_EXPORTER": "none"}, {})
    assert c.telemetry.spans_enabled and not c.telemetry.metrics_enabled


def test_ports_from_command_line_reach_conntrack(tmp_path):
    c = load(empty(tmp_path), {}, {"capture.ports": (80, 443)})
    assert c.conntrack.ports == frozenset({80, 443})
    c = load(empty(tmp_path), {"OTEL_EBPF_CAPTURE_PORTS": "8080"}, {})
    assert c.conntrack.ports == frozenset({8080})


def test_lists_from_environment_and_yaml(tmp_path):
    c = load(write(tmp_path, "telemetry:\n  route_patterns: ['/users/{id}', '/static/*']\n"),
             {"OTEL_EBPF_CONNTRACK_CAPTURE_REQUEST_HEADERS": "x-request-id, x-b3-traceid"}, {})
    assert c.telemetry.route_patterns == ("/users/{id}", "/static/*")
    assert c.conntrack.capture_request_headers == ("x-request-id", "x-b3-traceid")


def test_log_level_aliases(tmp_path):
    assert load(empty(tmp_path), {"OTEL_LOG_LEVEL": "WARN"}, {}).log_level == "warning"
    assert load(empty(tmp_path), {}, {"log_level": "debug"}).log_level == "debug"


# ---- error messages ----------------------------------------------------------------------


def test_bad_choice_from_environment_names_key_variable_and_choices(tmp_path):
    assert error_of(empty(tmp_path), {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpcc"}, {}) == (
        "export.otlp.protocol: 'grpcc' is not allowed (from OTEL_EXPORTER_OTLP_PROTOCOL); "
        "use one of: grpc, http/protobuf"
    )


def test_bad_value_from_yaml_names_file_and_variables(tmp_path):
    path = write(tmp_path, "conntrack:\n  max_connections: lots\n")
    assert error_of(path, {}, {}) == (
        "conntrack.max_connections: 'lots' is not a number (from config file %s; "
        "environment: OTEL_EBPF_CONNTRACK_MAX_CONNECTIONS); use a whole number >= 1" % path
    )


def test_bad_value_from_command_line(tmp_path):
    assert error_of(empty(tmp_path), {}, {"output.exporter": "otlpp"}) == (
        "output.exporter: 'otlpp' is not allowed (from the command line; environment: "
        "OTEL_EBPF_OUTPUT_EXPORTER); use one of: console, jsonl, otlp, none"
    )


def test_millisecond_variable_error_says_the_unit(tmp_path):
    assert error_of(empty(tmp_path), {"OTEL_EXPORTER_OTLP_TIMEOUT": "0"}, {}) == (
        "export.otlp.timeout_s: '0' is too small (from OTEL_EXPORTER_OTLP_TIMEOUT); "
        "use a number >= 0.001 (milliseconds in the environment)"
    )


def test_malformed_headers(tmp_path):
    msg = error_of(empty(tmp_path), {"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "a=1,broken"}, {})
    assert msg.startswith("export.otlp.traces.headers: 'a=1,broken' has a member 'broken' "
                          "that is not key=value (from OTEL_EXPORTER_OTLP_TRACES_HEADERS)")


def test_invalid_header_name(tmp_path):
    msg = error_of(empty(tmp_path), {"OTEL_EXPORTER_OTLP_HEADERS": "api key=1"}, {})
    assert msg == ("export.otlp.headers: 'api key=1' has an invalid header name 'api key' "
                   "(from OTEL_EXPORTER_OTLP_HEADERS); use letters, digits and - in header names")


def test_missing_certificate_file(tmp_path):
    msg = error_of(empty(tmp_path), {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "no.pem")},
                   {})
    assert msg == ("export.otlp.certificate: '%s' is not a readable file (from "
                   "OTEL_EXPORTER_OTLP_CERTIFICATE); give the path of an existing PEM file"
                   % (tmp_path / "no.pem"))


def test_bad_boolean_and_port(tmp_path):
    assert error_of(empty(tmp_path), {"OTEL_EXPORTER_OTLP_INSECURE": "maybe"}, {}) == (
        "export.otlp.insecure: 'maybe' is not a boolean (from OTEL_EXPORTER_OTLP_INSECURE); "
        "use true or false")
    assert error_of(empty(tmp_path), {}, {"capture.ports": (80, 70000)}).startswith(
        "capture.ports: (80, 70000) has an item that is too large (from the command line")


def test_bad_endpoint(tmp_path):
    msg = error_of(empty(tmp_path), {"OTEL_EXPORTER_OTLP_ENDPOINT": "ftp://c:21"}, {})
    assert msg.startswith("export.otlp.endpoint: 'ftp://c:21' is not an http:// or https:// URL "
                          "(from OTEL_EXPORTER_OTLP_ENDPOINT)")


def test_bad_exporter_variables(tmp_path):
    assert error_of(empty(tmp_path), {"OTEL_TRACES_EXPORTER": "zipkin"}, {}) == (
        "telemetry.spans_enabled: 'zipkin' is not allowed (from OTEL_TRACES_EXPORTER); "
        "use one of: otlp, console, none")
    assert "OTEL_SDK_DISABLED" in error_of(empty(tmp_path), {"OTEL_SDK_DISABLED": "yes"}, {})


def test_capture_keys_and_capture_validation(tmp_path):
    if config_mod.CaptureOptions is None:
        pytest.skip("the capture stage (otel_ebpf.capture.loader) is not in this checkout")
    c = load(empty(tmp_path), {"OTEL_EBPF_CAPTURE_PIDS": "123, 456"},
             {"capture.tls": False})
    assert c.capture.pids == (123, 456)
    assert c.capture.tls is False
    path = write(tmp_path, "capture:\n  max_capture_bytes: 5000\n")
    assert error_of(path, {}, {}) == (
        "capture.max_capture_bytes=5000 must be a power of two between 16 and 16384 "
        "(e.g. 4096) (from config file %s; environment: OTEL_EBPF_CAPTURE_MAX_CAPTURE_BYTES)"
        % path)
    assert error_of(empty(tmp_path), {"OTEL_EBPF_CAPTURE_RINGBUF_KIB": "100"}, {}) == (
        "capture.ringbuf_kib=100 must be a power of two >= 64 (e.g. 8192) "
        "(from OTEL_EBPF_CAPTURE_RINGBUF_KIB)")
    assert error_of(empty(tmp_path), {}, {"capture.max_iovecs": 17}) == (
        "capture.max_iovecs: 17 is too large (from the command line; environment: "
        "OTEL_EBPF_CAPTURE_MAX_IOVECS); use a whole number from 1 to 16")


def test_stage_validation_error_names_the_section(tmp_path):
    msg = error_of(write(tmp_path, "telemetry:\n  exponential_max_scale: 99\n"), {}, {})
    assert msg.startswith("telemetry: exponential_max_scale must be in [-10, 20]")
    assert "OTEL_EBPF_TELEMETRY_" in msg


def test_unknown_yaml_key_suggests_the_right_one(tmp_path):
    msg = error_of(write(tmp_path, "conntrack:\n  max_conections: 5\n"), {}, {})
    assert msg.startswith("conntrack.max_conections: unknown key (from %s); "
                          "did you mean conntrack.max_connections?" % (tmp_path / "c.yaml"))
    msg = error_of(write(tmp_path, "exprot:\n  otlp: {}\n"), {}, {})
    assert "did you mean export?" in msg


def test_unknown_command_line_key(tmp_path):
    assert error_of(empty(tmp_path), {}, {"output.exportr": "otlp"}) == (
        "output.exportr: unknown key (from the command line); did you mean output.exporter?")


def test_section_that_is_not_a_mapping(tmp_path):
    msg = error_of(write(tmp_path, "telemetry: 5\n"), {}, {})
    assert msg.startswith("telemetry: must be a mapping of keys")


def test_invalid_yaml_and_missing_file(tmp_path):
    msg = error_of(write(tmp_path, "telemetry:\n  max_routes: [1\n"), {}, {})
    assert msg.startswith("config file %s: line " % (tmp_path / "c.yaml"))
    assert "is not valid YAML" in msg
    msg = error_of(str(tmp_path / "absent.yaml"), {}, {})
    assert msg.startswith("cannot read config file %s: No such file" % (tmp_path / "absent.yaml"))


def test_client_key_without_certificate(tmp_path):
    key = tmp_path / "k.pem"
    key.write_text("x")
    msg = error_of(empty(tmp_path), {"OTEL_EXPORTER_OTLP_CLIENT_KEY": str(key)}, {})
    assert "client_key is set without client_certificate" in msg


def test_grpc_port_with_http_protocol_is_warned(tmp_path, caplog):
    load(empty(tmp_path), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, {})
    assert ("OTLP traces endpoint http://collector:4317/v1/traces uses port 4317, the "
            "collector's grpc port, but the protocol is http/protobuf (the default); set "
            "OTEL_EXPORTER_OTLP_PROTOCOL=grpc") in caplog.text
    caplog.clear()
    load(empty(tmp_path), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317",
                           "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, {})
    assert "port" not in caplog.text


def test_unknown_own_variable_is_warned_not_fatal(tmp_path, caplog):
    load(empty(tmp_path), {"OTEL_EBPF_CONNTRACK_MAX_CONECTIONS": "5"}, {})
    assert "did you mean OTEL_EBPF_CONNTRACK_MAX_CONNECTIONS" in caplog.text


def test_kind_for_type_covers_the_stage_field_types():
    for _section, cls in _options_classes():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = config_mod.kind_for_type(hints[f.name])
            # A bare Kind would accept anything unchecked: every field needs a real parser.
            assert type(kind) is not config_mod.Kind, (cls.__name__, f.name, hints[f.name])
