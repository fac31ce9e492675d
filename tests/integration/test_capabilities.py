"""The systemd unit's capability set suffices for capture, and each capability in it is needed.

The set is read from packaging/systemd/otel-ebpf.service (AmbientCapabilities=), so the
unit and this proof cannot drift apart. Each run is a real one: a non-root user
(uid 65534) with exactly those capabilities and no-new-privileges, as systemd would
start the service, via `setpriv`:

1. a probe program (tests/integration/capability_probe.py) that does what capture does
   at start-up: compile and load BPF with a ring buffer, attach a syscall tracepoint
   and OpenSSL uprobes, see events from real TLS traffic, and read another user's
   /proc/PID/{environ,maps,root};
2. each capability removed in turn makes that probe fail, so none is surplus;
3. the daemon itself (`otel-ebpf run --exporter jsonl`) under the same set captures
   23 requests a real curl sends to a real server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "packaging" / "systemd" / "otel-ebpf.service"
PLAINTEXT_DROP_IN = UNIT.with_name("plaintext-only.conf")
PROBE = Path(__file__).with_name("capability_probe.py")
NOBODY = 65534
LIBSSL = "/lib/x86_64-linux-gnu/libssl.so.3"


def unit_capabilities(unit: Path = UNIT) -> list[str]:
    """Last non-empty AmbientCapabilities= of a unit or drop-in, in setpriv's names."""
    text = unit.read_text()
    found = [m for m in re.findall(r"^AmbientCapabilities=(.*)$", text, re.M) if m.strip()]
    assert found, f"{unit} has no AmbientCapabilities= line"
    caps = found[-1].split()
    bounding = [m for m in re.findall(r"^CapabilityBoundingSet=(.*)$", text, re.M) if m.strip()]
    assert bounding and bounding[-1].split() == caps, (
        "CapabilityBoundingSet= and AmbientCapabilities= must list the same capabilities"
    )
    return [c.removeprefix("CAP_").lower() for c in caps]


def setpriv_prefix(caps: list[str]) -> list[str]:
    spec = ",".join(["-all"] + ["+" + c for c in caps])
    return [
        "setpriv",
        "--no-new-privs",
        f"--reuid={NOBODY}",
        f"--regid={NOBODY}",
        "--clear-groups",
        f"--inh-caps={spec}",
        f"--ambient-caps={spec}",
        f"--bounding-set={spec}",
    ]


@pytest.fixture(scope="module")
def capability_env(bpf_available, tmp_path_factory):
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is missing: apt-get install util-linux", pytrace=False)
    if not os.path.exists(LIBSSL):
        pytest.fail(f"{LIBSSL} is missing: apt-get install libssl3", pytrace=False)
    work = tmp_path_factory.mktemp("caps")
    work.chmod(0o777)  # the unprivileged runs write here
    cert, key = work / "cert.pem", work / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
         "-keyout", str(key), "-out", str(cert), "-days", "1"],
        check=True, capture_output=True,
    )
    key.chmod(0o644)
    # A private copy of libssl (own inode) for the probe: see capability_probe.py. Short
    # path: BCC names a tracefs uprobe after it, and the kernel caps names at 64 bytes.
    libdir = Path(tempfile.mkdtemp(prefix="oe", dir="/tmp"))
    shutil.copy2(LIBSSL, libdir / "libssl.so.3")
    libdir.chmod(0o755)
    # A process owned by root (another user than the daemon's) whose /proc entries the
    # probe must read, as the daemon does for every process it reports on.
    other = subprocess.Popen(["sleep", "120"], env={"OTEL_SERVICE_NAME": "cap-probe-target"})
    yield {"cert": cert, "key": key, "other_pid": other.pid, "work": work, "libdir": libdir}
    other.kill()
    other.wait()
    shutil.rmtree(libdir, ignore_errors=True)


def run_probe(env: dict, caps: list[str], *extra: str, libdir: Path | None = None
              ) -> subprocess.CompletedProcess:
    libdir = libdir or env["libdir"]
    cmd = setpriv_prefix(caps) + [
        "env", f"LD_LIBRARY_PATH={libdir}",
        sys.executable, str(PROBE), str(env["cert"]), str(env["key"]), str(env["other_pid"]),
        str(libdir / "libssl.so.3"), *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=env["work"])


def probe_result(proc: subprocess.CompletedProcess) -> dict:
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {}


def test_unit_capabilities_suffice_for_capture(capability_env):
    caps = unit_capabilities()
    proc = run_probe(capability_env, caps)
    result = probe_result(proc)
    assert proc.returncode == 0, f"probe failed under {caps}:\n{proc.stdout}\n{proc.stderr}"
    assert result["uid"] == NOBODY
    assert result["tracepoint_events"] >= 1
    assert result["uprobe_events"] >= 2  # the client's request and the server's response
    assert b"cap-probe-target" in bytes.fromhex(result["environ_hex"])
    assert result["maps_lines"] > 0
    assert result["root_entries"] > 0


def test_plaintext_drop_in_suffices_without_tls(capability_env):
    caps = unit_capabilities(PLAINTEXT_DROP_IN)
    assert "dac_override" not in caps
    proc = run_probe(capability_env, caps, "--no-tls")
    assert proc.returncode == 0, f"probe failed under {caps}:\n{proc.stdout}\n{proc.stderr}"
    result = probe_result(proc)
    assert result["tracepoint_events"] >= 1 and result["root_entries"] > 0
    # ...and that set really cannot register uprobes: the drop-in must also say --no-tls.
    assert run_probe(capability_env, caps).returncode != 0
    assert "--no-tls" in PLAINTEXT_DROP_IN.read_text()


@pytest.mark.parametrize("dropped", unit_capabilities())
def test_every_unit_capability_is_needed(capability_env, dropped):
    caps = [c for c in unit_capabilities() if c != dropped]
    proc = run_probe(capability_env, caps)
    assert proc.returncode != 0, (
        f"capture still worked without CAP_{dropped.upper()}: drop it from the unit\n{proc.stdout}"
    )
    # The failure must be a permission problem, not an unrelated crash.
    assert re.search(r"Permission denied|Operation not permitted|Failed to (attach|load)|"
                     r"EPERM|EACCES", proc.stdout + proc.stderr), proc.stderr[-2000:]


HOLDER = """
import sys, time
from bcc import BPF
b = BPF(text="int hold(void *ctx) { return 0; }")
b.attach_uprobe(name=sys.argv[1], sym="SSL_write", fn_name="hold")
print("holding", flush=True)
time.sleep(60)
"""


def test_tracefs_uprobe_limits_and_the_sys_admin_alternative(capability_env):
    """Why the unit's TLS capture has two documented limits, and what lifts them.

    Without CAP_SYS_ADMIN the kernel's uprobe PMU refuses us and BCC registers uprobes
    through tracefs instead, which (a) names the event after the library's path, capped
    at 64 bytes by the kernel, so long paths (a container's libssl under /proc/PID/root)
    fail, and (b) is refused where another process holds a PMU uprobe at the same offset.
    With CAP_SYS_ADMIN added, BCC uses the PMU and both work.
    """
    caps = unit_capabilities()
    # (a) a long library path
    long_dir = Path(tempfile.mkdtemp(prefix="oe", dir="/tmp")) / ("x" * 40)
    long_dir.mkdir()
    try:
        shutil.copy2(LIBSSL, long_dir / "libssl.so.3")
        long_dir.parent.chmod(0o755)
        failed = run_probe(capability_env, caps, libdir=long_dir)
        assert failed.returncode != 0 and "cannot attach uprobe, Invalid argument" in failed.stderr
        assert run_probe(capability_env, caps + ["sys_admin"], libdir=long_dir).returncode == 0
    finally:
        shutil.rmtree(long_dir.parent, ignore_errors=True)
    # (b) another process (root, PMU) already probes the same function
    lib = capability_env["libdir"] / "libssl.so.3"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lib)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        failed = run_probe(capability_env, caps)
        assert failed.returncode != 0 and "Invalid argument" in failed.stderr
        proc = run_probe(capability_env, caps + ["sys_admin"])
        assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        holder.kill()
        holder.wait()


def daemonset_capabilities() -> list[str]:
    import yaml

    manifest = REPO / "packaging" / "kubernetes" / "otel-ebpf.yaml"
    ds = next(d for d in yaml.safe_load_all(manifest.read_text()) if d and d["kind"] == "DaemonSet")
    added = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
    return [c.lower() for c in added]


def test_daemonset_capabilities_suffice_as_root_across_mount_namespaces(capability_env):
    """The pod's set, as root (the container's user), with a library path as long as a
    container's libssl seen from the agent (/proc/PID/root/usr/lib/x86_64-linux-gnu/...)."""
    caps = daemonset_capabilities()
    long_dir = Path(tempfile.mkdtemp(prefix="oe", dir="/tmp")) / ("p" * 40)
    long_dir.mkdir()
    try:
        shutil.copy2(LIBSSL, long_dir / "libssl.so.3")
        spec = ",".join(["-all"] + ["+" + c for c in caps])
        proc = subprocess.run(
            ["setpriv", "--no-new-privs", f"--inh-caps={spec}", f"--ambient-caps={spec}",
             f"--bounding-set={spec}", "env", f"LD_LIBRARY_PATH={long_dir}", sys.executable,
             str(PROBE), str(capability_env["cert"]), str(capability_env["key"]),
             str(capability_env["other_pid"]), str(long_dir / "libssl.so.3")],
            capture_output=True, text=True, timeout=120, cwd=capability_env["work"],
        )
    finally:
        shutil.rmtree(long_dir.parent, ignore_errors=True)
    assert proc.returncode == 0, f"probe failed as root under {caps}:\n{proc.stderr[-3000:]}"
    result = probe_result(proc)
    assert result["uid"] == 0 and result["uprobe_events"] >= 2 and result["tracepoint_events"] >= 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_daemon_captures_under_unit_capabilities(capability_env):
    """The real daemon, as the unit starts it (minus systemd), sees 23 of 23 requests."""
    exe = Path(sys.executable).with_name("otel-ebpf")
    assert exe.exists(), f"{exe} missing: pip install -e . (scripts/bootstrap.sh does)"
    work: Path = capability_env["work"]
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    out_path = work / "exchanges.jsonl"
    health_path = work / "health"
    with open(out_path, "w") as out, open(work / "daemon.log", "w") as err:
        out_path.chmod(0o666)
        daemon = subprocess.Popen(
            setpriv_prefix(unit_capabilities())
            + [str(exe), "run", "--exporter", "jsonl", "--output", "-", "--port", str(port),
               "--health-file", str(health_path)],
            stdout=out, stderr=err, cwd=work,
        )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                log_text = (work / "daemon.log").read_text()
                if "not root" in log_text:
                    pytest.fail(
                        "the capture loader still demands uid 0, so the systemd unit cannot "
                        "work: in otel_ebpf/capture/loader.py replace the euid check with "
                        "otel_ebpf.privileges.capture_privilege_problem(options.tls)\n"
                        + log_text[-1500:], pytrace=False)
                pytest.fail(f"daemon exited {daemon.returncode}:\n{log_text}")
            if health_path.exists() and health_path.read_text().strip() == "ready":
                break
            time.sleep(0.2)
        else:
            pytest.fail(f"daemon not ready after 90 s:\n{(work / 'daemon.log').read_text()}")
        for i in range(23):
            subprocess.run(
                ["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/?n={i}"],
                check=True, timeout=10,
            )
        deadline = time.monotonic() + 20
        mine: list[dict] = []
        while time.monotonic() < deadline:
            mine = _requests_seen(out_path)
            if len(mine) >= 46:  # each request once as SERVER (http.server), once as CLIENT (curl)
                break
            time.sleep(0.3)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
        server.kill()
        server.wait()
    log_text = (work / "daemon.log").read_text()
    mine = _requests_seen(out_path)
    servers = sorted(e["url.query"] for e in mine if e["kind"] == "SERVER")
    clients = sorted(e["url.query"] for e in mine if e["kind"] == "CLIENT")
    expected = sorted(f"n={i}" for i in range(23))
    assert servers == expected, f"SERVER exchanges {servers}; daemon log:\n{log_text[-3000:]}"
    assert clients == expected, f"CLIENT exchanges {clients}; daemon log:\n{log_text[-3000:]}"
    assert daemon.returncode == 0, log_text[-3000:]


def _requests_seen(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("url.query", "").startswith("n=")]
