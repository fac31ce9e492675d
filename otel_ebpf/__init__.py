"""otel-ebpf: zero-instrumentation HTTP observability from eBPF to OpenTelemetry."""

__version__ = "0.1.0"
