"""The actionner registry: declarations of what each actionner is, needs and accepts.

Position in the flow: the engine reads this registry; actionner modules fill it.
Nothing here imports the engine's machinery, only its contract (event model, results).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.contract.event import FalcoEvent
from engine.contract.kubeapi import RbacRule
from engine.contract.registry import Registry
from engine.contract.results import ActionResult, Target

__all__ = [
    "ACTIONNERS",
    "ActionContext",
    "ActionnerRegistry",
    "ActionnerSpec",
    "RbacRule",
    "actionner",
]


@dataclass(frozen=True, slots=True)
class ActionContext:
    """What an actionner's ``run`` receives for one step of one event."""

    event: FalcoEvent
    rule: str
    """The talon rule that asked for this action."""
    parameters: Mapping[str, Any]
    """The rule's ``action.parameters``, with the actionner's defaults filled in."""
    target: Target
    """The pod the event is about, when the event says (``k8s.pod.name``/``k8s.ns.name``)."""


RunFunc = Callable[[ActionContext], Awaitable[ActionResult]]


@dataclass(frozen=True, slots=True)
class ActionnerSpec:
    """The declaration of one actionner. Immutable: the registry hands the same one to everyone."""

    name: str
    """``category:action``, as rules name it in ``action.name``."""
    description: str
    run: RunFunc
    continue_: bool = True
    """Default of the rule's ``continue`` when the rule does not say."""
    before: bool = False
    """Default of the rule's ``before`` when the rule does not say."""
    parameters: Mapping[str, Any] = field(
        default_factory=lambda: {"type": "object", "properties": {}, "additionalProperties": False}
    )
    """JSON Schema (draft 2020-12) of ``action.parameters``."""
    rbac: tuple[RbacRule, ...] = ()
    """The Kubernetes permissions ``run`` needs."""

    @property
    def category(self) -> str:
        return self.name.split(":", 1)[0]

    def defaults(self) -> dict[str, Any]:
        """Parameter defaults declared in the schema."""
        props = self.parameters.get("properties", {})
        return {k: v["default"] for k, v in props.items() if "default" in v}


class ActionnerRegistry(Registry[ActionnerSpec]):
    """Actionners by name. Modules register into :data:`ACTIONNERS`; tests build their own."""

    kind = "actionner"

    def validate(self, spec: ActionnerSpec) -> None:
        if ":" not in spec.name:
            raise ValueError(f"actionner name {spec.name!r} must be 'category:action'")


ACTIONNERS = ActionnerRegistry()
"""The process-wide registry the built-in and installed actionner modules fill."""


def actionner(
    name: str,
    *,
    description: str,
    continue_: bool = True,
    before: bool = False,
    parameters: Mapping[str, Any] | None = None,
    rbac: tuple[RbacRule, ...] = (),
    registry: ActionnerRegistry | None = None,
) -> Callable[[RunFunc], RunFunc]:
    """Register the decorated ``async def run(ctx) -> ActionResult`` as actionner ``name``."""

    def decorate(run: RunFunc) -> RunFunc:
        kwargs: dict[str, Any] = {}
        if parameters is not None:
            kwargs["parameters"] = parameters
        spec = ActionnerSpec(
            name=name,
            description=description,
            run=run,
            continue_=continue_,
            before=before,
            rbac=rbac,
            **kwargs,
        )
        (registry if registry is not None else ACTIONNERS).add(spec)
        return run

    return decorate
