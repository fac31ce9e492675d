"""telemetry: HttpExchange -> OTLP spans and metrics (the stage API lands here)."""

from otel_ebpf.telemetry.options import TelemetryOptions

__all__ = ["TelemetryOptions"]
