"""Kubernetes metadata from API responses, without a cluster.

test_packaging_k8s_podlist.json is a `GET /api/v1/pods?fieldSelector=spec.nodeName=worker-1`
response in the API's PodList format (containerd, CRI-O and Docker ids; Deployment,
DaemonSet, StatefulSet, Job and bare pods; init containers; a restarted container; a
pod still pulling). It is served over real HTTP(S) by a local stand-in for the API
server, so the request the agent makes (path, field selector, bearer token, TLS with the
cluster CA) is checked too.
"""

from __future__ import annotations

import json
import logging
import ssl
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from otel_ebpf.kubernetes_metadata import KubernetesMetadata, index_pods, normalise_container_id

PODLIST = json.loads(Path(__file__).with_name("test_packaging_k8s_podlist.json").read_text())
H = lambda c: c * 64  # noqa: E731 - a 64-hex container id made of one repeated digit


def test_container_ids_of_every_runtime_are_normalised():
    assert normalise_container_id("containerd://" + H("a")) == H("a")
    assert normalise_container_id("cri-o://" + H("e")) == H("e")
    assert normalise_container_id("docker://" + H("f")) == H("f")


def test_index_of_a_recorded_pod_list():
    index = index_pods(PODLIST)
    assert index[H("a")] == {
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "web-7d9c6b5f4-x2kqz",
        "k8s.pod.uid": "5f0c1b6e-1c1e-4c55-9d7e-0e8f3a0b9a11",
        "k8s.node.name": "worker-1",
        "k8s.replicaset.name": "web-7d9c6b5f4",
        "k8s.deployment.name": "web",
        "k8s.container.name": "nginx",
    }
    # The restarted container's previous instance still maps to the same container.
    assert index[H("b")]["k8s.container.name"] == "nginx"
    assert index[H("c")]["k8s.container.name"] == "log-shipper"
    assert index[H("d")]["k8s.container.name"] == "init-config"
    assert index[H("e")]["k8s.daemonset.name"] == "kube-proxy"
    assert index[H("e")]["k8s.namespace.name"] == "kube-system"
    assert index[H("f")]["k8s.statefulset.name"] == "postgres"
    assert index[H("1")]["k8s.job.name"] == "nightly-report-29391840"
    bare = index[H("2")]
    assert bare["k8s.pod.name"] == "debug-shell"
    assert not any(k.endswith(("set.name", "deployment.name", "job.name")) for k in bare)
    # 4 ids in the web pod (2 containers, one restarted, 1 init), 1 each in kube-proxy,
    # postgres, the job and the bare pod; the pending pod has none yet.
    assert len(index) == 8


def test_malformed_items_are_skipped_not_raised():
    broken = {"items": [None, 7, {"metadata": []}, {"metadata": {"name": "x"}, "status": {
        "containerStatuses": [None, {"name": 3}, {"name": "ok", "containerID": "containerd://" + H("9")},
                              {"name": "no-id"}]}}, {"status": {"containerStatuses": [
                                  {"name": "nameless-pod", "containerID": "containerd://" + H("8")}]}}]}
    index = index_pods(broken)
    assert list(index) == [H("9")]
    assert index_pods({}) == {} and index_pods({"items": "nope"}) == {}


class FakeApi(BaseHTTPRequestHandler):
    responses: list[tuple[int, bytes]] = []
    requests: list[dict] = []

    def do_GET(self):  # noqa: N802
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization")})
        code, body = type(self).responses.pop(0) if type(self).responses else (200, b"{}")
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def api():
    handler = type("Api", (FakeApi,), {"responses": [], "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_refresh_lists_this_nodes_pods_with_the_token(api, tmp_path):
    server, handler = api
    token = tmp_path / "token"
    token.write_text("tok-1\n")
    handler.responses = [(200, json.dumps(PODLIST).encode())]
    meta = KubernetesMetadata("http://127.0.0.1:%d" % server.server_address[1], "worker-1", str(token))
    assert meta.lookup(H("a")) == {}  # nothing before the first refresh
    assert meta.refresh() is True
    assert meta.lookup(H("a"))["k8s.pod.name"] == "web-7d9c6b5f4-x2kqz"
    assert meta.lookup("containerd://" + H("a")) == {}  # ids come normalised from process
    req = handler.requests[0]
    assert req["path"] == "/api/v1/pods?fieldSelector=spec.nodeName%3Dworker-1&resourceVersion=0"
    assert req["auth"] == "Bearer tok-1"
    # Projected tokens rotate: the next request reads the file again.
    token.write_text("tok-2\n")
    handler.responses = [(200, json.dumps(PODLIST).encode())]
    meta.refresh()
    assert handler.requests[1]["auth"] == "Bearer tok-2"
    assert meta.refreshes == 2 and meta.failures == 0


def test_failures_keep_the_last_index_and_say_how_to_fix(api, tmp_path, caplog):
    server, handler = api
    meta = KubernetesMetadata("http://127.0.0.1:%d" % server.server_address[1], "worker-1")
    handler.responses = [
        (200, json.dumps(PODLIST).encode()),
        (403, b'{"kind":"Status","reason":"Forbidden","code":403}'),
        (403, b'{"kind":"Status","reason":"Forbidden","code":403}'),
        (200, b"{not json"),
    ]
    caplog.set_level(logging.WARNING)
    assert meta.refresh() is True
    assert meta.refresh() is False and meta.refresh() is False
    assert meta.refresh() is False
    assert meta.lookup(H("f"))["k8s.statefulset.name"] == "postgres"
    assert meta.failures == 3
    messages = [r.getMessage() for r in caplog.records]
    assert sum("HTTP 403" in m for m in messages) == 1  # once per kind of failure
    assert any("get/list on pods" in m for m in messages)
    assert any("unparsable pod list" in m for m in messages)


def test_unreachable_api_is_counted(tmp_path):
    meta = KubernetesMetadata("http://127.0.0.1:1", "worker-1", timeout_s=1)
    assert meta.refresh() is False and meta.failures == 1


def test_tls_with_the_cluster_ca(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=kubernetes", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    handler = type("Api", (FakeApi,), {"responses": [(200, json.dumps(PODLIST).encode())],
                                       "requests": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = "https://127.0.0.1:%d" % server.server_address[1]
        trusted = KubernetesMetadata(url, "worker-1", ca_path=str(cert))
        assert trusted.refresh() is True and len(trusted) == 8
        untrusted = KubernetesMetadata(url, "worker-1", ca_path=None)  # system CAs only
        assert untrusted.refresh() is False
    finally:
        server.shutdown()
        server.server_close()


def test_from_environment(tmp_path):
    sa = tmp_path / "sa"
    sa.mkdir()
    assert KubernetesMetadata.from_environment({}, str(sa)) is None  # not in a pod
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert KubernetesMetadata.from_environment(env, str(sa)) is None  # no node name, no token
    (sa / "token").write_text("t")
    (sa / "ca.crt").write_text("garbage")
    env["K8S_NODE_NAME"] = "worker-1"
    assert KubernetesMetadata.from_environment(env, str(sa)) is None  # unusable CA: off, no crash
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=kubernetes", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(sa / "ca.crt")], check=True, capture_output=True)
    meta = KubernetesMetadata.from_environment(env, str(sa))
    assert meta.api_url == "https://10.96.0.1:443" and meta.node_name == "worker-1"
    v6 = KubernetesMetadata.from_environment({**env, "KUBERNETES_SERVICE_HOST": "fd00::1"}, str(sa))
    assert v6.api_url == "https://[fd00::1]:443"


def test_background_refresh_and_early_refresh_on_miss(api):
    server, handler = api
    first = {"items": [PODLIST["items"][0]]}
    handler.responses = [(200, json.dumps(first).encode()), (200, json.dumps(PODLIST).encode())]
    meta = KubernetesMetadata("http://127.0.0.1:%d" % server.server_address[1], "worker-1",
                              refresh_interval_s=3600, min_refresh_interval_s=0.05)
    meta.start()
    try:
        for _ in range(100):
            if meta.refreshes >= 1:
                break
            threading.Event().wait(0.02)
        assert meta.lookup(H("a"))  # from the first refresh
        assert meta.lookup(H("f")) == {}  # postgres came later: a miss wakes the refresher
        for _ in range(200):
            if meta.lookup(H("f")):
                break
            threading.Event().wait(0.02)
        assert meta.lookup(H("f"))["k8s.pod.name"] == "postgres-0"
        assert meta.misses >= 1
    finally:
        meta.close()
