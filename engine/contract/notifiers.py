"""The notifier registry: each notifier's name, settings schema and ``send``.

Position in the flow: the engine (``engine.notify``) reads this registry; notifier modules
fill it. Nothing here imports the engine's machinery, only its contract.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from engine.contract.event import FalcoEvent
from engine.contract.kubeapi import RbacRule
from engine.contract.registry import EMPTY_OBJECT_SCHEMA, Registry, schema_defaults
from engine.contract.results import ActionResult


@dataclass(frozen=True, slots=True)
class Notification:
    """The result of one action of one event, as every notifier receives it."""

    event: FalcoEvent
    rule: str
    """The talon rule whose action this is."""
    action: str
    """The actionner name (``kubernetes:terminate``)."""
    stage: str
    """Where the step ran: ``before-actions``, ``actions`` or ``chain`` (a v0.3 rule's
    action); for an event given up with no step, the state its run ended in."""
    result: ActionResult
    trace_id: str = ""
    """The event's trace id (32 hex digits)."""
    trace_url: str = ""
    """A link to the event's trace (the ``traceUrl`` setting with the trace id filled in);
    empty when no ``traceUrl`` is set or the trace was not recorded (not sampled)."""


SendFunc = Callable[[Notification, Mapping[str, Any]], Awaitable[None]]
CloseFunc = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class NotifierSpec:
    """The declaration of one notifier."""

    name: str
    description: str
    send: SendFunc
    """Deliver one notification with the given settings (the config's ``notifiers.<name>``,
    defaults filled in); raise ``TemporaryError`` to be retried."""
    settings: Mapping[str, Any] = field(default_factory=lambda: EMPTY_OBJECT_SCHEMA)
    """JSON Schema (draft 2020-12) of ``notifiers.<name>`` in the config."""
    secrets: tuple[str, ...] = ()
    """Settings never to be shown in logs, errors or printed config."""
    needs_settings: bool = True
    """False when the notifier works with no configuration at all (``k8sevents``)."""
    rbac: tuple[RbacRule, ...] = ()
    """The Kubernetes permissions ``send`` needs."""
    close: CloseFunc | None = None
    """Release what ``send`` keeps between calls (an HTTP connection pool); awaited once at
    shutdown, after the last notification."""

    def defaults(self) -> dict[str, Any]:
        """Setting defaults declared in the schema."""
        return schema_defaults(self.settings)


class NotifierRegistry(Registry[NotifierSpec]):
    """Notifiers by name. Modules register into :data:`NOTIFIERS`; tests build their own."""

    kind = "notifier"


NOTIFIERS = NotifierRegistry()
"""The process-wide registry the built-in and installed notifier modules fill."""


def notifier(
    name: str,
    *,
    description: str,
    settings: Mapping[str, Any] = EMPTY_OBJECT_SCHEMA,
    secrets: tuple[str, ...] = (),
    needs_settings: bool = True,
    rbac: tuple[RbacRule, ...] = (),
    close: CloseFunc | None = None,
    registry: NotifierRegistry | None = None,
) -> Callable[[SendFunc], SendFunc]:
    """Register the decorated ``async def send(notification, settings)`` as notifier ``name``."""
    return (NOTIFIERS if registry is None else registry).register(
        lambda send: NotifierSpec(
            name, description, send, settings, secrets, needs_settings, rbac, close
        )
    )
