"""Delivering action results to notifiers, without ever blocking event handling.

Position in the flow: ... -> actionners -> **notifiers** (the last stage).

The state machine addresses each action result to notifiers (``EventRun.deliveries``);
:class:`Dispatcher` queues them and delivers them in the background: one queue and one
worker per notifier, so a notifier keeps the order in which actions ran and a slow or
broken notifier delays nobody else. Each send has a timeout; temporary failures are
retried with exponential backoff (or the delay the notifier asks for, e.g. Slack's
``Retry-After``), a bounded number of times. A final failure is logged with the event id
and counted: nothing is dropped without a trace.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.contract.errors import PermanentError, TemporaryError
from engine.machine import EventRun
from engine.contract.notifiers import Notification, NotifierRegistry
from observability.metrics import Metrics
from observability.tracing import ACTIVE, NO_SPAN, NO_TRACE, SpanRecord, Trace, Tracing

log = logging.getLogger("falco_talon.notify")

Item = tuple[Notification, Trace, SpanRecord | None]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How hard the dispatcher tries."""

    timeout: float = 10.0
    """Seconds one send may take before it counts as a temporary failure."""
    attempts: int = 4
    """Sends per notification, the first included."""
    backoff: float = 1.0
    """Delay before the first retry; doubled after each (capped by ``max_backoff``)."""
    max_backoff: float = 30.0
    queue_size: int = 10_000
    """Notifications waiting per notifier before new ones are refused (and logged)."""


class Dispatcher:
    """Queues notifications per notifier and delivers them in the background."""

    def __init__(
        self,
        notifiers: NotifierRegistry,
        settings: Mapping[str, Mapping[str, Any]],
        policy: DeliveryPolicy = DeliveryPolicy(),
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.notifiers = notifiers
        self.tracing = tracing
        self.metrics = metrics
        self.settings = settings
        self.policy = policy
        self.stats: Counter[tuple[str, str]] = Counter()
        """(notifier, outcome) -> count; outcomes: delivered, retried, failed, refused."""
        self._queues: dict[str, asyncio.Queue[Item]] = {}
        self._workers: list[asyncio.Task[None]] = []

    def submit(
        self, run: EventRun, trace: Trace = NO_TRACE, parent: SpanRecord | None = None
    ) -> None:
        """Queue every delivery of ``run``; never waits. Send spans go under ``parent``."""
        for d in run.deliveries:
            result = d.step.result
            if result is None:
                continue
            note = Notification(
                event=run.event,
                rule=d.step.rule.name,
                action=d.step.rule.action,
                stage=d.step.stage.value,
                result=result,
                trace_id=run.trace_id,
            )
            queue = self._queue(d.notifier)
            try:
                queue.put_nowait((note, trace, parent))
            except asyncio.QueueFull:
                self._count(d.notifier, "refused")
                log.error(
                    "notification refused: %s queue is full",
                    d.notifier,
                    extra={
                        "fields": {
                            "event_id": run.event.id,
                            "notifier": d.notifier,
                            "rule": note.rule,
                        }
                    },
                )

    def _count(self, name: str, outcome: str) -> None:
        self.stats[(name, outcome)] += 1
        if self.metrics is not None:
            self.metrics.notification(name, outcome)

    def _queue(self, name: str) -> asyncio.Queue[Item]:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = asyncio.Queue(self.policy.queue_size)
            self._workers.append(
                asyncio.create_task(self._work(name, queue), name=f"notify-{name}")
            )
        return queue

    async def _work(self, name: str, queue: asyncio.Queue[Item]) -> None:
        while True:
            note, trace, parent = await queue.get()
            span = trace.start(
                f"notify {name}",
                parent,
                talon__notifier=name,
                talon__rule=note.rule,
                talon__action=note.action,
                talon__outcome=note.result.outcome.value,
            )
            token = ACTIVE.set((trace, span))
            try:
                await self.deliver(name, note, span)
            except Exception as exc:  # a bug in a notifier must not kill its worker
                span.fail(f"{type(exc).__name__}: {exc}", exc)
                log.exception(
                    "notifier %s crashed", name, extra={"fields": {"event_id": note.event.id}}
                )
                self._count(name, "failed")
            finally:
                ACTIVE.reset(token)
                span.end()
                queue.task_done()
                if self.tracing is not None:
                    self.tracing.submit(trace)

    async def deliver(self, name: str, note: Notification, span: SpanRecord = NO_SPAN) -> bool:
        """Send one notification with retries; True when delivered."""
        spec = self.notifiers[name]
        settings = self.settings.get(name, {})
        fields = {
            "event_id": note.event.id,
            "notifier": name,
            "rule": note.rule,
            "action": note.action,
        }
        delay = self.policy.backoff
        for attempt in range(1, self.policy.attempts + 1):
            try:
                await asyncio.wait_for(spec.send(note, settings), self.policy.timeout)
            except PermanentError as exc:
                return self._failed(name, f"{exc}", fields, attempt, span)
            except (TemporaryError, TimeoutError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                if isinstance(exc, TimeoutError):
                    reason = f"timed out after {self.policy.timeout:g}s"
                if attempt == self.policy.attempts:
                    return self._failed(name, reason, fields, attempt, span)
                wait = exc.delay if isinstance(exc, TemporaryError) and exc.delay else delay
                self._count(name, "retried")
                span.event(
                    "retry", talon__attempt=attempt, talon__reason=reason, talon__delay_s=wait
                )
                log.warning(
                    "notifier %s failed (%s), retrying in %.1fs",
                    name,
                    reason,
                    wait,
                    extra={"fields": {**fields, "attempt": attempt}},
                )
                await asyncio.sleep(wait)
                delay = min(delay * 2, self.policy.max_backoff)
            else:
                self._count(name, "delivered")
                span.set(talon__attempts=attempt)
                log.debug("notified %s", name, extra={"fields": fields})
                return True
        return False

    def _failed(
        self, name: str, reason: str, fields: dict[str, Any], attempts: int, span: SpanRecord
    ) -> bool:
        self._count(name, "failed")
        span.set(talon__attempts=attempts)
        span.fail(f"failed after {attempts} attempt(s): {reason}")
        log.error(
            "notification to %s failed for good after %d attempt(s): %s",
            name,
            attempts,
            reason,
            extra={"fields": fields},
        )
        return False

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every queued notification has been handled."""
        waits = [q.join() for q in self._queues.values()]
        if waits:
            try:
                await asyncio.wait_for(asyncio.gather(*waits), timeout)
            except TimeoutError:
                left = sum(q.qsize() for q in self._queues.values())
                log.error("shutdown: %d notification(s) still queued after %.0fs", left, timeout)

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self._queues.clear()
