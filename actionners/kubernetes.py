"""Kubernetes actionners: terminate, labelize, networkpolicy, exec.

Position in the flow: ... -> state machine -> **actionners** -> notifiers.

This module declares each actionner (name, ``continue``/``before`` defaults, parameter
schema, RBAC needs). Their effects on a cluster are not implemented yet: running one
fails loudly with reason "not implemented" instead of pretending success.
"""

from __future__ import annotations

from actionners.registry import ActionContext, RbacRule, actionner
from engine.results import ActionResult

# Kubernetes label syntax: an optional DNS-subdomain prefix and a name of at most 63 chars.
LABEL_KEY_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"

_PODS_READ = RbacRule(("",), ("pods",), ("get",))


async def _not_implemented(ctx: ActionContext) -> ActionResult:
    return ActionResult.failed("not implemented", target=ctx.target)


actionner(
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
)(_not_implemented)

actionner(
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
)(_not_implemented)

actionner(
    "kubernetes:networkpolicy",
    description="Deny all egress of the pod's workload with a NetworkPolicy.",
    continue_=True,
    before=True,
    rbac=(
        _PODS_READ,
        RbacRule(("apps",), ("replicasets", "daemonsets", "statefulsets"), ("get",)),
        RbacRule(("networking.k8s.io",), ("networkpolicies",), ("get", "create", "update")),
    ),
)(_not_implemented)

actionner(
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
        },
    },
    rbac=(_PODS_READ, RbacRule(("",), ("pods/exec",), ("create", "get"))),
)(_not_implemented)
