"""Load empty BPF programs on the daemon's own tracepoints and hold them until SIGTERM.

usage: python -m tests.benchmark.empty_probes [--list]
Prints "attached N tracepoints: ..." on stdout when every program is attached (the
harness waits for it), then sleeps until SIGTERM/SIGINT, which detaches everything.

The tracepoint set is read from the daemon's sources rather than written here, so the
floor stays the same set as otel-ebpf's: TRACEPOINT_PROBE(cat, ev) in bpf/**/*.c|h and
"cat:ev" tracepoint strings / attach_tracepoint calls in otel_ebpf/capture/*.py.
Tracepoints this kernel lacks are skipped (the daemon skips them too).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).resolve().parent / "empty_probes.c"

C_PROBE = re.compile(r"TRACEPOINT_PROBE\s*\(\s*(\w+)\s*,\s*(\w+)\s*\)")
PY_TP = re.compile(r"""["']((?:syscalls|sock|tcp|net|sched):\w+)["']""")
# Used only when the daemon's sources name no tracepoint yet (the stage is in flux);
# it is the README's list of socket syscalls, and the run says so in its output.
DESIGN_SYSCALLS = ("accept", "accept4", "connect", "close", "read", "readv", "recvfrom",
                   "recvmsg", "recvmmsg", "write", "writev", "sendto", "sendmsg", "sendmmsg",
                   "sendfile64")


def daemon_tracepoints(repo: Path = REPO) -> tuple[list[tuple[str, str]], str]:
    """(category, event) pairs the daemon attaches, and where the list came from."""
    found: set[tuple[str, str]] = set()
    for path in sorted((repo / "bpf").rglob("*")):
        if path.suffix in (".c", ".h") and path.is_file():
            for line in path.read_text(errors="replace").splitlines():
                if line.lstrip().startswith(("//", "*", "/*", "#define")):
                    continue
                found.update(C_PROBE.findall(line))
    for path in sorted((repo / "otel_ebpf" / "capture").glob("*.py")):
        for name in PY_TP.findall(path.read_text(errors="replace")):
            cat, ev = name.split(":", 1)
            found.add((cat, ev))
    if found:
        return sorted(found), "bpf/ and otel_ebpf/capture/ sources"
    pairs = [("syscalls", "sys_%s_%s" % (kind, s)) for s in DESIGN_SYSCALLS
             for kind in ("enter", "exit")]
    return pairs, "fallback list (no tracepoint found in the daemon's sources)"


def build_source(pairs: list[tuple[str, str]]) -> tuple[str, list[str]]:
    from bcc import BPF

    lines = [TEMPLATE.read_text()]
    used: list[str] = []
    for cat, ev in pairs:
        if not BPF.tracepoint_exists(cat, ev):
            log.warning("tracepoint %s:%s does not exist on this kernel; skipped", cat, ev)
            continue
        lines.append("TRACEPOINT_PROBE(%s, %s) { return 0; }" % (cat, ev))
        used.append("%s:%s" % (cat, ev))
    return "\n".join(lines) + "\n", used


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print the tracepoints and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="empty_probes: %(message)s")
    pairs, origin = daemon_tracepoints()
    if args.list:
        print("%d tracepoints from %s" % (len(pairs), origin))
        for cat, ev in pairs:
            print("%s:%s" % (cat, ev))
        return 0
    from bcc import BPF

    text, used = build_source(pairs)
    if not used:
        print("no tracepoint of the daemon exists on this kernel", file=sys.stderr)
        return 3
    bpf = BPF(text=text)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("attached %d tracepoints (from %s): %s" % (len(used), origin, " ".join(used)),
          flush=True)
    stop.wait()
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
