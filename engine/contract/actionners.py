"""Actionners: what each one is, needs and accepts, and the policy the pipeline runs it with.

Position in the flow: actionner modules (``actionners.*``) fill :data:`ACTIONNERS` with
``@actionner(...)``; the pipeline (``engine.pipeline``) looks steps up in it and runs them
under each spec's :class:`HandlerPolicy`. Nothing here runs an actionner.
"""

from __future__ import annotations

import copy
import dataclasses
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
    "Alias",
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
    spelled: Mapping[str, str] = field(default_factory=dict)
    """For a parameter with a second accepted spelling (the seed's camelCase), the name the
    rule used for it; see :meth:`name_of`."""
    talon: Mapping[str, str] = field(default_factory=dict)
    """Talon's context for this step, as Falco Talon v0.3 names it: ``falco-talon.rule``,
    ``falco-talon.action``, ``falco-talon.actionner``, ``falco-talon.event.id``, ... (see
    ``engine.pipeline.talon_context``)."""

    def name_of(self, parameter: str) -> str:
        """``parameter`` as the rule spelled it (``gracePeriodSeconds`` for
        ``grace_period_seconds``), so a reason names what the user wrote."""
        return self.spelled.get(parameter, parameter)


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
    requires: tuple[str, ...] = ()
    """Output fields of the event the actionner needs; ``a|b``: either of them."""
    alias_of: str | None = None
    """For an alias (a former name kept working): the name of the actionner it runs."""
    spellings: Mapping[str, str] = field(default_factory=dict)
    """Second accepted spellings of parameters, ``{seed name: canonical name}``: the schema
    accepts either (never both), ``run`` gets the canonical one."""

    @property
    def category(self) -> str:
        return self.name.split(":", 1)[0]

    def defaults(self) -> dict[str, Any]:
        """Parameter defaults declared in the schema, but for parameters with two spellings:
        ``run`` fills those in, once it knows which spelling the rule used."""
        canonical = set(self.spellings.values())
        return {k: v for k, v in schema_defaults(self.parameters).items() if k not in canonical}


class ActionnerRegistry(Registry[ActionnerSpec]):
    """Actionners by name. Modules register into :data:`ACTIONNERS`; tests build their own."""

    kind = "actionner"

    def validate(self, spec: ActionnerSpec) -> None:
        if ":" not in spec.name:
            raise ValueError(f"actionner name {spec.name!r} must be 'category:action'")
        if spec.alias_of is not None and spec.alias_of not in self:
            raise ValueError(f"alias {spec.name!r} of {spec.alias_of!r}, which is not registered")


ACTIONNERS = ActionnerRegistry()
"""The process-wide registry the built-in and installed actionner modules fill."""


@dataclass(frozen=True, slots=True)
class Alias:
    """A former name of an actionner, registered as a spec of its own that runs the same
    function (``alias_of`` names the actionner). It may be narrower than the actionner: a
    parameter schema and RBAC rules of its own (the seed's ``kubernetes:labelize`` labels
    pods only, so it needs no permission on nodes)."""

    name: str
    parameters: Mapping[str, Any] | None = None
    rbac: tuple[RbacRule, ...] | None = None
    description: str = ""


def with_spellings(schema: Mapping[str, Any], spellings: Mapping[str, str]) -> dict[str, Any]:
    """``schema`` with a property for each second spelling (``{seed: canonical}``): the
    canonical property's schema without its default, marked deprecated, and a rule that
    refuses both spellings of one parameter at once."""
    out = copy.deepcopy(dict(schema))
    props: dict[str, Any] = out.setdefault("properties", {})
    refusals = list(out.get("allOf", []))
    for seed, canonical in spellings.items():
        alias = {k: v for k, v in props[canonical].items() if k not in ("default", "description")}
        alias["description"] = f"The seed's spelling of {canonical}."
        alias["deprecated"] = True
        props[seed] = alias
        refusals.append(
            {
                "not": {"required": [seed, canonical]},
                "errorMessage": f"gives both {seed!r} and {canonical!r}, two spellings of one "
                "parameter: keep one",
            }
        )
    if refusals:
        out["allOf"] = refusals
    return out


def normalise(
    parameters: Mapping[str, Any], spellings: Mapping[str, str], schema: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The parameters under their canonical names, defaults of the two-spelling ones filled
    in, and ``{canonical: name the rule used}``. A parameter the rule does not give is
    named in the spelling its others use; the seed's when it gives none of them."""
    out = dict(parameters)
    defaults = schema_defaults(schema)
    seed_style = any(s in out for s in spellings) or not any(c in out for c in spellings.values())
    spelled: dict[str, str] = {}
    for seed, canonical in spellings.items():
        if seed in out:
            out[canonical] = out.pop(seed)  # the schema refused both: canonical was a default
            spelled[canonical] = seed
        elif canonical in out:
            spelled[canonical] = canonical
        else:
            if canonical in defaults:
                out[canonical] = copy.deepcopy(defaults[canonical])
            spelled[canonical] = seed if seed_style else canonical
    return out, spelled


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
    requires: tuple[str, ...] = (),
    aliases: tuple[str | Alias, ...] = (),
    spellings: Mapping[str, str] | None = None,
    registry: ActionnerRegistry | None = None,
) -> Callable[[RunFunc], RunFunc]:
    """Register the decorated ``async def run(ctx) -> ActionResult`` as actionner ``name``.

    ``aliases``: other names rules may use for it (each registered as a spec of its own with
    ``alias_of`` set, sharing ``run``; an :class:`Alias` may narrow its parameters and
    RBAC). ``spellings``: ``{seed name: canonical name}`` of parameters accepted under a
    second name (see :func:`with_spellings`); ``run`` always sees the canonical names.
    ``requires``: the event's output fields it needs."""
    policy = HandlerPolicy(timeout=timeout, retry=retry)
    spelling_map = dict(spellings or {})
    schema = with_spellings(parameters, spelling_map) if spelling_map else parameters
    target = ACTIONNERS if registry is None else registry

    def declare(run: RunFunc) -> RunFunc:
        wrapped = run
        if spelling_map:

            async def wrapped(ctx: ActionContext) -> ActionResult:
                params, spelled = normalise(ctx.parameters, spelling_map, parameters)
                return await run(dataclasses.replace(ctx, parameters=params, spelled=spelled))

        base = ActionnerSpec(
            name,
            description,
            wrapped,
            continue_,
            before,
            schema,
            rbac,
            policy,
            requires=requires,
            spellings=spelling_map,
        )
        target.add(base)
        for given in aliases:
            alias = Alias(given) if isinstance(given, str) else given
            own = alias.parameters
            target.add(
                dataclasses.replace(
                    base,
                    name=alias.name,
                    description=alias.description or f"Former name of {name}.",
                    alias_of=name,
                    parameters=base.parameters
                    if own is None
                    else (with_spellings(own, spelling_map) if spelling_map else own),
                    rbac=base.rbac if alias.rbac is None else alias.rbac,
                )
            )
        return run

    return declare
