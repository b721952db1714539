"""The pipeline: drives an event's run through the state machine and executes its steps.

Position in the flow:
HTTP -> event model -> matcher -> state machine -> **actionners** -> notifiers.

The ordering decisions are the machine's (``engine.machine``); this module only runs what
the current state planned, in order, each step bounded by a timeout, and hands the results
to the notification dispatcher. An internal error ends the run in the ``failed`` state,
is logged with the event id, and never escapes to the worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import dataclass

from actionners.registry import ActionContext, ActionnerRegistry
from engine import machine
from engine.errors import TalonError
from engine.event import FalcoEvent
from engine.machine import EventRun, Step
from engine.matcher import Matcher
from engine.notify import Dispatcher
from engine.results import ActionResult, Outcome
from engine.rules import RuleSet

log = logging.getLogger("falco_talon.pipeline")


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
    ) -> None:
        self.compiled = CompiledRules.of(rules)
        self.actionners = actionners
        self.dispatcher = dispatcher
        self.default_notifiers = default_notifiers
        self.dry_run = dry_run
        self.action_timeout = action_timeout
        self.stats: Counter[str] = Counter()
        """Final states and outcomes, for health and metrics."""

    def set_rules(self, rules: RuleSet) -> None:
        """Swap the rules; runs already started keep the ones they started with."""
        self.compiled = CompiledRules.of(rules)

    async def process(self, event: FalcoEvent) -> EventRun:
        compiled = self.compiled
        run = machine.start(EventRun(event, compiled.matcher, self.default_notifiers))
        if event.level is None:
            log.warning(
                "event priority %r is not a Falco priority: no priority criterion holds",
                event.priority,
                extra={"fields": {"event_id": event.id}},
            )
        try:
            while not run.finished:
                machine.advance(run)
                for step in run.pending:
                    await self._execute(run, step)
            for step in run.steps if log.isEnabledFor(logging.INFO) else ():
                if not step.ran:
                    log.info(
                        "%s skipped: %s (%s)",
                        step.rule.action,
                        step.rule.name,
                        step.reason,
                        extra={
                            "fields": {
                                "event_id": event.id,
                                "rule": step.rule.name,
                                "action": step.rule.action,
                                "stage": step.stage.value,
                                "outcome": "skipped",
                            }
                        },
                    )
            if run.state == machine.Stage.UNMATCHED:
                log.debug(
                    "no rule matched",
                    extra={"fields": {"event_id": event.id, "falco_rule": event.rule}},
                )
        except asyncio.CancelledError:
            machine.fail(run, "cancelled")
            raise
        except Exception as exc:
            machine.fail(run, f"{type(exc).__name__}: {exc}")
            log.exception(
                "event run failed in state %s",
                run.history[-1][0].value,
                extra={"fields": {"event_id": event.id}},
            )
        self.stats[run.state] += 1
        if self.dispatcher is not None and run.deliveries:
            self.dispatcher.submit(run)
        return run

    async def _execute(self, run: EventRun, step: Step) -> None:
        rule = step.rule
        started = time.perf_counter()
        if self.dry_run:
            result = ActionResult(
                Outcome.PLANNED, "dry run: nothing was touched", target=run.event.target
            )
        else:
            result = await self._call(run, step)
        step.duration = time.perf_counter() - started
        step.result = result
        step.outcome = result.outcome
        step.reason = result.reason
        self.stats[f"action.{result.outcome.value}"] += 1
        level = logging.WARNING if result.outcome is Outcome.FAILED else logging.INFO
        if not log.isEnabledFor(level):
            return
        log.log(
            level,
            "%s %s: %s%s",
            rule.action,
            result.outcome.value,
            rule.name,
            f" ({result.reason})" if result.reason else "",
            extra={
                "fields": {
                    "event_id": run.event.id,
                    "rule": rule.name,
                    "action": rule.action,
                    "stage": step.stage.value,
                    "outcome": result.outcome.value,
                    "duration_ms": round(step.duration * 1000, 3),
                }
            },
        )

    async def _call(self, run: EventRun, step: Step) -> ActionResult:
        rule = step.rule
        target = run.event.target
        spec = self.actionners.get(rule.action)
        if spec is None:
            return ActionResult.failed(f"actionner {rule.action!r} is not installed", target)
        ctx = ActionContext(
            event=run.event, rule=rule.name, parameters=rule.parameters, target=target
        )
        try:
            return await asyncio.wait_for(spec.run(ctx), self.action_timeout)
        except TimeoutError:
            return ActionResult.failed(f"timed out after {self.action_timeout:g}s", target)
        except TalonError as exc:
            return ActionResult.failed(str(exc) or type(exc).__name__, target)
        except Exception as exc:
            log.exception(
                "actionner %s raised",
                rule.action,
                extra={"fields": {"event_id": run.event.id, "rule": rule.name}},
            )
            return ActionResult.failed(f"{type(exc).__name__}: {exc}", target)
