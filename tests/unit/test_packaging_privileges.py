"""privileges: the capability check that replaces "are we root" (no root needed here)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from otel_ebpf.privileges import (
    CAPABILITIES,
    capture_privilege_problem,
    effective_capabilities,
    privilege_warnings,
)

UNIT = Path(__file__).resolve().parents[2] / "packaging" / "systemd" / "otel-ebpf.service"
DROP_IN = UNIT.with_name("plaintext-only.conf")


def caps_of(path: Path) -> set[str]:
    lines = [m for m in re.findall(r"^AmbientCapabilities=(.*)$", path.read_text(), re.M) if m]
    return set(lines[-1].split())


def cap_eff(names: set[str]) -> str:
    bits = 0
    for name in names:
        bits |= 1 << CAPABILITIES[name]
    return "Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t%016x\nCapBnd:\t000001ffffffffff\n" % bits


def test_parses_capeff():
    assert effective_capabilities(cap_eff({"CAP_BPF", "CAP_SYS_PTRACE"})) == {"CAP_BPF", "CAP_SYS_PTRACE"}
    assert effective_capabilities("CapEff:\t000001ffffffffff\n") == set(CAPABILITIES)
    assert effective_capabilities("no such line") == set()


def test_this_process_is_read_from_proc():
    caps = effective_capabilities()
    if os.geteuid() == 0 and "CAP_SYS_ADMIN" in caps:
        assert capture_privilege_problem() is None
    assert caps <= set(CAPABILITIES)


def test_the_systemd_units_set_is_accepted():
    unit = caps_of(UNIT)
    assert capture_privilege_problem(True, unit, euid=61234, kernel=(6, 18)) is None
    plaintext = caps_of(DROP_IN)
    assert capture_privilege_problem(False, plaintext, euid=61234, kernel=(6, 18)) is None
    problem = capture_privilege_problem(True, plaintext, euid=61234, kernel=(6, 18))
    assert "CAP_DAC_OVERRIDE for OpenSSL uprobes (or run with --no-tls)" in problem
    assert privilege_warnings(unit, euid=61234, kernel=(6, 18), tls=False) == []
    with_tls = privilege_warnings(unit, euid=61234, kernel=(6, 18))
    assert len(with_tls) == 1 and "tls-containers.conf" in with_tls[0]
    containers = unit | caps_of(UNIT.with_name("tls-containers.conf"))
    assert privilege_warnings(containers, euid=61234, kernel=(6, 18)) == []


def test_missing_capabilities_are_named_with_the_fix():
    problem = capture_privilege_problem(True, {"CAP_SYS_PTRACE"}, euid=61234, kernel=(6, 18))
    assert problem.startswith("running as uid 61234 without CAP_BPF, CAP_PERFMON, CAP_DAC_READ_SEARCH")
    assert "packaging/systemd/otel-ebpf.service" in problem


def test_the_daemonsets_set_is_accepted_for_root():
    import yaml

    manifest = UNIT.parents[1] / "kubernetes" / "otel-ebpf.yaml"
    ds = next(d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "DaemonSet")
    added = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
    caps = {"CAP_" + c for c in added}
    assert capture_privilege_problem(True, caps, euid=0, kernel=(6, 18)) is None
    assert privilege_warnings(caps, euid=0, kernel=(6, 18)) == []


def test_root_counts_capabilities_not_uid():
    assert capture_privilege_problem(True, set(CAPABILITIES), euid=0, kernel=(6, 18)) is None
    # Root in a container with every capability dropped cannot load anything.
    assert "without CAP_BPF, CAP_PERFMON" in capture_privilege_problem(True, set(), euid=0, kernel=(6, 18))
    # Root with the container's four: tracefs is root's own, so no DAC capability is needed.
    assert capture_privilege_problem(True, {"CAP_BPF", "CAP_PERFMON"}, euid=0, kernel=(6, 18)) is None


def test_old_kernels_need_sys_admin_and_memlock():
    problem = capture_privilege_problem(True, {"CAP_BPF", "CAP_PERFMON", "CAP_DAC_OVERRIDE"},
                                        euid=0, kernel=(5, 4))
    assert "CAP_SYS_ADMIN (kernel 5.4 predates CAP_BPF/CAP_PERFMON)" in problem
    warnings = privilege_warnings({"CAP_SYS_ADMIN", "CAP_SYS_PTRACE"}, euid=0, kernel=(5, 4),
                                  memlock=(8 << 20, 8 << 20))
    assert len(warnings) == 1 and "LimitMEMLOCK=infinity" in warnings[0]
    assert privilege_warnings({"CAP_SYS_ADMIN", "CAP_SYS_PTRACE"}, euid=0, kernel=(5, 4),
                              memlock=(-1, -1)) == []


def test_without_ptrace_capture_degrades():
    warnings = privilege_warnings({"CAP_BPF", "CAP_PERFMON", "CAP_DAC_OVERRIDE"}, euid=5,
                                  kernel=(6, 1), tls=False)
    assert len(warnings) == 1 and "OTEL_SERVICE_NAME" in warnings[0]
