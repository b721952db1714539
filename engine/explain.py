"""``explain``: what the engine would do with one event, touching nothing.

Position in the flow: runs an event through the same matcher and state machine as the
server, in dry-run mode (no actionner is called, no notification is sent), and renders the
run record for people (text) or for CI (JSON; the contract is in the README).
"""

from __future__ import annotations

from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import FalcoEvent
from engine.contract.results import Outcome
from engine.machine import EventRun
from engine.pipeline import DRY_RUN_REASON, Pipeline
from engine.rules import Rule, RuleSet
from engine.storm import throttle_target


async def explain(
    event: FalcoEvent,
    rules: RuleSet,
    actionners: ActionnerRegistry,
    default_notifiers: tuple[str, ...] = (),
) -> EventRun:
    """The run record of ``event`` against ``rules``, with every step planned or skipped."""
    pipeline = Pipeline(rules, actionners, default_notifiers=default_notifiers, dry_run=True)
    return await pipeline.process(event)


def explain_json(run: EventRun) -> dict[str, object]:
    """The stable JSON shape: matched, steps (execution order, skipped included), notifiers.

    A v0.3 chain step also has ``action_name`` (the action's name in the rule); a step of
    a ``dry_run: true`` rule keeps the reason ``dry run``."""
    summary = run.summary()
    for step in summary["steps"]:
        step.pop("duration_ms", None)
        if step["outcome"] == Outcome.PLANNED.value and step["reason"] == DRY_RUN_REASON:
            step["reason"] = ""
    return summary


def explain_text(run: EventRun) -> str:
    """A readable account of the decisions, in order."""
    ev = run.event
    lines = [f"Event {ev.id}: Falco rule {ev.rule!r}, priority {ev.priority}, source {ev.source}"]
    target = ev.target
    if target.pod:
        lines.append(f"  target pod: {target.namespace}/{target.pod}")
    if not run.matched:
        lines.append("No talon rule matches this event: nothing would happen.")
        return "\n".join(lines)
    lines.append(f"Matched {len(run.matched)} rule(s), in rule order:")
    for rule in run.matched:
        if rule.is_chain:
            flags = [f"continue: {str(rule.continue_).lower()}"]
            if rule.dry_run:
                flags.append("dry_run: true")
            flags += _throttle(rule, ev)
            chain = " > ".join(f"{a.name} ({a.actionner})" for a in rule.chain)
            lines.append(f"  - {rule.name} (v0.3) -> {chain}; " + ", ".join(flags))
            continue
        flags = []
        for name, value, explicit in (
            ("before", rule.before, rule.before_set),
            ("continue", rule.continue_, rule.continue_set),
        ):
            origin = "rule" if explicit else f"default of {rule.action}"
            flags.append(f"{name}: {str(value).lower()} ({origin})")
        flags += _throttle(rule, ev)
        lines.append(f"  - {rule.name} -> {rule.action}; " + ", ".join(flags))
    lines.append("Plan, in execution order:")
    for i, step in enumerate(run.steps, 1):
        verb = "would run" if step.outcome is Outcome.PLANNED else step.outcome.value
        what = step.actionner if step.action is None else f"{step.action.name} ({step.actionner})"
        line = f"  {i}. [{step.stage.value}] {step.rule.name}: {what} {verb}"
        if step.outcome is Outcome.SKIPPED or (step.reason and step.reason != DRY_RUN_REASON):
            line += f" ({step.reason})"
        lines.append(line)
    notified = run.summary()["notifiers"]
    if any(notified.values()):
        lines.append("Notifications:")
        for rule_name, names in notified.items():
            if names:
                lines.append(f"  - {rule_name} -> {', '.join(names)}")
    else:
        lines.append("Notifications: none (no rule names notifiers and no defaultNotifiers)")
    return "\n".join(lines)


def _throttle(rule: Rule, event: FalcoEvent) -> list[str]:
    """The rule's throttle and the counter this event would count in (a server run beyond
    the limit skips the step: "throttled: N actions on <target> within <window>")."""
    t = rule.throttle
    if t is None:
        return []
    target = throttle_target(event, t.per)
    on = f"{t.per} {target}" if target else f"no {t.per} in this event: not throttled"
    return [f"throttle: at most {t.max} per {t.per} within {t.within_text} ({on})"]
