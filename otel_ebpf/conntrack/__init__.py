"""Connection tracking: kernel events in, HttpExchange records out.

`ConnectionTable` (table.py) follows every connection's byte streams and drives the
HTTP/1.x framer and stitcher (otel_ebpf.protocols.http1); `ConntrackOptions`
(options.py) holds its limits; `procfs.resolve` finds addresses of connections opened
before the daemon attached.
"""

from otel_ebpf.conntrack.options import ConntrackOptions
from otel_ebpf.conntrack.table import ConnectionTable

__all__ = ["ConnectionTable", "ConntrackOptions"]
