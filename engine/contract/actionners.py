"""Actionners: what each one is, needs and accepts, and the policy the pipeline runs it with.

Position in the flow: actionner modules (``actionners.*``) fill :data:`ACTIONNERS` with
``@actionner(...)``; the pipeline (``engine.pipeline``) looks steps up in it and runs them
under each spec's :class:`HandlerPolicy`. Nothing here runs an actionner.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.contract.event import FalcoEvent
from engine.contract.kubeapi import RbacRule
from engine.contract.registry import EMPTY_OBJECT_SCHEMA, Registry, schema_defaults
from engine.contract.results import ActionResult, Target
from engine.contract.retry import RetryPolicy

__all__ = [
    "ACTIONNERS",
    "ActionContext",
    "ActionnerRegistry",
    "ActionnerSpec",
    "HandlerPolicy",
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
    talon: Mapping[str, str] = field(default_factory=dict)
    """Talon's context for this step, as Falco Talon v0.3 names it: ``falco-talon.rule``,
    ``falco-talon.action``, ``falco-talon.actionner``, ``falco-talon.event.id``, ... (see
    ``engine.pipeline.talon_context``)."""


RunFunc = Callable[[ActionContext], Awaitable[ActionResult]]


DEFAULT_RETRY = RetryPolicy(attempts=3, backoff=0.2, max_backoff=2.0, jitter=True)
"""An actionner's retries unless it declares its own: 3 runs, 0.2 s then 0.4 s apart (±50%)."""


@dataclass(frozen=True, slots=True)
class HandlerPolicy:
    """How the pipeline runs one actionner, as kopf's handler options: declared with the
    actionner (``@actionner(..., timeout=, retry=)``), honoured for every step of it."""

    timeout: float | None = None
    """Seconds the whole step may take, retries included; ``None``: the server's
    ``actionTimeout``. Past it the step fails with "timed out after Ns"."""
    retry: RetryPolicy = DEFAULT_RETRY
    """What a ``TemporaryError`` from ``run`` means: run it again after a backoff, up to
    ``retry.attempts`` runs in all; the last error fails the step. A ``PermanentError`` (or
    any other exception) fails it at once."""


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
    parameters: Mapping[str, Any] = field(default_factory=lambda: EMPTY_OBJECT_SCHEMA)
    """JSON Schema (draft 2020-12) of ``action.parameters``."""
    rbac: tuple[RbacRule, ...] = ()
    """The Kubernetes permissions ``run`` needs."""
    policy: HandlerPolicy = HandlerPolicy()
    """Timeout and retries the pipeline applies to every run."""

    @property
    def category(self) -> str:
        return self.name.split(":", 1)[0]

    def defaults(self) -> dict[str, Any]:
        """Parameter defaults declared in the schema."""
        return schema_defaults(self.parameters)


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
    parameters: Mapping[str, Any] = EMPTY_OBJECT_SCHEMA,
    rbac: tuple[RbacRule, ...] = (),
    timeout: float | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    registry: ActionnerRegistry | None = None,
) -> Callable[[RunFunc], RunFunc]:
    """Register the decorated ``async def run(ctx) -> ActionResult`` as actionner ``name``."""
    policy = HandlerPolicy(timeout=timeout, retry=retry)
    return (ACTIONNERS if registry is None else registry).register(
        lambda run: ActionnerSpec(
            name, description, run, continue_, before, parameters, rbac, policy
        )
    )
