"""falco-talon in a real cluster: events in, real effects out (see conftest.py for what runs)."""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.stream import stream

from tests.cluster.conftest import Talon, ctr_lines, parse_log, pod_events, poll, ready_pods
from tests.env.cluster import (
    DEMO_IMAGE,
    DEMO_NAMESPACE,
    NODE_NAME,
    RELEASE,
    TALON_NAMESPACE,
    TALON_SELECTOR,
    VALUES,
    Cluster,
)

pytestmark = pytest.mark.cluster

PROOF = "/tmp/talon-e2e-proof"


def _container_id(pod: Any) -> str:
    cid = str(pod.status.container_statuses[0].container_id)
    assert cid.startswith("containerd://"), cid
    return cid.removeprefix("containerd://")


@pytest.fixture
def scratch_pod(core: Any) -> Iterator[str]:
    """A pod of its own, in namespace demo, running the demo image."""
    name = f"scratch-{uuid.uuid4().hex[:8]}"
    core.create_namespaced_pod(
        DEMO_NAMESPACE,
        {
            "metadata": {"name": name, "labels": {"app": "scratch"}},
            "spec": {
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "app",
                        "image": DEMO_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/bash", "-c", "trap 'exit 0' TERM; sleep infinity & wait"],
                    }
                ],
            },
        },
    )
    poll(
        f"pod {name} Ready",
        lambda: any(p.metadata.name == name for p in ready_pods(core, "app=scratch")),
        90,
    )
    yield name
    core.delete_namespaced_pod(name, DEMO_NAMESPACE, grace_period_seconds=0)


def test_the_node_and_workloads_are_real(cluster: Cluster, core: Any) -> None:
    node = core.read_node(NODE_NAME)
    assert node.status.node_info.kubelet_version == "v1.34.12"
    assert node.status.node_info.container_runtime_version.startswith("containerd://2.4.2")
    tasks = ctr_lines(cluster, "tasks", "ls")
    for selector in ("app=web", "app=node-agent", "app=db", "app=standalone"):
        pods = ready_pods(core, selector)
        assert pods, selector
        for pod in pods:
            assert pod.spec.node_name == NODE_NAME
            assert pod.status.pod_ip.startswith("10.244.0.")
            assert _container_id(pod) in tasks  # a running containerd task
    talon = core.list_namespaced_pod(TALON_NAMESPACE, label_selector=TALON_SELECTOR).items
    assert len(talon) == 2 and all(p.status.phase == "Running" for p in talon)
    container = talon[0].spec.containers[0]
    assert container.liveness_probe.http_get.path == "/healthz"
    assert container.readiness_probe.http_get.path == "/healthz"
    assert talon[0].spec.service_account_name == RELEASE


def test_health_through_the_service(talon_url: str) -> None:
    with urllib.request.urlopen(f"{talon_url}/healthz", timeout=5) as resp:
        body = json.loads(resp.read())
    assert resp.status == 200 and body["status"] == "ok" and body["rules"] >= 6


def test_label(talon: Talon, core: Any) -> None:
    pod = ready_pods(core, "app=web")[0].metadata.name
    event_id = talon.send("Talon e2e label", pod)
    poll(
        f"label suspicious=true on {pod}",
        lambda: (
            (core.read_namespaced_pod(pod, DEMO_NAMESPACE).metadata.labels or {}).get("suspicious")
            == "true"
        ),
    )
    assert talon.wait_outcome(event_id)["outcome"] == "succeeded"
    events = poll(
        "the LabelizeSucceeded Event on the pod",
        lambda: [e for e in pod_events(core, pod) if e.reason == "LabelizeSucceeded"],
    )
    assert events[0].involved_object.kind == "Pod"
    assert events[0].metadata.annotations["falco-talon/event-id"] == event_id


def test_networkpolicy_selects_the_workload(talon: Talon, core: Any) -> None:
    net: Any = client.NetworkingV1Api(core.api_client)
    pod = core.read_namespaced_pod("db-0", DEMO_NAMESPACE)
    event_id = talon.send("Talon e2e isolate", "db-0")
    assert talon.wait_outcome(event_id)["outcome"] == "succeeded"

    def selecting() -> list[Any]:
        labels = pod.metadata.labels or {}
        return [
            p
            for p in net.list_namespaced_network_policy(DEMO_NAMESPACE).items
            if (sel := p.spec.pod_selector.match_labels or {})
            and all(labels.get(k) == v for k, v in sel.items())
        ]

    policies = poll("a NetworkPolicy selecting db-0", selecting)
    policy = policies[0]
    assert "Egress" in policy.spec.policy_types
    assert not policy.spec.egress  # egress denied
    # it selects the StatefulSet's pods, not just this one
    assert "statefulset.kubernetes.io/pod-name" not in (policy.spec.pod_selector.match_labels or {})
    assert poll(
        "the NetworkpolicySucceeded Event",
        lambda: [e for e in pod_events(core, "db-0") if e.reason == "NetworkpolicySucceeded"],
    )
    net.delete_namespaced_network_policy(policy.metadata.name, DEMO_NAMESPACE)


def test_exec_runs_inside_the_container(
    cluster: Cluster, talon: Talon, core: Any, scratch_pod: str
) -> None:
    assert not Path(PROOF).exists(), f"{PROOF} exists on the host before the test"
    # nothing written yet: the read-back fails (the check is real)
    first = talon.wait_outcome(talon.send("Talon e2e exec read", scratch_pod))
    assert first["outcome"] == "failed" and "exit code 1" in first["message"], first
    wrote = talon.wait_outcome(talon.send("Talon e2e exec write", scratch_pod))
    assert wrote["outcome"] == "succeeded", wrote
    read = talon.wait_outcome(talon.send("Talon e2e exec read", scratch_pod))
    assert read["outcome"] == "succeeded", read
    # the file is in the container's filesystem, and only there
    assert not Path(PROOF).exists(), f"{PROOF} was written on the host"
    out = stream(
        core.connect_get_namespaced_pod_exec,
        scratch_pod,
        DEMO_NAMESPACE,
        command=["cat", PROOF],
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
    )
    assert out.strip() == scratch_pod
    pod = core.read_namespaced_pod(scratch_pod, DEMO_NAMESPACE)
    cid = _container_id(pod)
    task = next(
        line.split()
        for line in ctr_lines(cluster, "tasks", "ls").splitlines()
        if line.startswith(cid)
    )
    pid = int(task[1])
    assert Path(f"/proc/{pid}/root{PROOF}").read_text().strip() == scratch_pod
    reasons = [e.reason for e in pod_events(core, scratch_pod)]
    assert "ExecFailed" in reasons and "ExecSucceeded" in reasons


def test_terminate_stops_the_container_and_the_deployment_replaces_it(
    cluster: Cluster, talon: Talon, core: Any, apps: Any
) -> None:
    pods = poll(
        "2 ready web pods",
        lambda: ps if len(ps := ready_pods(core, "app=web")) == 2 else None,
        90,
    )
    victim = pods[0]
    name, cid = victim.metadata.name, _container_id(victim)
    assert cid in ctr_lines(cluster, "tasks", "ls")
    event_id = talon.send("Talon e2e terminate", name)
    assert talon.wait_outcome(event_id)["outcome"] == "succeeded"

    def gone() -> bool:
        try:
            core.read_namespaced_pod(name, DEMO_NAMESPACE)
        except client.ApiException as e:
            return bool(e.status == 404)
        return False

    poll(f"pod {name} deleted", gone)
    poll(f"container {cid[:12]} stopped", lambda: cid not in ctr_lines(cluster, "tasks", "ls"))
    poll(
        f"container {cid[:12]} removed",
        lambda: cid not in ctr_lines(cluster, "containers", "ls"),
        60,
    )
    replaced = poll(
        "the Deployment back at 2 ready pods, one of them new",
        lambda: (
            ps
            if len(ps := ready_pods(core, "app=web")) == 2
            and name not in {p.metadata.name for p in ps}
            else None
        ),
        90,
    )
    assert apps.read_namespaced_deployment("web", DEMO_NAMESPACE).status.ready_replicas == 2
    assert len(replaced) == 2
    events = poll(
        "the TerminateSucceeded Event",
        lambda: [e for e in pod_events(core, name) if e.reason == "TerminateSucceeded"],
    )
    assert events[0].metadata.annotations["falco-talon/event-id"] == event_id


def _rules_reloaded(talon: Talon, since: float, count: int) -> bool:
    pods = talon.pods()
    seen = set()
    for r in talon.logs():
        if r.get("message") == "rules reloaded" and r.get("rules") == count and _ts(r) >= since:
            seen.add(r["_pod"])
    return len(seen) == len([p for p in pods if p.metadata.deletion_timestamp is None])


def _ts(record: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(str(record["time"])).timestamp()


def test_rbac_an_actionner_the_chart_did_not_enable_is_forbidden(
    cluster: Cluster, talon: Talon, core: Any, tmp_path: Path
) -> None:
    rbac: Any = client.RbacAuthorizationV1Api(core.api_client)
    values = yaml.safe_load(VALUES.read_text())
    label_only = [r for r in values["rules"] if r["action"]["name"] == "kubernetes:labelize"]
    only = tmp_path / "label-only.yaml"
    only.write_text(yaml.safe_dump({"rules": label_only}))
    restarts = {p.metadata.name: p.status.container_statuses[0].restart_count for p in talon.pods()}
    try:
        cluster.helm_install([VALUES, only])
        role = rbac.read_cluster_role(RELEASE)
        granted = {res for rule in role.rules for res in rule.resources or []}
        assert "networkpolicies" not in granted and "pods/exec" not in granted, granted
        # a rule for an actionner the chart did not grant, added behind helm's back
        cm_name = f"{RELEASE}-rules"
        unauthorised = {
            "name": "Isolate without RBAC",
            "match": {"rules": ["Talon e2e unauthorised"]},
            "action": {"name": "kubernetes:networkpolicy"},
        }
        since = time.time() - 1
        core.patch_namespaced_config_map(
            cm_name,
            TALON_NAMESPACE,
            {"data": {"00-rules.yaml": yaml.safe_dump([*label_only, unauthorised])}},
        )
        count = len(label_only) + 1
        poll(
            f"every falco-talon pod to reload {count} rules",
            lambda: _rules_reloaded(talon, since, count),
            120,
        )
        event_id = talon.send("Talon e2e unauthorised", "db-0")
        outcome = talon.wait_outcome(event_id)
        assert outcome["outcome"] == "failed" and outcome["action"] == "kubernetes:networkpolicy"
        assert "403" in outcome["message"] or "orbidden" in outcome["message"], outcome
        events = poll(
            "the NetworkpolicyFailed Event",
            lambda: [
                e
                for e in pod_events(core, "db-0")
                if e.reason == "NetworkpolicyFailed"
                and e.metadata.annotations["falco-talon/event-id"] == event_id
            ],
        )
        assert events[0].type == "Warning"
        # not a crash: the same pods, not restarted, still healthy
        now = {p.metadata.name: p.status.container_statuses[0].restart_count for p in talon.pods()}
        assert now == restarts
    finally:
        since = time.time() - 1
        cluster.helm_install([VALUES])
        # until the pods reload the chart's rules, events of the next tests match nothing
        rules = len(values["rules"])
        poll(
            f"every falco-talon pod back on the chart's {rules} rules",
            lambda: _rules_reloaded(talon, since, rules),
            120,
        )


class Load:
    """Posts slow events (an exec of 2 s each) from a thread, ~4 a second; records the replies."""

    def __init__(self, talon: Talon, pod: str) -> None:
        self.talon, self.pod = talon, pod
        self.accepted: list[str] = []
        self.refused: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                posted = self.talon.post(self.talon.event("Talon e2e slow", self.pod), timeout=5)
            except (OSError, urllib.error.URLError) as e:
                self.errors.append(str(e))
            else:
                (
                    self.accepted.append(posted.id)
                    if posted.status == 202
                    else self.refused.append(posted.status)
                )
            time.sleep(0.25)  # ~4 events/s: a few in flight, well within 16 workers

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


class LogFollower:
    """Follows the logs of the falco-talon pods (those running now and any started later)
    until they stop, so that the last lines of a pod being deleted are not lost."""

    def __init__(self, talon: Talon) -> None:
        self.talon = talon
        self.lines: dict[str, list[str]] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)

    def _follow(self, pod: str) -> None:
        buf = self.lines.setdefault(pod, [])
        try:
            resp = self.talon.core.read_namespaced_pod_log(
                pod, TALON_NAMESPACE, follow=True, _preload_content=False
            )
            pending = b""
            for chunk in resp.stream(4096):
                pending += chunk
                *complete, pending = pending.split(b"\n")
                buf.extend(line.decode(errors="replace") for line in complete)
            if pending:
                buf.append(pending.decode(errors="replace"))
        except Exception as e:
            buf.append(f"<log stream error {e!r}>")

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                for p in self.talon.pods():
                    running = any(
                        c.state and c.state.running for c in p.status.container_statuses or []
                    )
                    if p.metadata.name not in self._threads and running:
                        t = threading.Thread(
                            target=self._follow, args=(p.metadata.name,), daemon=True
                        )
                        self._threads[p.metadata.name] = t
                        t.start()
            except Exception:
                pass
            time.sleep(0.2)

    def __enter__(self) -> LogFollower:
        self._watcher.start()
        poll("log streams on the falco-talon pods", lambda: len(self._threads) >= 1, 30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._watcher.join(10)

    def join(self, pods: set[str], timeout: float) -> None:
        for name in pods:
            t = self._threads.get(name)
            if t is not None:
                t.join(timeout)

    def records(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for pod, lines in list(self.lines.items()):
            out.extend(parse_log("\n".join(lines), pod))
        return out


def _check_drained(load: Load, follower: LogFollower, extra: list[dict[str, Any]]) -> None:
    records = follower.records() + extra
    with_outcome = {r["event_id"] for r in records if "outcome" in r and "event_id" in r}
    assert load.accepted, (load.refused, load.errors[:3])
    missing = [e for e in load.accepted if e not in with_outcome]
    if missing:
        about = [r for r in records if r.get("event_id") in set(missing[:3])]
        errors = [line for lines in follower.lines.values() for line in lines if "<log" in line]
        pytest.fail(
            f"{len(missing)}/{len(load.accepted)} accepted events have no outcome: {missing[:5]}; "
            f"their log lines: {about}; streams: "
            f"{ {p: len(v) for p, v in follower.lines.items()} } {errors}"
        )
    signals = [
        r for r in records if r.get("message") == "signal received: finishing in-flight events"
    ]
    stopped = [r for r in records if r.get("message") == "stopped"]
    assert signals and len(stopped) == len(signals), (len(signals), len(stopped))
    lost = [r for r in records if str(r.get("message", "")).startswith("shutdown timeout")]
    assert not lost, lost


def test_rolling_update_drains(cluster: Cluster, talon: Talon, core: Any, tmp_path: Path) -> None:
    before = {p.metadata.name for p in talon.pods()}
    new_config = tmp_path / "config.yaml"
    # a configuration the pods have not run yet (the pod template's checksum changes)
    size = 2_000_000 + random.randrange(1_000_000)
    new_config.write_text(yaml.safe_dump({"config": {"maxBodySize": size}}))
    standalone = "standalone"
    with LogFollower(talon) as follower, Load(talon, standalone) as load:
        poll("some events accepted", lambda: len(load.accepted) >= 5, 30)
        cluster.helm_install([VALUES, new_config])  # a new config: the pods roll
        after = {p.metadata.name for p in talon.pods() if p.metadata.deletion_timestamp is None}
        assert not after & before, "the pods were not replaced"
        poll(
            "events accepted by the new pods",
            lambda: any(
                r.get("_pod") in after and r.get("event_id") in set(load.accepted)
                for r in follower.records()
            ),
            60,
        )
    follower.join(before, 60)
    extra = talon.logs()  # the new pods finish their slow events too
    try:
        with contextlib.suppress(pytest.fail.Exception):  # _check_drained says which
            poll("an outcome for every accepted event", lambda: _all_done(load, follower, talon))
        _check_drained(load, follower, extra + talon.logs())
    finally:
        cluster.helm_install([VALUES])  # back to the default configuration


def _all_done(load: Load, follower: LogFollower, talon: Talon) -> bool:
    records = follower.records() + talon.logs()
    done = {r["event_id"] for r in records if "outcome" in r and "event_id" in r}
    return all(e in done for e in load.accepted)


def test_helm_uninstall_drains_and_the_reinstall_runs_what_was_stored(
    cluster: Cluster, talon: Talon, core: Any
) -> None:
    """Runs in flight finish as the pods stop; an event stored in NATS but not yet run when
    the release went (the last ones accepted as the replicas stopped) is run when the release
    is back: the stream is on the NATS server's claim, which `helm uninstall` keeps."""
    before = {p.metadata.name for p in talon.pods()}
    reinstalled = False
    try:
        with LogFollower(talon) as follower, Load(talon, "standalone") as load:
            poll("some events accepted", lambda: len(load.accepted) >= 5, 30)
            subprocess_helm(cluster, "uninstall", RELEASE, "--namespace", TALON_NAMESPACE, "--wait")
            poll("the falco-talon pods gone", lambda: not talon.pods(), 120)
        follower.join(before, 60)
        claims = core.list_namespaced_persistent_volume_claim(TALON_NAMESPACE).items
        assert [c.metadata.name for c in claims] == [f"data-{RELEASE}-nats-0"]
        cluster.helm_install([VALUES])  # until every replica is connected to NATS
        reinstalled = True
        talon.url = cluster.talon_url()  # a new Service, a new ClusterIP
        with contextlib.suppress(pytest.fail.Exception):  # _check_drained says which
            poll("an outcome for every accepted event", lambda: _all_done(load, follower, talon))
        _check_drained(load, follower, talon.logs())
    finally:
        if not reinstalled:
            cluster.helm_install([VALUES])
            talon.url = cluster.talon_url()


def subprocess_helm(cluster: Cluster, *args: str) -> None:
    res = subprocess.run(
        [*cluster.helm(), *args], capture_output=True, text=True, timeout=300, check=False
    )
    assert res.returncode == 0, res.stderr
