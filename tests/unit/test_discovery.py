"""Discovery: selector parsing and validation, matching, verdicts, and how the process
resolver and the daemon's output apply them (real processes: this one and children)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from otel_ebpf.cli import build_parser, run_overrides
from otel_ebpf.config import ConfigError, load
from otel_ebpf.daemon import reported_only
from otel_ebpf.discovery import (
    DEFAULT_EXCLUDES,
    Discovery,
    DiscoveryOptions,
    ProcessFacts,
    SelectorError,
    listening_ports,
    parse_ports,
    parse_selectors,
)
from otel_ebpf.kubernetes_metadata import index_pod_labels
from otel_ebpf.process import ProcessResolver
from otel_ebpf.stats import Stats

CID = "4f2b0a9e1c3d5e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"


def discovery(instrument=(), exclude=(), defaults=None) -> Discovery:
    return Discovery(DiscoveryOptions(
        instrument=parse_selectors(list(instrument), "discovery.instrument"),
        exclude_instrument=parse_selectors(list(exclude), "discovery.exclude_instrument"),
        default_exclude_instrument=DEFAULT_EXCLUDES if defaults is None
        else parse_selectors(defaults, "discovery.default_exclude_instrument")))


def facts(**kw) -> ProcessFacts:
    ports = kw.pop("ports", frozenset())
    f = ProcessFacts(pid=kw.pop("pid", 4242), **kw)
    f._ports = frozenset(ports)
    return f


NGINX = dict(exe_name="nginx", exe_path="/usr/sbin/nginx",
             command_line="nginx: worker process")


# ---- matching ---------------------------------------------------------------------------


def test_exe_name_and_path_globs_and_regexes():
    d = discovery([{"exe_name": "ngin?"}])
    assert d.decide(facts(**NGINX)).selected
    assert not d.decide(facts(exe_name="nginx-debug", exe_path="/usr/sbin/nginx-debug")).selected
    assert discovery([{"exe_path": "/usr/sbin/*"}]).decide(facts(**NGINX)).selected
    assert not discovery([{"exe_path": "/usr/bin/*"}]).decide(facts(**NGINX)).selected
    # a regex is searched (unanchored), a glob must match the whole value
    assert discovery([{"exe_path_regex": "sbin/ng"}]).decide(facts(**NGINX)).selected
    assert not discovery([{"exe_path": "sbin/ng"}]).decide(facts(**NGINX)).selected
    # a list is any of its items
    assert discovery([{"exe_name": ["node", "nginx"]}]).decide(facts(**NGINX)).selected


def test_command_line_glob_and_regex():
    f = facts(exe_name="python3.11", command_line="/usr/bin/python3 -m http.server 8080")
    assert discovery([{"cmd_args_regex": r"http\.server \d+$"}]).decide(f).selected
    assert not discovery([{"cmd_args_regex": r"^http"}]).decide(f).selected
    assert discovery([{"cmd_args": "*-m http.server*"}]).decide(f).selected
    assert not discovery([{"cmd_args": "-m http.server*"}]).decide(f).selected


def test_open_ports_single_list_and_ranges():
    assert parse_ports("80,443, 8000-8099", "k") == ((80, 80), (443, 443), (8000, 8099))
    assert parse_ports([80, "90-91"], "k") == ((80, 80), (90, 91))
    d = discovery([{"open_ports": "80,8000-8099"}])
    assert d.decide(facts(ports={8050})).selected
    assert d.decide(facts(ports={22, 80})).selected
    assert not d.decide(facts(ports={8100})).selected
    assert not d.decide(facts(ports=())).selected  # a client listens on nothing


def test_listening_ports_of_a_real_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port in listening_ports(os.getpid())
        d = discovery([{"open_ports": str(port), "exe_name": "python*"}])
        resolver = ProcessResolver(Stats(), discovery=d)
        assert resolver.get(os.getpid()).selected
    # a connected (not listening) socket does not count
    assert port not in listening_ports(os.getpid())
    assert listening_ports(2 ** 22 + 12345) == frozenset()  # no such process


def test_container_criteria():
    inside = facts(container_id=CID)
    assert discovery([{"container_id": CID[:12]}]).decide(inside).selected  # short id prefix
    assert discovery([{"container_id": "4f2b*"}]).decide(inside).selected
    assert not discovery([{"container_id": "ffff"}]).decide(inside).selected
    assert discovery([{"containers_only": True}]).decide(inside).selected
    assert not discovery([{"containers_only": True}]).decide(facts()).selected


def test_kubernetes_namespace_pod_owner_and_labels():
    k8s = {"k8s.namespace.name": "shop", "k8s.pod.name": "cart-7d4b9-x2x",
           "k8s.container.name": "cart", "k8s.replicaset.name": "cart-7d4b9",
           "k8s.deployment.name": "cart"}
    labels = {CID: {"app": "cart", "tier": "backend"}}
    f = facts(container_id=CID, kubernetes=k8s, labels_of=labels.get)
    assert discovery([{"k8s_namespace": "shop"}]).decide(f).selected
    assert not discovery([{"k8s_namespace": "kube-*"}]).decide(f).selected
    assert discovery([{"k8s_pod_name": "cart-*"}]).decide(f).selected
    assert discovery([{"k8s_container_name": "cart"}]).decide(f).selected
    assert discovery([{"k8s_owner_name": "cart"}]).decide(f).selected  # the deployment
    assert discovery([{"k8s_owner_name": "cart-7d4b9"}]).decide(f).selected  # the replicaset
    assert not discovery([{"k8s_owner_name": "checkout"}]).decide(f).selected
    assert discovery([{"k8s_pod_labels": {"app": "car*", "tier": "backend"}}]).decide(f).selected
    assert not discovery([{"k8s_pod_labels": {"app": "cart", "tier": "front*"}}]).decide(f).selected
    assert not discovery([{"k8s_pod_labels": {"team": "*"}}]).decide(f).selected  # absent label
    # outside Kubernetes nothing k8s_* matches
    assert not discovery([{"k8s_namespace": "*"}]).decide(facts(**NGINX)).selected


def test_criteria_and_selectors_or_and_exclude_wins():
    d = discovery([{"exe_name": "nginx", "open_ports": "8080"},  # AND
                   {"exe_name": "node", "service_name": "api"}],  # OR
                  exclude=[{"cmd_args_regex": "--batch"}])
    assert d.decide(facts(**NGINX, ports={8080})).selected
    assert not d.decide(facts(**NGINX, ports={9090})).selected
    node = d.decide(facts(exe_name="node", command_line="node server.js"))
    assert node.selected and node.overrides() == {"service.name": "api"}
    batch = d.decide(facts(exe_name="node", command_line="node server.js --batch"))
    assert not batch.selected and batch.reason == "matches discovery.exclude_instrument[0]"
    assert not d.decide(facts(exe_name="python3")).selected
    # no instrument list: everything not excluded
    assert discovery().decide(facts(exe_name="python3")).selected


def test_first_matching_selector_gives_the_overrides():
    d = discovery([{"exe_name": "nginx", "name": "edge", "namespace": "shop"},
                   {"exe_path": "/usr/sbin/*", "service_name": "other"}])
    assert d.decide(facts(**NGINX)).overrides() == {"service.name": "edge",
                                                   "service.namespace": "shop"}


def test_default_excludes_and_turning_them_off():
    d = discovery()
    for excluded in (facts(exe_name="otelcol-contrib"), facts(exe_name="otelcol"),
                     facts(exe_name="rotel"), facts(exe_name="jaeger"),
                     facts(exe_name="prometheus"),
                     facts(exe_name="python3.11",
                           command_line="/venv/bin/python -m otel_ebpf.cli run --exe x"),
                     facts(exe_name="python3.11",
                           command_line="/usr/bin/python3 /usr/local/bin/otel-ebpf top")):
        assert not d.decide(excluded).selected, excluded
    # a checkout under a directory named otel-ebpf is not the daemon
    assert d.decide(facts(exe_name="python3.11", command_line=(
        "/home/ci/otel-ebpf/otel-ebpf/.venv/bin/python tests/server.py"))).selected
    assert d.decide(facts(exe_name="prometheus-node-exporter")).selected
    assert discovery(defaults=[]).decide(facts(exe_name="otelcol-contrib")).selected
    assert not Discovery(DiscoveryOptions(default_exclude_instrument=())).active
    assert Discovery(DiscoveryOptions()).active


# ---- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("items, message", [
    ([{"exe_path_regex": "(["}], "discovery.instrument[0].exe_path_regex: '([' is not a valid "
     "regular expression: unterminated character set at position 1"),
    ([{"exe_name": "a"}, {"cmd_args_regex": "a)"}], "discovery.instrument[1].cmd_args_regex: "
     "'a)' is not a valid regular expression: unbalanced parenthesis at position 1"),
    ([{"exe_nme": "nginx"}], "discovery.instrument[0].exe_nme: unknown criterion; did you "
     "mean exe_name?"),
    ([{"open_ports": "80-70"}], "discovery.instrument[0].open_ports: '80-70' is not a port "
     "range within 1-65535"),
    ([{"open_ports": "http"}], "discovery.instrument[0].open_ports: 'http' is not a port"),
    ([{"service_name": "x"}], "discovery.instrument[0]: a selector needs at least one "
     "criterion"),
    (["nginx"], "discovery.instrument[0]: 'nginx' is not a selector; use a mapping"),
    ([{"exe_name": []}], "discovery.instrument[0].exe_name: an empty list matches nothing"),
    ([{"containers_only": "yes"}], "discovery.instrument[0].containers_only: 'yes' is not a "
     "boolean"),
    ([{"k8s_pod_labels": "app=x"}], "discovery.instrument[0].k8s_pod_labels: use a mapping"),
])
def test_bad_selectors_name_the_key_and_the_problem(items, message):
    with pytest.raises(SelectorError) as err:
        parse_selectors(items, "discovery.instrument")
    assert str(err.value).startswith(message), str(err.value)


def _error(tmp_path, text: str = "", environ=None, overrides=None) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load(str(path), environ or {}, overrides or {})
    return str(err.value)


def test_config_errors_say_where_the_value_came_from(tmp_path):
    msg = _error(tmp_path, "discovery:\n  exclude_instrument:\n    - cmd_args_regex: '*x'\n")
    assert msg == ("discovery.exclude_instrument[0].cmd_args_regex: '*x' is not a valid regular "
                   "expression: nothing to repeat at position 0 (from config file %s; "
                   "environment: OTEL_EBPF_DISCOVERY_EXCLUDE_INSTRUMENT)" % (tmp_path / "c.yaml"))
    msg = _error(tmp_path, environ={"OTEL_EBPF_DISCOVERY_INSTRUMENT": "[{open_ports: 0}]"})
    assert msg.endswith("(from OTEL_EBPF_DISCOVERY_INSTRUMENT)"), msg
    assert _error(tmp_path, "discovery:\n  instrument: nginx\n").startswith(
        "discovery.instrument: 'nginx' is not a list of selectors")
    assert _error(tmp_path, "discovery:\n  instruments: []\n").startswith(
        "discovery.instruments: unknown key")


def test_config_from_yaml_environment_and_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("discovery:\n  instrument:\n    - exe_name: nginx\n      name: web\n"
                    "  default_exclude_instrument: []\n")
    options = load(str(path), {}, {}).discovery
    assert [s.exe_name for s in options.instrument] == [("nginx",)]
    assert options.instrument[0].service_name == "web"
    assert options.default_exclude_instrument == ()
    env = {"OTEL_EBPF_DISCOVERY_INSTRUMENT": '[{"open_ports": "8000-8099"}]'}
    assert load(str(path), env, {}).discovery.instrument[0].open_ports == ((8000, 8099),)
    args = build_parser().parse_args(["run", "--exe", "node", "--exe", "/usr/sbin/ng*",
                                      "--exclude-exe", "curl", "--no-default-excludes"])
    options = load(str(path), env, run_overrides(args)).discovery
    assert [(s.exe_name, s.exe_path) for s in options.instrument] == [
        (("node",), ()), ((), ("/usr/sbin/ng*",))]
    assert [s.exe_name for s in options.exclude_instrument] == [("curl",)]
    assert options.default_exclude_instrument == ()
    # the defaults when nothing is said
    assert load(None, {}, {}).discovery.default_exclude_instrument == DEFAULT_EXCLUDES


def test_top_gets_the_same_selector_flags():
    args = build_parser().parse_args(["top", "--exe", "nginx", "--once"])
    assert args.exe == ["nginx"]


# ---- applied: the process resolver and the output ---------------------------------------


@pytest.fixture
def sleeper(tmp_path):
    """A child whose executable is a copy of sleep named my-worker."""
    exe = tmp_path / "my-worker"
    exe.write_bytes(open("/bin/sleep", "rb").read())
    exe.chmod(0o755)
    p = subprocess.Popen([str(exe), "30"])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if os.readlink("/proc/%d/exe" % p.pid) == str(exe):
                with open("/proc/%d/cmdline" % p.pid, "rb") as f:
                    if f.read().endswith(b"30\0"):
                        break
        except OSError:
            pass
        time.sleep(0.01)
    yield p
    p.kill()
    p.wait()


def test_resolver_judges_each_process_and_applies_overrides(sleeper):
    stats = Stats()
    d = discovery([{"exe_name": "my-*", "service_name": "worker", "service_namespace": "batch"}])
    resolver = ProcessResolver(stats, discovery=d)
    info = resolver.get(sleeper.pid)
    assert info.selected
    assert info.service_name == "worker"
    assert info.resource_attributes["service.name"] == "worker"
    assert info.resource_attributes["service.namespace"] == "batch"
    assert info.resource_attributes["process.executable.name"] == "my-worker"
    me = resolver.get(os.getpid())  # python: not in the instrument list
    assert not me.selected
    assert me.service_name != "worker"
    snapshot = stats.snapshot()
    assert snapshot["discovery.selected_processes"] == 1
    assert snapshot["discovery.excluded_processes"] == 1
    # judged once per process: cached
    assert resolver.get(sleeper.pid) is info
    assert stats.snapshot()["discovery.selected_processes"] == 1


def test_resolver_judges_a_process_known_only_by_its_kernel_name():
    resolver = ProcessResolver(Stats(), discovery=discovery([{"exe_name": "curl"}]))
    gone = 2 ** 22 + 4321  # above any pid_max: never a live process
    resolver.note_name(gone, "curl")
    assert resolver.get(gone).selected
    resolver.note_name(gone + 1, "wget")
    assert not resolver.get(gone + 1).selected


def test_without_discovery_every_process_is_selected():
    resolver = ProcessResolver(Stats(), discovery=discovery(defaults=[]))
    assert resolver.get(os.getpid()).selected


def test_output_drops_exchanges_of_processes_not_selected(sleeper):
    stats = Stats()
    d = discovery([{"exe_name": "my-worker"}])
    resolver = ProcessResolver(stats, discovery=d)
    got = []
    emit = reported_only(got.append, resolver, d, stats)
    mine, theirs = SimpleNamespace(pid=os.getpid()), SimpleNamespace(pid=sleeper.pid)
    for _ in range(3):
        emit(mine)
        emit(theirs)
    assert got == [theirs] * 3
    assert stats.snapshot()["discovery.dropped_exchanges"] == 3
    # unknown processes (gone, name unknown): dropped when only selected ones are wanted
    unknown = SimpleNamespace(pid=2 ** 22 + 99)
    emit(unknown)
    assert got == [theirs] * 3
    everyone = discovery()
    reported_only(got.append, ProcessResolver(Stats(), discovery=everyone), everyone,
                  Stats())(unknown)
    assert got[-1] is unknown


def test_pod_labels_are_indexed_by_container_id():
    pods = {"items": [{
        "metadata": {"name": "cart-1", "namespace": "shop", "labels": {"app": "cart"}},
        "status": {"containerStatuses": [
            {"name": "cart", "containerID": "containerd://" + CID,
             "lastState": {"terminated": {"containerID": "containerd://" + "a" * 64}}}]},
    }, {"metadata": {"name": "bare"}, "status": {}}]}
    index = index_pod_labels(pods)
    assert index == {CID: {"app": "cart"}, "a" * 64: {"app": "cart"}}


def test_python_executable_is_what_exe_name_sees():
    """exe_name is the file /proc/PID/exe names: the interpreter, not a symlink to it."""
    info = ProcessResolver(Stats(), discovery=discovery(
        [{"exe_name": os.path.basename(os.path.realpath(sys.executable))}])).get(os.getpid())
    assert info.selected


def test_program_changed_after_an_exec(tmp_path):
    """The daemon judges a process again when, after an exec, it runs another program."""
    trigger = tmp_path / "go"
    p = subprocess.Popen(["sh", "-c", 'while [ ! -e "$0" ]; do sleep 0.02; done; exec sleep 30',
                          str(trigger)])
    try:
        resolver = ProcessResolver(Stats(), discovery=discovery([{"exe_name": "sleep"}]))
        deadline = time.monotonic() + 5
        sh = os.path.realpath(shutil.which("sh"))
        while time.monotonic() < deadline:  # until the fork has exec'd sh (and its argv)
            try:
                if os.readlink("/proc/%d/exe" % p.pid) == sh and open(
                        "/proc/%d/cmdline" % p.pid, "rb").read().startswith(b"sh\0"):
                    break
            except OSError:
                pass
            time.sleep(0.01)
        before = resolver.get(p.pid)
        assert not before.selected  # sh
        assert not resolver.program_changed(p.pid)
        trigger.write_text("")
        while time.monotonic() < deadline and resolver.program_changed(p.pid) is False:
            time.sleep(0.01)
        assert resolver.program_changed(p.pid)
        resolver.forget(p.pid)
        after = resolver.get(p.pid)
        assert after.selected and after.executable_name == "sleep"
        assert after.start_ticks == before.start_ticks  # same process, another program
        assert not resolver.program_changed(p.pid)
    finally:
        p.kill()
        p.wait()
    assert not resolver.program_changed(p.pid)  # gone: nothing to judge
