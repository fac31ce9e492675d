"""Where the daemon's non-Python files are: the BPF C sources and the config file.

Contract: `bpf_dir()` returns the directory holding the BPF programs (`*.c` and
`include/`), `default_config_path()` the YAML config to read when the command line
names none (or None: run on built-in defaults), `shipped_config_path()` the example
config that came with this copy of otel-ebpf. Nothing here reads the files.

Two layouts are supported, checked in this order:
1. a checkout (`bpf/` and `config/` beside the `otel_ebpf` package, next to
   pyproject.toml), including editable installs: edits to bpf/ take effect at once;
2. an installed wheel, where setup.py's build hook copied them to
   `otel_ebpf/_data/{bpf,config}`.
`OTEL_EBPF_BPF_DIR` overrides the BPF directory (e.g. for kernel engineers trying a
patched program against an installed daemon). A missing directory raises
`ResourceError`, whose message says what was searched and how to fix it.
"""

from __future__ import annotations

import os
from pathlib import Path

# The config path an installed daemon reads by default (systemd unit, container
# image and Kubernetes ConfigMap all put it here).
SYSTEM_CONFIG_PATH = Path("/etc/otel-ebpf/otel-ebpf.yaml")
CONFIG_FILE_NAME = "otel-ebpf.yaml"
BPF_DIR_ENV = "OTEL_EBPF_BPF_DIR"

_PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT_DIR = _PACKAGE_DIR.parent
_DATA_DIR = _PACKAGE_DIR / "_data"


class ResourceError(RuntimeError):
    """A file the daemon ships with could not be found (broken install)."""


def running_from_checkout() -> bool:
    """True when this package is imported from a source checkout (plain or editable)."""
    return (_CHECKOUT_DIR / "pyproject.toml").is_file() and (_CHECKOUT_DIR / "bpf").is_dir()


def bpf_dir() -> Path:
    """The directory holding the BPF C sources, for BPF(src_file=..., cflags=["-I..."])."""
    override = os.environ.get(BPF_DIR_ENV)
    if override:
        path = Path(override)
        if not path.is_dir():
            raise ResourceError(
                f"{BPF_DIR_ENV}={override} is not a directory; unset it to use the BPF "
                "programs shipped with otel-ebpf"
            )
        return path
    candidates = [_CHECKOUT_DIR / "bpf"] if running_from_checkout() else []
    candidates.append(_DATA_DIR / "bpf")
    for path in candidates:
        if path.is_dir():
            return path
    raise ResourceError(
        "the BPF programs are missing (looked in "
        + ", ".join(str(p) for p in candidates)
        + "): reinstall otel-ebpf from a wheel or sdist built by `pip wheel .`, "
        f"or set {BPF_DIR_ENV} to a directory holding the bpf/ sources"
    )


def shipped_config_path() -> Path | None:
    """The example config that came with this copy (checkout or wheel), if any."""
    candidates = [_CHECKOUT_DIR / "config" / CONFIG_FILE_NAME] if running_from_checkout() else []
    candidates.append(_DATA_DIR / "config" / CONFIG_FILE_NAME)
    for path in candidates:
        if path.is_file():
            return path
    return None


def default_config_path() -> Path | None:
    """The config to read when none is given on the command line.

    From a checkout: config/otel-ebpf.yaml (what developers edit). Installed:
    /etc/otel-ebpf/otel-ebpf.yaml when it exists, else None (built-in defaults plus
    OTEL_* variables), because silently reading an example file from site-packages
    would hide a forgotten /etc config.
    """
    if running_from_checkout():
        path = _CHECKOUT_DIR / "config" / CONFIG_FILE_NAME
        if path.is_file():
            return path
    if SYSTEM_CONFIG_PATH.is_file():
        return SYSTEM_CONFIG_PATH
    return None
