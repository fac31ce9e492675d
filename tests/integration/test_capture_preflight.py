"""`otel-ebpf check` diagnosis and the capture's start-up errors, on this machine."""

from __future__ import annotations

import pytest

from otel_ebpf import preflight
from otel_ebpf.capture import CaptureError
from otel_ebpf.capture.loader import Capture, CaptureOptions, bpf_source_dir, flatten_source, validate


def test_diagnose_this_machine(bpf_available):
    checks = preflight.diagnose()
    by_name = {c.name: c for c in checks}
    for name in ("privileges", "bcc", "tracefs", "syscall tracepoints", "uprobes", "ring buffer",
                 "BTF", "kernel headers", "kprobes"):
        assert name in by_name, name
    assert preflight.capture_possible(checks)
    for c in checks:
        assert c.detail
        if not c.ok:  # every missing piece says what it costs and how to fix it
            assert c.consequence and c.fix
    # kprobes are absent on the project's machines and never needed.
    assert not by_name["kprobes"].required


def test_capture_impossible_when_a_required_check_fails():
    ok = preflight.Check("a", True, "fine")
    optional = preflight.Check("b", False, "absent", "less", "install", required=False)
    required = preflight.Check("c", False, "absent", "nothing works", "install it")
    assert preflight.capture_possible([ok, optional])
    assert not preflight.capture_possible([ok, optional, required])


@pytest.mark.parametrize("options, words", [
    (CaptureOptions(max_capture_bytes=1000), "power of two"),
    (CaptureOptions(ringbuf_kib=3), "ringbuf_kib"),
    (CaptureOptions(max_iovecs=64), "verifier"),
    (CaptureOptions(max_kernel_connections=0), "max_kernel_connections"),
])
def test_bad_options_are_capture_errors(options, words):
    with pytest.raises(CaptureError, match=words):
        validate(options)


def test_missing_bpf_dir_is_a_capture_error(monkeypatch, tmp_path):
    monkeypatch.setenv("OTEL_EBPF_BPF_DIR", str(tmp_path / "nope"))
    with pytest.raises(CaptureError, match="OTEL_EBPF_BPF_DIR"):
        bpf_source_dir()


def test_compile_error_is_a_one_line_capture_error(bpf_available, monkeypatch, tmp_path):
    (tmp_path / "syscalls.c").write_text("this is not C;\n")
    monkeypatch.setenv("OTEL_EBPF_BPF_DIR", str(tmp_path))
    cap = Capture(CaptureOptions(tls=False))
    with pytest.raises(CaptureError, match="compiling .*syscalls.c failed") as info:
        cap.start(lambda e: None)
    assert "\n" not in str(info.value)
    cap.close()  # idempotent and safe after a failed start
    cap.close()


def test_flattened_source_keeps_file_names_for_errors():
    text = flatten_source(bpf_source_dir() / "syscalls.c")
    assert '#line 1 "%s"' % (bpf_source_dir() / "include" / "events.h").resolve() in text
    assert "#include \"include/maps.h\"" not in text
    assert text.count("struct conn_open_event {") == 1  # each header inlined once


def test_ensure_tracefs_and_headers_are_idempotent(bpf_available):
    assert preflight.ensure_tracefs() == preflight.ensure_tracefs()
    assert preflight.ensure_kernel_headers() == preflight.ensure_kernel_headers()


def test_poll_before_start_and_after_close_is_harmless(bpf_available):
    cap = Capture(CaptureOptions(tls=False))
    assert cap.poll(0) == 0  # the daemon's shutdown polls even when start failed
    cap.start(lambda e: None)
    cap.poll(0)
    cap.close()
    assert cap.poll(0) == 0
    cap.close()
