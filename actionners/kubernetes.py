"""Kubernetes actionners: the original Falco Talon's catalogue (terminate, label, annotation,
networkpolicy, exec, script, log, delete, cordon, drain), with its names and snake_case
parameters; the seed's names (``kubernetes:labelize``) and camelCase parameter spellings
(``gracePeriodSeconds``) keep working.

Position in the flow: ... -> state machine -> **actionners** -> notifiers.

Each actionner is declared with its ``continue``/``before`` defaults, the JSON Schema of its
parameters and the RBAC rules it needs, and runs against the API through the engine's
shared client (``engine.contract.kubeapi``): calls run off the event loop, transient failures are
retried there, permanent ones come back with the API's message.

The pod comes from the event: ``k8s.pod.name``/``k8s.ns.name``, or ``ka.target.name``/
``ka.target.namespace`` for Kubernetes audit events. A missing field or a pod that no
longer exists is an outcome with a reason (skipped; for terminate, already done), never
an exception.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from engine.contract import kubeapi
from engine.contract.actionners import ActionContext, Alias, RbacRule, RunFunc, actionner
from engine.contract.errors import PermanentError
from engine.contract.kubeapi import (
    ApiPermanentError,
    ApiTemporaryError,
    Conflict,
    KubeApi,
    NotFound,
)
from engine.contract.results import ActionResult, Target
from engine.contract.retry import RetryPolicy

# Kubernetes label syntax: an optional DNS-subdomain prefix and a name of at most 63 chars.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
MANAGED_BY = {"app.kubernetes.io/managed-by": "falco-talon"}
GENERATED_LABELS = frozenset(
    {"pod-template-hash", "controller-revision-hash", "pod-template-generation"}
)
OUTPUT_LIMIT = 4096
"""Bytes of stdout/stderr an exec keeps (per container and stream)."""

_PODS_READ = RbacRule(("",), ("pods",), ("get",))
POD_FIELDS = ("k8s.pod.name|ka.target.name", "k8s.ns.name|ka.target.namespace")
"""Output fields naming the pod: what ``requires`` says of the pod actionners."""
CIDR_PATTERN = (
    r"^((25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])"
    r"/([0-9]|[12][0-9]|3[0-2])$|^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*/([0-9]|[1-9][0-9]|1[01][0-9]|12[0-8])$"
)
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""The label the apiserver puts on every namespace, = its name (the original used a
``k8s.io/metadata.name`` label that does not exist)."""


# -- shared steps --------------------------------------------------------------------------------


class NoTarget(Exception):
    """The event names no pod, or the pod is gone: an outcome, not an error."""

    def __init__(self, reason: str, target: Target) -> None:
        super().__init__(reason)
        self.reason = reason
        self.target = target


async def pod_of(api: KubeApi, ctx: ActionContext) -> tuple[Any, Target]:
    target = ctx.target
    if not target.pod or not target.namespace:
        raise NoTarget(
            "the event names no pod (k8s.pod.name and k8s.ns.name, or "
            "ka.target.name and ka.target.namespace)",
            target,
        )
    try:
        pod = await api.read_pod(target.namespace, target.pod)
    except NotFound:
        raise NoTarget(f"pod {target.namespace}/{target.pod} no longer exists", target) from None
    return pod, Target(target.pod, target.namespace, pod.metadata.uid)


def _owner(pod: Any) -> Any | None:
    """The pod's controller owner reference, if any."""
    for ref in pod.metadata.owner_references or ():
        if ref.controller:
            return ref
    return None


def _ready(pod: Any) -> bool:
    if pod.metadata.deletion_timestamp is not None:
        return False
    for cond in (pod.status.conditions if pod.status else None) or ():
        if cond.type == "Ready":
            return bool(cond.status == "True")
    return False


PodStep = Callable[[ActionContext, KubeApi], Awaitable[ActionResult]]


def injects_api_skips_missing_pod(step: PodStep) -> RunFunc:
    """Adapt ``step(ctx, api)`` to an actionner's ``run(ctx)``: hand it the shared Kubernetes
    client, and turn a :class:`NoTarget` it raises (the event names no pod, or the pod is
    gone) into a ``skipped`` outcome with the reason. Any other error is the engine's to
    report."""

    @functools.wraps(step)
    async def run(ctx: ActionContext) -> ActionResult:
        try:
            return await step(ctx, kubeapi.current())
        except NoTarget as gone:
            return ActionResult.skipped(gone.reason, gone.target)

    return run


def _min_healthy_schema() -> dict[str, Any]:
    return {
        "type": ["integer", "string"],
        "minimum": 0,
        "pattern": r"^([0-9]+|(100|[1-9]?[0-9])%)$",
        "errorMessage": "must be a whole number of pods (3) or a quoted percentage ('50%')",
        "description": (
            "Leave the pod alone when fewer than this many ready pods of its ReplicaSet would "
            "remain: a number, or a quoted percentage of the ReplicaSet's desired replicas "
            "(rounded up)."
        ),
    }


def _owner_kind(pod: Any) -> tuple[str | None, Any]:
    ref = _owner(pod)
    return (ref.kind if ref is not None else None), ref


def _ignored_by_owner(ctx: ActionContext, pod: Any) -> str | None:
    """Why ``ignore_daemonsets``/``ignore_statefulsets``/``ignore_standalone_pods`` leave
    ``pod`` alone, or None."""
    kind, ref = _owner_kind(pod)
    params = ctx.parameters
    if kind == "DaemonSet" and params.get("ignore_daemonsets"):
        return f"owned by DaemonSet {ref.name} and {ctx.name_of('ignore_daemonsets')} is true"
    if kind == "StatefulSet" and params.get("ignore_statefulsets"):
        return f"owned by StatefulSet {ref.name} and {ctx.name_of('ignore_statefulsets')} is true"
    if kind is None and params.get("ignore_standalone_pods"):
        return "not owned by a controller and ignore_standalone_pods is true"
    return None


# -- the actionners ----------------------------------------------------------------------------
@actionner(
    "kubernetes:terminate",
    description="Terminate the pod the event is about.",
    continue_=False,
    before=False,
    requires=POD_FIELDS,
    spellings={
        "gracePeriodSeconds": "grace_period_seconds",
        "ignoreDaemonsets": "ignore_daemonsets",
        "ignoreStatefulsets": "ignore_statefulsets",
        "minHealthyReplicas": "min_healthy_replicas",
    },
    parameters={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "grace_period_seconds": {
                "type": "integer",
                "minimum": 0,
                "default": 0,
                "description": "Seconds the pod has to stop; 0 deletes it at once.",
            },
            "ignore_daemonsets": {
                "type": "boolean",
                "default": False,
                "description": "Leave pods owned by a DaemonSet alone.",
            },
            "ignore_statefulsets": {
                "type": "boolean",
                "default": False,
                "description": "Leave pods owned by a StatefulSet alone.",
            },
            "ignore_standalone_pods": {
                "type": "boolean",
                "default": False,
                "description": "Leave pods no controller owns alone.",
            },
            "min_healthy_replicas": _min_healthy_schema(),
        },
    },
    rbac=(
        RbacRule(("",), ("pods",), ("get", "list", "delete")),
        RbacRule(("apps",), ("replicasets",), ("get",)),
    ),
)
@injects_api_skips_missing_pod
async def terminate(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Delete the pod, unless its owner or the replica budget says to leave it."""
    params = ctx.parameters
    if not any(params.get(k) for k in _OWNER_CHECKS) and params.get("min_healthy_replicas") is None:
        return await _delete_pod(ctx, api, int(params.get("grace_period_seconds", 0)))
    try:
        pod, target = await pod_of(api, ctx)
    except NoTarget as gone:
        if gone.target.pod and gone.target.namespace:
            return ActionResult.succeeded(f"{gone.reason}: nothing to terminate", gone.target)
        raise
    why = _ignored_by_owner(ctx, pod)
    if why:
        return ActionResult.skipped(why, target)
    kind, ref = _owner_kind(pod)
    minimum = params.get("min_healthy_replicas")
    if minimum is not None and kind == "ReplicaSet":
        verdict = await _replica_budget(api, pod, ref, minimum, ctx.name_of("min_healthy_replicas"))
        if verdict:
            return ActionResult.skipped(verdict, target)
    grace = int(params.get("grace_period_seconds", 0))
    try:
        await api.call(
            f"delete pod {target.namespace}/{target.pod}",
            api.core.delete_namespaced_pod,
            target.pod,
            target.namespace,
            grace_period_seconds=grace,
        )
    except NotFound:
        return ActionResult.succeeded("pod already gone", target)
    return ActionResult.succeeded(
        f"pod deleted ({ctx.name_of('grace_period_seconds')} {grace})",
        target,
        grace_period_seconds=grace,
        owner=f"{kind}/{ref.name}" if ref else None,
    )


_OWNER_CHECKS = ("ignore_daemonsets", "ignore_statefulsets", "ignore_standalone_pods")
"""The parameters that make terminate read the pod before deleting it."""


async def _delete_pod(ctx: ActionContext, api: KubeApi, grace: int) -> ActionResult:
    """Terminate when nothing needs the pod read first: one DELETE, whose answer (the pod,
    as JSON) gives the uid and the owner for the result. This is the path from an event to
    a pod going away in milliseconds: no GET before, no client models built after."""
    target = ctx.target
    if not target.pod or not target.namespace:
        await pod_of(api, ctx)  # raises NoTarget naming what the event lacks
    try:
        pod = await api.call_json(
            f"delete pod {target.namespace}/{target.pod}",
            api.core.delete_namespaced_pod,
            target.pod,
            target.namespace,
            grace_period_seconds=grace,
        )
    except NotFound:
        return ActionResult.succeeded(
            f"pod {target.namespace}/{target.pod} no longer exists: nothing to terminate", target
        )
    meta = pod.get("metadata") or {}
    owner = next((r for r in meta.get("ownerReferences") or () if r.get("controller")), None)
    return ActionResult.succeeded(
        f"pod deleted ({ctx.name_of('grace_period_seconds')} {grace})",
        Target(target.pod, target.namespace, meta.get("uid")),
        grace_period_seconds=grace,
        owner=f"{owner.get('kind')}/{owner.get('name')}" if owner else None,
    )


def _needed(minimum: int | str, desired: int) -> tuple[int, str]:
    """Ready pods ``minimum`` asks for: ``3``, ``"3"``, or ``"50%"`` of ``desired`` rounded up."""
    text = str(minimum)
    if text.endswith("%"):
        needed = math.ceil(desired * int(text.rstrip("%")) / 100)
        return needed, f"{text} of {desired} desired = {needed}"
    return int(text), text


async def _replica_budget(
    api: KubeApi, pod: Any, ref: Any, minimum: int | str, spelled: str
) -> str | None:
    """Why deleting ``pod`` would leave its ReplicaSet below ``minimum`` ready pods, or None."""
    ns = pod.metadata.namespace
    rs = await api.call(
        f"get replicaset {ns}/{ref.name}", api.apps.read_namespaced_replica_set, ref.name, ns
    )
    needed, wanted = _needed(minimum, int(rs.spec.replicas or 0))
    selector = ",".join(f"{k}={v}" for k, v in (rs.spec.selector.match_labels or {}).items())
    pods = await api.call(
        f"list pods of replicaset {ns}/{ref.name}",
        api.core.list_namespaced_pod,
        ns,
        label_selector=selector,
    )
    owned = [
        p
        for p in pods.items
        if any(r.uid == rs.metadata.uid for r in p.metadata.owner_references or ())
    ]
    remaining = sum(1 for p in owned if _ready(p) and p.metadata.uid != pod.metadata.uid)
    if remaining < needed:
        return (
            f"only {remaining} ready pod(s) of ReplicaSet {ref.name} would remain, "
            f"{spelled} is {wanted}"
        )
    return None


# -- label, annotation ----------------------------------------------------------------------------


def _level_schema() -> dict[str, Any]:
    return {
        "type": "string",
        "enum": ["pod", "node"],
        "default": "pod",
        "errorMessage": "must be pod or node",
        "description": "pod: the event's pod; node: the node it runs on.",
    }


def _node_name(ctx: ActionContext, pod: Any | None) -> str | None:
    """The event's node: ``k8s.node.name``, else the pod's ``spec.nodeName``."""
    name = ctx.event.field("k8s.node.name")
    if name:
        return str(name)
    if pod is not None and pod.spec is not None and pod.spec.node_name:
        return str(pod.spec.node_name)
    return None


async def _metadata_patch(
    ctx: ActionContext, api: KubeApi, field_: str, values: Mapping[str, str]
) -> ActionResult:
    """Set (or, with an empty value, remove) labels or annotations of the pod or its node."""
    pod, target = await pod_of(api, ctx)
    patch = {"metadata": {field_: {k: (v if v != "" else None) for k, v in values.items()}}}
    if ctx.parameters.get("level", "pod") == "node":
        node = _node_name(ctx, pod)
        if node is None:
            return ActionResult.skipped(
                f"pod {target.namespace}/{target.pod} is on no node", target
            )
        try:
            await api.call(f"patch {field_} of node {node}", api.core.patch_node, node, patch)
        except NotFound:
            return ActionResult.skipped(f"node {node} no longer exists", target)
        subject: dict[str, Any] = {"node": node}
    else:
        try:
            await api.call(
                f"patch {field_} of pod {target.namespace}/{target.pod}",
                api.core.patch_namespaced_pod,
                target.pod,
                target.namespace,
                patch,
            )
        except NotFound:
            return ActionResult.skipped(
                f"pod {target.namespace}/{target.pod} no longer exists", target
            )
        subject = {}
    set_ = sorted(k for k, v in values.items() if v != "")
    removed = sorted(k for k, v in values.items() if v == "")
    parts = [f"set {', '.join(set_)}"] if set_ else []
    parts += [f"removed {', '.join(removed)}"] if removed else []
    where = f" of node {subject['node']}" if subject else ""
    return ActionResult.succeeded(
        f"{field_} " + "; ".join(parts) + where,
        target,
        **{field_: {k: v for k, v in values.items() if v != ""}},
        removed=removed,
        **subject,
    )


_NODE_PATCH = RbacRule(("",), ("nodes",), ("get", "patch"))


LABELS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "minProperties": 1,
    "description": "Labels to set; an empty value removes the label.",
    "propertyNames": {
        "pattern": LABEL_KEY_PATTERN,
        "maxLength": 317,
        "errorMessage": "is not a valid Kubernetes label key ([prefix/]name)",
    },
    "additionalProperties": {
        "type": "string",
        "pattern": LABEL_VALUE_PATTERN,
        "errorMessage": (
            "must be a Kubernetes label value (quoted, at most 63 characters "
            "of letters, digits, '-', '_', '.'), or empty to remove the label"
        ),
    },
}
_POD_PATCH = RbacRule(("",), ("pods",), ("get", "patch"))


@actionner(
    "kubernetes:label",
    aliases=(
        Alias(
            "kubernetes:labelize",
            description="Former name of kubernetes:label, for the pod's labels only.",
            parameters={
                "type": "object",
                "additionalProperties": False,
                "required": ["labels"],
                "properties": {"labels": LABELS_SCHEMA},
            },
            rbac=(_POD_PATCH,),
        ),
    ),
    description="Add, change or remove labels of the pod the event is about, or of its node.",
    continue_=True,
    before=False,
    requires=POD_FIELDS,
    parameters={
        "type": "object",
        "additionalProperties": False,
        "required": ["labels"],
        "properties": {"labels": LABELS_SCHEMA, "level": _level_schema()},
    },
    rbac=(_POD_PATCH, _NODE_PATCH),
)
@injects_api_skips_missing_pod
async def label(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Set labels; an empty value removes the label (absent already: fine)."""
    return await _metadata_patch(ctx, api, "labels", ctx.parameters["labels"])


@actionner(
    "kubernetes:annotation",
    description="Add, change or remove annotations of the pod the event is about, or of its node.",
    continue_=True,
    before=False,
    requires=POD_FIELDS,
    parameters={
        "type": "object",
        "additionalProperties": False,
        "required": ["annotations"],
        "properties": {
            "annotations": {
                "type": "object",
                "minProperties": 1,
                "description": "Annotations to set; an empty value removes the annotation.",
                "propertyNames": {
                    "pattern": LABEL_KEY_PATTERN,
                    "maxLength": 317,
                    "errorMessage": "is not a valid Kubernetes annotation key ([prefix/]name)",
                },
                "additionalProperties": {
                    "type": "string",
                    "errorMessage": "must be text (quote it), or empty to remove the annotation",
                },
            },
            "level": _level_schema(),
        },
    },
    rbac=(RbacRule(("",), ("pods",), ("get", "patch")), _NODE_PATCH),
)
@injects_api_skips_missing_pod
async def annotation(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Set annotations; an empty value removes the annotation (absent already: fine)."""
    return await _metadata_patch(ctx, api, "annotations", ctx.parameters["annotations"])


# -- network policies ----------------------------------------------------------------------------

_OWNER_READERS = {
    "ReplicaSet": ("replicaset", "read_namespaced_replica_set"),
    "DaemonSet": ("daemonset", "read_namespaced_daemon_set"),
    "StatefulSet": ("statefulset", "read_namespaced_stateful_set"),
}

ALLOW_SCHEMA: dict[str, Any] = {
    "allow_cidr": {
        "type": "array",
        "items": {
            "type": "string",
            "pattern": CIDR_PATTERN,
            "errorMessage": "is not a CIDR (10.0.0.0/8, fd00::/8)",
        },
        "description": "Egress to these CIDRs stays allowed.",
    },
    "allow_namespaces": {
        "type": "array",
        "items": {
            "type": "string",
            "pattern": NAMESPACE_PATTERN,
            "errorMessage": "is not a namespace name",
        },
        "description": "Egress to pods of these namespaces stays allowed (selected by their "
        f"{NAMESPACE_NAME_LABEL} label).",
    },
}


class Workload:
    """The pods a policy isolates: the pod's owner's (by its selector), or the pod alone."""

    def __init__(self, kind: str, name: str, selector: dict[str, Any], subject: str) -> None:
        self.kind = kind
        self.name = name
        self.selector = selector
        """A Kubernetes LabelSelector (``matchLabels``, maybe ``matchExpressions``)."""
        self.subject = subject

    @property
    def policy_name(self) -> str:
        """The name of the policy made for it: ``falco-talon-<kind>-<name>``."""
        return f"falco-talon-{self.kind}-{self.name}"[:253].rstrip("-.")


async def workload_of(api: KubeApi, pod: Any, target: Target) -> Workload | ActionResult:
    """The pod's workload; a ``skipped`` result when nothing safe selects it."""
    ns = target.namespace
    ref = _owner(pod)
    if ref is not None and ref.kind in _OWNER_READERS:
        short, reader = _OWNER_READERS[ref.kind]
        owner = await api.call(
            f"get {short} {ns}/{ref.name}", getattr(api.apps, reader), ref.name, ns
        )
        selector = api.api_client.sanitize_for_serialization(owner.spec.selector)
        return Workload(short, ref.name, selector, f"{ref.kind} {ref.name}")
    labels = {k: v for k, v in (pod.metadata.labels or {}).items() if k not in GENERATED_LABELS}
    if not labels:
        return ActionResult.skipped(
            "the pod has no labels to select it by; a policy without a selector "
            "would isolate the whole namespace",
            target,
        )
    return Workload("pod", str(target.pod), {"matchLabels": labels}, f"pod {target.pod}")


def cidrs_of(values: Any) -> list[str]:
    """Each CIDR in its canonical form (``10.1.2.3/8`` -> ``10.0.0.0/8``)."""
    out = []
    for value in values or ():
        try:
            out.append(str(ipaddress.ip_network(str(value), strict=False)))
        except ValueError as exc:
            raise PermanentError(f"allow_cidr: {value!r} is not a CIDR ({exc})") from None
    return out


@actionner(
    "kubernetes:networkpolicy",
    description="Deny the egress of the pod's workload with a NetworkPolicy, but to the "
    "allowed CIDRs and namespaces.",
    continue_=True,
    before=True,
    requires=POD_FIELDS,
    parameters={
        "type": "object",
        "additionalProperties": False,
        "properties": ALLOW_SCHEMA,
    },
    rbac=(
        _PODS_READ,
        RbacRule(("apps",), ("replicasets", "daemonsets", "statefulsets"), ("get",)),
        RbacRule(("networking.k8s.io",), ("networkpolicies",), ("get", "create", "update")),
    ),
)
@injects_api_skips_missing_pod
async def networkpolicy(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Deny all egress of the pod's workload (its owner's pods, or the pod alone) but to
    ``allow_cidr`` and the pods of ``allow_namespaces``."""
    pod, target = await pod_of(api, ctx)
    ns = str(target.namespace)
    workload = await workload_of(api, pod, target)
    if isinstance(workload, ActionResult):
        return workload
    selector = workload.selector
    name = workload.policy_name
    cidrs = cidrs_of(ctx.parameters.get("allow_cidr"))
    namespaces = sorted(set(ctx.parameters.get("allow_namespaces") or ()))
    to: list[dict[str, Any]] = [{"ipBlock": {"cidr": c}} for c in cidrs]
    if namespaces:
        to.append(
            {
                "namespaceSelector": {
                    "matchExpressions": [
                        {"key": NAMESPACE_NAME_LABEL, "operator": "In", "values": namespaces}
                    ]
                }
            }
        )
    body: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "labels": dict(MANAGED_BY)},
        "spec": {
            "podSelector": selector,
            "policyTypes": ["Egress"],
            "egress": [{"to": to}] if to else [],
        },
    }
    net: Any = api.networking
    verb = await create_or_replace(
        api,
        f"networkpolicy {ns}/{name}",
        lambda **kw: net.create_namespaced_network_policy(ns, body, **kw),
        lambda **kw: net.read_namespaced_network_policy(name, ns, **kw),
        lambda current, **kw: net.replace_namespaced_network_policy(
            name, ns, with_version(body, current.metadata), **kw
        ),
    )
    allowed = cidrs + [f"namespace {n}" for n in namespaces]
    but = f" but to {', '.join(allowed)}" if allowed else ""
    return ActionResult.succeeded(
        f"networkpolicy {name} {verb}: all egress of {workload.subject} denied{but}",
        target,
        networkpolicy=name,
        operation=verb,
        allow_cidr=cidrs,
        allow_namespaces=namespaces,
    )


def with_version(body: dict[str, Any], current: Any) -> dict[str, Any]:
    """``body`` to replace the stored object: its resourceVersion, its labels kept."""
    out = {**body, "metadata": dict(body["metadata"])}
    get = current.get if isinstance(current, dict) else lambda k: getattr(current, _snake(k))
    out["metadata"]["resourceVersion"] = get("resourceVersion")
    out["metadata"]["labels"] = {**(get("labels") or {}), **body["metadata"].get("labels", {})}
    return out


def _snake(key: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in key)


async def create_or_replace(
    api: KubeApi,
    what: str,
    create: Callable[..., Any],
    read: Callable[..., Any],
    replace: Callable[..., Any],
) -> str:
    """Create the object; if it exists, replace it: ``"created"`` or ``"updated"``. Each
    callable passes on the client keyword arguments it is given (``_request_timeout``);
    ``replace`` gets the stored object first."""
    try:
        await api.call(f"create {what}", create)
        return "created"
    except Conflict:
        current = await api.call(f"get {what}", read)
        await api.call(f"update {what}", replace, current)
        return "updated"


# -- exec, script, log ----------------------------------------------------------------------------

_EXEC_RBAC = (_PODS_READ, RbacRule(("",), ("pods/exec",), ("create", "get")))
_TIMEOUT_SCHEMA = {
    "type": "number",
    "exclusiveMinimum": 0,
    "default": 20,
    "description": "Seconds the command may run in each container.",
}
_SHELL_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "default": "/bin/sh",
    "description": "Shell that runs the command with -c.",
}


@actionner(
    "kubernetes:exec",
    description="Run a command in the pod's containers (forensics).",
    continue_=True,
    before=True,
    requires=POD_FIELDS,
    parameters={
        "type": "object",
        "additionalProperties": False,
        "required": ["command"],
        "properties": {
            "shell": _SHELL_SCHEMA,
            "command": {
                "type": "string",
                "minLength": 1,
                "description": "The command to run.",
            },
            "timeout": _TIMEOUT_SCHEMA,
        },
    },
    rbac=_EXEC_RBAC,
)
@injects_api_skips_missing_pod
async def exec_command(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Run ``shell -c command`` in each container; any non-zero exit is a failure."""
    return await _run_in_containers(ctx, api, str(ctx.parameters["command"]), "command")


@actionner(
    "kubernetes:script",
    description="Run a shell script in the pod's containers (forensics).",
    continue_=True,
    before=True,
    requires=POD_FIELDS,
    parameters={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "shell": {**_SHELL_SCHEMA, "description": "Shell that runs the script with -c."},
            "script": {
                "type": "string",
                "minLength": 1,
                "description": "The script's text.",
            },
            "file": {
                "type": "string",
                "minLength": 1,
                "description": "Path of a file holding the script, read when the action runs.",
            },
            "timeout": {
                **_TIMEOUT_SCHEMA,
                "description": "Seconds the script may run in each container.",
            },
        },
        "allOf": [
            {
                "anyOf": [{"required": ["script"]}, {"required": ["file"]}],
                "errorMessage": "needs the script: script (its text) or file (its path)",
            },
            {
                "not": {"required": ["script", "file"]},
                "errorMessage": "gives both script and file: keep one",
            },
        ],
    },
    rbac=_EXEC_RBAC,
)
@injects_api_skips_missing_pod
async def script(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Run the script with ``shell -c`` in each container; any non-zero exit is a failure."""
    text = ctx.parameters.get("script")
    if text is None:
        path = str(ctx.parameters["file"])
        try:
            text = await asyncio.to_thread(_read_text, path)
        except OSError as exc:
            return ActionResult.failed(f"cannot read script file {path}: {exc}", ctx.target)
    return await _run_in_containers(ctx, api, str(text), "script")


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


async def _run_in_containers(
    ctx: ActionContext, api: KubeApi, command: str, what: str
) -> ActionResult:
    from kubernetes.stream import stream

    pod, target = await pod_of(api, ctx)
    shell = str(ctx.parameters.get("shell", "/bin/sh"))
    timeout = float(ctx.parameters.get("timeout", 20))
    results: dict[str, dict[str, Any]] = {}
    for container in (c.name for c in pod.spec.containers):

        def run(container: str = container) -> dict[str, Any]:
            # A client of its own: stream() swaps its transport while it connects.
            with api.stream_core() as core:
                resp = stream(
                    core.connect_get_namespaced_pod_exec,
                    target.pod,
                    target.namespace,
                    container=container,
                    command=[shell, "-c", command],
                    stderr=True,
                    stdin=False,
                    stdout=True,
                    tty=False,
                    _preload_content=False,
                    _request_timeout=timeout + 10,  # the socket outlives run_forever's deadline
                )
                started = time.monotonic()
                try:
                    resp.run_forever(timeout=timeout)
                    # timeout=0: never wait here for output of a command still running.
                    out = resp.read_stdout(timeout=0) or ""
                    err = resp.read_stderr(timeout=0) or ""
                    code = resp.returncode
                finally:
                    resp.close(timeout=1)  # closing the stream makes the kubelet kill it
            return {
                "stdout": _cut(out),
                "stderr": _cut(err),
                "exit_code": code if code is not None else -1,
                # A command still running at the deadline is killed when the stream closes;
                # depending on timing the kubelet's 137 may arrive first: either way it ran out.
                "timed_out": code is None or time.monotonic() - started >= timeout,
            }

        try:
            results[container] = await asyncio.wait_for(api.run_blocking(run), timeout + 5)
        except ApiPermanentError:
            raise
        except Exception as exc:
            raise kubeapi.classify(
                exc, f"exec in {target.namespace}/{target.pod}/{container}"
            ) from exc
    failed = {c: r for c, r in results.items() if r["exit_code"] != 0}
    if failed:
        why = "; ".join(
            f"{c}: "
            + (f"timed out after {timeout:g}s" if r["timed_out"] else f"exit code {r['exit_code']}")
            for c, r in failed.items()
        )
        return ActionResult.failed(f"{what} failed in {why}", target, containers=results)
    return ActionResult.succeeded(
        f"{what} ran in {len(results)} container(s)", target, containers=results
    )


def _cut(text: str) -> str:
    data = text.encode()
    if len(data) <= OUTPUT_LIMIT:
        return text
    return (
        data[:OUTPUT_LIMIT].decode(errors="ignore") + f"... [{len(data) - OUTPUT_LIMIT} bytes cut]"
    )


@actionner(
    "kubernetes:log",
    description="Read the last lines of the logs of the pod's containers.",
    continue_=True,
    before=True,
    requires=POD_FIELDS,
    parameters={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "tail_lines": {
                "type": "integer",
                "minimum": 0,
                "default": 20,
                "description": "Lines of each container's log to read, from its end.",
            },
        },
    },
    rbac=(_PODS_READ, RbacRule(("",), ("pods/log",), ("get",))),
)
@injects_api_skips_missing_pod
async def log(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Each container's last ``tail_lines`` log lines, in the outcome's ``logs``."""
    pod, target = await pod_of(api, ctx)
    tail = int(ctx.parameters.get("tail_lines", 20))
    logs: dict[str, str] = {}
    for container in (c.name for c in pod.spec.containers):
        try:
            text = await api.call(
                f"get log of {target.namespace}/{target.pod}/{container}",
                api.core.read_namespaced_pod_log,
                target.pod,
                target.namespace,
                container=container,
                tail_lines=tail,
            )
        except NotFound:
            return ActionResult.skipped(
                f"pod {target.namespace}/{target.pod} no longer exists", target
            )
        logs[container] = _cut(str(text or ""))
    lines = sum(len(t.splitlines()) for t in logs.values())
    return ActionResult.succeeded(
        f"{lines} log line(s) read from {len(logs)} container(s)", target, logs=logs
    )


# -- delete, cordon, drain ------------------------------------------------------------------------

# ka.target.resource -> (API group attribute of KubeApi, client method stem, namespaced, group)
DELETABLE: dict[str, tuple[str, str, bool, str]] = {
    "namespaces": ("core", "namespace", False, ""),
    "configmaps": ("core", "namespaced_config_map", True, ""),
    "secrets": ("core", "namespaced_secret", True, ""),
    "services": ("core", "namespaced_service", True, ""),
    "serviceaccounts": ("core", "namespaced_service_account", True, ""),
    "deployments": ("apps", "namespaced_deployment", True, "apps"),
    "daemonsets": ("apps", "namespaced_daemon_set", True, "apps"),
    "statefulsets": ("apps", "namespaced_stateful_set", True, "apps"),
    "replicasets": ("apps", "namespaced_replica_set", True, "apps"),
    "roles": ("rbac", "namespaced_role", True, "rbac.authorization.k8s.io"),
    "clusterroles": ("rbac", "cluster_role", False, "rbac.authorization.k8s.io"),
}


def _delete_rbac() -> tuple[RbacRule, ...]:
    groups: dict[str, list[str]] = {}
    for resource, (_, _, _, group) in DELETABLE.items():
        groups.setdefault(group, []).append(resource)
    return tuple(RbacRule((g,), tuple(rs), ("get", "delete")) for g, rs in groups.items())


@actionner(
    "kubernetes:delete",
    description="Delete the resource a Kubernetes audit event is about (ka.target.resource: "
    + ", ".join(DELETABLE)
    + ").",
    continue_=False,
    before=False,
    requires=("ka.target.resource", "ka.target.name", "ka.target.namespace"),
    rbac=_delete_rbac(),
)
async def delete(ctx: ActionContext) -> ActionResult:
    """Delete ``ka.target.resource`` ``ka.target.name`` (in ``ka.target.namespace``);
    already gone or being deleted: done."""
    api = kubeapi.current()
    resource = str(ctx.event.field("ka.target.resource") or "")
    name = str(ctx.event.field("ka.target.name") or "")
    ns = str(ctx.event.field("ka.target.namespace") or "")
    target = Target(namespace=ns or None)
    if not resource or not name:
        return ActionResult.skipped(
            "the event names no resource (ka.target.resource and ka.target.name)", target
        )
    if resource not in DELETABLE:
        return ActionResult.skipped(
            f"kubernetes:delete does not delete {resource} (only {', '.join(DELETABLE)})", target
        )
    group, stem, namespaced, _ = DELETABLE[resource]
    client = getattr(api, group)
    args: tuple[str, ...] = (name, ns) if namespaced else (name,)
    if namespaced and not ns:
        return ActionResult.skipped(f"the event names no namespace of {resource} {name}", target)
    what = f"{resource} {ns + '/' if namespaced else ''}{name}"
    try:
        current = await api.call(f"get {what}", getattr(client, f"read_{stem}"), *args)
        if current.metadata.deletion_timestamp is not None:
            return ActionResult.succeeded(f"{what} is already being deleted", target)
        await api.call(
            f"delete {what}",
            getattr(client, f"delete_{stem}"),
            *args,
            propagation_policy="Background",
        )
    except NotFound:
        return ActionResult.succeeded(f"{what} already gone", target, resource=resource, name=name)
    return ActionResult.succeeded(f"{what} deleted", target, resource=resource, name=name)


async def _node_of_event(ctx: ActionContext, api: KubeApi) -> tuple[str, Target]:
    """The event's node (``k8s.node.name``, else the pod's ``spec.nodeName``)."""
    name = _node_name(ctx, None)
    if name:
        return name, ctx.target
    pod, target = await pod_of(api, ctx)
    name = _node_name(ctx, pod)
    if not name:
        raise NoTarget(f"pod {target.namespace}/{target.pod} is on no node", target)
    return name, target


async def _cordon(api: KubeApi, node: str) -> bool:
    """Mark ``node`` unschedulable; False when it already was."""
    current = await api.call(f"get node {node}", api.core.read_node, node)
    if current.spec is not None and current.spec.unschedulable:
        return False
    await api.call(
        f"cordon node {node}", api.core.patch_node, node, {"spec": {"unschedulable": True}}
    )
    return True


_NODE_CORDON = RbacRule(("",), ("nodes",), ("get", "patch"))


@actionner(
    "kubernetes:cordon",
    description="Mark the event's node unschedulable (k8s.node.name, or the pod's node).",
    continue_=True,
    before=False,
    requires=("k8s.node.name|k8s.pod.name", "k8s.ns.name"),
    rbac=(_PODS_READ, _NODE_CORDON),
)
@injects_api_skips_missing_pod
async def cordon(ctx: ActionContext, api: KubeApi) -> ActionResult:
    node, target = await _node_of_event(ctx, api)
    try:
        done = await _cordon(api, node)
    except NotFound:
        return ActionResult.skipped(f"node {node} no longer exists", target)
    return ActionResult.succeeded(
        f"node {node} cordoned" if done else f"node {node} was already cordoned", target, node=node
    )


@actionner(
    "kubernetes:drain",
    description="Cordon the event's node, then evict its pods (pods/eviction: "
    "PodDisruptionBudgets are honoured).",
    continue_=True,
    before=False,
    requires=("k8s.node.name|k8s.pod.name", "k8s.ns.name"),
    spellings={
        "ignoreDaemonsets": "ignore_daemonsets",
        "ignoreStatefulsets": "ignore_statefulsets",
        "minHealthyReplicas": "min_healthy_replicas",
    },
    parameters={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "ignore_daemonsets": {
                "type": "boolean",
                "default": False,
                "description": "Leave pods owned by a DaemonSet on the node.",
            },
            "ignore_statefulsets": {
                "type": "boolean",
                "default": False,
                "description": "Leave pods owned by a StatefulSet on the node.",
            },
            "min_healthy_replicas": _min_healthy_schema(),
            "max_wait_period": {
                "type": "integer",
                "minimum": 0,
                "default": 0,
                "description": "Seconds to wait for the evicted pods to be gone; 0: do not wait.",
            },
            "ignore_errors": {
                "type": "boolean",
                "default": False,
                "description": "Succeed even when some evictions failed (they are still counted).",
            },
        },
    },
    rbac=(
        RbacRule(("",), ("pods",), ("get", "list")),
        RbacRule(("",), ("pods/eviction",), ("create",)),
        RbacRule(("apps",), ("replicasets",), ("get",)),
        _NODE_CORDON,
    ),
    timeout=None,
)
@injects_api_skips_missing_pod
async def drain(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Cordon the node, then evict each of its pods not left alone; count the outcome."""
    node, target = await _node_of_event(ctx, api)
    try:
        await _cordon(api, node)
    except NotFound:
        return ActionResult.skipped(f"node {node} no longer exists", target)
    pods = await api.call(
        f"list pods of node {node}",
        api.core.list_pod_for_all_namespaces,
        field_selector=f"spec.nodeName={node}",
    )
    evicted: list[str] = []
    ignored: dict[str, str] = {}
    failed: dict[str, str] = {}
    minimum = ctx.parameters.get("min_healthy_replicas")
    for pod in sorted(pods.items, key=lambda p: (p.metadata.namespace, p.metadata.name)):
        key = f"{pod.metadata.namespace}/{pod.metadata.name}"
        if pod.metadata.deletion_timestamp is not None:
            evicted.append(key)  # evicted before (a repeated drain): being deleted already
            continue
        why = _ignored_by_owner(ctx, pod)
        kind, ref = _owner_kind(pod)
        if why is None and minimum is not None and kind == "ReplicaSet":
            try:
                why = await _replica_budget(
                    api, pod, ref, minimum, ctx.name_of("min_healthy_replicas")
                )
            except NotFound:
                why = None
        if why:
            ignored[key] = why
            continue
        try:
            await api.call(
                f"evict pod {key}",
                api.core.create_namespaced_pod_eviction,
                pod.metadata.name,
                pod.metadata.namespace,
                {
                    "apiVersion": "policy/v1",
                    "kind": "Eviction",
                    "metadata": {"name": pod.metadata.name, "namespace": pod.metadata.namespace},
                },
                retry_policy=EVICTION_RETRY,
            )
        except NotFound:
            evicted.append(key)  # gone meanwhile
        except (ApiPermanentError, ApiTemporaryError) as exc:
            status = getattr(exc, "status", None)
            failed[key] = "blocked by a PodDisruptionBudget" if status == 429 else str(exc)
        else:
            evicted.append(key)
    remaining: list[str] = []
    wait = int(ctx.parameters.get("max_wait_period", 0))
    if wait > 0 and evicted:
        remaining = await _wait_gone(api, evicted, wait)
        for key in remaining:
            failed[key] = f"still there after {wait}s"
    summary = (
        f"node {node} cordoned; {len(evicted) - len(remaining)} pod(s) evicted, "
        f"{len(ignored)} ignored, {len(failed)} failed"
    )
    output = {
        "node": node,
        "evicted": [k for k in evicted if k not in remaining],
        "ignored": ignored,
        "failed": failed,
        "counts": {
            "evicted": len(evicted) - len(remaining),
            "ignored": len(ignored),
            "failed": len(failed),
        },
    }
    if failed and not ctx.parameters.get("ignore_errors"):
        return ActionResult.failed(summary, target, **output)
    return ActionResult.succeeded(summary, target, **output)


EVICTION_RETRY = RetryPolicy(attempts=1)
"""An eviction is tried once: a 429 is a PodDisruptionBudget saying no, not throttling."""


async def _wait_gone(api: KubeApi, keys: list[str], seconds: int) -> list[str]:
    """Poll until the pods are gone or ``seconds`` passed; the ones still there."""
    deadline = time.monotonic() + seconds
    left = list(keys)
    while left:
        still = []
        for key in left:
            ns, name = key.split("/", 1)
            try:
                await api.read_pod(ns, name)
                still.append(key)
            except NotFound:
                pass
        left = still
        if not left or time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    return left
