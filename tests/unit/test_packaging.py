"""Everything in packaging/ checked as far as this machine allows (no Docker, no cluster).

- Python packaging: a wheel built from the sources, installed into a throwaway venv,
  finds bpf/*.c and the config through otel_ebpf.resources and runs `otel-ebpf version`.
- Every YAML file parses; the Kubernetes manifests pass strict schema validation
  (kubernetes-validate ships the schemas); the ConfigMap's config loads through the
  real config loader; the compose file validates against the Compose specification.
- Helm: real Helm (the Go library inside PyPI's helm-sdkpy, see packaging/helm/render.py)
  lints the chart and renders it; with default values the rendering equals the plain
  manifests; with other values the knobs land where they should and still validate.
- systemd: `systemd-analyze verify` accepts the unit without a warning.
- One version everywhere: otel_ebpf.__version__, Chart.yaml, image tags and labels.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import otel_ebpf

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
K8S = PACKAGING / "kubernetes"
CHART = PACKAGING / "helm" / "otel-ebpf"
UNIT = PACKAGING / "systemd" / "otel-ebpf.service"
COMPOSE = PACKAGING / "compose" / "compose.yaml"
K8S_VERSIONS = ("1.30.0", "1.37.0")  # appArmorProfile needs >= 1.30
VERSION = otel_ebpf.__version__


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def plain_objects() -> list[dict]:
    return load_all(K8S / "otel-ebpf.yaml")


# ---- YAML and schemas ---------------------------------------------------------------


def yaml_files() -> list[Path]:
    templates = CHART / "templates"
    return sorted(
        p for p in PACKAGING.rglob("*.y*ml") if templates not in p.parents
    )


def test_there_is_something_to_check():
    names = {p.relative_to(PACKAGING).as_posix() for p in yaml_files()}
    assert {"kubernetes/otel-ebpf.yaml", "kubernetes/collector.yaml", "helm/otel-ebpf/Chart.yaml",
            "helm/otel-ebpf/values.yaml", "compose/compose.yaml",
            "compose/otel-collector.yaml", "compose/otel-ebpf.yaml"} <= names


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: p.relative_to(PACKAGING).as_posix())
def test_every_yaml_file_parses(path):
    docs = load_all(path)
    assert docs, f"{path} is empty"


def validate_k8s(obj: dict, version: str) -> None:
    import kubernetes_validate

    kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", ["otel-ebpf.yaml", "collector.yaml"])
def test_kubernetes_manifests_pass_strict_schema_validation(name, version):
    objects = load_all(K8S / name)
    assert objects
    for obj in objects:
        validate_k8s(obj, version)


def test_schema_validation_rejects_a_broken_daemonset():
    """The validator is not a rubber stamp: a misspelt and a mistyped field fail."""
    import kubernetes_validate

    ds = next(o for o in plain_objects() if o["kind"] == "DaemonSet")
    misspelt = copy.deepcopy(ds)
    misspelt["spec"]["template"]["spec"]["hostPid"] = True
    mistyped = copy.deepcopy(ds)
    mistyped["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = "BPF"
    for bad in (misspelt, mistyped):
        with pytest.raises(kubernetes_validate.ValidationError):
            validate_k8s(bad, K8S_VERSIONS[-1])


def configmap_config(objects: list[dict]) -> dict:
    cm = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "otel-ebpf")
    return yaml.safe_load(cm["data"]["otel-ebpf.yaml"])


def test_configmap_config_loads_through_the_real_loader(tmp_path):
    from otel_ebpf.config import load

    ds = next(o for o in plain_objects() if o["kind"] == "DaemonSet")
    container = ds["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    path = tmp_path / "otel-ebpf.yaml"
    path.write_text(yaml.safe_dump(configmap_config(plain_objects())))
    config = load(str(path), env, {})
    assert config.output.exporter == "otlp"
    assert config.health.file == "/run/otel-ebpf/health"
    # The probes read the file the config names.
    probes = [container[k]["exec"]["command"] for k in ("startupProbe", "livenessProbe", "readinessProbe")]
    assert all(config.health.file in cmd for cmd in probes)


def test_compose_file_follows_the_compose_specification():
    from compose_spec import PyCompose

    compose = PyCompose.from_yaml(COMPOSE.read_text())
    compose.validate()
    assert set(compose.service_names()) == {"otel-ebpf", "otel-collector", "jaeger", "nginx"}
    spec = yaml.safe_load(COMPOSE.read_text())
    agent = spec["services"]["otel-ebpf"]
    assert agent["pid"] == "host"
    # The config it mounts loads through the real loader.
    from otel_ebpf.config import load

    load(str(COMPOSE.with_name("otel-ebpf.yaml")), agent["environment"], {})


def test_compose_collector_pipelines_are_wired():
    config = yaml.safe_load(COMPOSE.with_name("otel-collector.yaml").read_text())
    for pipeline in config["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            for name in pipeline.get(kind, []):
                assert name in config[kind], f"pipeline uses undefined {kind[:-1]} {name}"
    assert "otlp/jaeger" in config["service"]["pipelines"]["traces"]["exporters"]
    assert config["exporters"]["otlp/jaeger"]["endpoint"].startswith("jaeger:")


# ---- one capability set everywhere ---------------------------------------------------


def daemonset_capabilities() -> list[str]:
    ds = next(o for o in plain_objects() if o["kind"] == "DaemonSet")
    return ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]


def test_capability_sets_are_consistent():
    ambient = re.search(r"^AmbientCapabilities=(.+)$", UNIT.read_text(), re.M).group(1).split()
    unit = {c.removeprefix("CAP_") for c in ambient}
    # The proven minimal set for an unprivileged user (tests/integration/test_capabilities.py).
    assert unit == {"BPF", "PERFMON", "DAC_OVERRIDE", "SYS_PTRACE"}
    # Root in a container: tracefs is root's own (no DAC_OVERRIDE); SYS_ADMIN lets TLS
    # uprobes reach other containers' libssl; DAC_READ_SEARCH reads other users' files.
    container = set(daemonset_capabilities())
    assert container == (unit - {"DAC_OVERRIDE"}) | {"SYS_ADMIN", "DAC_READ_SEARCH"}
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["otel-ebpf"]
    assert set(compose["cap_add"]) == container and compose["cap_drop"] == ["ALL"]
    dockerfile = (PACKAGING / "container" / "Dockerfile").read_text()
    assert all(c in dockerfile for c in container)
    containers_drop_in = (UNIT.with_name("tls-containers.conf")).read_text()
    assert "AmbientCapabilities=CAP_SYS_ADMIN" in containers_drop_in


# ---- versions --------------------------------------------------------------------------


def test_version_is_single_sourced():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION
    assert chart["version"] == VERSION
    for obj in plain_objects():
        labels = obj["metadata"].get("labels", {})
        if "app.kubernetes.io/version" in labels:
            assert labels["app.kubernetes.io/version"] == VERSION
    ds = next(o for o in plain_objects() if o["kind"] == "DaemonSet")
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":" + VERSION)
    assert yaml.safe_load(COMPOSE.read_text())["services"]["otel-ebpf"]["image"].endswith(":" + VERSION)


# ---- systemd ---------------------------------------------------------------------------


def systemd_verify(unit_text: str, tmp_path: Path, drop_in: Path | None = None
                   ) -> subprocess.CompletedProcess:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd", pytrace=False)
    # verify insists that ExecStart's binary exists: point it at this checkout's.
    exe = Path(sys.executable).with_name("otel-ebpf")
    assert exe.exists(), f"{exe} missing: pip install -e . (scripts/bootstrap.sh does)"
    path = tmp_path / "otel-ebpf.service"
    path.write_text(unit_text.replace("/opt/otel-ebpf/bin/otel-ebpf", str(exe)))
    if drop_in is not None:  # verify reads <unit>.d/*.conf beside the unit
        (tmp_path / "otel-ebpf.service.d").mkdir()
        (tmp_path / "otel-ebpf.service.d" / drop_in.name).write_text(
            drop_in.read_text().replace("/opt/otel-ebpf/bin/otel-ebpf", str(exe)))
    return subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("drop_in", [None, "plaintext-only.conf", "tls-containers.conf"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path, drop_in):
    proc = systemd_verify(UNIT.read_text(), tmp_path, drop_in and UNIT.with_name(drop_in))
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


def test_systemd_analyze_verify_would_catch_a_typo(tmp_path):
    proc = systemd_verify(UNIT.read_text().replace("NoNewPrivileges=", "NoNewPrivilegez="), tmp_path)
    assert "Unknown key 'NoNewPrivilegez'" in proc.stderr


# ---- Helm ------------------------------------------------------------------------------


def _render_module():
    spec = importlib.util.spec_from_file_location("helm_render", PACKAGING / "helm" / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def helm():
    module = _render_module()
    try:
        module.helm_library_path()
    except module.HelmError as exc:
        pytest.fail(f"real Helm unavailable: {exc}", pytrace=False)
    return module


def render(helm, values: dict | None = None) -> list[dict]:
    return [d for d in yaml.safe_load_all(helm.render(CHART, values)) if d]


HELM_ONLY_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def normalise(obj: dict) -> dict:
    """Drop what only Helm adds (its labels, the config checksum); parse embedded config."""
    obj = copy.deepcopy(obj)
    metas = [obj["metadata"]]
    if obj["kind"] == "DaemonSet":
        metas.append(obj["spec"]["template"]["metadata"])
        obj["spec"]["template"]["metadata"].get("annotations", {}).pop("checksum/config", None)
        if not obj["spec"]["template"]["metadata"].get("annotations"):
            obj["spec"]["template"]["metadata"].pop("annotations", None)
    for meta in metas:
        for label in HELM_ONLY_LABELS:
            meta.get("labels", {}).pop(label, None)
    if obj["kind"] == "ConfigMap":
        obj["data"] = {k: yaml.safe_load(v) for k, v in obj["data"].items()}
    return obj


def by_kind(objects: list[dict]) -> dict[str, dict]:
    return {o["kind"]: o for o in objects}


def test_helm_lint_finds_no_error(helm):
    result = helm.lint(CHART)
    assert result["TotalChartsLinted"] == 1
    assert not result["Errors"], result
    # Severity 1 is INFO (e.g. "icon is recommended"); 2 WARNING, 3 ERROR.
    assert all(m["Severity"] <= 1 for m in result["Messages"]), result["Messages"]


def test_helm_rendering_with_defaults_equals_the_plain_manifests(helm):
    rendered = by_kind(normalise(o) for o in render(helm))
    plain = by_kind(normalise(o) for o in plain_objects() if o["kind"] != "Namespace")
    assert set(rendered) == set(plain) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                           "ConfigMap", "DaemonSet"}
    for kind in plain:
        assert rendered[kind] == plain[kind], f"{kind} differs between Helm and plain manifests"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_helm_rendering_passes_schema_validation(helm, version):
    for obj in render(helm):
        validate_k8s(obj, version)


def test_helm_values_reach_the_objects(helm, tmp_path):
    values = {
        "image": {"repository": "registry.example/otel-ebpf", "tag": "9.9.9"},
        "otlp": {"endpoint": "https://collector.example:4318", "protocol": "http/protobuf",
                 "headersSecret": {"name": "vendor-key", "key": "h", "optional": False}},
        "selection": {"ports": [80, 8080]},
        "config": {"log_level": "debug", "conntrack": {"body_prefix_bytes": 64}},
        "hostKernelHeaders": False,
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "extraEnv": [{"name": "OTEL_EBPF_TELEMETRY_MAX_ROUTES", "value": "50"}],
        "kubernetesMetadata": {"enabled": False},
        "tls": {"enabled": False},
    }
    objects = render(helm, values)
    for obj in objects:
        validate_k8s(obj, K8S_VERSIONS[-1])
    kinds = by_kind(objects)
    pod = kinds["DaemonSet"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert container["image"] == "registry.example/otel-ebpf:9.9.9"
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "https://collector.example:4318"
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "http/protobuf"
    assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"]["secretKeyRef"] == {
        "name": "vendor-key", "key": "h", "optional": False}
    assert env["OTEL_EBPF_TELEMETRY_MAX_ROUTES"]["value"] == "50"
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    # Without TLS: no SYS_ADMIN, and the daemon is told so.
    assert "SYS_ADMIN" not in container["securityContext"]["capabilities"]["add"]
    assert container["args"][-1] == "--no-tls"
    # Without Kubernetes metadata: no RBAC, no token, no node name.
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert pod["automountServiceAccountToken"] is False and "K8S_NODE_NAME" not in env
    mounts = {m["name"] for m in container["volumeMounts"]}
    assert "host-modules" not in mounts and "modules" in mounts
    config = configmap_config(objects)
    assert config["capture"]["ports"] == [80, 8080]
    assert config["log_level"] == "debug"
    assert config["conntrack"]["body_prefix_bytes"] == 64
    assert config["health"]["file"] == "/run/otel-ebpf/health"
    # The rendered config is one the daemon accepts.
    from otel_ebpf.config import load

    path = tmp_path / "otel-ebpf.yaml"
    path.write_text(yaml.safe_dump(config))
    loaded = load(str(path), {}, {})
    assert loaded.log_level == "debug"


def test_helm_requires_an_endpoint(helm):
    with pytest.raises(helm.HelmError, match="otlp.endpoint is required"):
        helm.render(CHART, {"otlp": {"endpoint": ""}})


def test_helm_config_change_rolls_the_pods(helm):
    def checksum(values):
        ds = by_kind(render(helm, values))["DaemonSet"]
        return ds["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum(None) != checksum({"config": {"log_level": "debug"}})


# ---- Python packaging ------------------------------------------------------------------

WHEEL_SOURCES = ("otel_ebpf", "bpf", "config", "pyproject.toml", "setup.py", "MANIFEST.in",
                 "README.md")


def _tree(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    }


def _copy_wheel_sources(tmp_path):
    """A clean copy of what a wheel or sdist is built from, in tmp_path/src."""
    src = tmp_path / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in WHEEL_SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    return src


def test_wheel_ships_bpf_and_config_and_finds_them_installed(tmp_path):
    src = _copy_wheel_sources(tmp_path)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"), "."],
        cwd=src, capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("otel_ebpf-*.whl"))
    assert wheel.name.startswith(f"otel_ebpf-{VERSION}-")

    # A throwaway venv on Debian's python3 with system site-packages (where BCC lives),
    # exactly like packaging/README.md's install; run from elsewhere than the checkout.
    base = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
    venv = tmp_path / "venv"
    subprocess.run([base, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = (
        "import json, otel_ebpf, otel_ebpf.resources as r\n"
        "b = r.bpf_dir()\n"
        "print(json.dumps({'package': otel_ebpf.__file__, 'bpf': str(b),"
        " 'files': sorted(str(p.relative_to(b)) for p in b.rglob('*') if p.is_file()),"
        " 'shipped': str(r.shipped_config_path()), 'default': str(r.default_config_path()),"
        " 'checkout': r.running_from_checkout()}))\n"
    )
    run = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    found = json.loads(run.stdout)
    assert found["package"].startswith(str(venv)), "imported the checkout, not the wheel"
    assert found["checkout"] is False
    assert found["bpf"].startswith(str(venv)) and found["bpf"].endswith("otel_ebpf/_data/bpf")
    checkout_bpf = _tree(REPO / "bpf")
    assert any(f.endswith(".c") for f in checkout_bpf), "no BPF program in bpf/"
    assert set(found["files"]) == checkout_bpf
    assert found["shipped"].endswith("otel_ebpf/_data/config/otel-ebpf.yaml")
    assert Path(found["shipped"]).read_text() == (REPO / "config" / "otel-ebpf.yaml").read_text()
    system_config = Path("/etc/otel-ebpf/otel-ebpf.yaml")
    assert found["default"] == (str(system_config) if system_config.exists() else "None")

    version = subprocess.run([str(venv / "bin" / "otel-ebpf"), "version"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"otel-ebpf {VERSION}"


def test_checkout_resources_point_into_the_checkout():
    from otel_ebpf import resources

    assert resources.running_from_checkout()
    assert resources.bpf_dir() == REPO / "bpf"
    assert resources.default_config_path() == REPO / "config" / "otel-ebpf.yaml"
    assert resources.shipped_config_path() == REPO / "config" / "otel-ebpf.yaml"


def test_bpf_dir_override_and_its_error(monkeypatch, tmp_path):
    from otel_ebpf import resources

    monkeypatch.setenv(resources.BPF_DIR_ENV, str(tmp_path))
    assert resources.bpf_dir() == tmp_path
    monkeypatch.setenv(resources.BPF_DIR_ENV, str(tmp_path / "missing"))
    with pytest.raises(resources.ResourceError, match="unset it to use the BPF programs"):
        resources.bpf_dir()


def test_rbac_is_read_only_pods_for_the_agents_service_account():
    kinds = by_kind(plain_objects())
    assert kinds["ClusterRole"]["rules"] == [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}]
    subject = kinds["ClusterRoleBinding"]["subjects"][0]
    pod = kinds["DaemonSet"]["spec"]["template"]["spec"]
    assert (subject["name"], subject["namespace"]) == (pod["serviceAccountName"], "otel-ebpf")
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    from otel_ebpf.kubernetes_metadata import NODE_NAME_ENV

    assert env[NODE_NAME_ENV]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"


@pytest.mark.parametrize("values,complaint", [
    ({"otlp": {"protocol": "grpcc"}}, "protocol"),
    ({"selection": {"ports": [0]}}, "ports"),
    ({"hostKernelHeaders": "yes"}, "hostKernelHeaders"),
])
def test_helm_values_schema_rejects_bad_values(helm, values, complaint):
    with pytest.raises(helm.HelmError, match=complaint):
        helm.render(CHART, values)


def test_sdist_carries_bpf_and_config_into_its_wheel(tmp_path):
    """MANIFEST.in: a wheel built from the sdist (as PyPI users get it) still ships them."""
    src = _copy_wheel_sources(tmp_path)
    tools = tmp_path / "tools"
    subprocess.run([sys.executable, "-m", "venv", str(tools)], check=True, timeout=120)
    setup = subprocess.run([str(tools / "bin" / "pip"), "install", "--quiet", "build"],
                           capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stderr[-2000:]
    sdist = subprocess.run([str(tools / "bin" / "python"), "-m", "build", "--sdist", "--outdir",
                            str(tmp_path / "sdist"), str(src)],
                           capture_output=True, text=True, timeout=300)
    assert sdist.returncode == 0, sdist.stderr[-3000:]
    tarball = next((tmp_path / "sdist").glob("otel_ebpf-*.tar.gz"))
    wheel_build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(tmp_path / "dist"),
         str(tarball)], capture_output=True, text=True, timeout=300)
    assert wheel_build.returncode == 0, wheel_build.stderr[-3000:]
    import zipfile

    wheel = next((tmp_path / "dist").glob("otel_ebpf-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {n.removeprefix("otel_ebpf/_data/") for n in names if n.startswith("otel_ebpf/_data/")}
    expected = {"bpf/" + f for f in _tree(REPO / "bpf")} | {"config/" + f for f in _tree(REPO / "config")}
    assert shipped == expected
