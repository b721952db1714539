"""Kubernetes actionners: terminate, labelize, networkpolicy, exec.

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
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from engine.contract import kubeapi
from engine.contract.actionners import ActionContext, RbacRule, RunFunc, actionner
from engine.contract.kubeapi import ApiPermanentError, Conflict, KubeApi, NotFound
from engine.contract.results import ActionResult, Target

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


# -- shared steps --------------------------------------------------------------------------------


class NoTarget(Exception):
    """The event names no pod, or the pod is gone: an outcome, not an error."""

    def __init__(self, reason: str, target: Target) -> None:
        super().__init__(reason)
        self.reason = reason
        self.target = target


async def _pod(api: KubeApi, ctx: ActionContext) -> tuple[Any, Target]:
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


# -- the actionners ----------------------------------------------------------------------------
@actionner(
    "kubernetes:terminate",
    description="Terminate the pod the event is about.",
    continue_=False,
    before=False,
    parameters={
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "gracePeriodSeconds": {
                "type": "integer",
                "minimum": 0,
                "default": 0,
                "description": "Seconds the pod has to stop; 0 deletes it at once.",
            },
            "ignoreDaemonsets": {
                "type": "boolean",
                "default": False,
                "description": "Leave pods owned by a DaemonSet alone.",
            },
            "ignoreStatefulsets": {
                "type": "boolean",
                "default": False,
                "description": "Leave pods owned by a StatefulSet alone.",
            },
            "minHealthyReplicas": {
                "type": ["integer", "string"],
                "minimum": 0,
                "pattern": r"^(100|[1-9]?[0-9])%$",
                "errorMessage": "must be a whole number of pods (3) or a quoted percentage ('50%')",
                "description": (
                    "Skip when fewer than this many ready pods of the owning ReplicaSet would "
                    "remain: a number, or a quoted percentage of its desired replicas."
                ),
            },
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
    try:
        pod, target = await _pod(api, ctx)
    except NoTarget as gone:
        if gone.target.pod and gone.target.namespace:
            return ActionResult.succeeded(f"{gone.reason}: nothing to terminate", gone.target)
        raise
    ref: Any = _owner(pod)
    kind = ref.kind if ref is not None else None
    if kind == "DaemonSet" and params.get("ignoreDaemonsets"):
        return ActionResult.skipped(
            f"owned by DaemonSet {ref.name} and ignoreDaemonsets is true", target
        )
    if kind == "StatefulSet" and params.get("ignoreStatefulsets"):
        return ActionResult.skipped(
            f"owned by StatefulSet {ref.name} and ignoreStatefulsets is true", target
        )
    minimum = params.get("minHealthyReplicas")
    if minimum is not None and kind == "ReplicaSet":
        verdict = await _replica_budget(api, pod, ref, minimum)
        if verdict:
            return ActionResult.skipped(verdict, target)
    grace = int(params.get("gracePeriodSeconds", 0))
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
        f"pod deleted (gracePeriodSeconds {grace})",
        target,
        gracePeriodSeconds=grace,
        owner=f"{kind}/{ref.name}" if ref else None,
    )


async def _replica_budget(api: KubeApi, pod: Any, ref: Any, minimum: int | str) -> str | None:
    """Why deleting ``pod`` would leave its ReplicaSet below ``minimum`` ready pods, or None."""
    ns = pod.metadata.namespace
    rs = await api.call(
        f"get replicaset {ns}/{ref.name}", api.apps.read_namespaced_replica_set, ref.name, ns
    )
    desired = int(rs.spec.replicas or 0)
    if isinstance(minimum, str):  # "50%" of the desired replicas, rounded up
        needed = math.ceil(desired * int(minimum.rstrip("%")) / 100)
        wanted = f"{minimum} of {desired} desired = {needed}"
    else:
        needed = int(minimum)
        wanted = str(needed)
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
            f"minHealthyReplicas is {wanted}"
        )
    return None


@actionner(
    "kubernetes:labelize",
    description="Add, change or remove labels of the pod the event is about.",
    continue_=True,
    before=False,
    parameters={
        "type": "object",
        "additionalProperties": False,
        "required": ["labels"],
        "properties": {
            "labels": {
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
            },
        },
    },
    rbac=(RbacRule(("",), ("pods",), ("get", "patch")),),
)
@injects_api_skips_missing_pod
async def labelize(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Set labels; an empty value removes the label (absent already: fine)."""
    labels: Mapping[str, str] = ctx.parameters["labels"]
    _, target = await _pod(api, ctx)
    patch = {"metadata": {"labels": {k: (v if v != "" else None) for k, v in labels.items()}}}
    try:
        await api.call(
            f"patch labels of pod {target.namespace}/{target.pod}",
            api.core.patch_namespaced_pod,
            target.pod,
            target.namespace,
            patch,
        )
    except NotFound:
        return ActionResult.skipped(f"pod {target.namespace}/{target.pod} no longer exists", target)
    set_ = sorted(k for k, v in labels.items() if v != "")
    removed = sorted(k for k, v in labels.items() if v == "")
    parts = [f"set {', '.join(set_)}"] if set_ else []
    parts += [f"removed {', '.join(removed)}"] if removed else []
    return ActionResult.succeeded(
        "labels " + "; ".join(parts),
        target,
        labels={k: v for k, v in labels.items() if v != ""},
        removed=removed,
    )


_OWNER_READERS = {
    "ReplicaSet": ("replicaset", "read_namespaced_replica_set"),
    "DaemonSet": ("daemonset", "read_namespaced_daemon_set"),
    "StatefulSet": ("statefulset", "read_namespaced_stateful_set"),
}


@actionner(
    "kubernetes:networkpolicy",
    description="Deny all egress of the pod's workload with a NetworkPolicy.",
    continue_=True,
    before=True,
    rbac=(
        _PODS_READ,
        RbacRule(("apps",), ("replicasets", "daemonsets", "statefulsets"), ("get",)),
        RbacRule(("networking.k8s.io",), ("networkpolicies",), ("get", "create", "update")),
    ),
)
@injects_api_skips_missing_pod
async def networkpolicy(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Deny all egress of the pod's workload (its owner's pods, or the pod alone)."""
    pod, target = await _pod(api, ctx)
    ns = target.namespace
    ref = _owner(pod)
    if ref is not None and ref.kind in _OWNER_READERS:
        short, reader = _OWNER_READERS[ref.kind]
        owner = await api.call(
            f"get {short} {ns}/{ref.name}", getattr(api.apps, reader), ref.name, ns
        )
        selector = api.api_client.sanitize_for_serialization(owner.spec.selector)
        name = f"falco-talon-{short}-{ref.name}"
        subject = f"{ref.kind} {ref.name}"
    else:
        labels = {k: v for k, v in (pod.metadata.labels or {}).items() if k not in GENERATED_LABELS}
        if not labels:
            return ActionResult.skipped(
                "the pod has no labels to select it by; a NetworkPolicy without a selector "
                "would isolate the whole namespace",
                target,
            )
        selector = {"matchLabels": labels}
        name = f"falco-talon-pod-{target.pod}"
        subject = f"pod {target.pod}"
    name = name[:253].rstrip("-.")
    body: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns, "labels": dict(MANAGED_BY)},
        "spec": {"podSelector": selector, "policyTypes": ["Egress"], "egress": []},
    }
    net = api.networking
    try:
        await api.call(
            f"create networkpolicy {ns}/{name}", net.create_namespaced_network_policy, ns, body
        )
        verb = "created"
    except Conflict:
        current = await api.call(
            f"get networkpolicy {ns}/{name}", net.read_namespaced_network_policy, name, ns
        )
        body["metadata"]["resourceVersion"] = current.metadata.resource_version
        body["metadata"]["labels"] = {**(current.metadata.labels or {}), **MANAGED_BY}
        await api.call(
            f"update networkpolicy {ns}/{name}",
            net.replace_namespaced_network_policy,
            name,
            ns,
            body,
        )
        verb = "updated"
    return ActionResult.succeeded(
        f"networkpolicy {name} {verb}: all egress of {subject} denied",
        target,
        networkpolicy=name,
        operation=verb,
    )


@actionner(
    "kubernetes:exec",
    description="Run a command in the pod's containers (forensics).",
    continue_=True,
    before=True,
    parameters={
        "type": "object",
        "additionalProperties": False,
        "required": ["command"],
        "properties": {
            "shell": {
                "type": "string",
                "minLength": 1,
                "default": "/bin/sh",
                "description": "Shell that runs the command with -c.",
            },
            "command": {
                "type": "string",
                "minLength": 1,
                "description": "The command to run.",
            },
            "timeout": {
                "type": "number",
                "exclusiveMinimum": 0,
                "default": 20,
                "description": "Seconds the command may run in each container.",
            },
        },
    },
    rbac=(_PODS_READ, RbacRule(("",), ("pods/exec",), ("create", "get"))),
)
@injects_api_skips_missing_pod
async def exec_command(ctx: ActionContext, api: KubeApi) -> ActionResult:
    """Run ``shell -c command`` in each container; any non-zero exit is a failure."""
    from kubernetes.stream import stream

    pod, target = await _pod(api, ctx)
    shell = str(ctx.parameters.get("shell", "/bin/sh"))
    command = str(ctx.parameters["command"])
    timeout = float(ctx.parameters.get("timeout", 20))
    results: dict[str, dict[str, Any]] = {}
    for container in (c.name for c in pod.spec.containers):

        def run(container: str = container) -> dict[str, Any]:
            resp = stream(
                api.core.connect_get_namespaced_pod_exec,
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
                resp.close(timeout=1)  # closing the stream makes the kubelet kill the command
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
        return ActionResult.failed(f"command failed in {why}", target, containers=results)
    return ActionResult.succeeded(
        f"command ran in {len(results)} container(s)", target, containers=results
    )


def _cut(text: str) -> str:
    data = text.encode()
    if len(data) <= OUTPUT_LIMIT:
        return text
    return (
        data[:OUTPUT_LIMIT].decode(errors="ignore") + f"... [{len(data) - OUTPUT_LIMIT} bytes cut]"
    )
