"""Fixtures for tests against a real single-node Kubernetes cluster, where nothing is simulated.

What is real: everything. etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
kubelet, containerd + runc (real containers, overlayfs, cgroups), CNI bridge networking,
kube-proxy in iptables mode (TALON_URL is the falco-talon Service's ClusterIP, reached from
this host through kube-proxy's DNAT), the falco-talon OCI image of ``make image`` installed by
its own Helm chart (``charts/falco-talon`` with ``examples/cluster-values.yaml``: in-cluster
config, the chart's ServiceAccount and computed ClusterRole, /healthz probes) and the demo
image of ``make image-demo`` running the workloads of namespace ``demo`` (a Deployment, a
DaemonSet, a StatefulSet and a standalone pod). falco-talon runs two replicas sharing the NATS
JetStream server the chart deploys (the image of ``make image-nats``, its store on a
PersistentVolume). Events are POSTed the way Falcosidekick
posts them; outcomes are read where an operator reads them: pod labels, NetworkPolicies,
Kubernetes Events, the falco-talon pods' logs, and containerd (``ctr``).

How the cluster is started: the session fixture :func:`cluster` uses
``tests/env/cluster.py``. A healthy cluster already recorded in its state directory (from
``make cluster-up``, or ``$FALCO_TALON_CLUSTER_DIR``) is reused and left running; otherwise
the fixture brings one up (binaries built on first use by ``tests/env/build.sh``, images
by ``make image`` / ``make image-demo``) and tears it down at the end of the session
(``FALCO_TALON_KEEP_CLUSTER=1`` keeps it). Needs root: skipped otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from kubernetes import client

from tests.env.cluster import (
    DEMO_NAMESPACE,
    TALON_NAMESPACE,
    TALON_SELECTOR,
    Cluster,
)

LISTEN_PORT = 2803  # examples/cluster-values.yaml keeps the chart's config.listenPort

T = TypeVar("T")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cluster: needs the real single-node cluster of tests/env/cluster.py"
    )


def poll(what: str, check: Callable[[], T | None], timeout: float = 60.0, every: float = 0.3) -> T:
    """``check()``'s first truthy result; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        try:
            result = check()
        except Exception as e:
            last = e
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(
                f"timed out after {timeout:g}s waiting for {what}" + (f": {last!r}" if last else "")
            )
        time.sleep(every)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    if os.geteuid() != 0:
        pytest.skip("the real cluster needs root (containers, a bridge, iptables)")
    c = Cluster()
    reused = c.is_healthy()
    c.up()
    yield c
    if not reused and not os.environ.get("FALCO_TALON_KEEP_CLUSTER"):
        c.down()


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> Iterator[client.ApiClient]:
    with cluster.api() as a:
        yield a


@pytest.fixture(scope="session")
def core(api: client.ApiClient) -> Any:
    return client.CoreV1Api(api)


@pytest.fixture(scope="session")
def apps(api: client.ApiClient) -> Any:
    return client.AppsV1Api(api)


@pytest.fixture(scope="session")
def talon_url(cluster: Cluster) -> str:
    return cluster.talon_url()


@dataclass
class Posted:
    id: str
    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


class Talon:
    """Talks to the in-cluster falco-talon the way Falcosidekick does, and reads its logs."""

    def __init__(self, url: str, core: Any) -> None:
        self.url = url
        self.core = core

    def event(
        self, rule: str, pod: str, namespace: str = DEMO_NAMESPACE, priority: str = "Warning"
    ) -> dict[str, Any]:
        return {
            "uuid": str(uuid.uuid4()),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime()),
            "rule": rule,
            "priority": priority,
            "source": "syscall",
            "hostname": "talon-node",
            "output": f"{priority} e2e event for pod {namespace}/{pod} (rule {rule})",
            "output_fields": {"k8s.pod.name": pod, "k8s.ns.name": namespace, "proc.name": "bash"},
        }

    def post(self, body: dict[str, Any], timeout: float = 10.0) -> Posted:
        req = urllib.request.Request(
            self.url + "/",
            data=json.dumps(body).encode(),
            method="POST",
            headers={
                "User-Agent": "Falcosidekick",
                "Content-Type": "application/json; charset=utf-8",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                status, raw, headers = int(resp.status), resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as e:
            status, raw, headers = int(e.code), e.read(), dict(e.headers)
        data = json.loads(raw) if raw else {}
        return Posted(str(data.get("id", body.get("uuid"))), status, data, headers)

    def send(self, rule: str, pod: str, namespace: str = DEMO_NAMESPACE) -> str:
        posted = self.post(self.event(rule, pod, namespace))
        assert posted.status == 202, posted
        return posted.id

    def pods(self) -> list[Any]:
        """falco-talon's pods (not the NATS server's)."""
        return list(
            self.core.list_namespaced_pod(TALON_NAMESPACE, label_selector=TALON_SELECTOR).items
        )

    def running(self) -> list[Any]:
        """falco-talon's pods that run and are not being deleted."""
        return [
            p
            for p in self.pods()
            if p.metadata.deletion_timestamp is None and p.status.phase == "Running"
        ]

    def post_to(self, pod: Any, body: dict[str, Any]) -> Posted:
        """POST to one replica, by its pod IP (the bridge reaches it from this host)."""
        return Talon(f"http://{pod.status.pod_ip}:{LISTEN_PORT}", self.core).post(body)

    def counter(self, pod: Any, name: str, **labels: str) -> float:
        """One replica's Prometheus counter ``name`` (summed over the series matching
        ``labels``), read from its /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://{pod.status.pod_ip}:{LISTEN_PORT}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def logs(self) -> list[dict[str, Any]]:
        """Every JSON log line of every falco-talon pod (current containers)."""
        out: list[dict[str, Any]] = []
        for pod in self.pods():
            try:
                text = self.core.read_namespaced_pod_log(pod.metadata.name, TALON_NAMESPACE)
            except client.ApiException:
                continue
            out.extend(parse_log(text, pod.metadata.name))
        return out

    def outcomes(self, event_id: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r.get("event_id") == event_id and "outcome" in r]

    def wait_outcome(self, event_id: str, timeout: float = 60.0) -> dict[str, Any]:
        return poll(
            f"an outcome for event {event_id} in the falco-talon logs",
            lambda: next(iter(self.outcomes(event_id)), None),
            timeout,
        )


def parse_log(text: str, pod: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            record["_pod"] = pod
            out.append(record)
    return out


@pytest.fixture(scope="session")
def talon(talon_url: str, core: Any) -> Talon:
    return Talon(talon_url, core)


def ready_pods(core: Any, selector: str) -> list[Any]:
    pods = core.list_namespaced_pod(DEMO_NAMESPACE, label_selector=selector).items
    return [
        p
        for p in pods
        if p.metadata.deletion_timestamp is None
        and p.status.phase == "Running"
        and any(c.type == "Ready" and c.status == "True" for c in p.status.conditions or [])
    ]


def pod_events(core: Any, pod: str, namespace: str = DEMO_NAMESPACE) -> list[Any]:
    """The Kubernetes Events falco-talon created about ``pod``."""
    events = core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={pod}")
    return [e for e in events.items if e.reporting_component == "falco-talon"]


def ctr_lines(cluster: Cluster, *args: str) -> str:
    res = subprocess.run(
        [*cluster.ctr(), *args], capture_output=True, text=True, check=True, timeout=30
    )
    return res.stdout
