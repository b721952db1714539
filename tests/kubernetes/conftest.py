"""Fixtures for tests against the real local control plane (``tests/env``).

A session starts etcd + kube-apiserver once (or reuses one started with
``make testenv-up``); each test gets its own namespace. There is no controller-manager,
scheduler or kubelet, so the workloads here are made the way those would make them:
ReplicaSets/DaemonSets/StatefulSets with pods that carry ``ownerReferences``, bound to a
node by ``spec.nodeName``, and marked Ready through the ``pods/status`` subresource.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from engine.contract import kubeapi
from engine.contract.kubeapi import KubeApi
from engine.contract.retry import RetryPolicy
from tests.env.kubelet import TestKubelet, kubelet_apiserver_args
from tests.env.testenv import TestEnv, TestEnvInfo, default_state_dir

NODE = "talon-node-1"


@pytest.fixture(scope="session")
def control_plane() -> Iterator[TestEnv]:
    """The session's etcd + kube-apiserver, plus the test kubelet that serves ``pods/exec``
    for pods bound to :data:`NODE` (started, and stopped at the end, by the tests)."""
    # A state directory of its own, so a test run never stops the control plane that
    # `make run` uses; set FALCO_TALON_TESTENV_DIR to reuse one started with `make testenv-up`.
    explicit = os.environ.get("FALCO_TALON_TESTENV_DIR")
    state_dir = explicit or f"{default_state_dir()}-pytest"
    env = TestEnv(state_dir, extra_apiserver_args=kubelet_apiserver_args(state_dir))
    info = env.start()
    kubelet = TestKubelet(info.kubeconfig, node_name=NODE)
    kubelet.start()
    yield env
    kubelet.stop()
    env.stop()


@pytest.fixture
def testenv(control_plane: TestEnv) -> TestEnvInfo:
    return control_plane.info()


@pytest.fixture
async def kube(testenv: TestEnvInfo) -> AsyncIterator[KubeApi]:
    api = kubeapi.connect(str(testenv.kubeconfig), RetryPolicy(attempts=3, backoff=0.05))
    kubeapi.use(api)
    yield api
    kubeapi.use(None)
    api.close()


@pytest.fixture
def core(testenv: TestEnvInfo) -> Iterator[client.CoreV1Api]:
    from kubernetes import config

    configuration = client.Configuration()
    config.load_kube_config(str(testenv.kubeconfig), client_configuration=configuration)
    with client.ApiClient(configuration) as api_client:
        yield client.CoreV1Api(api_client)


@pytest.fixture
def namespace(core: client.CoreV1Api) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    # Namespaces never finish deleting without a controller-manager; the etcd of the
    # session is thrown away at the end anyway.


@dataclass
class Workload:
    kind: str
    name: str
    namespace: str
    owner: Any
    pods: list[str]


class Cluster:
    """Creates workloads the way the missing controllers would."""

    def __init__(self, api_client: client.ApiClient, namespace: str) -> None:
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.net = client.NetworkingV1Api(api_client)
        self.ns = namespace

    def pod(
        self,
        name: str,
        labels: dict[str, str],
        owner: Any | None = None,
        kind: str = "",
        ready: bool = True,
        containers: tuple[str, ...] = ("app",),
        node: str = NODE,
    ) -> Any:
        meta: dict[str, Any] = {"name": name, "labels": labels}
        if owner is not None:
            meta["ownerReferences"] = [
                {
                    "apiVersion": "apps/v1",
                    "kind": kind,
                    "name": owner.metadata.name,
                    "uid": owner.metadata.uid,
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
        pod = self.core.create_namespaced_pod(
            self.ns,
            {
                "metadata": meta,
                "spec": {
                    "nodeName": node,
                    "containers": [{"name": c, "image": "busybox"} for c in containers],
                },
            },
        )
        status = "True" if ready else "False"
        self.core.patch_namespaced_pod_status(
            name,
            self.ns,
            {
                "status": {
                    "phase": "Running",
                    "conditions": [
                        {"type": "Ready", "status": status},
                        {"type": "ContainersReady", "status": status},
                    ],
                }
            },
        )
        return pod

    def replicaset(
        self, name: str, replicas: int, ready: int | None = None, node: str = NODE
    ) -> Workload:
        labels = {"app": name, "pod-template-hash": "5d4b9c7f"}
        rs = self.apps.create_namespaced_replica_set(
            self.ns,
            {
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "replicas": replicas,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
                    },
                },
            },
        )
        ready = replicas if ready is None else ready
        pods = [f"{name}-{i}" for i in range(replicas)]
        for i, pod in enumerate(pods):
            self.pod(pod, labels, rs, "ReplicaSet", ready=i < ready, node=node)
        return Workload("ReplicaSet", name, self.ns, rs, pods)

    def daemonset(self, name: str, node: str = NODE) -> Workload:
        labels = {"app": name}
        ds = self.apps.create_namespaced_daemon_set(
            self.ns,
            {
                "metadata": {"name": name},
                "spec": {
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
                    },
                },
            },
        )
        pod = f"{name}-x7k2p"
        self.pod(
            pod,
            {**labels, "controller-revision-hash": "6c5f", "pod-template-generation": "1"},
            ds,
            "DaemonSet",
            node=node,
        )
        return Workload("DaemonSet", name, self.ns, ds, [pod])

    def statefulset(self, name: str) -> Workload:
        labels = {"app": name}
        sts = self.apps.create_namespaced_stateful_set(
            self.ns,
            {
                "metadata": {"name": name},
                "spec": {
                    "serviceName": name,
                    "replicas": 1,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
                    },
                },
            },
        )
        pod = f"{name}-0"
        self.pod(
            pod,
            {
                **labels,
                "controller-revision-hash": f"{name}-7b9",
                "statefulset.kubernetes.io/pod-name": pod,
            },
            sts,
            "StatefulSet",
        )
        return Workload("StatefulSet", name, self.ns, sts, [pod])

    def standalone(
        self,
        name: str,
        labels: dict[str, str],
        containers: tuple[str, ...] = ("app",),
        node: str = NODE,
    ) -> Workload:
        self.pod(name, labels, containers=containers, node=node)
        return Workload("Pod", name, self.ns, None, [name])

    def get_pod(self, name: str) -> Any | None:
        try:
            return self.core.read_namespaced_pod(name, self.ns)
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return None
            raise


@pytest.fixture
def cluster(testenv: TestEnvInfo, namespace: str) -> Iterator[Cluster]:
    from kubernetes import config

    configuration = client.Configuration()
    config.load_kube_config(str(testenv.kubeconfig), client_configuration=configuration)
    with client.ApiClient(configuration) as api_client:
        yield Cluster(api_client, namespace)


@pytest.fixture
def node(core: client.CoreV1Api) -> Iterator[str]:
    """A Node of its own (no kubelet behind it), for tests that cordon, drain or label a
    node: the shared :data:`NODE` serves exec for every test and stays schedulable."""
    name = f"n-{uuid.uuid4().hex[:10]}"
    core.create_node({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}}})
    yield name
    core.delete_node(name)


CRDS = Path(__file__).parent / "crds"


@pytest.fixture(scope="session")
def crds(control_plane: TestEnv) -> None:
    """Calico's and Cilium's network policy CRDs (``tests/kubernetes/crds``), installed and
    established."""
    from kubernetes import config

    configuration = client.Configuration()
    config.load_kube_config(
        str(control_plane.info().kubeconfig), client_configuration=configuration
    )
    with client.ApiClient(configuration) as api_client:
        ext = client.ApiextensionsV1Api(api_client)
        names = []
        for path in sorted(CRDS.glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            names.append(crd["metadata"]["name"])
            try:
                ext.create_custom_resource_definition(crd)
            except client.exceptions.ApiException as exc:
                if exc.status != 409:
                    raise
        deadline = time.monotonic() + 60
        for name in names:
            while True:
                got = ext.read_custom_resource_definition(name)
                conditions = {c.type: c.status for c in (got.status.conditions or ())}
                if conditions.get("Established") == "True":
                    break
                assert time.monotonic() < deadline, f"CRD {name} not established"
                time.sleep(0.2)
