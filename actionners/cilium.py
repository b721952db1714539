"""Cilium actionner: ``cilium:networkpolicy``, a ``cilium.io/v2`` CiliumNetworkPolicy that
denies the pod's workload egress to the event's remote IP.

Position in the flow: ... -> state machine -> **actionners** -> notifiers.

As the original: named after the pod's workload, its ``endpointSelector`` the workload's
selector, ``egressDeny`` to the event's remote address (``fd.rip``, else ``fd.sip``), and the
rest allowed, or, when ``allow_cidr``/``allow_namespaces`` are given, only those. A second
event for the same workload adds its address to the denied ones. Namespaces are selected the
way Cilium labels endpoints, ``k8s:io.kubernetes.pod.namespace`` (the original used a
``k8s.io/metadata.name`` label that does not exist). With nothing to allow, egress is
allowed to every entity (``toEntities: [all]``), not only to ``0.0.0.0/0``: Cilium's CIDR
rules do not match pods of the cluster, so the original's default also cut those off.
"""

from __future__ import annotations

from typing import Any

from actionners.calico import IP_FIELDS, deny_plan
from actionners.kubernetes import (
    ALLOW_SCHEMA,
    MANAGED_BY,
    create_or_replace,
    injects_api_skips_missing_pod,
    with_version,
)
from engine.contract.actionners import ActionContext, RbacRule, actionner
from engine.contract.kubeapi import KubeApi
from engine.contract.results import ActionResult

GROUP, VERSION, PLURAL = "cilium.io", "v2", "ciliumnetworkpolicies"
COLLECTION = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}"
NAMESPACE_KEY = "k8s:io.kubernetes.pod.namespace"
DESCRIPTION = "Network policy created by Falco Talon"


@actionner(
    "cilium:networkpolicy",
    description="Deny the pod's workload egress to the event's remote IP with a "
    "CiliumNetworkPolicy (cilium.io/v2); the rest stays allowed, or only allow_cidr and "
    "allow_namespaces.",
    continue_=True,
    before=True,
    requires=("k8s.pod.name|ka.target.name", "k8s.ns.name|ka.target.namespace", *IP_FIELDS),
    parameters={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **ALLOW_SCHEMA,
            "allow_namespaces": {
                **ALLOW_SCHEMA["allow_namespaces"],
                "description": "Egress to pods of these namespaces stays allowed (selected by "
                f"Cilium's {NAMESPACE_KEY} label).",
            },
        },
    },
    rbac=(
        RbacRule(("",), ("pods",), ("get",)),
        RbacRule(("apps",), ("replicasets", "daemonsets", "statefulsets"), ("get",)),
        RbacRule((GROUP,), (PLURAL,), ("get", "create", "update")),
    ),
)
@injects_api_skips_missing_pod
async def networkpolicy(ctx: ActionContext, api: KubeApi) -> ActionResult:
    plan = await deny_plan(api, ctx)
    if isinstance(plan, ActionResult):
        return plan
    target, workload, ns, name, denied, cidrs, namespaces = plan

    def body(deny: list[str]) -> dict[str, Any]:
        allow: list[dict[str, Any]] = [{"toCIDR": cidrs}] if cidrs else []
        if namespaces:
            expr = {"key": NAMESPACE_KEY, "operator": "In", "values": namespaces}
            allow.append({"toEndpoints": [{"matchExpressions": [expr]}]})
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": ns, "labels": dict(MANAGED_BY)},
            "spec": {
                "description": DESCRIPTION,
                "endpointSelector": workload.selector,
                "egressDeny": [{"toCIDR": deny}],
                "egress": allow or [{"toEntities": ["all"]}],
            },
        }

    def replacement(current: dict[str, Any]) -> dict[str, Any]:
        before = [
            cidr
            for rule in (current.get("spec") or {}).get("egressDeny") or ()
            for cidr in rule.get("toCIDR") or ()
        ]
        nets = list(dict.fromkeys([*before, denied]))
        return with_version(body(nets), current.get("metadata") or {})

    verb = await create_or_replace(
        api,
        f"ciliumnetworkpolicy {ns}/{name}",
        COLLECTION,
        ns,
        name,
        body([denied]),
        replacement,
    )
    return ActionResult.succeeded(
        f"ciliumnetworkpolicy {name} {verb}: egress of {workload.subject} to {denied} denied",
        target,
        networkpolicy=name,
        operation=verb,
        denied=denied,
    )
