"""The Kubernetes permissions falco-talon needs, derived from the plug-ins' declarations.

Each actionner and notifier declares the RBAC rules its calls need; this module merges
them into the rules of one ClusterRole (``falco-talon rbac``), which the Helm chart and the
RBAC tests use, so permissions are generated from the code and cannot drift from it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from engine.contract.actionners import ActionnerRegistry
from engine.contract.kubeapi import RbacRule
from engine.contract.notifiers import NotifierRegistry


def merge(rules: Iterable[RbacRule]) -> list[RbacRule]:
    """One rule per (API group, resource), verbs united, in a stable order."""
    verbs: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        for group in rule.api_groups:
            for resource in rule.resources:
                verbs.setdefault((group, resource), set()).update(rule.verbs)
    # Group resources of one API group that need the same verbs into one rule.
    by_verbs: dict[tuple[str, tuple[str, ...]], list[str]] = {}
    for (group, resource), vs in sorted(verbs.items()):
        by_verbs.setdefault((group, tuple(sorted(vs))), []).append(resource)
    return [
        RbacRule((group,), tuple(resources), vs)
        for (group, vs), resources in sorted(by_verbs.items())
    ]


def required_rules(
    actionners: ActionnerRegistry,
    notifiers: NotifierRegistry,
    *,
    only_actionners: Iterable[str] | None = None,
    only_notifiers: Iterable[str] | None = None,
) -> list[RbacRule]:
    """The merged rules of the given actionners and notifiers (all installed ones by default)."""
    wanted_a = set(only_actionners) if only_actionners is not None else None
    wanted_n = set(only_notifiers) if only_notifiers is not None else None
    rules: list[RbacRule] = []
    for a in actionners:
        if wanted_a is None or a.name in wanted_a:
            rules.extend(a.rbac)
    for n in notifiers:
        if wanted_n is None or n.name in wanted_n:
            rules.extend(n.rbac)
    return merge(rules)


def cluster_role(name: str, rules: Iterable[RbacRule]) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "falco-talon"}},
        "rules": [r.as_dict() for r in rules],
    }


def declared_rules(
    actionners: ActionnerRegistry, notifiers: NotifierRegistry
) -> dict[str, dict[str, list[dict[str, list[str]]]]]:
    """Each plug-in's own rules, by kind and name (what the Helm chart unites at install)."""
    return {
        "actionners": {a.name: [r.as_dict() for r in merge(a.rbac)] for a in actionners},
        "notifiers": {n.name: [r.as_dict() for r in merge(n.rbac)] for n in notifiers},
    }
