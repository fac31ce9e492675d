"""Connection tracking: kernel events in, HttpExchange records out (see table.py)."""

from otel_ebpf.conntrack.options import ConntrackOptions

__all__ = ["ConntrackOptions"]
