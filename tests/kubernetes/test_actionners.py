"""The Kubernetes actionners, end to end: an event through the HTTP server, the effect
read back from a real kube-apiserver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.contract.event import event_from_dict
from engine.contract.kubeapi import KubeApi
from engine.contract.notifiers import Notification
from engine.contract.results import ActionResult, Outcome
from notifiers import k8sevents
from observability.tracing import Tracing
from tests.kubernetes.conftest import Cluster
from tests.kubernetes.harness import event_for, outcomes, start_talon

pytestmark = pytest.mark.kubernetes


def terminate(**params: Any) -> str:
    body = "".join(f"      {k}: {v!r}\n" for k, v in params.items())
    return "- name: kill\n  action:\n    name: kubernetes:terminate\n" + (
        f"    parameters:\n{body}" if params else ""
    )


async def test_terminate_deletes_the_pod_at_once_by_default(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("web", replicas=2)
    talon = await start_talon(aiohttp_client, tmp_path, terminate())
    run = await talon.send(event_for(rs.pods[0], cluster.ns))
    assert outcomes(run) == [("kill", "succeeded", "pod deleted (gracePeriodSeconds 0)")]
    assert cluster.get_pod(rs.pods[0]) is None
    assert cluster.get_pod(rs.pods[1]) is not None
    # One DELETE and no GET before it: its answer still names the pod's uid and owner.
    result = run.steps[0].result
    assert result is not None and result.target.uid
    assert result.output["owner"] == f"ReplicaSet/{rs.name}"


async def test_terminate_honours_the_grace_period(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("web", replicas=1)
    talon = await start_talon(aiohttp_client, tmp_path, terminate(gracePeriodSeconds=45))
    await talon.send(event_for(rs.pods[0], cluster.ns))
    pod = cluster.get_pod(rs.pods[0])  # bound pod: terminating until a kubelet confirms
    assert pod is not None and pod.metadata.deletion_timestamp is not None
    assert pod.metadata.deletion_grace_period_seconds == 45


@pytest.mark.parametrize(
    ("kind", "param"), [("daemonset", "ignoreDaemonsets"), ("statefulset", "ignoreStatefulsets")]
)
async def test_terminate_leaves_pods_of_ignored_owners_alone(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, kind: str, param: str
) -> None:
    workload = getattr(cluster, kind)("agent")
    talon = await start_talon(aiohttp_client, tmp_path, terminate(**{param: True}))
    run = await talon.send(event_for(workload.pods[0], cluster.ns))
    assert outcomes(run) == [
        ("kill", "skipped", f"owned by {workload.kind} agent and {param} is true")
    ]
    assert cluster.get_pod(workload.pods[0]).metadata.deletion_timestamp is None


async def test_terminate_deletes_pods_of_ignored_kinds_when_not_asked_to_ignore(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    ds = cluster.daemonset("agent")
    talon = await start_talon(aiohttp_client, tmp_path, terminate(ignoreStatefulsets=True))
    run = await talon.send(event_for(ds.pods[0], cluster.ns))
    assert outcomes(run)[0][1] == "succeeded"
    assert cluster.get_pod(ds.pods[0]) is None


@pytest.mark.parametrize(
    ("replicas", "ready", "minimum", "deleted", "reason"),
    [
        (
            3,
            3,
            3,
            False,
            "only 2 ready pod(s) of ReplicaSet web would remain, minHealthyReplicas is 3",
        ),
        (3, 3, 2, True, "pod deleted (gracePeriodSeconds 0)"),
        # Percentages are of the desired replicas, rounded up: 50% of 4 = 2, 75% of 4 = 3.
        (4, 3, "50%", True, "pod deleted (gracePeriodSeconds 0)"),
        (
            4,
            3,
            "75%",
            False,
            "only 2 ready pod(s) of ReplicaSet web would remain, "
            "minHealthyReplicas is 75% of 4 desired = 3",
        ),
        # The original project compared the ready count (3) with the bare number 50 and
        # never deleted anything; 50% of 2 desired is 1.
        (2, 2, "50%", True, "pod deleted (gracePeriodSeconds 0)"),
    ],
)
async def test_terminate_keeps_the_minimum_of_healthy_replicas(
    aiohttp_client: Any,
    tmp_path: Path,
    kube: KubeApi,
    cluster: Cluster,
    replicas: int,
    ready: int,
    minimum: int | str,
    deleted: bool,
    reason: str,
) -> None:
    rs = cluster.replicaset("web", replicas=replicas, ready=ready)
    talon = await start_talon(aiohttp_client, tmp_path, terminate(minHealthyReplicas=minimum))
    run = await talon.send(event_for(rs.pods[0], cluster.ns))  # pods[0] is ready
    assert outcomes(run) == [("kill", "succeeded" if deleted else "skipped", reason)]
    assert (cluster.get_pod(rs.pods[0]) is None) is deleted


async def test_terminating_a_pod_that_is_already_gone_counts_as_done(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    talon = await start_talon(aiohttp_client, tmp_path, terminate())
    run = await talon.send(event_for("gone-pod", cluster.ns))
    assert outcomes(run) == [
        ("kill", "succeeded", f"pod {cluster.ns}/gone-pod no longer exists: nothing to terminate")
    ]


async def test_an_event_without_a_pod_is_skipped_with_the_reason(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    talon = await start_talon(aiohttp_client, tmp_path, terminate())
    event = event_for("x", cluster.ns)
    del event["output_fields"]["k8s.pod.name"], event["output_fields"]["k8s.ns.name"]
    run = await talon.send(event)
    assert outcomes(run)[0][1:] == (
        "skipped",
        "the event names no pod (k8s.pod.name and "
        "k8s.ns.name, or ka.target.name and ka.target.namespace)",
    )


async def test_audit_events_name_the_pod_with_ka_target_fields(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("web", replicas=1)
    talon = await start_talon(aiohttp_client, tmp_path, terminate())
    event = event_for("x", cluster.ns, source="k8s_audit", rule="Attach/Exec Pod")
    event["output_fields"] = {
        "ka.target.name": rs.pods[0],
        "ka.target.namespace": cluster.ns,
        "ka.user.name": "mallory",
    }
    await talon.send(event)
    assert cluster.get_pod(rs.pods[0]) is None


LABELIZE = """
- name: mark
  action:
    name: kubernetes:labelize
    parameters:
      labels:
        suspicious: "true"
        app: changed
        falco.org/quarantine: "yes"
        team: ""
        never-there: ""
"""


async def test_labelize_adds_changes_and_removes_labels_including_prefixed_keys(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("shell", {"app": "web", "team": "payments"})
    talon = await start_talon(aiohttp_client, tmp_path, LABELIZE)
    run = await talon.send(event_for("shell", cluster.ns))
    assert outcomes(run) == [
        (
            "mark",
            "succeeded",
            "labels set app, falco.org/quarantine, suspicious; removed never-there, team",
        )
    ]
    assert cluster.get_pod("shell").metadata.labels == {
        "app": "changed",
        "suspicious": "true",
        "falco.org/quarantine": "yes",
    }


async def test_labelize_on_a_pod_that_is_gone_is_skipped(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    talon = await start_talon(aiohttp_client, tmp_path, LABELIZE)
    run = await talon.send(event_for("gone", cluster.ns))
    assert outcomes(run) == [("mark", "skipped", f"pod {cluster.ns}/gone no longer exists")]


ISOLATE = "- name: isolate\n  action: {name: kubernetes:networkpolicy}\n"


@pytest.mark.parametrize(
    ("kind", "policy", "selector"),
    [
        (
            "replicaset",
            "falco-talon-replicaset-web",
            {"matchLabels": {"app": "web", "pod-template-hash": "5d4b9c7f"}},
        ),
        ("daemonset", "falco-talon-daemonset-web", {"matchLabels": {"app": "web"}}),
        ("statefulset", "falco-talon-statefulset-web", {"matchLabels": {"app": "web"}}),
    ],
)
async def test_networkpolicy_denies_egress_of_the_owners_pods_and_updates_on_a_second_event(
    aiohttp_client: Any,
    tmp_path: Path,
    kube: KubeApi,
    cluster: Cluster,
    kind: str,
    policy: str,
    selector: dict[str, Any],
) -> None:
    workload = (
        cluster.replicaset("web", 2) if kind == "replicaset" else getattr(cluster, kind)("web")
    )
    talon = await start_talon(aiohttp_client, tmp_path, ISOLATE)
    first = await talon.send(event_for(workload.pods[0], cluster.ns))
    stored = cluster.net.read_namespaced_network_policy(policy, cluster.ns)
    second = await talon.send(event_for(workload.pods[-1], cluster.ns))
    assert [s.result.output["operation"] for s in (*first.steps, *second.steps)] == [
        "created",
        "updated",
    ]
    policies = cluster.net.list_namespaced_network_policy(cluster.ns).items
    assert [p.metadata.name for p in policies] == [policy]
    spec = cluster.net.api_client.sanitize_for_serialization(policies[0].spec)
    assert spec == {"podSelector": selector, "policyTypes": ["Egress"]}  # no egress rule: deny
    assert policies[0].metadata.labels == {"app.kubernetes.io/managed-by": "falco-talon"}
    assert int(policies[0].metadata.resource_version) > int(stored.metadata.resource_version)


async def test_networkpolicy_selects_a_standalone_pod_by_its_own_labels(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("debug", {"run": "debug", "pod-template-hash": "abc"})
    talon = await start_talon(aiohttp_client, tmp_path, ISOLATE)
    await talon.send(event_for("debug", cluster.ns))
    stored = cluster.net.read_namespaced_network_policy("falco-talon-pod-debug", cluster.ns)
    assert stored.spec.pod_selector.match_labels == {"run": "debug"}


async def test_networkpolicy_refuses_to_isolate_a_whole_namespace_for_an_unlabelled_pod(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("bare", {})
    talon = await start_talon(aiohttp_client, tmp_path, ISOLATE)
    run = await talon.send(event_for("bare", cluster.ns))
    assert outcomes(run)[0][1] == "skipped"
    assert cluster.net.list_namespaced_network_policy(cluster.ns).items == []


SEED = """
- name: Rule Labelize
  match:
    rules: [Terminal shell in container]
  action:
    name: kubernetes:labelize
    parameters:
      labels: {suspicious: "true"}
  continue: true
- name: Rule NetworkPolicy
  match:
    rules: [Terminal shell in container]
  action:
    name: kubernetes:networkpolicy
  before: true
- name: Rule Terminate
  match:
    rules: [Terminal shell in container]
    priority: ">=Critical"
  action:
    name: kubernetes:terminate
    parameters:
      gracePeriodSeconds: 30
"""


async def test_the_seed_ordering_on_a_live_cluster(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("web", replicas=2)
    talon = await start_talon(aiohttp_client, tmp_path, SEED)
    run = await talon.send(event_for(rs.pods[0], cluster.ns, priority="Critical"))
    assert [(s.stage.value, s.rule.name, s.outcome.value) for s in run.steps] == [
        ("before-actions", "Rule NetworkPolicy", "succeeded"),
        ("actions", "Rule Labelize", "skipped"),
        ("actions", "Rule Terminate", "succeeded"),
    ]
    pod = cluster.get_pod(rs.pods[0])
    assert pod.metadata.deletion_timestamp is not None  # terminating (grace 30s)
    assert "suspicious" not in pod.metadata.labels  # the labelize rule was superseded
    policy = cluster.net.read_namespaced_network_policy("falco-talon-replicaset-web", cluster.ns)
    assert policy.metadata.creation_timestamp <= pod.metadata.deletion_timestamp


async def test_k8sevents_records_each_result_on_the_pod_in_its_namespace(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("web", replicas=2)
    pod_uid = cluster.get_pod(rs.pods[0]).metadata.uid
    talon = await start_talon(aiohttp_client, tmp_path, SEED, default_notifiers=("k8sevents",))
    await talon.send(event_for(rs.pods[0], cluster.ns, priority="Critical", uuid="ev-42"))
    events = sorted(
        cluster.core.list_namespaced_event(cluster.ns).items,
        key=lambda e: int(e.metadata.resource_version),  # creation order
    )
    assert [(e.reason, e.type) for e in events] == [
        ("NetworkpolicySucceeded", "Normal"),
        ("TerminateSucceeded", "Normal"),
    ]
    for e in events:
        assert (e.involved_object.kind, e.involved_object.name, e.involved_object.namespace) == (
            "Pod",
            rs.pods[0],
            cluster.ns,
        )
        assert e.involved_object.uid == pod_uid
        assert e.source.component == "falco-talon" and e.reporting_component == "falco-talon"
        assert e.metadata.annotations["falco-talon/event-id"] == "ev-42"
    assert events[1].message.startswith(
        "falco-talon rule 'Rule Terminate': kubernetes:terminate succeeded: pod deleted"
    )
    assert cluster.core.list_namespaced_event("default").items == []


async def test_k8sevents_records_an_event_given_up_as_a_warning_on_the_pod(
    kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("doomed", replicas=1)
    event = event_from_dict(event_for(rs.pods[0], cluster.ns, uuid="ev-dead"))
    why = "given up after 3 deliveries: moved to falco-talon.events.dead"
    result = ActionResult(Outcome.GIVEN_UP, why, {"deliveries": 3}, event.target)
    # a rule's action given up, then an event given up that no rule matched
    for rule, action in (("Rule Terminate", "kubernetes:terminate"), ("", "")):
        await k8sevents.send(Notification(event, rule, action, "actions", result), {})
    events = sorted(
        cluster.core.list_namespaced_event(cluster.ns).items,
        key=lambda e: int(e.metadata.resource_version),  # creation order
    )
    assert [(e.reason, e.type, e.involved_object.name) for e in events] == [
        ("TerminateGivenUp", "Warning", rs.pods[0]),
        ("EventGivenUp", "Warning", rs.pods[0]),
    ]
    assert events[0].message.startswith(
        f"falco-talon rule 'Rule Terminate': kubernetes:terminate given-up: {why} (Falco rule"
    )
    assert events[1].message.startswith(f"falco-talon: event given-up: {why} (Falco rule")
    assert all(e.metadata.annotations["falco-talon/event-id"] == "ev-dead" for e in events)


async def test_k8sevents_links_each_result_to_its_trace_when_trace_url_is_set(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("traced", replicas=1)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    link = f"https://jaeger.example.com/trace/{trace_id}"
    talon = await start_talon(
        aiohttp_client,
        tmp_path,
        """
        - name: Rule Labelize
          action:
            name: kubernetes:labelize
            parameters: {labels: {suspicious: "true"}}
        """,
        default_notifiers=("k8sevents",),
        tracing=Tracing(exporter=InMemorySpanExporter(), flush_interval=0.05),
        trace_url="https://jaeger.example.com/trace/{trace_id}",
    )
    traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"
    await talon.send(event_for(rs.pods[0], cluster.ns), headers={"traceparent": traceparent})
    [event] = [
        e
        for e in cluster.core.list_namespaced_event(cluster.ns).items
        if e.involved_object.name == rs.pods[0] and e.source.component == "falco-talon"
    ]
    assert event.reason == "LabelizeSucceeded"
    assert event.message.endswith(f" trace: {link}")
    assert event.metadata.annotations["falco-talon/trace-id"] == trace_id
    assert event.metadata.annotations["falco-talon/trace-url"] == link
