"""Build hook: ship the repository's bpf/ and config/ inside the package.

All metadata lives in pyproject.toml. This file exists only because the BPF C sources
and the example config sit at the repository top (a fixed layout shared with the
kernel and config stages), outside the `otel_ebpf` package, yet a non-editable
`pip install .` must still find them at run time. `build_py` copies them into
`otel_ebpf/_data/{bpf,config}` inside the build tree (never into the checkout);
`otel_ebpf.resources` looks there when it is not running from a checkout.
"""

from __future__ import annotations

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

# Repository directories shipped verbatim, and where they land inside the package.
DATA_DIRS = {"bpf": "otel_ebpf/_data/bpf", "config": "otel_ebpf/_data/config"}
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "*~", ".*")


class build_py_with_data(build_py):
    def run(self) -> None:
        super().run()
        if self.editable_mode:
            # Editable installs run from the checkout, where resources.py finds bpf/
            # and config/ directly; copying them would only create stale duplicates.
            return
        here = os.path.dirname(os.path.abspath(__file__))
        for src, dest in DATA_DIRS.items():
            src_dir = os.path.join(here, src)
            if not os.path.isdir(src_dir):
                raise FileNotFoundError(
                    f"{src_dir} is missing: build from a complete checkout or sdist"
                )
            target = os.path.join(self.build_lib, dest)
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(src_dir, target, ignore=SKIP)


setup(cmdclass={"build_py": build_py_with_data})
