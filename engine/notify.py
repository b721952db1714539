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

from engine.contract.errors import TemporaryError, worth_retrying
from engine.contract.notifiers import Notification, NotifierRegistry
from engine.contract.retry import Retried, RetryPolicy, retry
from engine.machine import EventRun
from observability.eventlog import EventLogger, event_logger
from observability.metrics import Metrics
from observability.tracing import NO_SPAN, NO_TRACE, SpanRecord, Trace, Tracing, activate

log = logging.getLogger("falco_talon.notify")

Item = tuple[Notification, Trace, SpanRecord | None]


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How hard the dispatcher tries."""

    timeout: float = 10.0
    """Seconds one send may take before it counts as a temporary failure."""
    retry: RetryPolicy = RetryPolicy(attempts=4, backoff=1.0, max_backoff=30.0)
    """Sends per notification and the backoff between them; a notifier's ``Retry-After``
    (``TemporaryError.delay``) replaces the backoff, capped by ``retry.max_backoff``."""
    queue_size: int = 10_000
    """Notifications waiting per notifier before new ones are refused (and logged)."""


def _temporary(exc: BaseException) -> float | bool:
    """A notifier's temporary failures, and network errors, are retried."""
    return worth_retrying(exc) or isinstance(exc, OSError)


def _note_logger(note: Notification, notifier: str) -> EventLogger:
    return event_logger(log, note.event.id, note.trace_id).bind(
        notifier=notifier, rule=note.rule, action=note.action
    )


class Dispatcher:
    """Queues notifications per notifier and delivers them in the background."""

    def __init__(
        self,
        notifiers: NotifierRegistry,
        settings: Mapping[str, Mapping[str, Any]],
        policy: DeliveryPolicy = DeliveryPolicy(),
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
        trace_url: str = "",
    ) -> None:
        self.notifiers = notifiers
        self.trace_url = trace_url
        """The ``traceUrl`` template (``...{trace_id}...``); empty: notifications link nowhere."""
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
        trace_url = self.link(run.trace_id, trace)
        for d in run.deliveries:
            result = d.step.result
            if result is None:
                continue
            note = Notification(
                event=run.event,
                rule=d.step.rule.name,
                action=d.step.actionner,
                stage=d.step.stage.value,
                result=result,
                trace_id=run.trace_id,
                trace_url=trace_url,
            )
            self.send(d.notifier, note, trace, parent)

    def send(
        self,
        name: str,
        note: Notification,
        trace: Trace = NO_TRACE,
        parent: SpanRecord | None = None,
    ) -> None:
        """Queue one notification for notifier ``name``; never waits."""
        try:
            self._queue(name).put_nowait((note, trace, parent))
        except asyncio.QueueFull:
            self._count(name, "refused")
            event_logger(log, note.event.id, note.trace_id).error(
                "notification refused: %s queue is full",
                name,
                fields={"notifier": name, "rule": note.rule},
            )

    def link(self, trace_id: str, trace: Trace) -> str:
        """The ``traceUrl`` of ``trace_id``, or "" when there is no template or the trace is
        not recorded (a link to a trace that was never exported leads nowhere)."""
        if not self.trace_url or not trace_id or not trace.sampled:
            return ""
        return self.trace_url.replace("{trace_id}", trace_id)

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
            try:
                with activate(trace, span):
                    await self.deliver(name, note, span)
            except Exception as exc:  # a bug in a notifier must not kill its worker
                span.fail(f"{type(exc).__name__}: {exc}", exc)
                _note_logger(note, name).exception("notifier %s crashed", name)
                self._count(name, "failed")
            finally:
                span.end()
                queue.task_done()
                if self.tracing is not None:
                    self.tracing.submit(trace)

    async def deliver(self, name: str, note: Notification, span: SpanRecord = NO_SPAN) -> bool:
        """Send one notification with retries; True when delivered."""
        spec = self.notifiers[name]
        settings = self.settings.get(name, {})
        nlog = _note_logger(note, name)
        timeout = self.policy.timeout
        attempts = 0

        async def send() -> None:
            nonlocal attempts
            attempts += 1
            try:
                await asyncio.wait_for(spec.send(note, settings), timeout)
            except TimeoutError:
                raise TemporaryError(f"timed out after {timeout:g}s") from None

        def on_retry(attempt: int, exc: BaseException, wait: float) -> None:
            reason = str(exc) or type(exc).__name__
            self._count(name, "retried")
            span.event("retry", talon__attempt=attempt, talon__reason=reason, talon__delay_s=wait)
            nlog.warning(
                "notifier %s failed (%s), retrying in %.1fs",
                name,
                reason,
                wait,
                fields={"attempt": attempt},
            )

        try:
            await retry(self.policy.retry, send, _temporary, on_retry)
        except Retried as failed:
            reason = str(failed) or type(failed.error).__name__
            self._count(name, "failed")
            span.set(talon__attempts=failed.attempts)
            span.fail(f"failed after {failed.attempts} attempt(s): {reason}")
            nlog.error(
                "notification to %s failed for good after %d attempt(s): %s",
                name,
                failed.attempts,
                reason,
            )
            return False
        self._count(name, "delivered")
        span.set(talon__attempts=attempts)
        nlog.debug("notified %s", name)
        return True

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
        """Stop the workers, then let each notifier release what it keeps (``close``)."""
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self._queues.clear()
        for spec in self.notifiers:
            if spec.close is not None:
                try:
                    await spec.close()
                except Exception:
                    log.exception("notifier %s failed to close", spec.name)
