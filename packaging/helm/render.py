"""Render and lint a Helm chart with real Helm, without a `helm` binary or a cluster.

No helm binary can be installed from the package registries this project may use, but
PyPI's `helm-sdkpy` wheel ships the Helm v4 Go library itself (a cgo shared object).
This script loads that library with ctypes (the wheel says Python >= 3.12 only for its
own async wrapper; the C ABI does not care) and:

- `lint CHART`: Helm's own linter (`helm lint`);
- `render CHART [--values FILE] [--release NAME] [--namespace NS]`: a real `helm
  install` against a throwaway in-process stand-in for the Kubernetes API on 127.0.0.1
  that accepts every object and stores nothing. Helm renders the templates with its
  own engine (sprig, include, toYaml, required, ...) and returns the release manifest,
  which is printed: the same text `helm template` would give.

The wheel is fetched once with pip (`pip download helm-sdkpy==VERSION`) into
$XDG_CACHE_HOME/otel-ebpf (default ~/.cache/otel-ebpf). Used by
tests/unit/test_packaging.py; usable by hand:
    .venv/bin/python packaging/helm/render.py render packaging/helm/otel-ebpf
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HELM_SDK_VERSION = "0.1.32"
_SO_IN_WHEEL = "helm_sdkpy/_lib/linux-amd64/libhelm_sdkpy.so"


class HelmError(RuntimeError):
    pass


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "otel-ebpf" / f"helm-sdkpy-{HELM_SDK_VERSION}"


def helm_library_path() -> Path:
    """The Helm shared library, downloading the wheel with pip on first use."""
    target = cache_dir()
    so = target / "libhelm_sdkpy.so"
    if so.exists():
        return so
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             "--only-binary=:all:", "--python-version", "3.12", "--platform",
             "manylinux2014_x86_64", "--platform", "any",
             f"helm-sdkpy=={HELM_SDK_VERSION}", "-d", tmp],
            capture_output=True, text=True,
        )
        wheels = list(Path(tmp).glob("helm_sdkpy-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise HelmError(
                f"could not download helm-sdkpy {HELM_SDK_VERSION} from PyPI "
                f"(pip said: {proc.stderr.strip()[-500:]})"
            )
        with zipfile.ZipFile(wheels[0]) as whl, whl.open(_SO_IN_WHEEL) as src:
            partial = target / "libhelm_sdkpy.so.partial"
            partial.write_bytes(src.read())
            partial.rename(so)
    return so


class _Helm:
    def __init__(self) -> None:
        self.lib = ctypes.CDLL(str(helm_library_path()))
        self.lib.helm_sdkpy_last_error.restype = ctypes.c_void_p
        self.lib.helm_sdkpy_version_string.restype = ctypes.c_void_p

    @staticmethod
    def _text(ptr: int | None) -> str:
        return ctypes.string_at(ptr).decode() if ptr else ""

    def _error(self) -> str:
        return self._text(self.lib.helm_sdkpy_last_error())

    def version(self) -> str:
        return self._text(self.lib.helm_sdkpy_version_string())

    def config(self, namespace: str, kubeconfig: str = "", context: str = "") -> ctypes.c_ulonglong:
        handle = ctypes.c_ulonglong()
        rc = self.lib.helm_sdkpy_config_create(
            namespace.encode(), kubeconfig.encode(), context.encode(), b"{}", ctypes.byref(handle)
        )
        if rc != 0:
            raise HelmError(f"helm configuration failed: {self._error()}")
        return handle

    def lint(self, chart: Path) -> dict:
        out = ctypes.c_void_p()
        rc = self.lib.helm_sdkpy_lint(self.config("default"), str(chart).encode(), ctypes.byref(out))
        if rc != 0:
            raise HelmError(f"helm lint failed: {self._error()}")
        return json.loads(self._text(out.value))

    def install(self, handle, release: str, chart: Path, values: dict | None) -> dict:
        options = {
            "create_namespace": False, "wait": False, "timeout_seconds": 60,
            "wait_for_jobs": False, "server_side_apply": "false", "force_conflicts": False,
            "disable_openapi_validation": True, "skip_schema_validation": False,
            "rollback_on_failure": False, "take_ownership": False,
        }
        out = ctypes.c_void_p()
        rc = self.lib.helm_sdkpy_install(
            handle, release.encode(), str(chart).encode(),
            json.dumps(values).encode() if values else b"", b"",
            json.dumps(options).encode(), ctypes.byref(out),
        )
        if rc != 0:
            raise HelmError(f"helm install (render) failed: {self._error()}")
        return json.loads(self._text(out.value))


# ---- a stand-in Kubernetes API that accepts everything ----------------------------

def _resource(name: str, kind: str, namespaced: bool = True) -> dict:
    return {"name": name, "singularName": kind.lower(), "namespaced": namespaced, "kind": kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}


_DISCOVERY = {
    "/version": {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"},
    "/api": {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []},
    "/apis": {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
        {"name": group, "versions": [{"groupVersion": group + "/v1", "version": "v1"}],
         "preferredVersion": {"groupVersion": group + "/v1", "version": "v1"}}
        for group in ("apps", "rbac.authorization.k8s.io")]},
    "/api/v1": {"kind": "APIResourceList", "groupVersion": "v1", "resources": [
        _resource("configmaps", "ConfigMap"), _resource("secrets", "Secret"),
        _resource("serviceaccounts", "ServiceAccount"), _resource("services", "Service"),
        _resource("namespaces", "Namespace", namespaced=False)]},
    "/apis/apps/v1": {"kind": "APIResourceList", "groupVersion": "apps/v1", "resources": [
        _resource("daemonsets", "DaemonSet"), _resource("deployments", "Deployment")]},
    "/apis/rbac.authorization.k8s.io/v1": {
        "kind": "APIResourceList", "groupVersion": "rbac.authorization.k8s.io/v1", "resources": [
            _resource("clusterroles", "ClusterRole", namespaced=False),
            _resource("clusterrolebindings", "ClusterRoleBinding", namespaced=False)]},
}


class _FakeApi(BaseHTTPRequestHandler):
    def _send(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> dict:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            return json.loads(raw or b"{}")
        except ValueError:  # Helm stores its release record as protobuf: not needed here
            return {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": "release"}}

    def do_GET(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path in _DISCOVERY:
            self._send(200, _DISCOVERY[path])
        elif path.rsplit("/", 1)[-1] in ("secrets", "configmaps"):  # empty lists
            self._send(200, {"kind": "List", "apiVersion": "v1",
                             "metadata": {"resourceVersion": "1"}, "items": []})
        else:
            self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404, "message": "not found"})

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()
        body.setdefault("metadata", {})["resourceVersion"] = "1"
        self._send(201, body)

    def do_PUT(self) -> None:  # noqa: N802
        self._send(200, self._body())

    do_PATCH = do_PUT

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def render(chart: Path, values: dict | None = None, release: str = "otel-ebpf",
           namespace: str = "otel-ebpf") -> str:
    """The manifest real Helm renders for `chart` with `values` (a `helm template`)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(json.dumps({
                "apiVersion": "v1", "kind": "Config", "current-context": "render",
                "clusters": [{"name": "render", "cluster": {
                    "server": f"http://127.0.0.1:{server.server_address[1]}"}}],
                "users": [{"name": "render", "user": {"token": "unused"}}],
                "contexts": [{"name": "render", "context": {
                    "cluster": "render", "user": "render", "namespace": namespace}}],
            }))
            helm = _Helm()
            handle = helm.config(namespace, str(kubeconfig), "render")
            return helm.install(handle, release, chart.resolve(), values)["manifest"]
    finally:
        server.shutdown()
        server.server_close()


def lint(chart: Path) -> dict:
    return _Helm().lint(chart.resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_lint = sub.add_parser("lint")
    p_lint.add_argument("chart", type=Path)
    p_render = sub.add_parser("render")
    p_render.add_argument("chart", type=Path)
    p_render.add_argument("--values", type=Path, help="YAML or JSON values file")
    p_render.add_argument("--release", default="otel-ebpf")
    p_render.add_argument("--namespace", default="otel-ebpf")
    args = parser.parse_args(argv)
    try:
        if args.command == "lint":
            result = lint(args.chart)
            print(json.dumps(result, indent=2))
            return 1 if result.get("Errors") else 0
        values = None
        if args.values:
            import yaml

            values = yaml.safe_load(args.values.read_text())
        print(render(args.chart, values, args.release, args.namespace))
        return 0
    except HelmError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
