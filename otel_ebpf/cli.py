"""The `otel-ebpf` command: argument parsing and exit codes only.

    otel-ebpf run      capture HTTP exchanges and export them (default: console)
    otel-ebpf top      a live table of requests/s, errors and latency per service and route
    otel-ebpf check    what this kernel and machine allow, and what follows from it
    otel-ebpf version

Exit codes: 0 success; 1 unexpected runtime error; 2 bad usage or configuration;
3 capture impossible on this machine (the diagnosis says why and how to fix it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

from otel_ebpf import __version__

EXIT_OK = 0
EXIT_RUNTIME_ERROR = 1
EXIT_CONFIG_ERROR = 2
EXIT_CAPTURE_IMPOSSIBLE = 3

log = logging.getLogger("otel_ebpf")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1-65535)")
    return value


def _pid(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a process id")
    return value


def _seconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of seconds") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a number of seconds (at least 1)")
    return value


def _add_capture_options(parser: argparse.ArgumentParser) -> None:
    """Options of every command that runs the capture pipeline (run, top): settings and
    which processes and connections to capture. A selector added here reaches both."""
    parser.add_argument("--config", metavar="PATH", help="YAML configuration file")
    parser.add_argument("--pid", type=_pid, action="append", metavar="N",
                        help="trace only this process (repeatable)")
    parser.add_argument("--port", type=_port, action="append", metavar="N",
                        help="trace only connections whose local or remote port is N "
                        "(repeatable)")
    _add_discovery_options(parser)
    parser.add_argument("--no-tls", action="store_true",
                        help="do not attach OpenSSL uprobes (plaintext capture only)")
    parser.add_argument("--no-fast-path", action="store_true",
                        help="send every connection through the chunk stream instead of "
                        "pairing requests and responses in the kernel (debugging; costs "
                        "more CPU)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))


def _add_discovery_options(parser: argparse.ArgumentParser) -> None:
    """Service discovery flags (otel_ebpf/discovery.py); the rest is in YAML."""
    parser.add_argument("--exe", action="append", metavar="PATTERN",
                        help="report only processes whose executable name matches this glob "
                        "(its path, when PATTERN has a '/'); repeatable; replaces "
                        "discovery.instrument")
    parser.add_argument("--exclude-exe", action="append", metavar="PATTERN",
                        help="never report processes whose executable matches (as --exe); "
                        "repeatable; replaces discovery.exclude_instrument")
    parser.add_argument("--no-default-excludes", action="store_true",
                        help="also report otel-ebpf itself and OpenTelemetry collectors and "
                        "backends (discovery.default_exclude_instrument: [])")


def discovery_overrides(args: argparse.Namespace) -> dict[str, object]:
    """--exe / --exclude-exe / --no-default-excludes as discovery.* keys."""
    from otel_ebpf.discovery import exe_selector

    overrides: dict[str, object] = {}
    if args.exe:
        overrides["discovery.instrument"] = [exe_selector(p) for p in args.exe]
    if args.exclude_exe:
        overrides["discovery.exclude_instrument"] = [exe_selector(p) for p in args.exclude_exe]
    if args.no_default_excludes:
        overrides["discovery.default_exclude_instrument"] = []
    return overrides


def capture_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The options of _add_capture_options as dotted YAML keys (highest precedence)."""
    pairs = {
        "capture.pids": tuple(args.pid) if args.pid else None,
        "capture.ports": tuple(args.port) if args.port else None,
        "capture.tls": False if args.no_tls else None,
        "capture.fast_path": False if args.no_fast_path else None,
        "log_level": args.log_level,
    }
    overrides = {key: value for key, value in pairs.items() if value is not None}
    overrides.update(discovery_overrides(args))
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otel-ebpf",
        description="Zero-instrumentation HTTP observability: eBPF capture of HTTP/1.x "
        "exchanges, exported as OpenTelemetry spans and metrics.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser(
        "run",
        help="capture and export HTTP exchanges",
        description="Capture every HTTP/1.x exchange on this host and export it. Settings "
        "come from defaults < YAML (--config) < environment (OTEL_*) < these options.",
    )
    _add_capture_options(run)
    run.add_argument(
        "--exporter",
        choices=("console", "jsonl", "otlp", "none"),
        help="where exchanges go (default: otlp when an OTLP endpoint is configured, "
        "else console)",
    )
    run.add_argument("--output", metavar="PATH", help="jsonl output file ('-' = stdout)")
    run.add_argument("--otlp-endpoint", metavar="URL",
                     help="OTLP endpoint (same as OTEL_EXPORTER_OTLP_ENDPOINT)")
    run.add_argument("--otlp-protocol", choices=("grpc", "http/protobuf"),
                     help="OTLP protocol (same as OTEL_EXPORTER_OTLP_PROTOCOL)")
    run.add_argument("--spool-dir", metavar="DIR",
                     help="keep OTLP payloads the collector cannot take now in DIR "
                     "(export.spool.directory; default: the daemon's state directory)")
    run.add_argument("--no-spool", action="store_true",
                     help="no on-disk export spool: a collector outage longer than the "
                     "in-memory queue loses payloads (export.spool.enabled: false)")
    run.add_argument("--health-file", metavar="PATH",
                     help="touch this file while the capture loop is alive")
    run.add_argument("--health-listen", metavar="HOST:PORT",
                     help="serve /healthz, /readyz and /stats on this local address")
    run.add_argument("--prometheus-listen", metavar="HOST:PORT",
                     help="serve Prometheus metrics on http://HOST:PORT/metrics (a bare "
                     "PORT binds 127.0.0.1; 0.0.0.0:9464 to be scraped from other hosts); "
                     "works with every --exporter")

    from otel_ebpf.top import SORT_KEYS

    top = sub.add_parser(
        "top",
        help="a live table of requests/s, errors and latency per service and route",
        description="Capture like `run` and show, per service, route and role, requests/s, "
        "error % (4xx, 5xx, timeouts, other failures) and p50/p99 latency over a sliding "
        "window, redrawn every second. Needs no collector and no configuration; keys in "
        "the live view change the sort order, q quits.",
    )
    _add_capture_options(top)
    top.add_argument("--sort", choices=tuple(SORT_KEYS), default="rps",
                     help="order of the rows (default: rps)")
    top.add_argument("--window", type=_seconds, default=10, metavar="S",
                     help="the sliding window, in whole seconds (default: 10)")
    top.add_argument("--once", action="store_true",
                     help="measure for --interval seconds, print one table and exit "
                     "(plain text when stdout is not a terminal)")
    top.add_argument("--interval", type=_seconds, default=5, metavar="S",
                     help="with --once: seconds to measure; the rates are over them "
                     "(default: 5)")

    check = sub.add_parser("check", help="diagnose what this kernel and machine allow")
    check.add_argument("--no-tls", action="store_true", help="skip the TLS library scan")
    check.add_argument("--no-compile", action="store_true",
                       help="do not compile the BPF programs (skips the kernel map memory "
                       "report)")
    sub.add_parser("version", help="print the version")
    return parser


def run_overrides(args: argparse.Namespace) -> dict[str, object]:
    """Command-line values as dotted YAML keys, the highest-precedence layer."""
    overrides = capture_overrides(args)
    pairs = {
        "output.exporter": args.exporter,
        "output.path": args.output,
        "export.otlp.endpoint": args.otlp_endpoint,
        "export.otlp.protocol": args.otlp_protocol,
        "export.spool.directory": args.spool_dir,
        "export.spool.enabled": False if args.no_spool else None,
        "health.file": args.health_file,
        "health.listen": args.health_listen,
        "export.prometheus.listen": args.prometheus_listen,
    }
    for key, value in pairs.items():
        if value is not None:
            overrides[key] = value
    return overrides


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_run(args: argparse.Namespace) -> int:
    from otel_ebpf.capture import CaptureError
    from otel_ebpf.config import ConfigError, load
    from otel_ebpf.daemon import Daemon

    try:
        config = load(args.config, os.environ, run_overrides(args))
    except ConfigError as exc:
        print(f"otel-ebpf: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    _setup_logging(config.log_level)
    from otel_ebpf.telemetry.prometheus import PrometheusError

    try:
        return Daemon(config).run()
    except CaptureError as exc:
        print(f"otel-ebpf: cannot capture: {exc}", file=sys.stderr)
        return EXIT_CAPTURE_IMPOSSIBLE
    except PrometheusError as exc:  # e.g. the address is in use: a setting to change
        print(f"otel-ebpf: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR


def cmd_top(args: argparse.Namespace) -> int:
    from otel_ebpf.capture import CaptureError
    from otel_ebpf.config import ConfigError, load
    from otel_ebpf.daemon import Daemon
    from otel_ebpf.top import TopModel, TopScreen

    if not args.once and not sys.stdout.isatty():
        print("otel-ebpf: top: stdout is not a terminal; the live table needs one "
              "(--once prints a single table to a pipe or file)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    overrides = capture_overrides(args)
    overrides["output.exporter"] = "none"  # the table is top's only output
    overrides.setdefault("log_level", "warning")  # info lines would scroll the table away
    try:
        config = load(args.config, os.environ, overrides)
    except ConfigError as exc:
        print(f"otel-ebpf: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    # top is a viewer, often beside a running daemon with the same configuration: it
    # must not take that daemon's health file or listening ports.
    config = dataclasses.replace(
        config, health=dataclasses.replace(config.health, file=None, listen=None),
        prometheus=dataclasses.replace(config.prometheus, listen=None), spool=None)
    console = None
    if args.once:
        _setup_logging(config.log_level)
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console()
        # Log records go through the live display's console, above the table.
        logging.basicConfig(level=getattr(logging, config.log_level.upper()),
                            format="%(name)s: %(message)s",
                            handlers=[RichHandler(console=console, show_path=False)])
    window = args.interval if args.once else args.window
    telemetry = config.telemetry

    def make_screen(processes) -> TopScreen:
        def service_of(pid: int) -> str:
            info = processes.get(pid)
            return info.service_name if info else "unknown_service:%d" % pid

        model = TopModel(window, service_of, telemetry.route_patterns, telemetry.max_routes,
                         telemetry.route_cache_size)
        return TopScreen(model, args.sort, once_after_s=args.interval if args.once else None,
                         console=console)

    print("otel-ebpf top: loading the eBPF programs (a few seconds)...", file=sys.stderr)
    try:
        return Daemon(config, sink_factory=make_screen).run()
    except CaptureError as exc:
        print(f"otel-ebpf: cannot capture: {exc}", file=sys.stderr)
        return EXIT_CAPTURE_IMPOSSIBLE


def cmd_check(args: argparse.Namespace) -> int:
    from otel_ebpf.preflight import capture_possible, diagnose

    _setup_logging("warning")
    checks = diagnose()
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok " if c.ok else "NO "
        print(f"[{mark}] {c.name:<{width}}  {c.detail}")
        if not c.ok:
            if c.consequence:
                print(f"      {'':<{width}}  consequence: {c.consequence}")
            if c.fix:
                print(f"      {'':<{width}}  fix: {c.fix}")
    if not args.no_tls:
        _print_tls_coverage()
    possible = capture_possible(checks)
    if possible and not args.no_compile:
        possible = _print_map_memory()
    print("capture: possible" if possible else "capture: IMPOSSIBLE on this machine (see above)")
    return EXIT_OK if possible else EXIT_CAPTURE_IMPOSSIBLE


def _print_map_memory() -> bool:
    """Compile as `run` would (settings from the environment and /etc defaults) and
    print each BPF map's kernel memory; False when the programs do not load."""
    from otel_ebpf.capture import CaptureError
    from otel_ebpf.capture.bpfmap import BPF_MAP_TYPE_RINGBUF, possible_cpus
    from otel_ebpf.capture.loader import compile_report, map_kernel_bytes
    from otel_ebpf.config import ConfigError, load

    try:
        options = load(None, os.environ, {}).capture
        report = compile_report(options)
    except (CaptureError, ConfigError) as exc:
        print(f"[NO ] BPF programs  {exc}")
        return False
    cpus = possible_cpus()
    maps = sorted(report["maps"], key=lambda m: -map_kernel_bytes(m, cpus))
    total = sum(map_kernel_bytes(m, cpus) for m in maps)
    print("[ok ] BPF programs  compiled, verified and attached in %.1f s (then released)"
          % report["compile_s"])
    print("      kernel maps   %.1f MiB in %d maps (key + value x max entries; %d possible "
          "CPUs for per-CPU maps):" % (total / 2**20, len(maps), cpus))
    for m in maps:
        size = map_kernel_bytes(m, cpus)
        if m["type"] == BPF_MAP_TYPE_RINGBUF:
            what = "ring buffer (capture.ringbuf_kib; the daemon maps it: counts in its RSS)"
        else:
            what = "%d x (%d + %d B)" % (m["max_entries"], m["key_size"], m["value_size"])
        print("        %-12s %8.1f KiB  %s" % (m["name"], size / 1024, what))
    return True


def _print_tls_coverage() -> None:
    try:
        from otel_ebpf.capture.tls import coverage_report
    except ImportError:  # TLS support not built into this version
        return
    for line in coverage_report():
        print(line)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"otel-ebpf {__version__}")
        return EXIT_OK
    if args.command == "check":
        return cmd_check(args)
    if args.command == "top":
        return cmd_top(args)
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
