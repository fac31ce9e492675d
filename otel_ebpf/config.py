"""Configuration: one frozen `Config` composed of each stage's options dataclass.

Precedence, lowest to highest (stated here once; README repeats it):

    built-in defaults  <  YAML file  <  environment variables  <  command line

- defaults: the dataclasses' own (CaptureOptions, ConntrackOptions, TelemetryOptions,
  OtlpOptions, OutputOptions, HealthOptions);
- YAML: `--config PATH`, else otel_ebpf.resources.default_config_path()
  (config/otel-ebpf.yaml in a checkout, /etc/otel-ebpf/otel-ebpf.yaml when installed).
  `null` for a key means "not set here" (the lower layers decide). Unknown keys are
  errors, with a did-you-mean;
- environment: the standard OTEL_* variables where one exists (OTEL_EXPORTER_OTLP_*,
  their per-signal OTEL_EXPORTER_OTLP_{TRACES,METRICS}_* forms, OTEL_BSP_*,
  OTEL_METRIC_EXPORT_INTERVAL, OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE,
  OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION, OTEL_SDK_DISABLED,
  OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER, OTEL_LOG_LEVEL), and for every key
  OTEL_EBPF_<KEY> (the dotted YAML key upper-cased, dots -> underscores, e.g.
  conntrack.max_connections -> OTEL_EBPF_CONNTRACK_MAX_CONNECTIONS);
- command line: `overrides`, keyed by dotted YAML key ({"output.exporter": "jsonl"}).

Within one layer a per-signal OTLP setting (export.otlp.traces.endpoint,
OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) beats the generic one; across layers the higher
layer wins. Units: YAML keys ending in `_s` are seconds; the OTEL_* variables keep their
specified units (milliseconds for timeouts and intervals) and are converted.

Every problem raises `ConfigError` naming the YAML key, the environment variable, where
the bad value came from and what is allowed, e.g.
  export.otlp.protocol: 'grpcc' is not allowed (from OTEL_EXPORTER_OTLP_PROTOCOL);
  use one of: grpc, http/protobuf
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import logging
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlparse

from otel_ebpf.conntrack.options import ConntrackOptions
from otel_ebpf.discovery import DiscoveryOptions, SelectorError, parse_selectors
from otel_ebpf.export import (
    COMPRESSIONS,
    DEFAULT_GRPC_ENDPOINT,
    DEFAULT_HTTP_ENDPOINT,
    PROTOCOLS,
    OtlpOptions,
    OtlpSignalOptions,
    SpoolOptions,
)
from otel_ebpf.telemetry.options import TelemetryOptions

try:  # the kernel engineer's stage; absent in early checkouts
    from otel_ebpf.capture.loader import CaptureOptions
except ImportError:  # pragma: no cover - depends on what is checked out
    CaptureOptions = None  # type: ignore[assignment,misc]

log = logging.getLogger(__name__)

EXPORTERS: tuple[str, ...] = ("console", "jsonl", "otlp", "none")
LOG_LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error")
ENV_PREFIX = "OTEL_EBPF_"
# OTEL_EBPF_* variables read elsewhere, not configuration keys.
_FOREIGN_ENV = frozenset({"OTEL_EBPF_BPF_DIR", "OTEL_EBPF_VENV"})


class ConfigError(ValueError):
    """A configuration value the daemon cannot start with; the message says the fix."""


@dataclass(frozen=True, slots=True)
class OutputOptions:
    # console | jsonl | otlp | none. Default: otlp when an OTLP endpoint is configured
    # (OTEL_EXPORTER_OTLP_ENDPOINT, ..._TRACES_ENDPOINT, or export.otlp.*endpoint), else
    # console, so that the daemon shows something without a collector.
    exporter: Literal["console", "jsonl", "otlp", "none"] = "console"
    path: str = "-"  # jsonl destination; "-" = stdout
    stats_interval_s: float = 10.0  # periodic stats line; 0 disables it


@dataclass(frozen=True, slots=True)
class HealthOptions:
    file: str | None = None  # touched periodically while the capture loop is alive
    listen: str | None = None  # HOST:PORT serving /healthz, /readyz, /stats (localhost)


@dataclass(frozen=True, slots=True)
class PrometheusOptions:
    listen: str | None = None  # HOST:PORT serving /metrics for Prometheus; None = off


@dataclass(frozen=True, slots=True)
class Config:
    capture: Any  # otel_ebpf.capture.loader.CaptureOptions (None if that stage is absent)
    conntrack: ConntrackOptions
    telemetry: TelemetryOptions
    otlp: OtlpOptions
    spool: SpoolOptions | None = None  # export.spool.*; None when disabled
    output: OutputOptions = field(default_factory=OutputOptions)
    health: HealthOptions = field(default_factory=HealthOptions)
    prometheus: PrometheusOptions = field(default_factory=PrometheusOptions)
    log_level: str = "info"
    discovery: DiscoveryOptions = field(default_factory=DiscoveryOptions)
    source: str | None = None  # the YAML file read, if any


# ---------------------------------------------------------------------------------------
# Value kinds: parse a YAML value (already typed) or an environment string.


class _Invalid(Exception):
    # fix None: `problem` is the whole message, naming the key itself (selector items).
    def __init__(self, problem: str, fix: str | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.fix = fix


class Kind:
    describe = "a value"

    def parse(self, value: object, from_env: bool) -> object:
        return value


class BoolKind(Kind):
    describe = "true or false"
    _TRUE = ("true", "1", "yes", "on")
    _FALSE = ("false", "0", "no", "off")

    def parse(self, value, from_env):
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            low = value.strip().lower()
            if low in self._TRUE:
                return True
            if low in self._FALSE:
                return False
        raise _Invalid("is not a boolean", "use true or false")


class NumberKind(Kind):
    def __init__(self, integer: bool, minimum: float | None = None,
                 env_scale: float = 1.0, env_unit: str = "",
                 maximum: float | None = None) -> None:
        self.integer = integer
        self.minimum = minimum
        self.maximum = maximum
        self.env_scale = env_scale  # env value * scale = field value (ms -> s: 0.001)
        self.env_unit = env_unit

    @property
    def describe(self):  # type: ignore[override]
        what = "a whole number" if self.integer else "a number"
        if self.minimum is not None and self.maximum is not None:
            return "%s from %g to %g" % (what, self.minimum, self.maximum)
        return what if self.minimum is None else "%s >= %g" % (what, self.minimum)

    def parse(self, value, from_env):
        if isinstance(value, bool):
            raise _Invalid("is not a number", "use " + self.describe)
        number: float
        if isinstance(value, (int, float)):
            number = value
        elif isinstance(value, str):
            text = value.strip()
            try:
                number = int(text)
            except ValueError:
                try:
                    number = float(text)
                except ValueError:
                    raise _Invalid("is not a number", "use " + self.describe + (
                        " (%s)" % self.env_unit if from_env and self.env_unit else "")) from None
        else:
            raise _Invalid("is not a number", "use " + self.describe)
        if from_env and self.env_scale != 1.0:
            number = number * self.env_scale
        if self.integer:
            if float(number) != int(number):
                raise _Invalid("is not a whole number", "use " + self.describe)
            number = int(number)
        else:
            number = float(number)
        too_small = self.minimum is not None and number < self.minimum
        if too_small or (self.maximum is not None and number > self.maximum):
            raise _Invalid("is too small" if too_small else "is too large",
                           "use " + self.describe + (
                               " (%s)" % self.env_unit if from_env and self.env_unit else ""))
        return number


class StrKind(Kind):
    describe = "a string"

    def __init__(self, optional: bool = False, check: Callable[[str], None] | None = None,
                 describe: str | None = None) -> None:
        self.optional = optional
        self.check = check
        if describe:
            self.describe = describe

    def parse(self, value, from_env):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise _Invalid("is not a string", "use " + self.describe)
        value = value.strip()
        if not value and self.optional:
            return None
        if self.check is not None:
            self.check(value)
        return value


class ChoiceKind(Kind):
    def __init__(self, choices: tuple[object, ...], aliases: Mapping[str, object] | None = None,
                 lower: bool = True) -> None:
        self.choices = choices
        self.aliases = dict(aliases or {})
        self.lower = lower

    @property
    def describe(self):  # type: ignore[override]
        return "one of: " + ", ".join(str(c) for c in self.choices)

    def parse(self, value, from_env):
        key = value.strip().lower() if isinstance(value, str) and self.lower else value
        if key in self.aliases:
            return self.aliases[key]
        for choice in self.choices:
            if key == choice or (isinstance(choice, enum.Enum) and key == choice.value):
                return choice
            if isinstance(choice, enum.Enum) and isinstance(key, str) and key == choice.name.lower():
                return choice
        raise _Invalid("is not allowed", "use " + self.describe)


class ListKind(Kind):
    """A list: YAML sequence, or a comma-separated string (environment)."""

    def __init__(self, item: Kind, as_set: bool = False, none_if_empty: bool = False) -> None:
        self.item = item
        self.as_set = as_set
        self.none_if_empty = none_if_empty

    @property
    def describe(self):  # type: ignore[override]
        return "a list of %s (comma-separated in the environment)" % self.item.describe

    def parse(self, value, from_env):
        if isinstance(value, str):
            items: list = [v for v in (p.strip() for p in value.split(",")) if v]
        elif isinstance(value, (list, tuple, set, frozenset)):
            items = list(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            items = [value]
        else:
            raise _Invalid("is not a list", "use " + self.describe)
        try:
            parsed = [self.item.parse(v, from_env) for v in items]
        except _Invalid as exc:
            raise _Invalid("has an item that " + exc.problem, exc.fix) from None
        if not parsed and self.none_if_empty:
            return None
        return frozenset(parsed) if self.as_set else tuple(parsed)


class HeadersKind(Kind):
    describe = "key=value pairs: a YAML mapping, or 'k1=v1,k2=v2' (values URL-encoded)"

    # RFC 9110 token: what a header name may contain (gRPC metadata keys likewise).
    _NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")

    def parse(self, value, from_env):
        headers = self._parse(value)
        for name, _ in headers:
            if not self._NAME.match(name):
                raise _Invalid("has an invalid header name %r" % name,
                               "use letters, digits and - in header names")
        return headers

    def _parse(self, value):
        if isinstance(value, Mapping):
            return tuple((str(k).strip(), "" if v is None else str(v)) for k, v in value.items())
        if not isinstance(value, str):
            raise _Invalid("is not a set of headers", "use " + self.describe)
        headers = []
        # W3C Baggage-like format (OTLP exporter spec): values are percent-decoded.
        for member in value.split(","):
            if not member.strip():
                continue
            name, sep, val = member.partition("=")
            name = name.strip()
            if not sep or not name:
                raise _Invalid("has a member %r that is not key=value" % member.strip(),
                               "use " + self.describe)
            headers.append((unquote(name), unquote(val.strip())))
        return tuple(headers)


class SelectorsKind(Kind):
    """discovery.* selector lists (otel_ebpf/discovery.py): a YAML list of mappings, or
    the same as a YAML/JSON string in the environment."""

    describe = "a list of selectors, e.g. [{exe_name: nginx}, {open_ports: 8000-8099}]"

    def __init__(self, key: str) -> None:
        self.key = key

    def parse(self, value, from_env):
        try:
            return parse_selectors(value, self.key)
        except SelectorError as exc:
            raise _Invalid(str(exc), None) from None  # the message names the item's key


def _existing_file(value: str) -> None:
    if not os.path.isfile(value):
        raise _Invalid("is not a readable file", "give the path of an existing PEM file")


def _listen_address(value: str) -> None:
    from otel_ebpf.health import HealthError, parse_listen

    try:
        parse_listen(value)
    except HealthError as exc:
        raise _Invalid("is not a listen address", str(exc)) from None


def _prometheus_listen(value: str) -> None:
    from otel_ebpf.telemetry.prometheus import ListenError, parse_listen

    try:
        parse_listen(value)
    except ListenError as exc:
        raise _Invalid(exc.problem, exc.fix) from None


def _endpoint(value: str) -> None:
    if "://" in value:
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise _Invalid("is not an http:// or https:// URL",
                           "use e.g. http://collector:4317 (gRPC) or "
                           "http://collector:4318 (HTTP/protobuf)")
    elif ":" not in value:
        raise _Invalid("has no port", "use e.g. http://collector:4317 or collector:4317")


def _spool_directory(value: str) -> None:
    from otel_ebpf.spool import writable_or_creatable

    if not writable_or_creatable(Path(value)):
        raise _Invalid("is not a directory this user can create or write",
                       "give a writable directory (or leave it null for the daemon's state "
                       "directory), or set export.spool.enabled: false")


def kind_for_type(tp: object) -> Kind:
    """A Kind from a dataclass field's type hint (for the stages' options classes)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        inner = kind_for_type(rest[0] if len(rest) == 1 else typing.Union[rest])
        if isinstance(inner, StrKind):
            return StrKind(optional=True)
        if isinstance(inner, ListKind):
            return ListKind(inner.item, inner.as_set, none_if_empty=True)
        return _Optional(inner)
    if tp is bool:
        return BoolKind()
    if tp is int:
        return NumberKind(integer=True)
    if tp is float:
        return NumberKind(integer=False)
    if tp is str:
        return StrKind()
    if origin is Literal:
        return ChoiceKind(args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return ChoiceKind(tuple(tp))
    if origin in (tuple, frozenset, set, list) and args:
        return ListKind(kind_for_type(args[0]), as_set=origin in (frozenset, set))
    return Kind()


class _Optional(Kind):
    def __init__(self, inner: Kind) -> None:
        self.inner = inner
        self.describe = inner.describe + " or null"

    def parse(self, value, from_env):
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        return self.inner.parse(value, from_env)


# ---------------------------------------------------------------------------------------
# The settings table: every YAML key, its kind, its environment variables.


@dataclass(frozen=True)
class Setting:
    key: str  # dotted YAML key
    kind: Kind
    # Standard variables, most specific first; OTEL_EBPF_<KEY> is always read too,
    # after them. A (name, kind) pair gives the variable its own unit/format.
    env: tuple[str | tuple[str, Kind], ...] = ()

    @property
    def own_env(self) -> str:
        return ENV_PREFIX + self.key.upper().replace(".", "_")

    def env_vars(self) -> list[tuple[str, Kind]]:
        out = [(e, self.kind) if isinstance(e, str) else e for e in self.env]
        out.append((self.own_env, self.kind))
        return out

    def env_names(self) -> str:
        return ", ".join(name for name, _ in self.env_vars())


_MS = dict(env_scale=0.001, env_unit="milliseconds in the environment")

# Foreign sections: YAML section -> (options class, fields not configurable there,
# standard variables per field).
_TELEMETRY_ENV: dict[str, tuple[str | tuple[str, Kind], ...]] = {
    "span_batch_size": ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE",),
    "span_schedule_delay_s": (("OTEL_BSP_SCHEDULE_DELAY",
                               NumberKind(False, 0.001, **_MS)),),
    "span_queue_size": ("OTEL_BSP_MAX_QUEUE_SIZE",),
    "metric_export_interval_s": (("OTEL_METRIC_EXPORT_INTERVAL",
                                  NumberKind(False, 0.001, **_MS)),),
    "metrics_temporality": ("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE",),
    "histogram_aggregation": ("OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION",),
}
_MINIMUMS: dict[str, float] = {
    # Numbers that make no sense below these; the stages check the rest themselves.
    "max_buffer_bytes": 1, "max_connections": 1, "idle_timeout_s": 0.001,
    "request_timeout_s": 0.001, "max_header_bytes": 1, "max_pending_requests": 1,
    "max_resync_bytes": 0, "body_prefix_bytes": 0, "max_routes": 1, "route_cache_size": 1,
    "span_batch_size": 1, "span_queue_size": 1, "span_schedule_delay_s": 0.001,
    "metric_export_interval_s": 0.001, "metric_cardinality_limit": 1,
    "exponential_max_size": 1,
    "max_capture_bytes": 16, "ringbuf_kib": 64, "max_kernel_connections": 1, "max_iovecs": 1,
    "pids": 1, "ports": 1,
}
_MAXIMUMS: dict[str, float] = {"max_capture_bytes": 16384, "max_iovecs": 16, "ports": 65535}


def _foreign_settings(section: str, cls: type, exclude: frozenset[str] = frozenset(),
                      env: Mapping[str, tuple] | None = None) -> list[Setting]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name in exclude:
            continue
        kind = kind_for_type(hints.get(f.name, object))
        number = kind.item if isinstance(kind, ListKind) else kind
        if isinstance(number, NumberKind):
            number.minimum = _MINIMUMS.get(f.name, number.minimum)
            number.maximum = _MAXIMUMS.get(f.name, number.maximum)
        out.append(Setting("%s.%s" % (section, f.name), kind, tuple((env or {}).get(f.name, ()))))
    return out


_SIGNAL_FIELDS: tuple[tuple[str, Kind, str], ...] = (
    # (field, kind, standard variable suffix)
    ("protocol", ChoiceKind(PROTOCOLS), "PROTOCOL"),
    ("endpoint", StrKind(optional=True, check=_endpoint, describe="a URL"), "ENDPOINT"),
    ("headers", HeadersKind(), "HEADERS"),
    ("timeout_s", NumberKind(False, 0.001), "TIMEOUT"),
    ("compression", ChoiceKind(COMPRESSIONS), "COMPRESSION"),
    ("certificate", StrKind(optional=True, check=_existing_file, describe="a file path"),
     "CERTIFICATE"),
    ("client_key", StrKind(optional=True, check=_existing_file, describe="a file path"),
     "CLIENT_KEY"),
    ("client_certificate", StrKind(optional=True, check=_existing_file,
                                   describe="a file path"), "CLIENT_CERTIFICATE"),
    ("insecure", BoolKind(), "INSECURE"),
)


def _signal_env(field_name: str, kind: Kind, suffix: str, signal: str | None):
    name = "OTEL_EXPORTER_OTLP_%s%s" % ("%s_" % signal.upper() if signal else "", suffix)
    if field_name == "timeout_s":  # the spec's unit is milliseconds
        return ((name, NumberKind(False, 0.001, **_MS)),)
    return (name,)


def _otlp_settings() -> list[Setting]:
    out = []
    for signal in (None, "traces", "metrics"):
        prefix = "export.otlp." + (signal + "." if signal else "")
        for name, kind, suffix in _SIGNAL_FIELDS:
            env = _signal_env(name, kind, suffix, signal)
            if signal == "traces" and name == "timeout_s":
                # The batch span processor's export timeout is the traces call timeout.
                env = env + (("OTEL_BSP_EXPORT_TIMEOUT", NumberKind(False, 0.001, **_MS)),)
            out.append(Setting(prefix + name, kind, env))
    out += [
        Setting("export.otlp.max_queue_payloads", NumberKind(True, 1)),
        Setting("export.otlp.max_queue_bytes", NumberKind(True, 1024)),
        Setting("export.otlp.retry_max_elapsed_s", NumberKind(False, 0)),
        Setting("export.otlp.retry_initial_backoff_s", NumberKind(False, 0.001)),
        Setting("export.otlp.retry_max_backoff_s", NumberKind(False, 0.001)),
        Setting("export.spool.enabled", BoolKind()),
        Setting("export.spool.directory", StrKind(optional=True, check=_spool_directory,
                                                  describe="a directory path")),
        Setting("export.spool.max_bytes", NumberKind(True, 65536)),
        Setting("export.spool.max_age_s", NumberKind(False, 1)),
    ]
    return out


def _capture_settings() -> list[Setting]:
    if CaptureOptions is None:
        return []
    return _foreign_settings("capture", CaptureOptions)


def settings() -> list[Setting]:
    """Every configuration key, in the order of the shipped YAML file."""
    out: list[Setting] = [Setting("log_level", ChoiceKind(LOG_LEVELS, {
        "warn": "warning", "trace": "debug", "fatal": "error", "critical": "error"}),
        ("OTEL_LOG_LEVEL",))]
    out += _capture_settings()
    if not any(s.key == "capture.ports" for s in out):
        out.append(Setting("capture.ports", ListKind(NumberKind(True, 1, maximum=65535), as_set=True,
                                                     none_if_empty=True)))
    out += _foreign_settings("conntrack", ConntrackOptions, exclude=frozenset({"ports"}))
    out += _foreign_settings("telemetry", TelemetryOptions, env=_TELEMETRY_ENV)
    out += _otlp_settings()
    out.append(Setting("export.prometheus.listen", StrKind(
        optional=True, check=_prometheus_listen, describe="HOST:PORT or PORT")))
    out += [
        Setting("output.exporter", _Optional(ChoiceKind(EXPORTERS))),
        Setting("output.path", StrKind()),
        Setting("output.stats_interval_s", NumberKind(False, 0)),
        Setting("health.file", StrKind(optional=True)),
        Setting("health.listen", StrKind(optional=True, check=_listen_address,
                                         describe="HOST:PORT or PORT")),
    ]
    out += [Setting("discovery." + name, SelectorsKind("discovery." + name))
            for name in ("instrument", "exclude_instrument", "default_exclude_instrument")]
    return out


# ---------------------------------------------------------------------------------------
# Loading.


@dataclass
class _Layer:
    name: str  # how error messages name it
    values: dict[str, object]
    env_name: dict[str, str] = field(default_factory=dict)  # key -> variable it came from
    from_env: bool = False


def _flatten(tree: Mapping, prefix: str, out: dict[str, object], known: set[str],
             sections: set[str], source: str) -> None:
    for raw_key, value in tree.items():
        key = prefix + str(raw_key)
        if key in known:
            out[key] = value
        elif key in sections:
            if value is None:
                continue
            if not isinstance(value, Mapping):
                raise ConfigError("%s: must be a mapping of keys (from %s), not %r"
                                  % (key, source, value))
            _flatten(value, key + ".", out, known, sections, source)
        else:
            candidates = sorted(known | sections)
            close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
            hint = "; did you mean %s?" % close[0] if close else ""
            siblings = sorted({c[len(prefix):].split(".")[0] for c in candidates
                               if c.startswith(prefix)})
            raise ConfigError("%s: unknown key (from %s)%s; known keys here: %s"
                              % (key, source, hint, ", ".join(siblings)))


def _read_yaml(path: Path, known: set[str], sections: set[str]) -> dict[str, object]:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("cannot read config file %s: %s; fix the path given to --config"
                          % (path, exc.strerror or exc)) from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = " line %d column %d" % (mark.line + 1, mark.column + 1) if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError("config file %s:%s is not valid YAML: %s" % (path, where, problem)) \
            from None
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise ConfigError("config file %s must hold a mapping of sections (capture:, "
                          "export:, ...), not a %s" % (path, type(tree).__name__))
    out: dict[str, object] = {}
    _flatten(tree, "", out, known, sections, str(path))
    return {k: v for k, v in out.items() if v is not None}


def _env_layer(table: list[Setting], environ: Mapping[str, str]) -> _Layer:
    layer = _Layer("the environment", {}, from_env=True)
    by_key = {s.key: s for s in table}
    for s in table:
        for name, _kind in s.env_vars():
            raw = environ.get(name)
            if raw is not None and raw.strip() != "":
                layer.values[s.key] = raw
                layer.env_name[s.key] = name
                break
    # OTEL_SDK_DISABLED / OTEL_{TRACES,METRICS}_EXPORTER select signals and the exporter.
    disabled = environ.get("OTEL_SDK_DISABLED", "").strip().lower()
    if disabled:
        if disabled not in ("true", "false"):
            raise ConfigError("OTEL_SDK_DISABLED: %r is not allowed; use true or false" % disabled)
        if disabled == "true":
            for key in ("telemetry.spans_enabled", "telemetry.metrics_enabled"):
                if key in by_key:
                    layer.values.setdefault(key, "false")
                    layer.env_name.setdefault(key, "OTEL_SDK_DISABLED")
    for var, enabled_key in (("OTEL_TRACES_EXPORTER", "telemetry.spans_enabled"),
                             ("OTEL_METRICS_EXPORTER", "telemetry.metrics_enabled")):
        value = environ.get(var, "").strip().lower()
        if not value:
            continue
        names = [v.strip() for v in value.split(",") if v.strip()]
        bad = [v for v in names if v not in ("otlp", "console", "none")]
        if bad:
            raise ConfigError("%s: %r is not allowed (from %s); use one of: otlp, console, none"
                              % (enabled_key if enabled_key in by_key else var, value, var))
        if names == ["none"]:
            if enabled_key in by_key:
                layer.values.setdefault(enabled_key, "false")
                layer.env_name.setdefault(enabled_key, var)
        elif "output.exporter" not in layer.values:
            layer.values["output.exporter"] = "otlp" if "otlp" in names else "console"
            layer.env_name["output.exporter"] = var
    known_env = {name for s in table for name, _ in s.env_vars()} | _FOREIGN_ENV
    for name in environ:
        if name.startswith(ENV_PREFIX) and name not in known_env:
            close = difflib.get_close_matches(name, sorted(known_env), n=1, cutoff=0.8)
            log.warning("environment variable %s is not an otel-ebpf setting; ignored%s",
                        name, " (did you mean %s?)" % close[0] if close else "")
    return layer


def _resolve(table: list[Setting], layers: list[_Layer]) -> dict[str, object]:
    """key -> parsed value, from the highest layer that sets it."""
    values: dict[str, object] = {}
    for s in table:
        for layer in reversed(layers):
            if s.key not in layer.values:
                continue
            raw = layer.values[s.key]
            env_name = layer.env_name.get(s.key)
            kind = dict(s.env_vars()).get(env_name, s.kind) if env_name else s.kind
            try:
                values[s.key] = kind.parse(raw, layer.from_env)
            except _Invalid as exc:
                source = env_name or layer.name
                also = "" if env_name else "; environment: %s" % s.env_names()
                if exc.fix is None:
                    raise ConfigError("%s (from %s%s)" % (exc.problem, source, also)) from None
                raise ConfigError("%s: %r %s (from %s%s); %s"
                                  % (s.key, raw, exc.problem, source, also, exc.fix)) from None
            values["@" + s.key] = layers.index(layer)  # which layer won, for OTLP merging
            break
    return values


def _build(cls, section: str, values: dict[str, object],
           extra: Mapping[str, object] | None = None):
    """cls(**) from the `section.<field>` values that were set, plus `extra`."""
    keys = {f.name: "%s.%s" % (section, f.name) for f in dataclasses.fields(cls)}
    kwargs = {name: values[key] for name, key in keys.items() if key in values}
    kwargs.update(extra or {})
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError("%s: %s; check the %s.* keys (YAML) and their OTEL_EBPF_%s_* "
                          "variables" % (section, exc, section, section.upper())) from None


def _signal_options(signal: str, values: dict[str, object]) -> OtlpSignalOptions:
    kwargs: dict[str, object] = {}
    for name, _kind, _suffix in _SIGNAL_FIELDS:
        specific, generic = "export.otlp.%s.%s" % (signal, name), "export.otlp." + name
        # The higher layer wins; within a layer the per-signal key does.
        candidates = [(values["@" + k], k == specific, k) for k in (specific, generic)
                      if k in values]
        if candidates:
            kwargs[name] = values[max(candidates)[2]]
            if name == "endpoint":
                kwargs["_endpoint_is_generic"] = max(candidates)[2] == generic
    protocol = kwargs.get("protocol", OtlpSignalOptions().protocol)
    endpoint = kwargs.pop("endpoint", None)
    generic = kwargs.pop("_endpoint_is_generic", False)
    if endpoint is None:
        endpoint = DEFAULT_GRPC_ENDPOINT if protocol == "grpc" else (
            DEFAULT_HTTP_ENDPOINT + "/v1/" + signal)
    elif protocol == "http/protobuf" and generic:
        # Spec: the generic endpoint is a base URL; the signal path is appended to it.
        endpoint = endpoint.rstrip("/") + "/v1/" + signal
    if protocol == "http/protobuf" and "://" not in str(endpoint):
        raise ConfigError("export.otlp.%sendpoint: %r needs http:// or https:// with "
                          "protocol http/protobuf (environment: OTEL_EXPORTER_OTLP_%sENDPOINT)"
                          % ("" if generic else signal + ".", endpoint,
                             "" if generic else signal.upper() + "_"))
    kwargs["endpoint"] = endpoint
    if kwargs.get("client_key") and not kwargs.get("client_certificate"):
        raise ConfigError("export.otlp.%s.client_key is set without client_certificate "
                          "(environment: OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE); set both for "
                          "mutual TLS, or neither" % signal)
    return OtlpSignalOptions(**kwargs)  # type: ignore[arg-type]


def _validate_capture(capture, values: Mapping[str, object], layers: list[_Layer]) -> None:
    """The capture stage's own checks (powers of two, verifier bounds), reported with
    where the value came from and its variable."""
    from otel_ebpf.capture import CaptureError
    from otel_ebpf.capture.loader import validate

    try:
        validate(capture)
    except CaptureError as exc:
        message = str(exc)
        key = message.split("=", 1)[0].split(" ", 1)[0]
        setting = {s.key: s for s in settings()}.get(key)
        if setting is None:
            raise ConfigError(message) from None
        layer_index = values.get("@" + key)
        env_name = None
        if isinstance(layer_index, int):
            layer = layers[layer_index]
            env_name = layer.env_name.get(key)
            source = env_name or layer.name
        else:
            source = "the default"
        also = "" if env_name else "; environment: %s" % setting.env_names()
        raise ConfigError("%s (from %s%s)" % (message, source, also)) from None


def _warn_port_protocol_mismatch(otlp: OtlpOptions, values: Mapping[str, object]) -> None:
    """4317 is the collector's gRPC port, 4318 its HTTP one: a mismatch is almost always
    a forgotten OTEL_EXPORTER_OTLP_PROTOCOL (whose default, per the spec, is
    http/protobuf). Not an error: a collector may listen anywhere."""
    for signal, opts in (("traces", otlp.traces), ("metrics", otlp.metrics)):
        try:
            port = urlparse(opts.endpoint if "://" in opts.endpoint
                            else "//" + opts.endpoint).port
        except ValueError:
            continue
        expected = {4317: "grpc", 4318: "http/protobuf"}.get(port or 0)
        if expected and expected != opts.protocol:
            log.warning(
                "OTLP %s endpoint %s uses port %d, the collector's %s port, but the protocol "
                "is %s%s; set OTEL_EXPORTER_OTLP_PROTOCOL=%s (or export.otlp.protocol) if "
                "that is what it serves", signal, opts.endpoint, port, expected, opts.protocol,
                "" if "export.otlp.protocol" in values or
                "export.otlp.%s.protocol" % signal in values else " (the default)", expected)


def _spool_options(values: Mapping[str, object],
                   environ: Mapping[str, str]) -> SpoolOptions | None:
    """export.spool.*: on by default, in the daemon's state directory unless set."""
    if not values.get("export.spool.enabled", True):
        return None
    directory = values.get("export.spool.directory")
    source = "export.spool.directory"
    if directory is None:
        from otel_ebpf.spool import default_directory

        path, source = default_directory(environ)
        directory = str(path)
    defaults = SpoolOptions(directory="")
    return SpoolOptions(
        directory=str(directory),
        max_bytes=values.get("export.spool.max_bytes", defaults.max_bytes),  # type: ignore[arg-type]
        max_age_s=values.get("export.spool.max_age_s", defaults.max_age_s),  # type: ignore[arg-type]
        directory_source=source)


def _port_set(ports: object) -> frozenset[int] | None:
    if ports is None:
        return None
    return frozenset(ports)  # type: ignore[arg-type]


def load(config_path: str | None = None, environ: Mapping[str, str] | None = None,
         overrides: Mapping[str, object] | None = None) -> Config:
    """Compose the Config from defaults, YAML, environment and command line (in that
    order of precedence); raises ConfigError with an actionable message."""
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    table = settings()
    known = {s.key for s in table}
    sections = {".".join(k.split(".")[:i]) for k in known for i in range(1, k.count(".") + 1)}

    path: Path | None
    if config_path is not None:
        path = Path(config_path)
    else:
        from otel_ebpf.resources import default_config_path

        path = default_config_path()
    file_values = _read_yaml(path, known, sections) if path is not None else {}

    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            raise ConfigError("%s: unknown key (from the command line)%s"
                              % (key, "; did you mean %s?" % close[0] if close else ""))
    layers = [
        _Layer("config file %s" % path, file_values),
        _env_layer(table, environ),
        _Layer("the command line", {k: v for k, v in overrides.items() if v is not None}),
    ]
    values = _resolve(table, layers)

    capture = None
    if CaptureOptions is not None:
        capture = _build(CaptureOptions, "capture", values)
        _validate_capture(capture, values, layers)
    conntrack = _build(ConntrackOptions, "conntrack", values,
                       {"ports": _port_set(values.get("capture.ports"))})
    telemetry = _build(TelemetryOptions, "telemetry", values)
    otlp_kwargs = {k.rsplit(".", 1)[1]: values[k] for k in (
        "export.otlp.max_queue_payloads", "export.otlp.max_queue_bytes",
        "export.otlp.retry_max_elapsed_s", "export.otlp.retry_initial_backoff_s",
        "export.otlp.retry_max_backoff_s") if k in values}
    otlp = OtlpOptions(traces=_signal_options("traces", values),
                       metrics=_signal_options("metrics", values), **otlp_kwargs)
    _warn_port_protocol_mismatch(otlp, values)
    spool = _spool_options(values, environ)

    exporter = values.get("output.exporter")
    if exporter is None:
        endpoint_keys = ("export.otlp.endpoint", "export.otlp.traces.endpoint",
                         "export.otlp.metrics.endpoint")
        exporter = "otlp" if any(k in values for k in endpoint_keys) else "console"
    output_defaults = OutputOptions()
    output = OutputOptions(
        exporter=exporter,  # type: ignore[arg-type]
        path=values.get("output.path", output_defaults.path),  # type: ignore[arg-type]
        stats_interval_s=values.get("output.stats_interval_s",  # type: ignore[arg-type]
                                    output_defaults.stats_interval_s),
    )
    health = HealthOptions(file=values.get("health.file"),  # type: ignore[arg-type]
                           listen=values.get("health.listen"))  # type: ignore[arg-type]
    discovery = _build(DiscoveryOptions, "discovery", values)
    prometheus = PrometheusOptions(
        listen=values.get("export.prometheus.listen"))  # type: ignore[arg-type]
    if (prometheus.listen and output.exporter == "otlp"
            and telemetry.metrics_temporality != "cumulative"):
        raise ConfigError(
            "export.prometheus.listen needs telemetry.metrics_temporality: cumulative with "
            "the otlp exporter, not %r (environment: "
            "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE): Prometheus reads cumulative "
            "series, and a delta export resets them; set cumulative, or drop "
            "--prometheus-listen" % telemetry.metrics_temporality)
    return Config(
        capture=capture, conntrack=conntrack, telemetry=telemetry, otlp=otlp, spool=spool,
        output=output,
        health=health, prometheus=prometheus,
        log_level=values.get("log_level", "info"),  # type: ignore[arg-type]
        discovery=discovery,
        source=str(path) if path is not None else None,
    )
