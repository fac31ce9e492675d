"""TLS discovery and attach bookkeeping, against real ELF files and a synthetic /proc.

The ELF files are real: the system libssl, the NodeSource/Debian `node` when present,
and tiny shared objects compiled here with gcc (a fake libssl exporting SSL_read and
SSL_write, one named libssl without them, a consumer that only imports them). The
/proc tree is synthetic (maps + exe link per pid), so no root and no BPF are needed;
the BPF object is a recording fake, the only mock here.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from otel_ebpf.capture import tls
from otel_ebpf.stats import Stats

SYSTEM_LIBSSL = "/usr/lib/x86_64-linux-gnu/libssl.so.3"

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")


def _compile(tmp: Path, name: str, source: str, extra: tuple[str, ...] = ()) -> Path:
    src = tmp / (name + ".c")
    src.write_text(source)
    out = tmp / name
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(out), str(src), *extra], check=True)
    return out


FAKE_OPENSSL = """
int SSL_read(void *s, void *b, int n) { return n; }
int SSL_write(void *s, const void *b, int n) { return n; }
int SSL_read_ex(void *s, void *b, unsigned long n, unsigned long *r) { *r = n; return 1; }
int SSL_write_ex(void *s, const void *b, unsigned long n, unsigned long *w) { *w = n; return 1; }
int SSL_set_fd(void *s, int fd) { return 1; }
"""
NOT_OPENSSL = "int NSS_Init(const char *d) { return 0; }\n"
CONSUMER = """
extern int SSL_read(void *s, void *b, int n);
extern int SSL_write(void *s, const void *b, int n);
int fetch(void *s, char *b) { return SSL_write(s, "GET /", 5) + SSL_read(s, b, 10); }
"""


class FakeProc:
    """A /proc tree: one directory per pid with `maps` and an `exe` link."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(exist_ok=True)

    def add(self, pid: int, exe: Path, *libs: Path, deleted: Path | None = None) -> None:
        d = self.root / str(pid)
        d.mkdir()
        (d / "exe").symlink_to(exe)
        lines = []
        addr = 0x400000
        for path in (exe, *libs):
            st = os.stat(path)
            dev = "%02x:%02x" % (os.major(st.st_dev), os.minor(st.st_dev))
            # a non-executable and an executable mapping, as the loader makes them
            for perms in ("r--p", "r-xp"):
                lines.append(
                    "%x-%x %s 00000000 %s %d %s"
                    % (addr, addr + 0x1000, perms, dev, st.st_ino, path)
                )
                addr += 0x1000
        if deleted is not None:
            lines.append("%x-%x r-xp 00000000 fe:00 424242 %s (deleted)" % (addr, addr + 0x1000, deleted))
        lines.append("7ffd0000-7ffd1000 rw-p 00000000 00:00 0 [stack]")
        (d / "maps").write_text("\n".join(lines) + "\n")

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))


class FakeBpf:
    """Records what the attacher asks the capture for, as (call, path, symbol, program)."""

    def __init__(self, fail_on: set[str] | None = None) -> None:
        self.calls: list[tuple[str, str, str, str]] = []
        self.fail_on = fail_on or set()
        self.execs: FakeExecMap | None = None

    # The attacher passes file offsets; recorded as the symbol they belong to, through
    # the file's own dynamic symbols.
    @staticmethod
    def _sym(path: str, offset: int) -> str:
        by_offset = {o: s for s, o in tls.read_elf_info(path).offsets.items()}
        return by_offset[offset]

    def attach_uprobe(self, path: str, offset: int, program: str, retprobe: bool = False):
        symbol = self._sym(path, offset)
        if not retprobe and symbol in self.fail_on:
            raise OSError(1, "perf_event_open(uprobe): Operation not permitted")
        kind = "uretprobe" if retprobe else "uprobe"
        self.calls.append((kind, path, symbol, program))
        return (kind, path, symbol)

    def detach_probes(self, handles) -> None:
        for kind, path, symbol in handles:
            self.calls.append(("detach_ret" if kind == "uretprobe" else "detach", path,
                               symbol, ""))


class FakeExecMap(dict):
    """The tls_execs map as capture.maps holds it: u32 keys as bytes."""

    def keys(self):
        return [k.to_bytes(4, "little") for k in list(dict.keys(self))]

    def delete(self, key: bytes) -> bool:
        return self.pop(int.from_bytes(key, "little"), None) is not None


class FakeBpfWithExecs(FakeBpf):
    def __init__(self) -> None:
        super().__init__()
        self.execs = FakeExecMap()


class FakeCapture:
    """What TlsAttacher uses of a started Capture."""

    def __init__(self, bpf: FakeBpf) -> None:
        self.bpf = bpf
        self.programs = {p: 100 + i for i, p in enumerate(
            p for pair in tls.PROBE_PROGRAMS.values() for p in pair if p)}
        self.maps = {"tls_execs": bpf.execs} if bpf.execs is not None else {}
        self.attach_uprobe = bpf.attach_uprobe
        self.detach_probes = bpf.detach_probes


@pytest.fixture
def libs(tmp_path: Path) -> dict[str, Path]:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    return {
        "openssl": _compile(tmp_path, "libssl.so.9", FAKE_OPENSSL),
        "nss": _compile(tmp_path, "libssl3.so", NOT_OPENSSL),
        "nosyms": _compile(tmp_path, "libssl.so.1.1", NOT_OPENSSL),
        "consumer": _compile(tmp_path, "libcurlish.so.4", CONSUMER),
        "static": _compile(tmp_path, "myserver", FAKE_OPENSSL),
        "plain": _compile(tmp_path, "plainserver", NOT_OPENSSL),
    }


# -- ELF reading -------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists(SYSTEM_LIBSSL), reason="no system libssl.so.3")
def test_system_libssl_defines_all_probe_symbols():
    info = tls.read_elf_info(SYSTEM_LIBSSL)
    assert info.error is None
    assert set(tls.DATA_SYMBOLS) <= info.defined
    assert "SSL_set_fd" in info.defined


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_node_binary_exports_static_openssl_if_nodesource():
    node = os.path.realpath(shutil.which("node"))
    info = tls.read_elf_info(node)
    assert info.error is None
    # NodeSource/official builds link OpenSSL statically and export it; Debian's own
    # nodejs links the system libssl instead (then node defines nothing here).
    assert info.defined in (frozenset(), frozenset(tls.DATA_SYMBOLS + tls.HELPER_SYMBOLS))


def test_compiled_libraries_are_classified(libs):
    info = tls.read_elf_info(str(libs["openssl"]))
    assert info.defined == frozenset(tls.DATA_SYMBOLS + ("SSL_set_fd",))
    # the addresses are the symbol values `nm` prints
    nm = subprocess.run(["nm", "-D", "--defined-only", str(libs["openssl"])],
                        capture_output=True, text=True, check=True).stdout
    want = {line.split()[2]: int(line.split()[0], 16) for line in nm.splitlines()
            if line.split()[2] in info.defined}
    assert info.addresses == want
    assert tls.read_elf_info(str(libs["nss"])).defined == frozenset()
    # imports SSL_read/SSL_write (undefined) but defines neither
    assert tls.read_elf_info(str(libs["consumer"])).defined == frozenset()


def test_not_elf_and_truncated_files_give_an_error_not_an_exception(tmp_path, libs):
    text = tmp_path / "script.sh"
    text.write_text("#!/bin/sh\necho hi\n")
    assert tls.read_elf_info(str(text)).error == "not an ELF file"
    cut = tmp_path / "cut.so"
    cut.write_bytes(libs["openssl"].read_bytes()[:100])
    info = tls.read_elf_info(str(cut))
    assert info.defined == frozenset()
    assert tls.read_elf_info(str(tmp_path / "missing.so")).error is not None


def test_go_binary_is_recognised(tmp_path):
    go = shutil.which("go") or "/usr/lib/go/bin/go"
    if not os.path.exists(go):
        pytest.skip("no Go toolchain binary to look at")
    info = tls.read_elf_info(os.path.realpath(go))
    assert info.is_go
    assert info.defined == frozenset()


# -- discovery over a synthetic /proc ----------------------------------------------------


def test_discovery_reports_covered_and_uncovered(tmp_path, libs):
    proc = FakeProc(tmp_path / "proc")
    proc.add(100, libs["plain"], libs["openssl"], libs["consumer"])
    proc.add(101, libs["plain"], libs["openssl"])
    proc.add(102, libs["static"])
    proc.add(103, libs["plain"], libs["nss"], libs["nosyms"])
    found = {Path(lib.path).name: lib for lib in tls.discover_tls_libraries(str(proc.root), include_system=False)}
    assert set(found) == {"libssl.so.9", "myserver", "libssl3.so", "libssl.so.1.1"}
    assert found["libssl.so.9"].kind == tls.Kind.OPENSSL_SHARED
    assert found["libssl.so.9"].covered
    assert found["libssl.so.9"].pids == (100, 101)
    assert found["myserver"].kind == tls.Kind.OPENSSL_STATIC
    assert found["myserver"].covered
    assert found["libssl3.so"].kind == tls.Kind.NSS
    assert not found["libssl3.so"].covered
    assert found["libssl.so.1.1"].kind == tls.Kind.LIBSSL_NO_SYMBOLS
    assert "does not export" in found["libssl.so.1.1"].note


def test_coverage_report_says_what_is_not_covered(tmp_path, libs):
    proc = FakeProc(tmp_path / "proc")
    proc.add(103, libs["plain"], libs["nss"])
    lines = tls.coverage_report(str(proc.root))
    text = "\n".join(lines)
    assert "NSS is not covered" in text
    assert "Go crypto/tls" in text and "GnuTLS" in text and "rustls" in text


# -- attaching ---------------------------------------------------------------------------


def test_attaches_once_per_inode_across_processes_and_paths(tmp_path, libs):
    proc = FakeProc(tmp_path / "proc")
    link = tmp_path / "hardlink-libssl.so.9"
    os.link(libs["openssl"], link)  # same inode, another name
    proc.add(200, libs["plain"], libs["openssl"])
    proc.add(201, libs["plain"], link)
    bpf = FakeBpf()
    stats = Stats()
    attacher = tls.TlsAttacher(FakeCapture(bpf), stats, proc=str(proc.root), attach_system_libssl=False)
    assert attacher.scan() == 1
    uprobes = [c for c in bpf.calls if c[0] == "uprobe"]
    retprobes = [c for c in bpf.calls if c[0] == "uretprobe"]
    # 4 data symbols + SSL_set_fd (the fake lib has no SSL_free): entry each, return for data
    assert sorted(c[2] for c in uprobes) == sorted(tls.DATA_SYMBOLS + ("SSL_set_fd",))
    assert sorted(c[2] for c in retprobes) == sorted(tls.DATA_SYMBOLS)
    assert {c[3] for c in uprobes} == {tls.PROBE_PROGRAMS[s][0] for s in tls.DATA_SYMBOLS + ("SSL_set_fd",)}
    assert attacher.attached() == [(str(libs["openssl"]), list(tls.DATA_SYMBOLS) + ["SSL_set_fd"])]
    assert stats.get("tls.libraries_attached") == 1
    assert stats.get("tls.probes_attached") == 9
    # rescans (incremental and full) attach nothing new
    for _ in range(20):
        assert attacher.scan() == 0
    assert len(bpf.calls) == 9


def test_new_process_with_new_provider_is_attached_on_next_scan(tmp_path, libs):
    proc = FakeProc(tmp_path / "proc")
    proc.add(300, libs["plain"])
    bpf = FakeBpf()
    attacher = tls.TlsAttacher(FakeCapture(bpf), Stats(), proc=str(proc.root), attach_system_libssl=False)
    assert attacher.scan() == 0
    proc.add(301, libs["static"])
    assert attacher.scan() == 1
    assert [p for p, _ in attacher.attached()] == [str(libs["static"])]


def test_dlopen_in_a_known_process_is_found_by_the_full_rescan(tmp_path, libs):
    proc = FakeProc(tmp_path / "proc")
    proc.add(400, libs["plain"])
    attacher = tls.TlsAttacher(
        FakeCapture(FakeBpf()), Stats(), proc=str(proc.root), full_rescan_every=3,
        attach_system_libssl=False,
    )
    attacher.scan()  # full
    proc.remove(400)
    proc.add(400, libs["plain"], libs["openssl"])  # same pid, same exe: `import ssl` later
    assert attacher.scan() == 0  # incremental: known pid, unchanged exe, not re-read
    assert attacher.scan() == 0
    assert attacher.scan() == 1  # the 4th scan is a full one


def test_library_without_symbols_is_skipped_with_one_log_line(tmp_path, libs, caplog):
    proc = FakeProc(tmp_path / "proc")
    proc.add(500, libs["plain"], libs["nosyms"])
    proc.add(501, libs["plain"], libs["nosyms"])
    stats = Stats()
    bpf = FakeBpf()
    attacher = tls.TlsAttacher(FakeCapture(bpf), stats, proc=str(proc.root), full_rescan_every=1,
                               attach_system_libssl=False)
    with caplog.at_level(logging.INFO, logger="otel_ebpf.capture.tls"):
        for _ in range(5):
            attacher.scan()
    lines = [r for r in caplog.records if "libssl.so.1.1" in r.getMessage()]
    assert len(lines) == 1
    assert "does not export SSL_read/SSL_write" in lines[0].getMessage()
    assert stats.get("tls.libraries_skipped") == 1
    assert bpf.calls == []


def test_attach_failure_is_counted_and_the_rest_still_attached(tmp_path, libs, caplog):
    proc = FakeProc(tmp_path / "proc")
    proc.add(600, libs["plain"], libs["openssl"])
    stats = Stats()
    bpf = FakeBpf(fail_on={"SSL_read_ex"})
    attacher = tls.TlsAttacher(FakeCapture(bpf), stats, proc=str(proc.root), attach_system_libssl=False)
    with caplog.at_level(logging.WARNING, logger="otel_ebpf.capture.tls"):
        assert attacher.scan() == 1
    assert stats.get("tls.attach_failures") == 1
    assert "SSL_read_ex" in caplog.text and "will not be seen" in caplog.text
    assert "SSL_read_ex" not in attacher.attached()[0][1]
    # its return probe (attached first) was taken off again: no half-probed symbol
    assert ("detach_ret", str(libs["openssl"]), "SSL_read_ex", "") in bpf.calls
    live = {(c[2], c[0]) for c in bpf.calls if c[0] in ("uprobe", "uretprobe")}
    assert ("SSL_read_ex", "uretprobe") in live  # attached, then detached above
    assert ("SSL_read_ex", "uprobe") not in live


def test_close_detaches_everything_once(tmp_path, libs):
    proc = FakeProc(tmp_path / "proc")
    proc.add(700, libs["static"])
    bpf = FakeBpf()
    attacher = tls.TlsAttacher(FakeCapture(bpf), Stats(), proc=str(proc.root), attach_system_libssl=False)
    attacher.scan()
    attacher.close()
    attacher.close()
    detaches = [c for c in bpf.calls if c[0].startswith("detach")]
    assert len(detaches) == 9
    assert attacher.attached() == []
    assert attacher.scan() == 0


def test_deleted_mapping_is_reached_through_map_files(tmp_path, libs):
    proc = FakeProc(tmp_path / "proc")
    proc.add(800, libs["plain"], deleted=Path("/usr/lib/x86_64-linux-gnu/libssl.so.3"))
    mappings = tls._mapped_files(str(proc.root), 800)
    deleted = [m for m in mappings if m.path.endswith("libssl.so.3")]
    assert len(deleted) == 1
    assert "/800/map_files/" in deleted[0].open_path


def test_tick_examines_execed_processes_at_once(tmp_path, libs):
    proc = FakeProc(tmp_path / "proc")
    bpf = FakeBpfWithExecs()
    stats = Stats()
    attacher = tls.TlsAttacher(FakeCapture(bpf), stats, proc=str(proc.root), attach_system_libssl=False)
    attacher.scan()
    assert attacher.tick() == 0  # nothing exec'd: nothing read
    proc.add(900, libs["static"])
    bpf.execs[900] = 123456789  # what the sched_process_exec program writes
    assert attacher.tick() == 1
    assert [p for p, _ in attacher.attached()] == [str(libs["static"])]
    assert dict(bpf.execs) == {}  # drained
    assert stats.get("tls.execs_examined") == 1
    # an exec'd pid that is already gone is harmless
    bpf.execs[901] = 1
    assert attacher.tick() == 0


def test_tick_without_exec_table_is_a_no_op(tmp_path, libs):
    proc = FakeProc(tmp_path / "proc")
    attacher = tls.TlsAttacher(FakeCapture(FakeBpf()), Stats(), proc=str(proc.root),
                               attach_system_libssl=False)
    assert attacher.tick() == 0
    proc.add(902, libs["static"])
    assert attacher.scan() == 1
