"""The container entry point gives BCC usable kernel headers, as it would in the image.

No container engine runs here, so the image's file-system layout is rebuilt with a
private mount namespace (`unshare --mount`): the host's /lib/modules and /usr/src are
bind-mounted under a fake /host (as the DaemonSet and compose file mount them), the
container's /lib/modules is an empty tmpfs (the DaemonSet's emptyDir), and then
packaging/container/entrypoint.sh runs a real BCC compile-and-attach:

- host headers present: the entry point links them and BPF loads;
- host headers absent: it falls back to the Debian headers baked into the image
  (here: the same Debian packages, installed by scripts/bootstrap.sh) and BPF loads;
- no headers at all: it says what to mount, and BCC indeed fails.
"""

from __future__ import annotations

import glob
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO / "packaging" / "container" / "entrypoint.sh"
BPF_SMOKE = (
    "from bcc import BPF\n"
    "b = BPF(text='TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }')\n"
    "print('BPF-LOADED', flush=True)\n"
)


@pytest.fixture(scope="module")
def namespace_tools(bpf_available):
    for tool in ("unshare", "mount"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} (util-linux/mount) is missing", pytrace=False)
    if not glob.glob("/usr/src/linux-headers-*-amd64"):
        pytest.fail("no Debian kernel headers in /usr/src: run scripts/bootstrap.sh", pytrace=False)


def run_in_container_layout(
    tmp_path: Path, *, host_headers: bool, image_headers: str, command: list[str]
) -> subprocess.CompletedProcess:
    host = tmp_path / "host"
    (host / "lib" / "modules").mkdir(parents=True)
    (host / "usr" / "src").mkdir(parents=True)
    binds = ""
    if host_headers:
        binds = (
            f"mount --bind /lib/modules {host}/lib/modules && "
            f"mount --bind /usr/src {host}/usr/src && "
        )
    script = (
        f"{binds}mount -t tmpfs tmpfs /lib/modules && "
        f'exec env OTEL_EBPF_HOST_ROOT={host} OTEL_EBPF_IMAGE_HEADERS={image_headers} '
        f'sh {ENTRYPOINT} "$@"'
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "entry", *command],
        capture_output=True, text=True, timeout=180,
    )


def test_host_headers_are_linked_and_bpf_loads(namespace_tools, tmp_path):
    proc = run_in_container_layout(
        tmp_path, host_headers=True, image_headers=str(tmp_path / "no-image-headers"),
        command=[sys.executable, "-c", BPF_SMOKE + "import os; print(os.readlink("
                 "'/lib/modules/' + os.uname().release + '/build'))"],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the host's kernel headers" in proc.stderr
    assert "BPF-LOADED" in proc.stdout
    assert f"{tmp_path}/host/usr/src/linux-headers-" in proc.stdout


def test_image_headers_are_the_fallback(namespace_tools, tmp_path):
    proc = run_in_container_layout(
        tmp_path, host_headers=False, image_headers="/usr/src",
        command=[sys.executable, "-c", BPF_SMOKE],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "using the image's linux-headers-" in proc.stderr
    assert "BPF-LOADED" in proc.stdout


def test_no_headers_says_what_to_mount(namespace_tools, tmp_path):
    proc = run_in_container_layout(
        tmp_path, host_headers=False, image_headers=str(tmp_path / "none"),
        command=[sys.executable, "-c", BPF_SMOKE],
    )
    assert "mount the host's /lib/modules and /usr/src" in proc.stderr
    assert proc.returncode != 0 and "BPF-LOADED" not in proc.stdout
