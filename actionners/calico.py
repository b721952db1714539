"""Calico actionner: ``calico:networkpolicy``, a ``projectcalico.org/v3`` NetworkPolicy that
denies the pod's workload egress to the event's remote IP.

Position in the flow: ... -> state machine -> **actionners** -> notifiers.

As the original: the policy is named after the pod's workload (``falco-talon-<kind>-<name>``),
selects its pods, denies egress to the event's remote address (``fd.rip``, else ``fd.sip``;
``/32`` or, for IPv6, ``/128``) and allows the rest, or, when ``allow_cidr``/
``allow_namespaces`` are given, only those. A second event for the same workload adds its
address to the denied ones. Namespaces are selected by their ``kubernetes.io/metadata.name``
label (the original used a ``k8s.io/metadata.name`` label that does not exist).
"""

from __future__ import annotations

import ipaddress
from typing import Any, NamedTuple

from actionners.kubernetes import (
    ALLOW_SCHEMA,
    MANAGED_BY,
    NAMESPACE_NAME_LABEL,
    NoTarget,
    Workload,
    cidrs_of,
    create_or_replace,
    injects_api_skips_missing_pod,
    pod_of,
    with_version,
    workload_of,
)
from engine.contract.actionners import ActionContext, RbacRule, actionner
from engine.contract.kubeapi import KubeApi
from engine.contract.results import ActionResult, Target

GROUP, VERSION, PLURAL = "projectcalico.org", "v3", "networkpolicies"
COLLECTION = f"/apis/{GROUP}/{VERSION}/namespaces/{{namespace}}/{PLURAL}"
IP_FIELDS = ("fd.rip|fd.sip",)


def remote_net(ctx: ActionContext) -> str:
    """The event's remote address as a one-address network, or :class:`NoTarget`."""
    for name in ("fd.rip", "fd.sip"):
        value = ctx.event.field(name)
        if value:
            try:
                address = ipaddress.ip_address(str(value))
            except ValueError:
                continue
            return f"{address}/{address.max_prefixlen}"
    raise NoTarget("the event names no remote IP address (fd.rip or fd.sip)", ctx.target)


class DenyPlan(NamedTuple):
    """What a CNI network policy action works out first, whatever the CNI: the pod's
    workload, the policy's namespace and name, the address to deny, what stays allowed."""

    target: Target
    workload: Workload
    namespace: str
    name: str
    denied: str
    cidrs: list[str]
    namespaces: list[str]


async def deny_plan(api: KubeApi, ctx: ActionContext) -> DenyPlan | ActionResult:
    """The :class:`DenyPlan` of this event, or the outcome that ends the step early (a pod
    without a workload to select); :class:`NoTarget` without a pod or remote address."""
    pod, target = await pod_of(api, ctx)
    denied = remote_net(ctx)
    workload = await workload_of(api, pod, target)
    if isinstance(workload, ActionResult):
        return workload
    return DenyPlan(
        target,
        workload,
        str(target.namespace),
        workload.policy_name,
        denied,
        cidrs_of(ctx.parameters.get("allow_cidr")),
        sorted(set(ctx.parameters.get("allow_namespaces") or ())),
    )


def calico_selector(selector: dict[str, Any]) -> str:
    """A Kubernetes LabelSelector in Calico's selector syntax."""
    terms = [f"{k} == {_quote(v)}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        quoted = "{" + ", ".join(_quote(v) for v in values) + "}"
        terms.append(
            {
                "In": f"{key} in {quoted}",
                "NotIn": f"{key} not in {quoted}",
                "Exists": f"has({key})",
                "DoesNotExist": f"!has({key})",
            }[op]
        )
    return " && ".join(terms) or "all()"


def _quote(value: str) -> str:
    return "'" + value.replace("'", "") + "'"


@actionner(
    "calico:networkpolicy",
    description="Deny the pod's workload egress to the event's remote IP with a Calico "
    "NetworkPolicy (projectcalico.org/v3); the rest stays allowed, or only allow_cidr and "
    "allow_namespaces.",
    continue_=True,
    before=True,
    requires=("k8s.pod.name|ka.target.name", "k8s.ns.name|ka.target.namespace", *IP_FIELDS),
    parameters={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            **ALLOW_SCHEMA,
            "order": {
                "type": "number",
                "description": "The policy's order (Calico applies lower orders first).",
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
    what = f"calico networkpolicy {ns}/{name}"

    def body(deny: list[str]) -> dict[str, Any]:
        allow: list[dict[str, Any]] = (
            [{"action": "Allow", "destination": {"nets": cidrs}}] if cidrs else []
        )
        if namespaces:
            names = ", ".join(_quote(n) for n in namespaces)
            allow.append(
                {
                    "action": "Allow",
                    "destination": {"namespaceSelector": f"{NAMESPACE_NAME_LABEL} in {{{names}}}"},
                }
            )
        if not allow:
            allow = [{"action": "Allow"}]
        spec: dict[str, Any] = {
            "selector": calico_selector(workload.selector),
            "types": ["Egress"],
            "egress": [{"action": "Deny", "destination": {"nets": deny}}, *allow],
        }
        if "order" in ctx.parameters:
            spec["order"] = ctx.parameters["order"]
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns, "labels": dict(MANAGED_BY)},
            "spec": spec,
        }

    def replacement(current: dict[str, Any]) -> dict[str, Any]:
        before = [
            net
            for rule in (current.get("spec") or {}).get("egress") or ()
            if rule.get("action") == "Deny"
            for net in (rule.get("destination") or {}).get("nets") or ()
        ]
        nets = list(dict.fromkeys([*before, denied]))
        return with_version(body(nets), current.get("metadata") or {})

    verb = await create_or_replace(api, what, COLLECTION, ns, name, body([denied]), replacement)
    return ActionResult.succeeded(
        f"calico networkpolicy {name} {verb}: egress of {workload.subject} to {denied} denied",
        target,
        networkpolicy=name,
        operation=verb,
        denied=denied,
    )
