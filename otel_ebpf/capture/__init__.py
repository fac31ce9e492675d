"""Kernel capture: load bpf/, attach the probes, drain the ring buffer into events.

`loader.Capture` is the stage's entry point (see its docstring for the API);
`events` holds the decoded event classes every later stage consumes; `reader` turns
raw ring-buffer records into those events. Every start-up failure raises
`CaptureError`, whose message is a one-line diagnosis plus the fix.
"""

from __future__ import annotations


class CaptureError(RuntimeError):
    """Capture cannot start here (privileges, BCC, tracefs, headers, compile, attach).

    The message is one line: what failed, and how to fix it. The CLI prints it and exits
    with its capture-impossible code; `otel-ebpf check` gives the full diagnosis.
    """


__all__ = ["CaptureError"]
