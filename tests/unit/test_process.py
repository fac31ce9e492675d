"""ProcessResolver: real processes (this one, children), cgroup samples, exit and reuse."""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
import time
import uuid
from datetime import datetime

import psutil
import pytest

from otel_ebpf import __version__
from otel_ebpf.process import (
    ProcessResolver,
    container_id_from_cgroup,
    daemon_resource_attributes,
    parse_resource_attributes,
    read_machine_id,
)
from otel_ebpf.stats import Stats

HEX = "4f2b0a9e1c3d5e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"


@pytest.fixture
def child():
    procs = []

    def start(env: dict[str, str]) -> subprocess.Popen:
        p = subprocess.Popen(["sleep", "30"], env=env)
        procs.append(p)
        # exec is complete once the new argv is visible: /proc/PID/exe switches earlier,
        # while argv and environ (set up together by the ELF loader) still read empty.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                with open("/proc/%d/cmdline" % p.pid, "rb") as f:
                    if f.read() == b"sleep\x0030\x00":
                        break
            except OSError:
                pass
            time.sleep(0.01)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_own_process_attributes():
    stats = Stats()
    info = ProcessResolver(stats).get(os.getpid())
    assert info is not None
    a = info.resource_attributes
    me = psutil.Process()
    exe = os.path.realpath(sys.executable)
    assert a["process.pid"] == os.getpid()
    assert a["process.parent_pid"] == os.getppid()
    assert a["process.executable.path"] == me.exe() == exe
    assert a["process.executable.name"] == os.path.basename(exe) == info.executable_name
    assert a["process.command_line"] == shlex.join(me.cmdline())
    assert a["process.owner"] == getpass.getuser()
    created = datetime.fromisoformat(a["process.creation.time"].replace("Z", "+00:00"))
    assert abs(created.timestamp() - me.create_time()) < 0.001
    assert a["process.creation.time"].endswith("Z")
    assert a["host.name"] == os.uname().nodename
    assert a["host.id"] == read_machine_id()
    assert a["os.type"] == "linux"
    assert a["telemetry.sdk.name"] == "opentelemetry"
    assert a["telemetry.sdk.language"] == "python"
    from opentelemetry.sdk.version import __version__ as sdk_version

    assert a["telemetry.sdk.version"] == sdk_version
    assert a["telemetry.distro.name"] == "otel-ebpf"
    assert a["telemetry.distro.version"] == __version__
    uuid.UUID(a["service.instance.id"])  # well-formed
    # Without OTEL_SERVICE_NAME in our environment, the executable name.
    if "OTEL_SERVICE_NAME" not in os.environ:
        assert a["service.name"] == info.service_name == os.path.basename(exe)
    assert stats.get("process.lookups") == 1


def test_cached_and_stable_instance_id():
    stats = Stats()
    r = ProcessResolver(stats)
    first = r.get(os.getpid())
    assert r.get(os.getpid()) is first
    assert stats.get("process.lookups") == 1
    # A fresh resolver (daemon restart) computes the same id for the same process.
    again = ProcessResolver(Stats()).get(os.getpid())
    assert again.resource_attributes["service.instance.id"] == \
        first.resource_attributes["service.instance.id"]


def test_child_with_otel_service_name_and_resource_attributes(child):
    p = child({"OTEL_SERVICE_NAME": "checkout",
               "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,deployment.environment=prod%20eu,"
                                           "service.version=1.2,process.pid=1,bad"})
    info = ProcessResolver(Stats()).get(p.pid)
    a = info.resource_attributes
    assert info.service_name == a["service.name"] == "checkout"
    assert a["deployment.environment"] == "prod eu"
    assert a["service.version"] == "1.2"
    assert a["process.pid"] == p.pid  # what we measured wins over the target's claim
    assert a["process.parent_pid"] == os.getpid()
    assert a["process.executable.name"] == "sleep"
    assert a["process.command_line"] == "sleep 30"


def test_child_with_service_name_only_in_resource_attributes(child):
    p = child({"OTEL_RESOURCE_ATTRIBUTES": "service.name=billing,service.instance.id=abc-1"})
    a = ProcessResolver(Stats()).get(p.pid).resource_attributes
    assert a["service.name"] == "billing"
    assert a["service.instance.id"] == "abc-1"  # the target's own, so its spans correlate


def test_child_without_otel_env_is_named_after_its_executable(child):
    p = child({})
    r = ProcessResolver(Stats())
    info = r.get(p.pid)
    assert info.service_name == "sleep"
    other = r.get(os.getpid())
    assert info.resource_attributes["service.instance.id"] != \
        other.resource_attributes["service.instance.id"]


def test_exit_forget_and_sweep(child, monkeypatch):
    stats = Stats()
    r = ProcessResolver(stats)
    p1, p2 = child({}), child({})
    assert r.get(p1.pid) is not None and r.get(p2.pid) is not None
    assert len(r) == 2
    r.forget(p1.pid)
    assert len(r) == 1
    before = r.get(p2.pid)
    p2.kill()
    p2.wait()
    # exited: its late exchanges keep its identity for the grace period
    assert r.sweep() == []
    assert r.get(p2.pid) is before
    monkeypatch.setattr("otel_ebpf.process._EXITED_GRACE_S", 0.0)
    assert r.sweep() == [p2.pid]
    assert len(r) == 0
    assert r.get(p2.pid) is None
    assert stats.get("process.vanished") == 1
    assert r.get(p2.pid) is None  # remembered as gone: no second lookup
    assert stats.get("process.lookups") == 3


def test_reused_pid_is_swept(child, monkeypatch):
    r = ProcessResolver(Stats())
    p = child({})
    info = r.get(p.pid)
    real = r._start_ticks
    # The same pid now names a process that started later.
    monkeypatch.setattr(r, "_start_ticks",
                        lambda pid: real(pid) + 1 if pid == p.pid else real(pid))
    assert r.sweep() == [p.pid]
    assert info.start_ticks == real(p.pid)


def test_vanished_pid_is_none_and_counted():
    stats = Stats()
    pid = 2 ** 22 + 7  # above pid_max's ceiling: never a live process
    assert ProcessResolver(stats).get(pid) is None
    assert stats.get("process.vanished") == 1


def test_access_denied_gives_partial_attributes_and_is_counted(child, monkeypatch):
    stats = Stats()
    r = ProcessResolver(stats)
    p = child({"OTEL_SERVICE_NAME": "hidden"})
    monkeypatch.setattr(r, "_read_environ", lambda pid: None)  # as for EACCES
    info = r.get(p.pid)
    assert info.service_name == "sleep"  # environ unreadable: falls back
    assert info.resource_attributes["process.pid"] == p.pid
    assert stats.get("process.access_denied") == 1


def test_cache_is_bounded(child):
    r = ProcessResolver(Stats(), max_entries=2)
    procs = [child({}) for _ in range(3)]
    for p in procs:
        assert r.get(p.pid) is not None
    assert len(r) == 2


def test_daemon_resource_attributes():
    a = daemon_resource_attributes()
    assert a["service.name"] == "otel-ebpf"
    assert a["service.version"] == __version__
    assert a["process.pid"] == os.getpid()
    assert a["telemetry.distro.name"] == "otel-ebpf"


def test_parse_resource_attributes():
    assert parse_resource_attributes("a=1, b = x%2Cy ,=z,c,d=") == {"a": "1", "b": "x,y", "d": ""}


# ---- cgroup samples (literal files from real hosts) ------------------------------------


@pytest.mark.parametrize("text", [
    # cgroup v2, docker with the systemd driver
    "0::/system.slice/docker-%s.scope\n" % HEX,
    # cgroup v1, docker with the cgroupfs driver
    "12:memory:/docker/%s\n11:cpu,cpuacct:/docker/%s\n1:name=systemd:/docker/%s\n"
    % (HEX, HEX, HEX),
    # Kubernetes, containerd, v2 systemd driver
    "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_5f6a_"
    "7b8c_9d0e_1f2a3b4c5d6e.slice/cri-containerd-%s.scope\n" % HEX,
    # Kubernetes, v1 cgroupfs driver
    "4:pids:/kubepods/burstable/pod1b2c3d4e-5f6a-7b8c-9d0e-1f2a3b4c5d6e/%s\n" % HEX,
    # CRI-O
    "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-podabc.slice/"
    "crio-%s.scope\n" % HEX,
    # Podman
    "0::/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-%s.scope/container\n"
    % HEX,
])
def test_container_id_from_cgroup(text):
    assert container_id_from_cgroup(text) == HEX


@pytest.mark.parametrize("text", [
    "0::/user.slice/user-1000.slice/session-3.scope\n",
    "0::/\n",
    "0::/system.slice/crio-conmon-%s.scope\n" % HEX,
    "garbage without colons\n",
    "",
])
def test_no_container_id(text):
    assert container_id_from_cgroup(text) is None


def test_this_process_cgroup_parses_without_error():
    with open("/proc/self/cgroup") as f:
        text = f.read()
    container_id_from_cgroup(text)  # a VM: usually None; must never raise
    info = ProcessResolver(Stats()).get(os.getpid())
    assert ("container.id" in info.resource_attributes) == (
        container_id_from_cgroup(text) is not None)


def test_zombie_is_reported_gone_not_cached_half_read():
    stats = Stats()
    p = subprocess.Popen(["true"])
    deadline = time.monotonic() + 5
    while psutil.Process(p.pid).status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        assert ProcessResolver(stats).get(p.pid) is None  # exited, not yet reaped
        assert stats.get("process.vanished") == 1
    finally:
        p.wait()


def test_a_process_gone_before_lookup_is_named_by_the_kernel_comm():
    import subprocess
    import sys

    from otel_ebpf.process import ProcessResolver
    from otel_ebpf.stats import Stats

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: /proc/PID is gone, as for a one-shot curl
    stats = Stats()
    resolver = ProcessResolver(stats)
    assert resolver.get(child.pid) is None  # no hint: nothing invented
    resolver = ProcessResolver(stats)
    resolver.note_name(child.pid, "curl")
    info = resolver.get(child.pid)
    assert info is not None
    assert (info.service_name, info.executable_name) == ("curl", "curl")
    attrs = info.resource_attributes
    assert attrs["service.name"] == "curl"
    assert attrs["process.pid"] == child.pid
    assert attrs["host.name"]
    assert stats.get("process.identified_by_comm") == 1
    assert resolver.sweep() == []  # exited: kept for its late exchanges


def test_an_exited_process_keeps_its_kernel_name_after_the_sweep(monkeypatch):
    """The race behind a null process.executable.name: a one-shot client's CONN_OPEN
    was handled (name noted, process cached), a sweep ran after it exited, and its
    exchange was emitted after that."""
    from otel_ebpf.process import ProcessResolver
    from otel_ebpf.stats import Stats

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        resolver = ProcessResolver(Stats())
        resolver.note_name(child.pid, "curl")
        live = resolver.get(child.pid)
        assert live is not None and live.start_ticks > 0
    finally:
        child.kill()
        child.wait()
    monkeypatch.setattr("otel_ebpf.process._EXITED_GRACE_S", 0.0)
    assert resolver.sweep() == [child.pid]  # the full identity is gone ...
    info = resolver.get(child.pid)  # ... the kernel's name is not
    assert info is not None and info.executable_name == "curl"
    assert info.resource_attributes["process.executable.name"] == "curl"


def test_a_name_noted_after_a_failed_lookup_beats_the_negative_cache():
    from otel_ebpf.process import ProcessResolver
    from otel_ebpf.stats import Stats

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    resolver = ProcessResolver(Stats())
    assert resolver.get(child.pid) is None  # gone, and remembered as gone
    resolver.note_name(child.pid, "curl")
    info = resolver.get(child.pid)
    assert info is not None and info.executable_name == "curl"


def test_the_latest_kernel_name_of_a_pid_counts():
    from otel_ebpf.process import ProcessResolver
    from otel_ebpf.stats import Stats

    resolver = ProcessResolver(Stats())
    pid = 2 ** 22 + 50  # above pid_max: never live
    resolver.note_name(pid, "sh")
    resolver.note_name(pid, "curl")  # the pid reused, or the exec'd program
    assert resolver.get(pid).executable_name == "curl"


def test_kernel_names_are_evicted_oldest_first():
    from otel_ebpf.process import ProcessResolver
    from otel_ebpf.stats import Stats

    resolver = ProcessResolver(Stats(), max_entries=3)
    base = 2 ** 22 + 100  # above pid_max: never live, so resolved by name only
    for i in range(4):
        resolver.note_name(base + i, "p%d" % i)
    assert resolver.get(base) is None  # the oldest made room
    assert [resolver.get(base + i).executable_name for i in (1, 2, 3)] == ["p1", "p2", "p3"]


def _wait_argv(p: subprocess.Popen) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if psutil.Process(p.pid).cmdline()[:1] == ["sh"]:
                return
        except psutil.Error:
            pass
        time.sleep(0.01)


def test_command_line_is_redacted_and_loses_trailing_empty_arguments():
    # A process whose argv carries secrets and ends with empty strings (as a rewritten
    # nginx worker's does).
    p = subprocess.Popen(["sh", "-c", "sleep 30; :", "sh", "--password", "hunter2",
                          "--token=abc", "https://u:pw@h/?q=1&token=t", "", "", ""])
    try:
        _wait_argv(p)
        a = ProcessResolver(Stats()).get(p.pid).resource_attributes
        assert a["process.command_args"] == [
            "sh", "-c", "sleep 30; :", "sh", "--password", "REDACTED", "--token=REDACTED",
            "https://u:REDACTED@h/?q=1&token=REDACTED"]
        assert a["process.command_line"] == shlex.join(a["process.command_args"])
        for value in (a["process.command_line"], *a["process.command_args"]):
            assert "hunter2" not in value and "abc" not in value and "pw@" not in value

        # the configured list is the query redactor's; opting out exports argv as is
        from otel_ebpf.telemetry.redact import QueryRedactor
        a = ProcessResolver(Stats(), redact=QueryRedactor(("password",))) \
            .get(p.pid).resource_attributes
        assert a["process.command_args"][4:7] == ["--password", "REDACTED", "--token=abc"]
        a = ProcessResolver(Stats(), redact_command_line=False).get(p.pid).resource_attributes
        assert a["process.command_args"][4:] == [
            "--password", "hunter2", "--token=abc", "https://u:pw@h/?q=1&token=t"]
    finally:
        p.kill()
        p.wait()


def test_command_args_are_bounded():
    from otel_ebpf.process import _MAX_COMMAND_LINE

    resolver = ProcessResolver(Stats())
    args = resolver._command_args(["x" * 600, "y" * 600, "z" * 10])
    assert args == ["x" * 600, "y" * (_MAX_COMMAND_LINE - 601)]
    assert len(" ".join(args)) <= _MAX_COMMAND_LINE
