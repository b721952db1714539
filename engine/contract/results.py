"""What an action produced: the contract between the engine and the actionners/notifiers.

An actionner returns an :class:`ActionResult`; the engine records it on the event's run
record (``engine.machine.Step``) and hands it to the notifiers inside a ``Notification``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    """The outcome of one step of an event's plan."""

    PLANNED = "planned"
    """Would run: in ``explain`` and in dry-run mode nothing is touched."""
    SUCCEEDED = "succeeded"
    """The action ran and did what it was asked."""
    FAILED = "failed"
    """The action ran (or tried to) and failed; the reason says why."""
    SKIPPED = "skipped"
    """The action did not run: superseded by a ``continue: false`` rule, or the actionner
    decided it had nothing to do (a DaemonSet pod with ``ignoreDaemonsets``)."""
    GIVEN_UP = "given-up"
    """With NATS: the event was delivered ``nats.maxDeliver`` times without the action
    succeeding (it failed temporarily each time, or its replica died or hung) and was moved
    to the dead letters; it is not tried again. The reason says after how many deliveries,
    where it went and the last error."""

    @property
    def is_failure(self) -> bool:
        """The action did not happen and should have: failed, or given up."""
        return self is Outcome.FAILED or self is Outcome.GIVEN_UP


@dataclass(frozen=True, slots=True)
class Target:
    """The Kubernetes object an action is about, as far as the event tells."""

    pod: str | None = None
    namespace: str | None = None
    uid: str | None = None
    """The pod's uid, once an actionner has read the pod (events and audit need it)."""


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What an actionner returns from ``run``."""

    outcome: Outcome
    reason: str = ""
    """Why (for failed and skipped outcomes), or a short summary."""
    output: dict[str, Any] = field(default_factory=dict)
    """Structured details (stdout of an exec, the NetworkPolicy name, ...)."""
    target: Target = Target()

    @classmethod
    def succeeded(cls, reason: str = "", target: Target = Target(), **output: Any) -> ActionResult:
        return cls(Outcome.SUCCEEDED, reason, dict(output), target)

    @classmethod
    def failed(cls, reason: str, target: Target = Target(), **output: Any) -> ActionResult:
        return cls(Outcome.FAILED, reason, dict(output), target)

    @classmethod
    def skipped(cls, reason: str, target: Target = Target(), **output: Any) -> ActionResult:
        return cls(Outcome.SKIPPED, reason, dict(output), target)
