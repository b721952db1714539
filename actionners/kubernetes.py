"""Kubernetes actionners: the original Falco Talon's catalogue (terminate, label, annotation,
networkpolicy, exec, script, log, delete, cordon, drain), with its names and snake_case
parameters; the seed's names (``kubernetes:labelize``) and camelCase parameter spellings
(``gracePeriodSeconds``) keep working.

Position in the flow: ... -> state machine -> **actionners** -> notifiers.

Each actionner is declared with its ``continue``/``before`` defaults, the JSON Schema of its
parameters and the RBAC rules it needs, and runs against the API through the engine's
shared client (``engine.contract.kubeapi``): calls run off the event loop, transient failures are
retried there, permanent ones come back with the API's message. They are plain REST requests
whose answers are read as the API's JSON (``pod["metadata"]["ownerReferences"]``): the
client's generated API classes and models are never loaded for them (~100 MB per process).
Only exec and script stream through the client's ``CoreV1Api``, imported when one runs.

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
    NODE_PATH,
    POD_PATH,
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


async def pod_of(api: KubeApi, ctx: ActionContext) -> tuple[dict[str, Any], Target]:
    """The event's pod (its JSON) and the target naming it with its uid; :class:`NoTarget`
    when the event names none or it is gone."""
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
    return pod, Target(target.pod, target.namespace, _meta(pod).get("uid"))


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An object's ``metadata`` (empty when it has none)."""
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _spec(obj: Mapping[str, Any]) -> dict[str, Any]:
    """An object's ``spec`` (empty when it has none)."""
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def _owner(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The pod's controller owner reference, if any."""
    for ref in _meta(pod).get("ownerReferences") or ():
        if ref.get("controller"):
            return dict(ref)
    return None


def _ready(pod: Mapping[str, Any]) -> bool:
    if _meta(pod).get("deletionTimestamp") is not None:
        return False
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if cond.get("type") == "Ready":
            return bool(cond.get("status") == "True")
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


def _owner_kind(pod: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
    ref = _owner(pod)
    return (ref.get("kind") if ref is not None else None), ref


def _ignored_by_owner(ctx: ActionContext, pod: Mapping[str, Any]) -> str | None:
    """Why ``ignore_daemonsets``/``ignore_statefulsets``/``ignore_standalone_pods`` leave
    ``pod`` alone, or None."""
    kind, ref = _owner_kind(pod)
    owner = ref.get("name") if ref is not None else None
    params = ctx.parameters
    if kind == "DaemonSet" and params.get("ignore_daemonsets"):
        return f"owned by DaemonSet {owner} and {ctx.name_of('ignore_daemonsets')} is true"
    if kind == "StatefulSet" and params.get("ignore_statefulsets"):
        return f"owned by StatefulSet {owner} and {ctx.name_of('ignore_statefulsets')} is true"
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
    if minimum is not None and kind == "ReplicaSet" and ref is not None:
        verdict = await _replica_budget(api, pod, ref, minimum, ctx.name_of("min_healthy_replicas"))
        if verdict:
            return ActionResult.skipped(verdict, target)
    grace = int(params.get("grace_period_seconds", 0))
    try:
        await _delete_pod_request(api, str(target.namespace), str(target.pod), grace)
    except NotFound:
        return ActionResult.succeeded("pod already gone", target)
    return ActionResult.succeeded(
        f"pod deleted ({ctx.name_of('grace_period_seconds')} {grace})",
        target,
        grace_period_seconds=grace,
        owner=f"{kind}/{ref.get('name')}" if ref else None,
    )


_OWNER_CHECKS = ("ignore_daemonsets", "ignore_statefulsets", "ignore_standalone_pods")
"""The parameters that make terminate read the pod before deleting it."""


async def _delete_pod(ctx: ActionContext, api: KubeApi, grace: int) -> ActionResult:
    """Terminate when nothing needs the pod read first: one DELETE, whose answer (the pod,
    as JSON) gives the uid and the owner for the result. This is the path from an event to
    a pod going away in milliseconds: no GET before."""
    target = ctx.target
    if not target.pod or not target.namespace:
        await pod_of(api, ctx)  # raises NoTarget naming what the event lacks
    try:
        pod = await _delete_pod_request(api, str(target.namespace), str(target.pod), grace)
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


async def _delete_pod_request(api: KubeApi, ns: str, name: str, grace: int) -> dict[str, Any]:
    """DELETE the pod with ``grace`` seconds to stop; the pod as the API answered."""
    return await api.request(
        f"delete pod {ns}/{name}",
        "DELETE",
        POD_PATH,
        path_params={"namespace": ns, "name": name},
        query={"gracePeriodSeconds": grace},
    )


def _needed(minimum: int | str, desired: int) -> tuple[int, str]:
    """Ready pods ``minimum`` asks for: ``3``, ``"3"``, or ``"50%"`` of ``desired`` rounded up."""
    text = str(minimum)
    if text.endswith("%"):
        needed = math.ceil(desired * int(text.rstrip("%")) / 100)
        return needed, f"{text} of {desired} desired = {needed}"
    return int(text), text


async def _replica_budget(
    api: KubeApi,
    pod: Mapping[str, Any],
    ref: Mapping[str, Any],
    minimum: int | str,
    spelled: str,
) -> str | None:
    """Why deleting ``pod`` would leave its ReplicaSet below ``minimum`` ready pods, or None."""
    ns = str(_meta(pod).get("namespace"))
    owner = str(ref.get("name"))
    rs = await api.request(
        f"get replicaset {ns}/{owner}",
        "GET",
        "/apis/apps/v1/namespaces/{namespace}/replicasets/{name}",
        path_params={"namespace": ns, "name": owner},
    )
    spec = _spec(rs)
    needed, wanted = _needed(minimum, int(spec.get("replicas") or 0))
    match_labels = (spec.get("selector") or {}).get("matchLabels") or {}
    selector = ",".join(f"{k}={v}" for k, v in match_labels.items())
    pods = await api.request(
        f"list pods of replicaset {ns}/{owner}",
        "GET",
        "/api/v1/namespaces/{namespace}/pods",
        path_params={"namespace": ns},
        query={"labelSelector": selector},
    )
    rs_uid = _meta(rs).get("uid")
    owned = [
        p
        for p in pods.get("items") or ()
        if any(r.get("uid") == rs_uid for r in _meta(p).get("ownerReferences") or ())
    ]
    uid = _meta(pod).get("uid")
    remaining = sum(1 for p in owned if _ready(p) and _meta(p).get("uid") != uid)
    if remaining < needed:
        return (
            f"only {remaining} ready pod(s) of ReplicaSet {owner} would remain, "
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


def _node_name(ctx: ActionContext, pod: Mapping[str, Any] | None) -> str | None:
    """The event's node: ``k8s.node.name``, else the pod's ``spec.nodeName``."""
    name = ctx.event.field("k8s.node.name")
    if name:
        return str(name)
    if pod is not None and _spec(pod).get("nodeName"):
        return str(_spec(pod)["nodeName"])
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
            await api.request(
                f"patch {field_} of node {node}",
                "PATCH",
                NODE_PATH,
                path_params={"name": node},
                body=patch,
            )
        except NotFound:
            return ActionResult.skipped(f"node {node} no longer exists", target)
        subject: dict[str, Any] = {"node": node}
    else:
        try:
            await api.request(
                f"patch {field_} of pod {target.namespace}/{target.pod}",
                "PATCH",
                POD_PATH,
                path_params={"namespace": str(target.namespace), "name": str(target.pod)},
                body=patch,
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
    "ReplicaSet": ("replicaset", "replicasets"),
    "DaemonSet": ("daemonset", "daemonsets"),
    "StatefulSet": ("statefulset", "statefulsets"),
}
"""Owner kind -> (its name in messages and policy names, its apps/v1 resource)."""

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


async def workload_of(
    api: KubeApi, pod: Mapping[str, Any], target: Target
) -> Workload | ActionResult:
    """The pod's workload; a ``skipped`` result when nothing safe selects it."""
    ns = str(target.namespace)
    ref = _owner(pod)
    if ref is not None and ref.get("kind") in _OWNER_READERS:
        kind, name = str(ref["kind"]), str(ref.get("name"))
        short, resource = _OWNER_READERS[kind]
        owner = await api.request(
            f"get {short} {ns}/{name}",
            "GET",
            f"/apis/apps/v1/namespaces/{{namespace}}/{resource}/{{name}}",
            path_params={"namespace": ns, "name": name},
        )
        selector = dict(_spec(owner).get("selector") or {})
        return Workload(short, name, selector, f"{kind} {name}")
    labels = {
        k: v for k, v in (_meta(pod).get("labels") or {}).items() if k not in GENERATED_LABELS
    }
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
    verb = await create_or_replace(
        api,
        f"networkpolicy {ns}/{name}",
        "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies",
        ns,
        name,
        body,
        lambda current: with_version(body, _meta(current)),
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


def with_version(body: dict[str, Any], current: Mapping[str, Any]) -> dict[str, Any]:
    """``body`` to replace the stored object whose ``metadata`` is ``current``: its
    resourceVersion, its labels kept."""
    out = {**body, "metadata": dict(body["metadata"])}
    out["metadata"]["resourceVersion"] = current.get("resourceVersion")
    out["metadata"]["labels"] = {
        **(current.get("labels") or {}),
        **body["metadata"].get("labels", {}),
    }
    return out


async def create_or_replace(
    api: KubeApi,
    what: str,
    collection: str,
    namespace: str,
    name: str,
    body: dict[str, Any],
    replacement: Callable[[dict[str, Any]], dict[str, Any]],
) -> str:
    """Create ``body`` in ``collection`` (a path with ``{namespace}``); if it exists, replace
    it with ``replacement(stored object)``: ``"created"`` or ``"updated"``."""
    where = {"namespace": namespace}
    try:
        await api.request(f"create {what}", "POST", collection, path_params=where, body=body)
        return "created"
    except Conflict:
        item = collection + "/{name}"
        at = {**where, "name": name}
        current = await api.request(f"get {what}", "GET", item, path_params=at)
        await api.request(f"update {what}", "PUT", item, path_params=at, body=replacement(current))
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
    pod, target = await pod_of(api, ctx)
    shell = str(ctx.parameters.get("shell", "/bin/sh"))
    timeout = float(ctx.parameters.get("timeout", 20))
    results: dict[str, dict[str, Any]] = {}
    for container in _containers(pod):

        def run(container: str = container) -> dict[str, Any]:
            resp = api.open_exec(
                str(target.namespace),
                str(target.pod),
                container,
                [shell, "-c", command],
                timeout + 10,  # the socket outlives run_forever's deadline
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


def _containers(pod: Mapping[str, Any]) -> list[str]:
    """The names of the pod's containers (its init containers left out)."""
    return [str(c.get("name")) for c in _spec(pod).get("containers") or ()]


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
    for container in _containers(pod):
        try:
            text = await api.request_text(
                f"get log of {target.namespace}/{target.pod}/{container}",
                "GET",
                POD_PATH + "/log",
                path_params={"namespace": str(target.namespace), "name": str(target.pod)},
                query={"container": container, "tailLines": tail},
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

# ka.target.resource -> (API group, its version, namespaced)
DELETABLE: dict[str, tuple[str, str, bool]] = {
    "namespaces": ("", "v1", False),
    "configmaps": ("", "v1", True),
    "secrets": ("", "v1", True),
    "services": ("", "v1", True),
    "serviceaccounts": ("", "v1", True),
    "deployments": ("apps", "v1", True),
    "daemonsets": ("apps", "v1", True),
    "statefulsets": ("apps", "v1", True),
    "replicasets": ("apps", "v1", True),
    "roles": ("rbac.authorization.k8s.io", "v1", True),
    "clusterroles": ("rbac.authorization.k8s.io", "v1", False),
}


def deletable_path(resource: str) -> str:
    """The REST path of one ``resource`` of :data:`DELETABLE`, with ``{name}`` (and
    ``{namespace}`` when it is namespaced) to fill."""
    group, version, namespaced = DELETABLE[resource]
    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
    return prefix + ("/namespaces/{namespace}" if namespaced else "") + f"/{resource}/{{name}}"


def _delete_rbac() -> tuple[RbacRule, ...]:
    groups: dict[str, list[str]] = {}
    for resource, (group, _, _) in DELETABLE.items():
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
    _, _, namespaced = DELETABLE[resource]
    path = deletable_path(resource)
    params = {"name": name, "namespace": ns} if namespaced else {"name": name}
    if namespaced and not ns:
        return ActionResult.skipped(f"the event names no namespace of {resource} {name}", target)
    what = f"{resource} {ns + '/' if namespaced else ''}{name}"
    try:
        current = await api.request(f"get {what}", "GET", path, path_params=params)
        if _meta(current).get("deletionTimestamp") is not None:
            return ActionResult.succeeded(f"{what} is already being deleted", target)
        await api.request(
            f"delete {what}",
            "DELETE",
            path,
            path_params=params,
            query={"propagationPolicy": "Background"},
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
    at = {"name": node}
    current = await api.request(f"get node {node}", "GET", NODE_PATH, path_params=at)
    if _spec(current).get("unschedulable"):
        return False
    await api.request(
        f"cordon node {node}",
        "PATCH",
        NODE_PATH,
        path_params=at,
        body={"spec": {"unschedulable": True}},
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
    pods = await api.request(
        f"list pods of node {node}",
        "GET",
        "/api/v1/pods",
        query={"fieldSelector": f"spec.nodeName={node}"},
    )
    evicted: list[str] = []
    ignored: dict[str, str] = {}
    failed: dict[str, str] = {}
    minimum = ctx.parameters.get("min_healthy_replicas")
    items = sorted(
        pods.get("items") or (),
        key=lambda p: (str(_meta(p).get("namespace")), str(_meta(p).get("name"))),
    )
    for pod in items:
        pod_ns, pod_name = str(_meta(pod).get("namespace")), str(_meta(pod).get("name"))
        key = f"{pod_ns}/{pod_name}"
        if _meta(pod).get("deletionTimestamp") is not None:
            evicted.append(key)  # evicted before (a repeated drain): being deleted already
            continue
        why = _ignored_by_owner(ctx, pod)
        kind, ref = _owner_kind(pod)
        if why is None and minimum is not None and kind == "ReplicaSet" and ref is not None:
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
            await api.request(
                f"evict pod {key}",
                "POST",
                POD_PATH + "/eviction",
                path_params={"namespace": pod_ns, "name": pod_name},
                body={
                    "apiVersion": "policy/v1",
                    "kind": "Eviction",
                    "metadata": {"name": pod_name, "namespace": pod_ns},
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
