"""Kubernetes metadata for a container id: k8s.pod.name, k8s.namespace.name, ...

Contract: `KubernetesMetadata.lookup(container_id)` returns the resource attributes of
the pod container with that id (`container.id` as otel_ebpf.process finds it in
/proc/PID/cgroup), or {} when unknown. `labels(container_id)` returns its pod's labels (for discovery's
k8s_pod_labels; not exported). Attributes: k8s.namespace.name, k8s.pod.name,
k8s.pod.uid, k8s.container.name, k8s.node.name, and the owner when there is one
(k8s.deployment.name / k8s.replicaset.name / k8s.daemonset.name /
k8s.statefulset.name / k8s.job.name), per the OpenTelemetry
Kubernetes resource conventions.

Source: the API server, in-cluster (service-account token and CA, $KUBERNETES_SERVICE_HOST),
one `LIST pods` restricted to this node (`fieldSelector=spec.nodeName=$K8S_NODE_NAME`,
`resourceVersion=0`, served from the API server's cache) every `refresh_interval_s`
in a background thread, and sooner when a lookup misses (a new pod), at most every
`min_refresh_interval_s`. lookup() never blocks on the network. Memory: one dict of
this node's containers, replaced whole on each refresh. Failures (no RBAC, API down,
bad JSON) are logged once per kind with the fix and counted; the last good index is
kept. Needs RBAC `get, list` on `pods` (packaging/kubernetes/otel-ebpf.yaml grants it).
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
NODE_NAME_ENV = "K8S_NODE_NAME"
MAX_RESPONSE_BYTES = 64 << 20  # a node's pods; far below this even at 250 pods/node

# ownerReferences kind -> attribute; a ReplicaSet owned by a Deployment also yields
# k8s.deployment.name (its name minus the pod-template-hash suffix).
_OWNER_ATTRIBUTES = {
    "ReplicaSet": "k8s.replicaset.name",
    "DaemonSet": "k8s.daemonset.name",
    "StatefulSet": "k8s.statefulset.name",
    "Job": "k8s.job.name",
}


def normalise_container_id(raw: str) -> str:
    """'containerd://abc' / 'cri-o://abc' / 'docker://abc' -> 'abc'."""
    return raw.rpartition("://")[2].strip()


def _mapping(value: object) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list:
    return value if isinstance(value, list) else []


def _owner_attributes(pod: Mapping) -> dict[str, str]:
    attrs: dict[str, str] = {}
    meta = _mapping(pod.get("metadata"))
    labels = _mapping(meta.get("labels"))
    for owner in _list(meta.get("ownerReferences")):
        owner = _mapping(owner)
        if not owner.get("controller", True):
            continue
        kind, name = owner.get("kind"), owner.get("name")
        if not isinstance(name, str) or kind not in _OWNER_ATTRIBUTES:
            continue
        attrs[_OWNER_ATTRIBUTES[kind]] = name
        if kind == "ReplicaSet":
            suffix = labels.get("pod-template-hash")
            if isinstance(suffix, str) and suffix and name.endswith("-" + suffix):
                attrs["k8s.deployment.name"] = name[: -len(suffix) - 1]
    return attrs


def index_pods(pod_list: Mapping) -> dict[str, dict[str, str]]:
    """A PodList (API JSON) -> {container id: resource attributes}.

    Current, init and ephemeral containers, plus each one's previous instance
    (lastState.terminated): its processes may still be exiting when we look.
    Malformed entries are skipped, never raised.
    """
    index: dict[str, dict[str, str]] = {}
    for pod in _list(pod_list.get("items")):
        if not isinstance(pod, Mapping):
            continue
        meta = _mapping(pod.get("metadata"))
        status = _mapping(pod.get("status"))
        base = {
            "k8s.namespace.name": meta.get("namespace"),
            "k8s.pod.name": meta.get("name"),
            "k8s.pod.uid": meta.get("uid"),
            "k8s.node.name": _mapping(pod.get("spec")).get("nodeName"),
        }
        base = {k: v for k, v in base.items() if isinstance(v, str) and v}
        if "k8s.pod.name" not in base:
            continue
        base.update(_owner_attributes(pod))
        for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            for cs in _list(status.get(key)):
                if not isinstance(cs, Mapping) or not isinstance(cs.get("name"), str):
                    continue
                ids = [cs.get("containerID")]
                ids.append(_mapping(_mapping(cs.get("lastState")).get("terminated")).get("containerID"))
                for raw in ids:
                    if isinstance(raw, str) and raw:
                        cid = normalise_container_id(raw)
                        if cid and cid not in index:  # the current instance wins
                            index[cid] = {**base, "k8s.container.name": cs["name"]}
    return index


def index_pod_labels(pod_list: Mapping) -> dict[str, dict[str, str]]:
    """A PodList -> {container id: its pod's labels}, for the same containers as
    index_pods."""
    index: dict[str, dict[str, str]] = {}
    for pod in _list(pod_list.get("items")):
        if not isinstance(pod, Mapping):
            continue
        labels = {str(k): str(v) for k, v in
                  _mapping(_mapping(pod.get("metadata")).get("labels")).items()}
        status = _mapping(pod.get("status"))
        for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            for cs in _list(status.get(key)):
                cs = _mapping(cs)
                for raw in (cs.get("containerID"), _mapping(_mapping(cs.get("lastState"))
                                                          .get("terminated")).get("containerID")):
                    if isinstance(raw, str) and raw:
                        index.setdefault(normalise_container_id(raw), labels)
    return index


class KubernetesMetadata:
    """Background-refreshed container-id -> pod attributes index for this node."""

    def __init__(
        self,
        api_url: str,
        node_name: str,
        token_path: str | None = None,
        ca_path: str | None = None,
        *,
        refresh_interval_s: float = 30.0,
        min_refresh_interval_s: float = 5.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.node_name = node_name
        self.token_path = token_path
        self.refresh_interval_s = refresh_interval_s
        self.min_refresh_interval_s = min_refresh_interval_s
        self.timeout_s = timeout_s
        self._clock = clock
        self._ssl = ssl.create_default_context(cafile=ca_path) if ca_path else None
        self._index: dict[str, dict[str, str]] = {}
        self._labels: dict[str, dict[str, str]] = {}
        self._last_refresh = float("-inf")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._warned: set[str] = set()
        self.refreshes = 0
        self.failures = 0
        self.misses = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ,
                         service_account_dir: str = SERVICE_ACCOUNT_DIR) -> KubernetesMetadata | None:
        """In-cluster settings, or None when not running in a pod set up for it."""
        host, port = environ.get("KUBERNETES_SERVICE_HOST"), environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            return None
        node = environ.get(NODE_NAME_ENV)
        token = os.path.join(service_account_dir, "token")
        ca = os.path.join(service_account_dir, "ca.crt")
        if not node or not os.path.exists(token):
            log.warning(
                "in a Kubernetes pod but %s; k8s.* resource attributes are off. Set %s from "
                "the downward API (fieldRef spec.nodeName) and mount a service-account token "
                "with get/list on pods (packaging/kubernetes/otel-ebpf.yaml does both)",
                "no %s is set" % NODE_NAME_ENV if not node else "no service-account token at %s" % token,
                NODE_NAME_ENV,
            )
            return None
        if ":" in host and not host.startswith("["):
            host = "[%s]" % host  # IPv6 service address
        try:
            return cls("https://%s:%s" % (host, port), node, token, ca if os.path.exists(ca) else None)
        except (ssl.SSLError, OSError) as exc:
            log.warning("cannot use the cluster CA %s (%s); k8s.* resource attributes are off", ca, exc)
            return None

    # ---- queries (any thread, never blocking) --------------------------------------

    def lookup(self, container_id: str | None) -> dict[str, str]:
        if not container_id:
            return {}
        attrs = self._index.get(container_id)
        if attrs is None:
            self.misses += 1
            self._wake.set()  # a pod newer than our last refresh: refresh soon
            return {}
        return dict(attrs)

    def labels(self, container_id: str | None) -> dict[str, str]:
        """The labels of the pod running this container ({} when unknown)."""
        return self._labels.get(container_id or "", {})

    def __len__(self) -> int:
        return len(self._index)

    # ---- refreshing ------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="otel-ebpf-k8s", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._wake.wait(self.refresh_interval_s)
            self._wake.clear()
            # Misses wake us early, but not more often than min_refresh_interval_s.
            wait = self._last_refresh + self.min_refresh_interval_s - self._clock()
            if wait > 0:
                self._stop.wait(wait)

    def refresh(self) -> bool:
        """One LIST of this node's pods; True when the index was replaced."""
        self._last_refresh = self._clock()
        query = urllib.parse.urlencode(
            {"fieldSelector": "spec.nodeName=%s" % self.node_name, "resourceVersion": "0"}
        )
        request = urllib.request.Request(self.api_url + "/api/v1/pods?" + query)
        request.add_header("Accept", "application/json")
        if self.token_path:
            try:
                with open(self.token_path, encoding="utf-8") as f:  # re-read: tokens rotate
                    request.add_header("Authorization", "Bearer " + f.read().strip())
            except OSError as exc:
                return self._fail("token", "cannot read service-account token %s: %s"
                                  % (self.token_path, exc))
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._ssl) as resp:
                body = resp.read(MAX_RESPONSE_BYTES + 1)
        except urllib.error.HTTPError as exc:
            hint = ""
            if exc.code in (401, 403):
                hint = ("; grant the agent's service account get/list on pods (ClusterRole "
                        "and ClusterRoleBinding in packaging/kubernetes/otel-ebpf.yaml)")
            return self._fail("http-%d" % exc.code, "listing pods on node %s: HTTP %d %s%s"
                              % (self.node_name, exc.code, exc.reason, hint))
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return self._fail("network", "listing pods from %s: %s" % (self.api_url, exc))
        if len(body) > MAX_RESPONSE_BYTES:
            return self._fail("size", "pod list larger than %d bytes; keeping the previous one"
                              % MAX_RESPONSE_BYTES)
        try:
            pod_list = json.loads(body)
            if not isinstance(pod_list, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            return self._fail("json", "unparsable pod list: %s" % exc)
        self._index = index_pods(pod_list)
        self._labels = index_pod_labels(pod_list)
        self.refreshes += 1
        if self._warned:
            log.info("Kubernetes metadata recovered: %d containers on node %s",
                     len(self._index), self.node_name)
            self._warned.clear()
        return True

    def _fail(self, kind: str, message: str) -> bool:
        self.failures += 1
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("Kubernetes metadata: %s (k8s.* attributes may be missing; retrying)",
                        message)
        return False
