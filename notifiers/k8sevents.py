"""The ``k8sevents`` notifier: each action result as a Kubernetes Event on the pod.

Position in the flow: ... -> actionners -> **notifiers** (the last stage).

Creates a core/v1 Event in the target pod's namespace whose ``involvedObject`` names the
pod with its ``uid``, so ``kubectl describe pod``, ``kubectl get events`` and tools such as
Argo CD show it next to the pod. ``reason`` names the action and its outcome
(``TerminateSucceeded``), ``type`` is Warning for a failure and Normal otherwise. With
``traceUrl`` set, the link to the trace ends the message and is the annotation
``falco-talon/trace-url``. Needs no configuration; uses the engine's shared Kubernetes client
(plain REST requests: the client's generated API classes are never loaded for it).
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from engine.contract import kubeapi
from engine.contract.errors import PermanentError
from engine.contract.kubeapi import NotFound, RbacRule
from engine.contract.notifiers import Notification, notifier

COMPONENT = "falco-talon"
MESSAGE_LIMIT = 1024


def _camel(text: str) -> str:
    words = [w for w in text.replace("_", "-").split("-") if w]
    return "".join(w[:1].upper() + w[1:] for w in words)


def reason(note: Notification) -> str:
    """``kubernetes:terminate`` + succeeded -> ``TerminateSucceeded``, + given-up ->
    ``TerminateGivenUp``; no action (an event given up that no rule matches) ->
    ``EventGivenUp`` (CamelCase, <= 128)."""
    action = note.action.split(":", 1)[-1] or "event"
    return (_camel(action) + _camel(note.result.outcome.value))[:128]


def message(note: Notification) -> str:
    """What ``kubectl describe`` shows; the trace link, when there is one, is never cut."""
    result = note.result
    what = f"falco-talon rule {note.rule!r}: {note.action}" if note.rule else "falco-talon: event"
    text = f"{what} {result.outcome.value}"
    if result.reason:
        text += f": {result.reason}"
    text += f" (Falco rule {note.event.rule!r}, priority {note.event.priority})"
    trace = f" trace: {note.trace_url}" if note.trace_url else ""
    if len(trace) > MESSAGE_LIMIT // 2:
        trace = ""  # an absurd URL: the annotation still has it
    return text[: MESSAGE_LIMIT - len(trace)] + trace


@notifier(
    "k8sevents",
    description="Create a Kubernetes Event on the target pod for each action result.",
    needs_settings=False,
    rbac=(RbacRule(("",), ("events",), ("create",)), RbacRule(("",), ("pods",), ("get",))),
)
async def send(note: Notification, settings: Mapping[str, Any]) -> None:
    target = note.result.target
    if not target.pod or not target.namespace:
        raise PermanentError("the action result names no pod: no Kubernetes Event to create")
    api = kubeapi.current()
    uid = target.uid
    if uid is None:
        try:
            uid = (await api.read_pod(target.namespace, target.pod)).get("metadata", {}).get("uid")
        except NotFound:
            uid = None  # the pod is gone: the Event still names it
    now = datetime.now(UTC)
    involved: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": target.pod,
        "namespace": target.namespace,
    }
    if uid:
        involved["uid"] = uid
    body = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "generateName": f"{target.pod[:200]}.falco-talon.",
            "namespace": target.namespace,
            "labels": {"app.kubernetes.io/managed-by": COMPONENT},
            "annotations": {
                "falco-talon/event-id": note.event.id,
                "falco-talon/rule": note.rule[:253],
                **({"falco-talon/trace-id": note.trace_id} if note.trace_id else {}),
                **({"falco-talon/trace-url": note.trace_url} if note.trace_url else {}),
            },
        },
        "involvedObject": involved,
        "reason": reason(note),
        "message": message(note),
        "type": "Warning" if note.result.outcome.is_failure else "Normal",
        "source": {"component": COMPONENT, "host": socket.gethostname()},
        "reportingComponent": COMPONENT,
        "reportingInstance": socket.gethostname()[:128],
        "action": note.action[:128],
        "firstTimestamp": now.isoformat(),
        "lastTimestamp": now.isoformat(),
        "count": 1,
    }
    await api.request(
        f"create event in {target.namespace}",
        "POST",
        "/api/v1/namespaces/{namespace}/events",
        path_params={"namespace": target.namespace},
        body=body,
    )
