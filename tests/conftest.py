"""Shared test policy.

Integration tests (tests/integration, marker `integration`) need root, BCC and a
kernel that loads our programs. On a developer's laptop without those they skip with
the reason; under CI=true they fail, because a CI run that silently skipped the real
eBPF tests would prove nothing.
"""

from __future__ import annotations

import os

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing_bpf_prerequisite() -> str | None:
    """Why real eBPF cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "not root: loading eBPF programs needs root (or CAP_BPF+CAP_PERFMON)"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "the bcc Python module is not importable (Debian package python3-bpfcc; use the .venv made by scripts/bootstrap.sh)"
    if not os.path.isdir("/sys/kernel/tracing/events") and not os.path.isdir(
        "/sys/kernel/debug/tracing/events"
    ):
        return "tracefs is not mounted (mount -t tracefs tracefs /sys/kernel/tracing)"
    return None


def require_or_fail(reason: str | None) -> None:
    """Skip locally, fail in CI, when an integration prerequisite is missing."""
    if reason is None:
        return
    if IN_CI:
        pytest.fail(f"integration prerequisite missing under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def bpf_available() -> None:
    require_or_fail(missing_bpf_prerequisite())


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/integration" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(pytest.mark.integration)
