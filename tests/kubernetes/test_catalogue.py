"""The original Falco Talon's Kubernetes catalogue, end to end against the real apiserver:
its names and snake_case parameters, the new actionners (delete, cordon, drain, log, script,
calico and cilium network policies), and that each is safe to run twice on one target."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from engine.contract.kubeapi import KubeApi
from engine.plugins import load_plugins
from engine.rules import RulesLoader
from tests.kubernetes.conftest import Cluster
from tests.kubernetes.harness import Talon, event_for, outcomes, start_talon

pytestmark = pytest.mark.kubernetes


def rule(action: str, name: str = "act", **params: Any) -> str:
    body = "".join(f"      {k}: {json.dumps(v)}\n" for k, v in params.items())
    return f"- name: {name}\n  action:\n    name: {action}\n" + (
        f"    parameters:\n{body}" if params else ""
    )


def with_fields(event: dict[str, Any], **fields: Any) -> dict[str, Any]:
    event["output_fields"].update({k.replace("__", "."): v for k, v in fields.items()})
    return event


async def twice(talon: Talon, event: dict[str, Any]) -> list[tuple[str, str, str]]:
    first = outcomes(await talon.send(event))
    second = outcomes(await talon.send(event))
    return first + second


def rules_error(tmp_path: Path, text: str) -> str:
    actionners, notifiers = load_plugins()
    path = tmp_path / "bad.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    with pytest.raises(Exception) as err:
        RulesLoader(actionners, notifiers).load([path])
    return str(err.value)


# -- terminate: the original's parameter names ----------------------------------------------------


async def test_terminate_takes_the_originals_snake_case_parameters_and_names_them_back(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("web", replicas=1)
    talon = await start_talon(
        aiohttp_client, tmp_path, rule("kubernetes:terminate", grace_period_seconds=45)
    )
    run = await talon.send(event_for(rs.pods[0], cluster.ns))
    assert outcomes(run) == [("act", "succeeded", "pod deleted (grace_period_seconds 45)")]
    assert cluster.get_pod(rs.pods[0]).metadata.deletion_grace_period_seconds == 45


@pytest.mark.parametrize(("minimum", "deleted"), [("67%", False), ("33%", True), ("1", True)])
async def test_min_healthy_replicas_percent_is_a_share_of_the_desired_replicas(
    aiohttp_client: Any,
    tmp_path: Path,
    kube: KubeApi,
    cluster: Cluster,
    minimum: str,
    deleted: bool,
) -> None:
    rs = cluster.replicaset("web", replicas=3, ready=2)  # 1 ready pod would remain
    talon = await start_talon(
        aiohttp_client, tmp_path, rule("kubernetes:terminate", min_healthy_replicas=minimum)
    )
    run = await talon.send(event_for(rs.pods[0], cluster.ns))
    if deleted:
        assert outcomes(run)[0][1] == "succeeded"
    else:  # 67% of 3 desired = 3 (rounded up); the original compared 1 < 67
        assert outcomes(run) == [
            (
                "act",
                "skipped",
                "only 1 ready pod(s) of ReplicaSet web would remain, "
                "min_healthy_replicas is 67% of 3 desired = 3",
            )
        ]
    assert (cluster.get_pod(rs.pods[0]) is None) is deleted


async def test_terminate_can_leave_standalone_pods_alone(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("bare", {"run": "bare"})
    talon = await start_talon(
        aiohttp_client, tmp_path, rule("kubernetes:terminate", ignore_standalone_pods=True)
    )
    assert (
        await twice(talon, event_for("bare", cluster.ns))
        == [("act", "skipped", "not owned by a controller and ignore_standalone_pods is true")] * 2
    )
    assert cluster.get_pod("bare") is not None


def test_both_spellings_of_one_parameter_are_refused_naming_both(tmp_path: Path) -> None:
    message = rules_error(
        tmp_path, rule("kubernetes:terminate", gracePeriodSeconds=1, grace_period_seconds=2)
    )
    assert "gives both 'gracePeriodSeconds' and 'grace_period_seconds'" in message


# -- label, annotation ----------------------------------------------------------------------------


async def test_label_is_the_originals_name_of_labelize_and_labels_the_node_too(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, node: str
) -> None:
    cluster.standalone("shell", {"app": "web"}, node=node)
    rules = rule("kubernetes:label", "node", labels={"quarantine": "true"}, level="node")
    rules += rule("kubernetes:labelize", "pod", labels={"suspicious": "true"})
    talon = await start_talon(aiohttp_client, tmp_path, rules)
    assert [o[1] for o in await twice(talon, event_for("shell", cluster.ns))] == ["succeeded"] * 4
    assert cluster.core.read_node(node).metadata.labels["quarantine"] == "true"
    labels = cluster.get_pod("shell").metadata.labels
    assert labels == {"app": "web", "suspicious": "true"}


@pytest.mark.parametrize("level", ["pod", "node"])
async def test_annotation_sets_and_removes_annotations(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, node: str, level: str
) -> None:
    cluster.standalone("shell", {"app": "web"}, node=node)
    talon = await start_talon(
        aiohttp_client,
        tmp_path,
        rule(
            "kubernetes:annotation",
            annotations={"falco.org/reason": "shell spawned: sh -c id", "stale": ""},
            level=level,
        ),
    )
    results = await twice(talon, event_for("shell", cluster.ns))
    where = f" of node {node}" if level == "node" else ""
    assert (
        results
        == [("act", "succeeded", f"annotations set falco.org/reason; removed stale{where}")] * 2
    )
    obj = cluster.core.read_node(node) if level == "node" else cluster.get_pod("shell")
    assert obj.metadata.annotations["falco.org/reason"] == "shell spawned: sh -c id"
    assert "stale" not in obj.metadata.annotations


# -- networkpolicy with allowances ----------------------------------------------------------------


async def test_networkpolicy_allows_the_given_cidrs_and_namespaces_by_their_name_label(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    rs = cluster.replicaset("web", replicas=1)
    talon = await start_talon(
        aiohttp_client,
        tmp_path,
        rule(
            "kubernetes:networkpolicy",
            allow_cidr=["10.1.2.3/8", "fd00::/8"],
            allow_namespaces=["kube-system", "monitoring"],
        ),
    )
    results = await twice(talon, event_for(rs.pods[0], cluster.ns))
    assert [r[1] for r in results] == ["succeeded", "succeeded"]
    assert results[0][2] == (
        "networkpolicy falco-talon-replicaset-web created: all egress of ReplicaSet web denied "
        "but to 10.0.0.0/8, fd00::/8, namespace kube-system, namespace monitoring"
    )
    stored = cluster.net.read_namespaced_network_policy("falco-talon-replicaset-web", cluster.ns)
    egress = stored.to_dict()["spec"]["egress"]
    assert egress == [
        {
            "ports": None,
            "to": [
                {
                    "ip_block": {"cidr": "10.0.0.0/8", "_except": None},
                    "namespace_selector": None,
                    "pod_selector": None,
                },
                {
                    "ip_block": {"cidr": "fd00::/8", "_except": None},
                    "namespace_selector": None,
                    "pod_selector": None,
                },
                {
                    "ip_block": None,
                    "namespace_selector": {
                        "match_expressions": [
                            {
                                "key": "kubernetes.io/metadata.name",
                                "operator": "In",
                                "values": ["kube-system", "monitoring"],
                            }
                        ],
                        "match_labels": None,
                    },
                    "pod_selector": None,
                },
            ],
        }
    ]


# -- exec, script, log ----------------------------------------------------------------------------


async def test_script_runs_inline_text_through_the_shell_in_each_container(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("shell", {"app": "web"}, containers=("app", "sidecar"))
    script = 'n=0\nfor i in 1 2 3; do n=$((n+i)); done\necho "sum=$n on $HOSTNAME"\n'
    talon = await start_talon(aiohttp_client, tmp_path, rule("kubernetes:script", script=script))
    run = await talon.send(event_for("shell", cluster.ns))
    assert outcomes(run) == [("act", "succeeded", "script ran in 2 container(s)")]
    containers = run.steps[0].result.output["containers"]  # type: ignore[union-attr]
    assert {c: r["stdout"] for c, r in containers.items()} == {
        "app": "sum=6 on shell\n",
        "sidecar": "sum=6 on shell\n",
    }


async def test_script_reads_a_file_and_reports_its_failure(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("shell", {"app": "web"})
    path = tmp_path / "collect.sh"
    path.write_text("echo collected\nexit 4\n")
    talon = await start_talon(aiohttp_client, tmp_path, rule("kubernetes:script", file=str(path)))
    run = await talon.send(event_for("shell", cluster.ns))
    assert outcomes(run) == [("act", "failed", "script failed in app: exit code 4")]
    assert run.steps[0].result.output["containers"]["app"]["stdout"] == "collected\n"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({}, "needs the script: script (its text) or file (its path)"),
        ({"script": "id", "file": "/x.sh"}, "gives both script and file: keep one"),
    ],
)
def test_script_needs_exactly_one_of_script_and_file(
    tmp_path: Path, params: dict[str, str], message: str
) -> None:
    text = rule("kubernetes:script", **params) if params else rule("kubernetes:script")
    if not params:
        text += "    parameters: {shell: /bin/sh}\n"
    assert message in rules_error(tmp_path, text)


async def test_log_reads_the_last_lines_of_each_container_through_pods_log(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    cluster.standalone("shell", {"app": "web"}, containers=("app", "sidecar"))
    rules = rule(
        "kubernetes:exec", "write", command="printf 'one\\ntwo\\nthree\\n' >> $HOME/container.log"
    )
    rules += rule("kubernetes:log", "read", tail_lines=2) + "  before: false\n"
    talon = await start_talon(aiohttp_client, tmp_path, rules)
    run = await talon.send(event_for("shell", cluster.ns))
    assert outcomes(run)[1] == ("read", "succeeded", "4 log line(s) read from 2 container(s)")
    assert run.steps[1].result.output["logs"] == {  # type: ignore[union-attr]
        "app": "two\nthree\n",
        "sidecar": "two\nthree\n",
    }


# -- delete ---------------------------------------------------------------------------------------


def _create(api_client: Any, ns: str, resource: str, name: str) -> None:
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    rbac = client.RbacAuthorizationV1Api(api_client)
    meta = {"name": name}
    template = {
        "metadata": {"labels": {"app": name}},
        "spec": {"containers": [{"name": "app", "image": "nginx"}]},
    }
    workload = {"selector": {"matchLabels": {"app": name}}, "template": template}
    {
        "namespaces": lambda: core.create_namespace({"metadata": meta}),
        "configmaps": lambda: core.create_namespaced_config_map(ns, {"metadata": meta}),
        "secrets": lambda: core.create_namespaced_secret(ns, {"metadata": meta}),
        "services": lambda: core.create_namespaced_service(
            ns, {"metadata": meta, "spec": {"ports": [{"port": 80}]}}
        ),
        "serviceaccounts": lambda: core.create_namespaced_service_account(ns, {"metadata": meta}),
        "deployments": lambda: apps.create_namespaced_deployment(
            ns, {"metadata": meta, "spec": workload}
        ),
        "daemonsets": lambda: apps.create_namespaced_daemon_set(
            ns, {"metadata": meta, "spec": workload}
        ),
        "statefulsets": lambda: apps.create_namespaced_stateful_set(
            ns, {"metadata": meta, "spec": {**workload, "serviceName": name}}
        ),
        "replicasets": lambda: apps.create_namespaced_replica_set(
            ns, {"metadata": meta, "spec": workload}
        ),
        "roles": lambda: rbac.create_namespaced_role(ns, {"metadata": meta, "rules": []}),
        "clusterroles": lambda: rbac.create_cluster_role({"metadata": meta, "rules": []}),
    }[resource]()


_READERS = {
    "namespaces": ("core", "namespace", False),
    "configmaps": ("core", "namespaced_config_map", True),
    "secrets": ("core", "namespaced_secret", True),
    "services": ("core", "namespaced_service", True),
    "serviceaccounts": ("core", "namespaced_service_account", True),
    "deployments": ("apps", "namespaced_deployment", True),
    "daemonsets": ("apps", "namespaced_daemon_set", True),
    "statefulsets": ("apps", "namespaced_stateful_set", True),
    "replicasets": ("apps", "namespaced_replica_set", True),
    "roles": ("rbac", "namespaced_role", True),
    "clusterroles": ("rbac", "cluster_role", False),
}
"""ka.target.resource -> (client API group, read_ method stem, namespaced)."""


def _read(api_client: Any, ns: str, resource: str, name: str) -> Any | None:
    from actionners.kubernetes import DELETABLE

    assert set(DELETABLE) == set(_READERS)
    group, stem, namespaced = _READERS[resource]
    api = {
        "core": client.CoreV1Api,
        "apps": client.AppsV1Api,
        "rbac": client.RbacAuthorizationV1Api,
    }[group](api_client)
    try:
        return getattr(api, f"read_{stem}")(*((name, ns) if namespaced else (name,)))
    except client.exceptions.ApiException as exc:
        if exc.status == 404:
            return None
        raise


@pytest.mark.parametrize(
    "resource",
    [
        "namespaces",
        "configmaps",
        "secrets",
        "deployments",
        "daemonsets",
        "statefulsets",
        "replicasets",
        "services",
        "serviceaccounts",
        "roles",
        "clusterroles",
    ],
)
async def test_delete_removes_the_resource_an_audit_event_names_and_repeats_safely(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, resource: str
) -> None:
    import uuid

    name = f"x-{uuid.uuid4().hex[:8]}"
    api_client = cluster.core.api_client
    _create(api_client, cluster.ns, resource, name)
    event = event_for("unused", cluster.ns, source="k8s_audit")
    del event["output_fields"]["k8s.pod.name"], event["output_fields"]["k8s.ns.name"]
    with_fields(
        event,
        ka__target__resource=resource,
        ka__target__name=name,
        ka__target__namespace=cluster.ns if resource not in ("namespaces", "clusterroles") else "",
    )
    talon = await start_talon(aiohttp_client, tmp_path, rule("kubernetes:delete"))
    results = await twice(talon, event)
    what = name if resource in ("namespaces", "clusterroles") else f"{cluster.ns}/{name}"
    assert results[0] == ("act", "succeeded", f"{resource} {what} deleted")
    left = _read(api_client, cluster.ns, resource, name)
    if resource == "namespaces":  # no namespace controller here to finish the deletion
        assert left.status.phase == "Terminating"
        assert results[1] == ("act", "succeeded", f"{resource} {what} is already being deleted")
    else:
        assert left is None
        assert results[1] == ("act", "succeeded", f"{resource} {what} already gone")


async def test_delete_skips_a_resource_kind_it_does_not_handle(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster
) -> None:
    event = with_fields(
        event_for("x", cluster.ns, source="k8s_audit"),
        ka__target__resource="pods",
        ka__target__name="x",
        ka__target__namespace=cluster.ns,
    )
    talon = await start_talon(aiohttp_client, tmp_path, rule("kubernetes:delete"))
    run = await talon.send(event)
    assert outcomes(run)[0][1] == "skipped"
    assert outcomes(run)[0][2].startswith("kubernetes:delete does not delete pods")


# -- cordon, drain --------------------------------------------------------------------------------


async def test_cordon_marks_the_pods_node_unschedulable_once(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, node: str
) -> None:
    cluster.standalone("shell", {"app": "web"}, node=node)
    talon = await start_talon(aiohttp_client, tmp_path, rule("kubernetes:cordon"))
    assert await twice(talon, event_for("shell", cluster.ns)) == [
        ("act", "succeeded", f"node {node} cordoned"),
        ("act", "succeeded", f"node {node} was already cordoned"),
    ]
    assert cluster.core.read_node(node).spec.unschedulable is True


async def test_cordon_takes_the_node_from_k8s_node_name(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, node: str
) -> None:
    event = with_fields(event_for("not-a-pod", cluster.ns), k8s__node__name=node)
    talon = await start_talon(aiohttp_client, tmp_path, rule("kubernetes:cordon"))
    assert outcomes(await talon.send(event)) == [("act", "succeeded", f"node {node} cordoned")]
    assert cluster.core.read_node(node).spec.unschedulable is True


def _pdb(cluster: Cluster, name: str, labels: dict[str, str], allowed: int) -> None:
    """A PodDisruptionBudget whose status says ``allowed`` disruptions (what the disruption
    controller, absent here, would compute)."""
    policy = client.PolicyV1Api(cluster.core.api_client)
    pdb = policy.create_namespaced_pod_disruption_budget(
        cluster.ns,
        {
            "metadata": {"name": name},
            "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}},
        },
    )
    policy.patch_namespaced_pod_disruption_budget_status(
        name,
        cluster.ns,
        {
            "status": {
                "observedGeneration": pdb.metadata.generation,
                "disruptionsAllowed": allowed,
                "currentHealthy": 2,
                "desiredHealthy": 1,
                "expectedPods": 2,
            }
        },
    )


async def test_drain_cordons_then_evicts_and_a_pdb_blocks_one_eviction(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, node: str
) -> None:
    rs = cluster.replicaset("web", replicas=2, node=node)
    ds = cluster.daemonset("agent", node=node)
    cluster.standalone("debug", {"run": "debug"}, node=node)
    _pdb(cluster, "web", {"app": "web"}, allowed=1)
    talon = await start_talon(
        aiohttp_client, tmp_path, rule("kubernetes:drain", ignore_daemonsets=True)
    )
    run = await talon.send(event_for("debug", cluster.ns))
    ns = cluster.ns
    assert outcomes(run) == [
        ("act", "failed", f"node {node} cordoned; 2 pod(s) evicted, 1 ignored, 1 failed")
    ]
    output = run.steps[0].result.output  # type: ignore[union-attr]
    assert output["counts"] == {"evicted": 2, "ignored": 1, "failed": 1}
    assert output["evicted"] == [f"{ns}/debug", f"{ns}/{rs.pods[0]}"]
    assert output["ignored"] == {
        f"{ns}/{ds.pods[0]}": "owned by DaemonSet agent and ignore_daemonsets is true"
    }
    assert output["failed"] == {f"{ns}/{rs.pods[1]}": "blocked by a PodDisruptionBudget"}
    assert cluster.core.read_node(node).spec.unschedulable is True
    assert cluster.get_pod(rs.pods[0]).metadata.deletion_timestamp is not None  # evicted
    assert cluster.get_pod(rs.pods[1]).metadata.deletion_timestamp is None  # the PDB said no
    assert cluster.get_pod(ds.pods[0]).metadata.deletion_timestamp is None


async def test_drain_twice_is_safe_and_honours_min_healthy_replicas(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, node: str
) -> None:
    rs = cluster.replicaset("web", replicas=2, node=node)
    cluster.standalone("debug", {"run": "debug"}, node=node)
    talon = await start_talon(
        aiohttp_client, tmp_path, rule("kubernetes:drain", minHealthyReplicas="50%")
    )
    results = await twice(talon, event_for("debug", cluster.ns))
    assert (
        results
        == [("act", "succeeded", f"node {node} cordoned; 2 pod(s) evicted, 1 ignored, 0 failed")]
        * 2
    )
    # web-0 evicted: 1 ready pod of 2 remains (50%); evicting web-1 would leave none.
    assert cluster.get_pod(rs.pods[0]).metadata.deletion_timestamp is not None
    assert cluster.get_pod(rs.pods[1]).metadata.deletion_timestamp is None


async def test_drain_waits_for_evicted_pods_and_counts_the_ones_still_there(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, node: str
) -> None:
    cluster.standalone("debug", {"run": "debug"}, node=node)  # no kubelet: never goes away
    talon = await start_talon(aiohttp_client, tmp_path, rule("kubernetes:drain", max_wait_period=1))
    run = await talon.send(event_for("debug", cluster.ns))
    assert outcomes(run) == [
        ("act", "failed", f"node {node} cordoned; 0 pod(s) evicted, 0 ignored, 1 failed")
    ]
    assert run.steps[0].result.output["failed"] == {  # type: ignore[union-attr]
        f"{cluster.ns}/debug": "still there after 1s"
    }


# -- calico, cilium -------------------------------------------------------------------------------


def _custom(cluster: Cluster, group: str, plural: str, name: str) -> dict[str, Any]:
    custom = client.CustomObjectsApi(cluster.core.api_client)
    obj: dict[str, Any] = custom.get_namespaced_custom_object(
        group, "v3" if group == "projectcalico.org" else "v2", cluster.ns, plural, name
    )
    return obj


async def test_calico_networkpolicy_denies_the_remote_ip_and_accumulates_on_repeat(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, crds: None
) -> None:
    rs = cluster.replicaset("web", replicas=1)
    talon = await start_talon(
        aiohttp_client,
        tmp_path,
        rule("calico:networkpolicy", allow_namespaces=["kube-system"], order=10),
    )
    first = await talon.send(with_fields(event_for(rs.pods[0], cluster.ns), fd__rip="203.0.113.7"))
    again = await talon.send(with_fields(event_for(rs.pods[0], cluster.ns), fd__rip="203.0.113.7"))
    second = await talon.send(with_fields(event_for(rs.pods[0], cluster.ns), fd__sip="2001:db8::1"))
    assert [s.result.output["operation"] for r in (first, again, second) for s in r.steps] == [  # type: ignore[union-attr]
        "created",
        "updated",
        "updated",
    ]
    stored = _custom(cluster, "projectcalico.org", "networkpolicies", "falco-talon-replicaset-web")
    assert stored["metadata"]["labels"] == {"app.kubernetes.io/managed-by": "falco-talon"}
    spec = stored["spec"]
    assert spec["selector"] == "app == 'web' && pod-template-hash == '5d4b9c7f'"
    assert spec["order"] == 10
    assert spec["types"] == ["Egress"]
    assert spec["egress"] == [
        {"action": "Deny", "destination": {"nets": ["203.0.113.7/32", "2001:db8::1/128"]}},
        {
            "action": "Allow",
            "destination": {"namespaceSelector": "kubernetes.io/metadata.name in {'kube-system'}"},
        },
    ]


async def test_cilium_networkpolicy_denies_the_remote_ip_and_allows_the_rest(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, crds: None
) -> None:
    cluster.standalone("debug", {"run": "debug"})
    talon = await start_talon(aiohttp_client, tmp_path, rule("cilium:networkpolicy"))
    event = with_fields(event_for("debug", cluster.ns), fd__rip="198.51.100.9")
    assert [r[1] for r in await twice(talon, event)] == ["succeeded", "succeeded"]
    stored = _custom(cluster, "cilium.io", "ciliumnetworkpolicies", "falco-talon-pod-debug")
    assert stored["spec"] == {
        "description": "Network policy created by Falco Talon",
        "endpointSelector": {"matchLabels": {"run": "debug"}},
        "egressDeny": [{"toCIDR": ["198.51.100.9/32"]}],
        "egress": [{"toEntities": ["all"]}],
    }


async def test_cilium_allow_lists_replace_the_allow_all(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, crds: None
) -> None:
    cluster.standalone("debug", {"run": "debug"})
    talon = await start_talon(
        aiohttp_client,
        tmp_path,
        rule("cilium:networkpolicy", allow_cidr=["10.0.0.0/8"], allow_namespaces=["dns"]),
    )
    await talon.send(with_fields(event_for("debug", cluster.ns), fd__rip="198.51.100.9"))
    stored = _custom(cluster, "cilium.io", "ciliumnetworkpolicies", "falco-talon-pod-debug")
    assert stored["spec"]["egress"] == [
        {"toCIDR": ["10.0.0.0/8"]},
        {
            "toEndpoints": [
                {
                    "matchExpressions": [
                        {
                            "key": "k8s:io.kubernetes.pod.namespace",
                            "operator": "In",
                            "values": ["dns"],
                        }
                    ]
                }
            ]
        },
    ]


async def test_network_policies_without_a_remote_ip_are_skipped(
    aiohttp_client: Any, tmp_path: Path, kube: KubeApi, cluster: Cluster, crds: None
) -> None:
    cluster.standalone("debug", {"run": "debug"})
    talon = await start_talon(aiohttp_client, tmp_path, rule("calico:networkpolicy"))
    run = await talon.send(event_for("debug", cluster.ns))
    assert outcomes(run) == [
        ("act", "skipped", "the event names no remote IP address (fd.rip or fd.sip)")
    ]


@pytest.mark.parametrize(
    ("action", "params"),
    [
        ("kubernetes:exec", {"command": "echo again >> $HOME/seen; wc -l < $HOME/seen"}),
        ("kubernetes:script", {"script": "echo again >> $HOME/seen\nwc -l < $HOME/seen"}),
        ("kubernetes:log", {"tail_lines": 5}),
    ],
)
async def test_the_forensics_actionners_run_again_on_a_repeated_event(
    aiohttp_client: Any,
    tmp_path: Path,
    kube: KubeApi,
    cluster: Cluster,
    action: str,
    params: dict[str, Any],
) -> None:
    cluster.standalone("shell", {"app": "web"})
    talon = await start_talon(aiohttp_client, tmp_path, rule(action, **params))
    first = await talon.send(event_for("shell", cluster.ns))
    second = await talon.send(event_for("shell", cluster.ns))
    assert [o[1] for o in outcomes(first) + outcomes(second)] == ["succeeded", "succeeded"]
    if action != "kubernetes:log":  # the second run sees the first one's trace
        out = second.steps[0].result.output["containers"]["app"]["stdout"]  # type: ignore[union-attr]
        assert out.strip() == "2"
