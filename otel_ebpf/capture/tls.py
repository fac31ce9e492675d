"""TLS capture: find OpenSSL in the processes on this host and attach uprobes to it.

Contract:
- In: /proc (which files every process maps) and the ELF dynamic symbol tables of those
  files. Out: uprobes + uretprobes on SSL_read, SSL_read_ex, SSL_write, SSL_write_ex
  (and SSL_set_fd / SSL_free when present, to tie an SSL* to its socket and forget it)
  attached through `capture.attach_uprobe()` (perf_event_open on the uprobe PMU, no
  BCC) to the programs of bpf/openssl.h that the compile step loaded and handed over
  (`capture.programs`). The kernel side then
  emits plaintext DataEvents with source OPENSSL into the same ring buffer as the
  syscall path; nothing TLS-specific reaches Python through this module.
- A uprobe is attached to a file (inode), so every process mapping that file is covered,
  including processes started later. We attach once per (st_dev, st_ino), never once per
  process, and also attach up front to the system's libssl (found through the loader
  cache) so programs started after the daemon are covered from their very first call.
- Providers: every mapped `libssl*.so*` that exports the symbols, and any other mapped
  ELF file (typically an executable such as the NodeSource `node`) that defines them in
  its dynamic symbol table (OpenSSL linked statically with its symbols exported).
  A libssl-named library without the symbols (e.g. NSS's libssl3.so) is skipped with ONE
  log line per file. Files that merely import SSL_read (libcurl, nginx) are consumers,
  covered through the libssl they load.
- Not covered, reported by `discover_tls_libraries()` for `otel-ebpf check`: Go
  crypto/tls (Go binaries), GnuTLS, NSS, and (undetectable from the outside) BoringSSL
  or rustls linked statically without exported symbols, Java's JSSE, and kernel TLS
  (kTLS: after the handshake the kernel encrypts, SSL_write/SSL_sendfile bytes are still
  seen by the uprobes but sendfile-with-kTLS bodies are not).
- New programs: the sched:sched_process_exec tracepoint (bpf/openssl.h) lists exec'd
  tgids in the `tls_execs` map; `tick()` examines them right away (node is probed
  ~100 ms after its exec), the periodic `scan()` catches everything else.
- Counters (Stats): tls.scans, tls.execs_examined, tls.libraries_attached,
  tls.probes_attached, tls.attach_failures, tls.libraries_skipped.

Cost: a scan reads /proc/<pid>/maps only for pids not seen before (or whose executable
changed); every `full_rescan_every`-th scan re-reads all of them to catch libraries
loaded later with dlopen (Python's `import ssl`). ELF symbol tables are read once per
file identity; what is kept afterwards is the identity alone (a set of (dev, inode)
pairs, one per distinct executable file ever mapped) and, per attached file, its
probe handles. Nothing here is on the per-exchange path.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from otel_ebpf.stats import Stats

log = logging.getLogger(__name__)

# symbol -> (entry program, return program) in bpf/openssl.h. The data symbols are
# required; the others are optional helpers (tie the SSL* to an fd, forget it on free).
DATA_SYMBOLS = ("SSL_read", "SSL_read_ex", "SSL_write", "SSL_write_ex")
HELPER_SYMBOLS = ("SSL_set_fd", "SSL_free")
PROBE_PROGRAMS: dict[str, tuple[str, str | None]] = {
    "SSL_read": ("tls_enter_read", "tls_exit_read"),
    "SSL_read_ex": ("tls_enter_read_ex", "tls_exit_read_ex"),
    "SSL_write": ("tls_enter_write", "tls_exit_write"),
    "SSL_write_ex": ("tls_enter_write_ex", "tls_exit_write_ex"),
    "SSL_set_fd": ("tls_enter_set_fd", None),
    "SSL_free": ("tls_enter_free", None),
}
_WANTED = DATA_SYMBOLS + HELPER_SYMBOLS

# What `check` says about TLS stacks it sees but cannot decrypt.
NOT_COVERED_NOTE = (
    "not covered: Go crypto/tls, GnuTLS, NSS, BoringSSL/rustls linked without exported "
    "symbols, Java JSSE, kTLS sendfile bodies; HTTPS from such programs is not reported "
    "(their ciphertext is rejected by protocol inference, never parsed as HTTP)"
)

_LIBSSL_NAME = re.compile(r"^libssl(-[0-9a-f]+)?\.so(\.\d+)*$")
_NSS_NAMES = ("libssl3.so", "libnss3.so")
_GNUTLS_NAME = re.compile(r"^libgnutls\.so(\.\d+)*$")

FileId = tuple[int, int]  # (st_dev, st_ino)


class Kind:
    OPENSSL_SHARED = "openssl-shared"  # libssl.so.* exporting the symbols
    OPENSSL_STATIC = "openssl-static"  # another ELF file defining the symbols itself
    LIBSSL_NO_SYMBOLS = "libssl-without-symbols"
    GNUTLS = "gnutls"
    NSS = "nss"
    GO = "go"


@dataclass(frozen=True, slots=True)
class TlsLibrary:
    """One TLS implementation file found on the host (or in a process)."""

    path: str  # a path this daemon can open the file by
    file_id: FileId
    kind: str  # a Kind constant
    symbols: tuple[str, ...]  # the probe symbols it defines (empty when not covered)
    pids: tuple[int, ...]  # the processes that map it (empty: found via ldconfig only)
    covered: bool
    note: str = ""


@dataclass(slots=True)
class ElfInfo:
    """What discovery needs from one ELF file's headers."""

    defined: frozenset[str] = frozenset()  # wanted symbols defined (not imported) here
    is_go: bool = False
    error: str | None = None
    # symbol -> st_value (a virtual address for ET_EXEC, an offset from the load base
    # for ET_DYN), as `nm -D` prints it.
    addresses: dict[str, int] = field(default_factory=dict)
    # symbol -> file offset of its code (through the PT_LOAD program headers): what
    # the uprobe PMU takes.
    offsets: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# ELF: just enough of the format to read the section headers and the dynamic symbols.
# (pyelftools would do, but is one more dependency for ~60 lines; BCC's symbol walk calls
# back into Python once per symbol: ~75k calls for node.)

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
_SHT_DYNSYM = 11
_STT_FUNC, _STT_GNU_IFUNC = 2, 10
_MAX_TABLE = 256 << 20  # bound what one (possibly corrupt) header makes us read


def read_elf_info(path: str, wanted: Iterable[str] = _WANTED) -> ElfInfo:
    """Which of `wanted` this ELF file defines in .dynsym, and whether it is a Go binary.

    Never raises: an unreadable or malformed file gives an ElfInfo with `error` set.
    """
    try:
        return _read_elf_info(path, tuple(wanted))
    except OSError as exc:
        return ElfInfo(error="cannot read: %s" % (exc.strerror or exc))
    except (struct.error, IndexError, ValueError):
        return ElfInfo(error="malformed ELF file (truncated or corrupt headers)")


def _read_elf_info(path: str, wanted: tuple[str, ...]) -> ElfInfo:
    with open(path, "rb") as f:
        ehdr = f.read(_EHDR.size)
        if len(ehdr) < _EHDR.size or ehdr[:4] != b"\x7fELF":
            return ElfInfo(error="not an ELF file")
        if ehdr[4] != 2 or ehdr[5] != 1:
            return ElfInfo(error="not a 64-bit little-endian ELF file")
        (_, _, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, shstrndx) = _EHDR.unpack(
            ehdr
        )
        if shoff == 0 or shnum == 0 or shentsize != _SHDR.size:
            return ElfInfo(error="no section headers (stripped of them)")
        f.seek(shoff)
        raw = f.read(shnum * shentsize)
        sections = [_SHDR.unpack_from(raw, i * shentsize) for i in range(shnum)]
        names_sh = sections[shstrndx] if shstrndx < shnum else None
        is_go = False
        if names_sh is not None:
            f.seek(names_sh[4])
            shstr = f.read(names_sh[5])
            for sh in sections:
                name = shstr[sh[0] : shstr.find(b"\0", sh[0])]
                if name in (b".go.buildinfo", b".note.go.buildid", b".gopclntab"):
                    is_go = True
                    break
        dynsym = next((sh for sh in sections if sh[1] == _SHT_DYNSYM), None)
        if dynsym is None or dynsym[6] >= shnum:
            return ElfInfo(is_go=is_go)
        strtab = sections[dynsym[6]]
        if strtab[5] > _MAX_TABLE or dynsym[5] > _MAX_TABLE:
            return ElfInfo(is_go=is_go, error="dynamic symbol table too large to read")
        f.seek(strtab[4])
        dynstr = f.read(strtab[5])
        # Offsets in .dynstr where a wanted name starts (names may share tails, so a
        # symbol can point into the middle of a longer string).
        offsets: dict[int, str] = {}
        for name in wanted:
            needle = name.encode() + b"\0"
            pos = dynstr.find(needle)
            while pos != -1:
                offsets[pos] = name
                pos = dynstr.find(needle, pos + 1)
        if not offsets:
            return ElfInfo(is_go=is_go)
        f.seek(dynsym[4])
        syms = f.read(dynsym[5])
    defined: dict[str, int] = {}
    for st_name, st_info, _, st_shndx, st_value, _ in _SYM.iter_unpack(
        syms[: len(syms) - len(syms) % _SYM.size]
    ):
        name = offsets.get(st_name)
        # defined (not an import: section index 0), and a function
        if (name is not None and st_shndx != 0 and st_value != 0
                and st_info & 0xF in (_STT_FUNC, _STT_GNU_IFUNC)):
            defined.setdefault(name, st_value)
    offsets: dict[str, int] = {}
    if defined:
        from otel_ebpf.capture.attach import file_offset, load_segments

        segments = load_segments(path)
        for name, value in defined.items():
            try:
                offsets[name] = file_offset(segments, value)
            except ValueError:
                pass  # not in a loadable segment: not probeable
    return ElfInfo(defined=frozenset(defined), is_go=is_go, addresses=defined, offsets=offsets)


# ---------------------------------------------------------------------------------------
# /proc


@dataclass(slots=True)
class _Mapping:
    path: str  # as in maps (the process's mount namespace)
    file_id: FileId
    open_path: str  # a path this daemon can open the same file by


def _pids(proc: str) -> Iterator[int]:
    try:
        names = os.listdir(proc)
    except OSError:
        return
    yield from sorted(int(name) for name in names if name.isdigit())


def _mapped_files(proc: str, pid: int) -> list[_Mapping]:
    """Distinct executable file mappings of one process (empty if it is gone)."""
    try:
        with open("%s/%d/maps" % (proc, pid), "rb") as f:
            data = f.read()
    except OSError:
        return []
    seen: dict[FileId, _Mapping] = {}
    for line in data.splitlines():
        # address perms offset dev inode path
        parts = line.split(None, 5)
        if len(parts) < 6 or b"x" not in parts[1] or parts[4] == b"0":
            continue
        path = parts[5].decode("utf-8", "surrogateescape")
        if not path.startswith("/"):
            continue
        major, _, minor = parts[3].partition(b":")
        file_id = (os.makedev(int(major, 16), int(minor, 16)), int(parts[4]))
        if file_id in seen:
            continue
        if path.endswith(" (deleted)"):
            # Replaced on disk (package upgrade) while mapped: reach it via map_files.
            open_path = "%s/%d/map_files/%s" % (proc, pid, parts[0].decode())
            path = path[: -len(" (deleted)")]
        else:
            open_path = _host_path(proc, pid, path, file_id)
        seen[file_id] = _Mapping(path, file_id, open_path)
    return list(seen.values())


def _host_path(proc: str, pid: int, path: str, file_id: FileId) -> str:
    """`path` if it names the same file in our mount namespace, else via /proc/pid/root."""
    try:
        st = os.stat(path)
        if (st.st_dev, st.st_ino) == file_id:
            return path
    except OSError:
        pass
    return "%s/%d/root%s" % (proc, pid, path)


def _exe_id(proc: str, pid: int) -> FileId | None:
    try:
        st = os.stat("%s/%d/exe" % (proc, pid))
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def system_libssl_paths() -> list[str]:
    """The libssl.so.* files the dynamic loader would hand out (ldconfig cache)."""
    paths = []
    try:
        out = subprocess.run(
            ["ldconfig", "-p"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        name, _, target = line.strip().partition(" => ")
        lib = name.split(" ", 1)[0]
        if _LIBSSL_NAME.match(lib) and "x86-64" in name and os.path.exists(target):
            paths.append(os.path.realpath(target))
    if not paths:
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64"):
            try:
                paths += [
                    os.path.realpath(os.path.join(d, n))
                    for n in os.listdir(d)
                    if _LIBSSL_NAME.match(n)
                ]
            except OSError:
                continue
    return sorted(set(paths))


def _system_libssl_mappings() -> Iterator[_Mapping]:
    """system_libssl_paths() as mappings of our own namespace (vanished files skipped)."""
    for path in system_libssl_paths():
        try:
            st = os.stat(path)
        except OSError:
            continue
        yield _Mapping(path, (st.st_dev, st.st_ino), path)


# ---------------------------------------------------------------------------------------
# Classification


@dataclass(slots=True)
class _Finder:
    """Classifies files by identity; ELF headers are read once per file."""

    proc: str = "/proc"
    elf_cache: dict[FileId, ElfInfo] = field(default_factory=dict)

    def elf(self, m: _Mapping) -> ElfInfo:
        info = self.elf_cache.get(m.file_id)
        if info is None:
            info = read_elf_info(m.open_path)
            self.elf_cache[m.file_id] = info
        return info

    def classify(self, m: _Mapping, is_exe: bool) -> tuple[str, ElfInfo] | None:
        """The Kind of a mapped file, or None when it is no TLS implementation we know."""
        base = os.path.basename(m.path)
        if base in _NSS_NAMES:
            return Kind.NSS, ElfInfo()
        if _GNUTLS_NAME.match(base):
            return Kind.GNUTLS, ElfInfo()
        libssl_named = bool(_LIBSSL_NAME.match(base))
        # Only ELF files we must look into: libssl-named ones, and executables (static
        # OpenSSL, Go). Reading the header of every shared library on the host would cost
        # more than it finds; libnode.so-style bundles are handled by the name check below.
        if not (libssl_named or is_exe or "node" in base or "ssl" in base):
            return None
        info = self.elf(m)
        if all(s in info.defined for s in ("SSL_read", "SSL_write")):
            return (Kind.OPENSSL_SHARED if libssl_named else Kind.OPENSSL_STATIC), info
        if libssl_named:
            return Kind.LIBSSL_NO_SYMBOLS, info
        if info.is_go:
            return Kind.GO, info
        return None


def _library(kind: str, m: _Mapping, info: ElfInfo, pids: tuple[int, ...]) -> TlsLibrary:
    symbols = tuple(s for s in _WANTED if s in info.defined)
    covered = kind in (Kind.OPENSSL_SHARED, Kind.OPENSSL_STATIC)
    if covered:
        missing = [s for s in DATA_SYMBOLS if s not in info.defined]
        note = "OpenSSL uprobes" + (" (lacks %s)" % ", ".join(missing) if missing else "")
    elif kind == Kind.LIBSSL_NO_SYMBOLS:
        note = "named libssl but does not export SSL_read/SSL_write%s" % (
            " (%s)" % info.error if info.error else ""
        )
    elif kind == Kind.GO:
        note = "Go binary: crypto/tls is not covered"
    elif kind == Kind.GNUTLS:
        note = "GnuTLS is not covered"
    else:
        note = "NSS is not covered"
    return TlsLibrary(m.path, m.file_id, kind, symbols, pids, covered, note)


def discover_tls_libraries(proc: str = "/proc", include_system: bool = True) -> list[TlsLibrary]:
    """Every TLS implementation the running processes map, plus the system libssl.

    For `otel-ebpf check`: entries with covered=True are what the daemon attaches to;
    the others say what is not covered and why. Needs no BPF; as non-root it sees only
    the caller's own processes.
    """
    finder = _Finder(proc)
    found: dict[FileId, tuple[str, _Mapping, ElfInfo, list[int]]] = {}
    for pid in _pids(proc):
        exe = _exe_id(proc, pid)
        for m in _mapped_files(proc, pid):
            if m.file_id in found:
                found[m.file_id][3].append(pid)
                continue
            got = finder.classify(m, is_exe=m.file_id == exe)
            if got is not None:
                found[m.file_id] = (got[0], m, got[1], [pid])
    if include_system:
        for m in _system_libssl_mappings():
            if m.file_id not in found:
                got = finder.classify(m, is_exe=False)
                if got is not None:
                    found[m.file_id] = (got[0], m, got[1], [])
    libs = [_library(kind, m, info, tuple(pids)) for kind, m, info, pids in found.values()]
    libs.sort(key=lambda lib: (not lib.covered, lib.kind, lib.path))
    return libs


# ---------------------------------------------------------------------------------------
# Attaching


class TlsAttacher:
    """Attaches the OpenSSL uprobes of bpf/openssl.h to every provider file, once.

    `capture` is a started Capture compiled with -DWITH_OPENSSL (its `programs` hold
    the handed-over OpenSSL programs): `attach_uprobe(path, offset, program, retprobe)`
    returns an attachment handle, `detach_probes(handles)` gives them up, and
    `maps["tls_execs"]` lists exec'd tgids. Call `scan()` at start and then every ~2 s
    from the daemon loop, and `tick()` on every loop iteration (programs that exec'd
    are examined within one poll interval); `close()` detaches everything (idempotent).
    Never raises for a file it cannot attach: counts and logs.
    """

    def __init__(
        self,
        capture: Any,
        stats: Stats,
        *,
        proc: str = "/proc",
        full_rescan_every: int = 15,
        attach_system_libssl: bool = True,
    ) -> None:
        self._capture = capture
        self._stats = stats
        self._proc = proc
        self._full_every = max(1, full_rescan_every)
        self._attach_system = attach_system_libssl
        self._finder = _Finder(proc)
        self._handled: set[FileId] = set()  # attached, skipped or not TLS: never re-examined
        # file -> (path as mapped, symbols, path attached by, attachment handles)
        self._attached: dict[FileId, tuple[str, list[str], str, list[Any]]] = {}
        self._pid_exe: dict[int, FileId | None] = {}
        self._scans = 0
        self._closed = False
        self._execs: Any = None  # the tls_execs BPF map; False when absent
        self._disabled = not self._programs_present()

    def _programs_present(self) -> bool:
        """Whether the compile step built and handed over our programs (-DWITH_OPENSSL)."""
        programs = getattr(self._capture, "programs", {})
        missing = [p for pair in PROBE_PROGRAMS.values() for p in pair
                   if p is not None and p not in programs]
        if missing:
            log.error(
                "TLS capture disabled: the BPF object has no OpenSSL probes (%s missing); "
                "the capture stage must compile bpf/syscalls.c with -DWITH_OPENSSL",
                ", ".join(missing[:3]),
            )
            return False
        return True

    def attached(self) -> list[tuple[str, list[str]]]:
        """(path, symbols) for every file with probes attached."""
        return [(path, list(symbols)) for path, symbols, *_ in self._attached.values()]

    def tick(self) -> int:
        """Examine the processes that exec'd since the last call (the kernel lists them
        in `tls_execs`); returns files newly attached. Cheap when nothing exec'd (one
        map walk, ~20 us): call it on every loop iteration, scan() every ~2 s."""
        if self._closed or self._disabled:
            return 0
        table = self._exec_table()
        if table is None:
            return 0
        try:
            keys = table.keys()
        except OSError:
            return 0
        if not keys:
            return 0
        before = len(self._attached)
        for key in keys:
            try:
                table.delete(key)
            except OSError:
                pass
            pid = int.from_bytes(key[:4], "little")
            exe = _exe_id(self._proc, pid)
            # Not remembered in _pid_exe: the loader maps the libraries only after the
            # exec, so the next scan() reads this process's maps again.
            for m in _mapped_files(self._proc, pid):
                self._consider(m, is_exe=m.file_id == exe)
        self._stats.add("tls.execs_examined", len(keys))
        return len(self._attached) - before

    def _exec_table(self) -> Any:
        if self._execs is False:
            return None
        if self._execs is None:
            # `is None`, not truthiness: an empty map has len() 0.
            table = getattr(self._capture, "maps", {}).get("tls_execs")
            self._execs = False if table is None else table
            if table is None:  # an older BPF object: rescans only
                return None
        return self._execs

    def scan(self) -> int:
        """Attach to providers that appeared since the last scan; returns how many."""
        if self._closed or self._disabled:
            return 0
        self.tick()
        full = self._scans % self._full_every == 0
        self._scans += 1
        self._stats.add("tls.scans")
        before = len(self._attached)
        if full and self._attach_system and self._scans == 1:
            for m in _system_libssl_mappings():
                self._consider(m, is_exe=False)
        alive = set()
        for pid in _pids(self._proc):
            alive.add(pid)
            exe = _exe_id(self._proc, pid)
            if not full and pid in self._pid_exe and self._pid_exe[pid] == exe:
                continue
            self._pid_exe[pid] = exe
            for m in _mapped_files(self._proc, pid):
                self._consider(m, is_exe=m.file_id == exe)
        for pid in list(self._pid_exe):
            if pid not in alive:
                del self._pid_exe[pid]
        return len(self._attached) - before

    def _consider(self, m: _Mapping, is_exe: bool) -> None:
        if m.file_id in self._handled:
            return
        got = self._finder.classify(m, is_exe)
        if got is None:
            # Not TLS: remember only the identity, drop the ELF details.
            self._handled.add(m.file_id)
            self._finder.elf_cache.pop(m.file_id, None)
            return
        kind, info = got
        self._handled.add(m.file_id)
        # Attached or skipped, the file is never looked at again: its ELF details go.
        self._finder.elf_cache.pop(m.file_id, None)
        if kind not in (Kind.OPENSSL_SHARED, Kind.OPENSSL_STATIC):
            lib = _library(kind, m, info, ())
            self._stats.add("tls.libraries_skipped")
            log.info("TLS: not attaching to %s: %s", m.path, lib.note)
            return
        self._attach(m, info)

    def _attach(self, m: _Mapping, info: ElfInfo) -> None:
        capture = self._capture
        done: list[Any] = []  # attachment handles
        symbols: list[str] = []
        for sym in _WANTED:
            if sym not in info.defined:
                continue
            enter, leave = PROBE_PROGRAMS[sym]
            mark = len(done)
            try:
                offset = info.offsets.get(sym)
                if offset is None:
                    raise OSError("symbol is in no loadable segment")
                # Return probe first: a call caught by the entry probe then always has
                # its return seen, so no stale in-call state swallows later syscalls.
                if leave is not None:
                    done.append(capture.attach_uprobe(m.open_path, offset, leave, True))
                done.append(capture.attach_uprobe(m.open_path, offset, enter, False))
                symbols.append(sym)
            except (OSError, KeyError) as exc:
                capture.detach_probes(done[mark:])  # no half-probed symbol
                del done[mark:]
                self._stats.add("tls.attach_failures")
                log.warning(
                    "TLS: could not attach %s in %s (%s); HTTPS through it will not be seen",
                    sym,
                    m.path,
                    exc,
                )
        if not any(s in symbols for s in DATA_SYMBOLS):
            capture.detach_probes(done)
            return
        self._attached[m.file_id] = (m.path, symbols, m.open_path, done)
        self._stats.add("tls.libraries_attached")
        self._stats.add("tls.probes_attached", len(done))
        log.info("TLS: attached %d probes to %s (%s)", len(done), m.path, ", ".join(symbols))

    def close(self) -> None:
        """Detach every probe this attacher added. Idempotent."""
        if self._closed:
            return
        self._closed = True
        handles = [h for _, _, _, done in self._attached.values() for h in done]
        self._attached.clear()
        self._capture.detach_probes(handles)


def _pids_text(pids: tuple[int, ...]) -> str:
    if not pids:
        return "no process"
    shown = ",".join(map(str, pids[:5]))
    return "pids %s%s" % (shown, " and %d more" % (len(pids) - 5) if len(pids) > 5 else "")


def coverage_report(proc: str = "/proc") -> list[str]:
    """Human-readable lines for `otel-ebpf check`: what TLS is covered and what is not."""
    libs = discover_tls_libraries(proc)
    lines = []
    covered = [lib for lib in libs if lib.covered]
    if not covered:
        lines.append(
            "[NO ] tls  no OpenSSL library found (no libssl.so.* in the loader cache or in any "
            "process); HTTPS will not be decrypted"
        )
    for lib in covered:
        users = _pids_text(lib.pids) if lib.pids else "loader cache"
        lines.append(
            "[ok ] tls  %s: %s, would attach %s (%s)"
            % (lib.path, lib.kind, ", ".join(lib.symbols), users)
        )
    for lib in libs:
        if not lib.covered:
            lines.append("[NO ] tls  %s (%s): %s" % (lib.path, _pids_text(lib.pids), lib.note))
    lines.append("      tls  " + NOT_COVERED_NOTE)
    return lines
