"""The pipeline: drives an event's run through the state machine and executes its steps.

Position in the flow:
HTTP -> event model -> matcher -> state machine -> **actionners** -> notifiers.

The ordering decisions are the machine's (``engine.machine``); this module only runs what
the current state planned, in order, each step bounded by a timeout, and hands the results
to the notification dispatcher. An internal error ends the run in the ``failed`` state,
is logged with the event id, and never escapes to the worker.

A queue that can redeliver an event (``engine.natsqueue``) runs it with ``redelivery``: a
run in which an action failed with a temporary error is then handed back unnotified, to be
run again later, and once the queue gives the event up, :meth:`Pipeline.give_up` tells the
notifiers (outcome ``given-up``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine import machine
from engine.contract.actionners import ActionContext, ActionnerRegistry
from engine.contract.errors import TalonError, TemporaryError, worth_retrying
from engine.contract.event import FalcoEvent
from engine.contract.notifiers import Notification
from engine.contract.results import ActionResult, Outcome
from engine.contract.retry import Retried, retry
from engine.machine import EventRun, Step
from engine.matcher import Matcher
from engine.notify import Dispatcher
from engine.rules import Rule, RuleSet
from engine.storm import Throttler
from observability.eventlog import EventLogger, event_logger
from observability.metrics import Metrics
from observability.tracing import NO_SPAN, NO_TRACE, SpanRecord, Trace, Tracing, activate

log = logging.getLogger("falco_talon.pipeline")


def _event_attributes(event: FalcoEvent) -> dict[str, Any]:
    target = event.target
    return {
        "falco__rule": event.rule,
        "falco__priority": event.priority,
        "falco__source": event.source,
        "falco__hostname": event.hostname,
        "falco__output": event.output,
        "talon__event_id": event.id,
        "k8s__pod__name": target.pod,
        "k8s__namespace__name": target.namespace,
    }


DRY_RUN_REASON = "dry run: nothing was touched"
"""The reason of every step when the whole pipeline plans only (``dryRun``, ``explain``)."""
RULE_DRY_RUN_REASON = "dry run"
"""The reason of a v0.3 rule's steps when the rule says ``dry_run: true``."""


def talon_context(run: EventRun, step: Step) -> dict[str, str]:
    """The ``falco-talon.*`` context of one step, keyed as Falco Talon v0.3 keys it (empty
    values left out), plus the event id."""
    rule, action = step.rule, step.action
    out = {
        "falco-talon.event.id": run.event.id,
        "falco-talon.rule": rule.name,
        "falco-talon.actionner": step.actionner,
        "falco-talon.action.parameters": json.dumps(dict(step.parameters), default=str),
    }
    if action is not None:
        out["falco-talon.action"] = action.name
        out["falco-talon.rule.continue"] = str(rule.continue_).lower()
        out["falco-talon.rule.dry_run"] = str(rule.dry_run).lower()
        out["falco-talon.action.continue"] = str(action.continue_).lower()
        out["falco-talon.action.ignore_errors"] = str(action.ignore_errors).lower()
    else:
        out["falco-talon.action"] = rule.action
        out["falco-talon.rule.continue"] = str(rule.continue_).lower()
    return out


_RECEIVED = machine.Stage.RECEIVED.value


class _StateSpans:
    """One span per state of a run, each ended when the next state is entered; all built
    only when the trace is sampled (unsampled: not even their attributes are). The
    ``chain`` state, entered once per v0.3 action, keeps one span, with a span per rule
    under it and each action's span under its rule's."""

    def __init__(self, trace: Trace, parent: SpanRecord | None, event: FalcoEvent) -> None:
        self.trace = trace
        self.parent = parent
        self.event_id = event.id
        self.state = _RECEIVED
        self.current = (
            trace.start(_RECEIVED, parent, **_event_attributes(event)) if trace.sampled else NO_SPAN
        )
        self.rule_span: SpanRecord = NO_SPAN
        self.rule: Rule | None = None

    def enter(self, state: str) -> SpanRecord:
        if state == self.state:
            return self.current
        self.state = state
        self._end_rule()
        self.current.end()
        if self.trace.sampled:
            self.current = self.trace.start(state, self.parent, talon__event_id=self.event_id)
        return self.current

    def parent_of(self, step: Step) -> SpanRecord:
        """Where ``step``'s span goes: under its rule's span for a v0.3 chain step."""
        if step.action is None or not self.trace.sampled:
            return self.current
        if self.rule is not step.rule:
            self._end_rule()
            rule = step.rule
            self.rule = rule
            self.rule_span = self.trace.start(
                "rule",
                self.current,
                talon__rule=rule.name,
                talon__continue=rule.continue_,
                talon__dry_run=rule.dry_run,
                talon__actions=[a.name for a in rule.chain],
            )
        return self.rule_span

    def _end_rule(self) -> None:
        self.rule_span.end()
        self.rule_span = NO_SPAN
        self.rule = None

    def failed(self, exc: BaseException, state: str, error: str) -> None:
        """The run broke in the current state: mark that span, open one for ``failed``."""
        self.current.fail(f"{type(exc).__name__}: {exc}", exc)
        self.current.end()
        self.current = self.trace.start(state, self.parent, talon__error=error)
        self.current.fail(error)

    def end(self) -> None:
        self._end_rule()
        self.current.end()


Observer = Callable[[EventRun, SpanRecord, EventLogger], None]
"""Shows what a state decided: on its span, in the log, in the metrics."""


@dataclass(frozen=True, slots=True)
class CompiledRules:
    """A rule set and its matcher, swapped as one on reload."""

    ruleset: RuleSet
    matcher: Matcher

    @classmethod
    def of(cls, ruleset: RuleSet) -> CompiledRules:
        return cls(ruleset, Matcher(ruleset))


class Pipeline:
    """Runs events through the machine against the current rules."""

    def __init__(
        self,
        rules: RuleSet,
        actionners: ActionnerRegistry,
        *,
        dispatcher: Dispatcher | None = None,
        default_notifiers: tuple[str, ...] = (),
        dry_run: bool = False,
        action_timeout: float = 30.0,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
        print_all_events: bool = False,
        throttler: Throttler | None = None,
    ) -> None:
        self.compiled = CompiledRules.of(rules)
        self.throttler = throttler if throttler is not None else Throttler()
        """Applies the rules' ``throttle`` (counts in memory, in the shared-memory file of
        several server processes, or in NATS's key-value bucket shared by replicas)."""
        self.print_all_events = print_all_events
        """``printAllEvents``: log unmatched events at info level too."""
        self.actionners = actionners
        self.dispatcher = dispatcher
        self.default_notifiers = default_notifiers
        self.dry_run = dry_run
        self.action_timeout = action_timeout
        self.tracing = tracing
        self.metrics = metrics
        self._observers: dict[str, Observer] = {
            machine.Stage.MATCHED.value: self._on_matched,
            machine.Stage.UNMATCHED.value: self._on_unmatched,
            machine.Stage.ACTIONS.value: self._on_actions,
            machine.Stage.NOTIFIED.value: self._on_notified,
        }
        """What each state's outcome shows in spans, logs and metrics, by state."""

    def set_rules(self, rules: RuleSet) -> None:
        """Swap the rules; runs already started keep the ones they started with."""
        self.compiled = CompiledRules.of(rules)

    async def process(
        self,
        event: FalcoEvent,
        trace: Trace | None = None,
        parent: SpanRecord | None = None,
        *,
        redelivery: bool = False,
    ) -> EventRun:
        """Run ``event`` to a final state. ``trace``/``parent``: the trace and span (the HTTP
        request's) the state spans go under; a fresh trace when not given.

        ``redelivery``: the caller can run the event again later (the NATS queue). A run in
        which a step failed with a temporary error (``run.failed_temporarily``) is then
        neither notified nor counted as processed: the caller redelivers the event, or gives
        it up (:meth:`give_up`)."""
        if trace is None:
            trace = (
                self.tracing.begin()
                if self.tracing is not None
                else Trace(random.getrandbits(128) or 1, sampled=False)
            )
        run = machine.start(EventRun(event, self.compiled.matcher, self.default_notifiers))
        run.trace_id = trace.trace_id_hex
        elog = event_logger(log, event.id, run.trace_id)
        started = time.perf_counter()
        spans = _StateSpans(trace, parent, event)
        if event.level is None:
            elog.warning(
                "event priority %r is not a Falco priority: no priority criterion holds",
                event.priority,
            )
        try:
            while not run.finished:
                machine.advance(run)
                span = spans.enter(run.state)
                with activate(trace, span):
                    for step in run.pending:
                        await self._execute(run, step, trace, spans.parent_of(step), elog)
                    observe = self._observers.get(run.state)
                    if observe is not None:
                        observe(run, span, elog)
        except asyncio.CancelledError:
            machine.fail(run, "cancelled")
            raise
        except Exception as exc:
            machine.fail(run, f"{type(exc).__name__}: {exc}")
            spans.failed(exc, run.state, run.error)
            elog.exception("event run failed in state %s", run.history[-2][0].value)
        finally:
            spans.end()
        handed_back = redelivery and bool(run.failed_temporarily)
        if self.metrics is not None and not handed_back:
            self.metrics.processed(run.state, time.perf_counter() - started)
        if self.dispatcher is not None and run.deliveries and not handed_back:
            self.dispatcher.submit(run, trace, spans.current)
        if self.tracing is not None:
            self.tracing.submit(trace)
        return run

    def give_up(
        self,
        event: FalcoEvent,
        why: str,
        trace: Trace = NO_TRACE,
        run: EventRun | None = None,
        **output: Any,
    ) -> EventRun:
        """Tell the notifiers that ``event`` is given up for good (the NATS queue moved it
        to the dead letters). Each step of ``run`` that failed temporarily, or, without a run
        (none of its deliveries finished), each step the current rules plan for the event, is
        reported with outcome ``given-up``, reason ``why`` (plus the step's last error) and
        ``output``, like any result: to its rule's notifiers plus the default notifiers, with
        the run's other results. An event no rule matches is reported to the default
        notifiers (rule and action empty)."""
        if run is None:
            run = machine.start(EventRun(event, self.compiled.matcher, self.default_notifiers))
            run.trace_id = trace.trace_id_hex
            try:
                while not run.finished:
                    machine.advance(run)
                    for step in run.pending:
                        _give_up_step(step, why, output, event)
            except Exception as exc:  # whatever kept the event from finishing may be here too
                machine.fail(run, f"{type(exc).__name__}: {exc}")
        else:
            for step in run.failed_temporarily:
                _give_up_step(step, why, output, event)
        span = trace.start("given-up", None, talon__event_id=event.id, talon__reason=why)
        span.fail(why)
        span.end()
        dispatcher = self.dispatcher
        if dispatcher is not None:
            if any(s.outcome is Outcome.GIVEN_UP for s in run.steps):
                dispatcher.submit(run, trace, span)
            else:
                note = Notification(
                    event=event,
                    rule="",
                    action="",
                    stage=run.state,
                    result=ActionResult(Outcome.GIVEN_UP, why, dict(output), event.target),
                    trace_id=run.trace_id,
                    trace_url=dispatcher.link(run.trace_id, trace),
                )
                for name in self.default_notifiers:
                    dispatcher.send(name, note, trace, span)
        if self.tracing is not None:
            self.tracing.submit(trace)
        return run

    # -- what each state shows (the observers) -------------------------------------------------

    def _on_matched(self, run: EventRun, span: SpanRecord, elog: EventLogger) -> None:
        if span is not NO_SPAN:
            span.set(talon__matched_rules=[r.name for r in run.matched])
        if self.metrics is not None:
            for rule in run.matched:
                self.metrics.matched(rule.name)

    def _on_unmatched(self, run: EventRun, span: SpanRecord, elog: EventLogger) -> None:
        span.event("no rule matched", falco__rule=run.event.rule)
        level = logging.INFO if self.print_all_events else logging.DEBUG
        if elog.isEnabledFor(level):
            elog.log(level, "no rule matched", fields={"falco_rule": run.event.rule})

    def _on_actions(self, run: EventRun, span: SpanRecord, elog: EventLogger) -> None:
        """The steps the machine skipped without running them (superseded ones)."""
        self._skipped([s for s in run.steps if s.stage is machine.Stage.ACTIONS], span, elog)

    def _skipped(self, steps: list[Step], span: SpanRecord, elog: EventLogger) -> None:
        for step in steps:
            if step.ran or step.outcome is not Outcome.SKIPPED:
                continue
            rule = step.rule
            span.event(
                "step skipped",
                talon__rule=rule.name,
                talon__action=step.actionner,
                talon__reason=step.reason,
            )
            self._count_action(step.actionner, Outcome.SKIPPED)
            if elog.isEnabledFor(logging.INFO):
                fields = {
                    "rule": rule.name,
                    "action": step.actionner,
                    "stage": step.stage.value,
                    "outcome": "skipped",
                }
                if step.action is not None:
                    fields["action_name"] = step.action.name
                elog.info(
                    "%s skipped: %s (%s)", step.actionner, rule.name, step.reason, fields=fields
                )

    def _on_notified(self, run: EventRun, span: SpanRecord, elog: EventLogger) -> None:
        """The v0.3 chain steps the machine skipped (known once the chain is over), and
        the notifications."""
        self._skipped([s for s in run.steps if s.stage is machine.Stage.CHAIN], span, elog)
        span.set(talon__notifications=len(run.deliveries))

    def _count_action(self, actionner: str, outcome: Outcome, seconds: float | None = None) -> None:
        if self.metrics is not None:
            self.metrics.action(actionner, outcome.value, seconds)

    async def _execute(
        self, run: EventRun, step: Step, trace: Trace, state: SpanRecord, elog: EventLogger
    ) -> None:
        rule = step.rule
        actionner = step.actionner
        target = run.event.target
        span: SpanRecord = NO_SPAN
        if trace.sampled:
            attributes: dict[str, Any] = {
                "talon__rule": rule.name,
                "talon__action": actionner,
                "talon__before": rule.before,
                "talon__continue": rule.continue_,
                "k8s__pod__name": target.pod,
                "k8s__namespace__name": target.namespace,
            }
            if step.action is not None:
                attributes.update(
                    talon__action_name=step.action.name,
                    talon__continue=step.action.continue_,
                    talon__ignore_errors=step.action.ignore_errors,
                )
            span = trace.start(actionner, state, **attributes)
        started = time.perf_counter()
        if step.action is not None and rule.dry_run:
            result = ActionResult(Outcome.PLANNED, RULE_DRY_RUN_REASON, target=target)
        elif self.dry_run:
            result = ActionResult(Outcome.PLANNED, DRY_RUN_REASON, target=target)
        elif rule.throttle is not None and (throttled := await self._throttled(run, rule)):
            result = ActionResult(Outcome.SKIPPED, throttled, target=target)
        else:
            with activate(trace, span):
                result = await self._call(run, step, span, elog)
        step.duration = time.perf_counter() - started
        step.result = result
        step.outcome = result.outcome
        step.reason = result.reason
        outcome = result.outcome.value
        if span is not NO_SPAN:
            span.set(talon__outcome=outcome, talon__reason=result.reason)
        if result.outcome is Outcome.FAILED:
            span.fail(result.reason)
        span.end()
        self._count_action(actionner, result.outcome, step.duration)
        level = logging.WARNING if result.outcome is Outcome.FAILED else logging.INFO
        if not elog.isEnabledFor(level):
            return
        elog.log(
            level,
            "%s %s: %s%s",
            actionner,
            outcome,
            rule.name,
            f" ({result.reason})" if result.reason else "",
            fields={
                "rule": rule.name,
                "action": actionner,
                "stage": step.stage.value,
                "outcome": outcome,
                "duration_ms": round(step.duration * 1000, 3),
            },
        )

    async def _throttled(self, run: EventRun, rule: Rule) -> str:
        """Why ``rule``'s actions are throttled for this event, or "": decided once per rule
        and event (a v0.3 chain's actions are one action of the throttle's count)."""
        decided = run.throttled.get(rule.name)
        if decided is None:
            decided = run.throttled[rule.name] = await self.throttler.check(rule, run.event)
        return decided

    async def _call(
        self, run: EventRun, step: Step, span: SpanRecord, elog: EventLogger
    ) -> ActionResult:
        """Run the step's actionner under its handler policy: one timeout for the whole
        step, a ``TemporaryError`` retried with backoff up to the policy's attempts."""
        rule = step.rule
        actionner = step.actionner
        slog = elog.bind(rule=rule.name, action=actionner)
        target = run.event.target
        spec = self.actionners.get(actionner)
        if spec is None:
            return ActionResult.failed(f"actionner {actionner!r} is not installed", target)
        ctx = ActionContext(
            event=run.event,
            rule=rule.name,
            parameters=step.parameters,
            target=target,
            talon=talon_context(run, step),
        )
        policy = spec.policy
        timeout = self.action_timeout if policy.timeout is None else policy.timeout

        def on_retry(attempt: int, exc: BaseException, wait: float) -> None:
            span.event("retry", talon__attempt=attempt, talon__reason=str(exc), talon__delay_s=wait)
            slog.warning("%s failed (%s), retry %d in %.2fs", actionner, exc, attempt, wait)

        try:
            return await asyncio.wait_for(
                retry(policy.retry, lambda: spec.run(ctx), worth_retrying, on_retry), timeout
            )
        except TimeoutError:
            return ActionResult.failed(f"timed out after {timeout:g}s", target)
        except Retried as failed:
            exc = failed.error
            step.temporary = isinstance(exc, TemporaryError)
            if isinstance(exc, TalonError):
                reason = str(exc) or type(exc).__name__
                if failed.temporary and failed.attempts > 1:
                    reason = f"{reason} (after {failed.attempts} attempts)"
                return ActionResult.failed(reason, target)
            span.fail(f"{type(exc).__name__}: {exc}", exc)
            slog.error("actionner %s raised", actionner, exc_info=exc)
            return ActionResult.failed(f"{type(exc).__name__}: {exc}", target)


def _give_up_step(step: Step, why: str, output: dict[str, Any], event: FalcoEvent) -> None:
    """Make ``step``'s result ``given-up``, keeping its last error and output, if any."""
    last = step.result
    reason = f"{why} (last error: {step.reason})" if last is not None and step.reason else why
    step.result = ActionResult(
        Outcome.GIVEN_UP,
        reason,
        {**(last.output if last is not None else {}), **output},
        last.target if last is not None else event.target,
    )
    step.outcome = Outcome.GIVEN_UP
    step.reason = reason
