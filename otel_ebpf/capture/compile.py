"""The compile step: a short-lived process that compiles, loads and attaches with BCC,
hands the file descriptors to the daemon, and leaves.

Run by Capture.start() (never by hand) as

    python -m otel_ebpf.capture.compile FD

where FD is this process's end of a SOCK_SEQPACKET socketpair. Protocol, one message
each way:
- daemon -> here: JSON {"options": CaptureOptions fields, "self_tgid": daemon pid,
  "log_level": "INFO"}.
- here -> daemon, on success: JSON HANDOVER (below) with SCM_RIGHTS carrying, in this
  order, one fd per entry of "maps", of "attachments" and of "programs":
      {"ok": true, "features": {...}, "compile_s": 6.1,
       "maps": [{"name", "type", "key_size", "value_size", "max_entries"}, ...],
       "attachments": ["syscalls:sys_enter_read", ...],   # tracepoint perf events
       "programs": ["tls_enter_read", ...]}               # loaded, not attached
  on failure: {"ok": false, "error": "<the CaptureError text>"}; then exit 3.

Why a process: BCC's compiler (libLLVM + libclang-cpp, ~83 MB resident) is mapped by
`import bcc` and never unmapped; here it lives for the seconds compiling takes. A fresh
interpreter (not a fork of the daemon) so no lock held by another daemon thread is
inherited. The attachments are file descriptors, so the daemon holding copies keeps
them; this process leaves with os._exit so BCC's atexit cleanup does not detach them.
If it dies before handing over, its fds close and nothing stays attached; if the
daemon dies first, PR_SET_PDEATHSIG kills this process too.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os
import platform
import socket
import sys
import time

from otel_ebpf.capture import CaptureError

log = logging.getLogger("otel_ebpf.capture.compile")

EXIT_CAPTURE_IMPOSSIBLE = 3  # as the CLI's
MAX_MESSAGE = 1 << 20
# SCM_MAX_FD in the kernel: one message carries at most this many descriptors.
MAX_FDS = 253
PR_SET_PDEATHSIG = 1


def options_to_json(options) -> dict:
    # JSON has no sets (capture.ports): sorted lists, made sets again on the other side
    return {k: sorted(v) if isinstance(v, (set, frozenset)) else v
            for k, v in dataclasses.asdict(options).items()}


def options_from_json(data: dict):
    from otel_ebpf.capture.loader import CaptureOptions

    fields = {f.name: str(f.type) for f in dataclasses.fields(CaptureOptions)}
    values = {k: (frozenset(v) if fields[k].startswith("frozenset") else tuple(v))
              if isinstance(v, list) else v for k, v in data.items() if k in fields}
    return CaptureOptions(**values)


def compile_and_attach(options, self_tgid: int) -> tuple[dict, list[int]]:
    """What Capture.start() did in-process before: the HANDOVER dict and its fds."""
    from otel_ebpf import preflight
    from otel_ebpf.capture.loader import MAIN_SOURCE, Capture, bpf_source_dir, flatten_source
    from otel_ebpf.preflight import OPTIONAL_TRACEPOINTS, SYSCALLS
    from otel_ebpf.privileges import kernel_version

    try:
        from bcc import BPF, lib
    except ImportError:
        raise CaptureError(preflight.BCC_MISSING) from None
    preflight.ensure_tracefs()
    preflight.ensure_kernel_headers()
    missing = [name for name in SYSCALLS
               if not (BPF.tracepoint_exists("syscalls", "sys_enter_" + name)
                       and BPF.tracepoint_exists("syscalls", "sys_exit_" + name))]
    if missing:
        raise CaptureError("this kernel lacks the syscall tracepoints for %s "
                           "(CONFIG_FTRACE_SYSCALLS); capture needs a kernel built with them"
                           % ", ".join(missing))
    features: dict[str, bool] = {}
    for category, event, flag in OPTIONAL_TRACEPOINTS:
        ok = BPF.tracepoint_exists(category, event)
        features[flag] = features.get(flag, True) and ok
        if not ok:
            log.warning("tracepoint %s:%s is missing: %s", category, event,
                        preflight.OPTIONAL_CONSEQUENCE.get(event, "less precision"))
    # Syscalls already in flight when we attach (a server blocked in recv/accept)
    # are recovered from the saved user registers: x86_64 ABI, kernel >= 5.15.
    features["OTEL_REGS_FALLBACK"] = (platform.machine() == "x86_64"
                                      and kernel_version() >= (5, 15))
    # The per-thread syscall stash in task local storage (bpf/include/maps.h): tracing
    # programs may use it from 5.11, with the kernel's BTF (bpf_get_current_task_btf).
    features["HAVE_TASK_STORAGE"] = (kernel_version() >= (5, 11)
                                     and os.path.exists("/sys/kernel/btf/vmlinux"))
    capture = Capture(options)
    capture.self_tgid = self_tgid
    source = bpf_source_dir() / MAIN_SOURCE
    text = flatten_source(source)
    started = time.monotonic()
    try:
        bpf = BPF(text=text.encode(), cflags=capture.cflags(features))
        # Vectored calls with more than max_iovecs segments continue here.
        cont = bpf.load_func(b"iov_continue", BPF.TRACEPOINT)
        bpf[b"iov_tail"][ctypes.c_int(0)] = ctypes.c_int(cont.fd)
        # HTTP/2 chunks with frames beyond the captured bytes are walked here
        # (bpf/http2_walk.h); without it they are emitted plain (user space sees gaps).
        walk = bpf.load_func(b"h2_walk_syscall", BPF.TRACEPOINT)
        bpf[b"h2_tail"][ctypes.c_int(0)] = ctypes.c_int(walk.fd)
    except Exception as exc:  # BCC raises bare Exception for compile/load/attach errors
        raise CaptureError(Capture._explain(exc, source)) from None
    programs: list[tuple[str, int]] = []
    if options.tls:
        from otel_ebpf.capture.tls import PROBE_PROGRAMS

        names = sorted({p for pair in PROBE_PROGRAMS.values() for p in pair if p})
        try:
            for name in names:
                programs.append((name, bpf.load_func(name.encode(), BPF.KPROBE).fd))
            name = "h2_walk_tls"  # the uprobes' HTTP/2 frame walk (tail call)
            walk_tls = bpf.load_func(name.encode(), BPF.KPROBE)
            bpf[b"h2_tls_tail"][ctypes.c_int(0)] = ctypes.c_int(walk_tls.fd)
        except Exception as exc:  # a missing function or a verifier rejection
            log.error("TLS capture disabled: loading the OpenSSL probe %s failed (%s)",
                      name, exc)
            programs = []
    compile_s = time.monotonic() - started
    maps = []
    module = bpf.module
    vp, idx = ctypes.c_void_p, ctypes.c_size_t
    for fn, res in ((lib.bpf_num_tables, ctypes.c_size_t), (lib.bpf_table_name, ctypes.c_char_p),
                    (lib.bpf_table_fd_id, ctypes.c_int), (lib.bpf_table_key_size_id, ctypes.c_size_t),
                    (lib.bpf_table_leaf_size_id, ctypes.c_size_t)):
        fn.restype = res
        fn.argtypes = [vp] if fn is lib.bpf_num_tables else [vp, idx]
    for i in range(lib.bpf_num_tables(module)):
        maps.append(({"name": lib.bpf_table_name(module, i).decode(),
                      "type": lib.bpf_table_type_id(module, i),
                      "key_size": lib.bpf_table_key_size_id(module, i),
                      "value_size": lib.bpf_table_leaf_size_id(module, i),
                      "max_entries": lib.bpf_table_max_entries_id(module, i)},
                     lib.bpf_table_fd_id(module, i)))
    attachments = [(tp.decode(), fd) for tp, fd in bpf.tracepoint_fds.items()]
    attachments += [(tp.decode(), fd) for tp, fd in bpf.raw_tracepoint_fds.items()]
    if bpf.kprobe_fds or bpf.uprobe_fds:
        # Those can be tracefs events that only BCC's cleanup would remove.
        raise CaptureError("bpf/ attaches kprobes or uprobes at load time; the compile step "
                           "hands over tracepoints only (attach them from the daemon)")
    handover = {
        "ok": True,
        "features": features,
        "compile_s": round(compile_s, 3),
        "maps": [m for m, _ in maps],
        "attachments": [name for name, _ in attachments],
        "programs": [name for name, _ in programs],
    }
    fds = [fd for _, fd in maps] + [fd for _, fd in attachments] + [fd for _, fd in programs]
    if len(fds) > MAX_FDS:
        raise CaptureError("%d BPF file descriptors to hand over, more than one message "
                           "carries (%d)" % (len(fds), MAX_FDS))
    return handover, fds


def main(argv: list[str]) -> int:
    sock = socket.socket(fileno=int(argv[0]))
    try:  # the daemon gone means nobody will take the fds: die with it
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    request = json.loads(sock.recv(MAX_MESSAGE) or b"{}")
    logging.basicConfig(level=request.get("log_level", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        handover, fds = compile_and_attach(options_from_json(request["options"]),
                                           int(request["self_tgid"]))
    except CaptureError as exc:
        sock.sendall(json.dumps({"ok": False, "error": str(exc)}).encode())
        return EXIT_CAPTURE_IMPOSSIBLE
    socket.send_fds(sock, [json.dumps(handover).encode()], fds)
    return 0


if __name__ == "__main__":
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit, not sys.exit: BCC's atexit handler would detach what the daemon now holds.
    code = 1
    try:
        code = main(sys.argv[1:])
    except BaseException:  # report, then still leave without BCC's cleanup
        import traceback

        traceback.print_exc()
    sys.stderr.flush()
    os._exit(code)
