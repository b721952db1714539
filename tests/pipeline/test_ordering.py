"""The ordering contract, run for real through the state machine with a recording actionner."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

from engine import machine
from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import FalcoEvent
from engine.contract.results import Outcome
from engine.machine import MACHINE, Stage
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from tests.recording import Recorder

ALL = "match: {rules: [Terminal shell in container]}"


def rule(name: str, action: str, extra: str = "") -> str:
    return f"- name: {name}\n  {ALL}\n  action: {{name: {action}}}\n{extra}"


async def run(rules: RuleSet, registry: ActionnerRegistry, event: FalcoEvent, **kw: object):
    return await Pipeline(rules, registry, **kw).process(event)  # type: ignore[arg-type]


async def test_before_rules_run_first_in_file_order_then_the_rest_in_file_order(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        rule("A", "test:record")
        + rule("B", "test:record", "  before: true\n")
        + rule("C", "test:record")
        + rule("D", "test:first")  # before: true by the actionner's default
    )
    result = await run(rules, registry, make_event())
    assert [c[0] for c in recorder.calls] == ["B", "D", "A", "C"]
    assert [(s.stage, s.rule.name) for s in result.steps] == [
        (Stage.BEFORE_ACTIONS, "B"),
        (Stage.BEFORE_ACTIONS, "D"),
        (Stage.ACTIONS, "A"),
        (Stage.ACTIONS, "C"),
    ]
    assert [s for s, _ in result.history] == [
        Stage.RECEIVED,
        Stage.MATCHED,
        Stage.BEFORE_ACTIONS,
        Stage.ACTIONS,
        Stage.NOTIFIED,
    ]


async def test_the_first_continue_false_rule_runs_alone_and_supersedes_the_others(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        rule("label", "test:record")  # continue true: superseded
        + rule("isolate", "test:record", "  before: true\n")  # before: unaffected
        + rule("kill", "test:stop")  # continue false by default
        + rule("kill again", "test:record", "  continue: false\n")  # second stopper: skipped
        + rule("after", "test:record")
    )
    result = await run(rules, registry, make_event())
    assert recorder.calls == [("isolate", "test:record"), ("kill", "test:stop")]
    skipped = {s.rule.name: s.reason for s in result.steps if s.outcome is Outcome.SKIPPED}
    assert skipped == {
        "label": "superseded by rule 'kill', continue: false",
        "kill again": "superseded by rule 'kill', continue: false",
        "after": "superseded by rule 'kill', continue: false",
    }
    assert [s.rule.name for s in result.steps] == [
        "isolate",
        "label",
        "kill",
        "kill again",
        "after",
    ]


async def test_a_rule_can_override_its_actionners_defaults(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        rule("first but not before", "test:first", "  before: false\n")
        + rule("stop that continues", "test:stop", "  continue: true\n")
        + rule("last", "test:record")
    )
    await run(rules, registry, make_event())
    assert [c[0] for c in recorder.calls] == ["first but not before", "stop that continues", "last"]


async def test_a_continue_false_rule_with_before_true_does_not_supersede_anything(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        rule("A", "test:record")
        + rule("early stop", "test:stop", "  before: true\n")
        + rule("B", "test:record")
    )
    await run(rules, registry, make_event())
    assert [c[0] for c in recorder.calls] == ["early stop", "A", "B"]


async def test_the_seed_rules_plan_networkpolicy_and_exec_before_terminate(
    registry: ActionnerRegistry,
    make_event: Callable[..., FalcoEvent],
) -> None:
    from engine.rules import RulesLoader

    rules = RulesLoader(registry).load(["examples/rules.yaml"])
    result = await run(rules, registry, make_event(priority="Critical"), dry_run=True)
    assert [(s.stage.value, s.rule.action, s.outcome.value) for s in result.steps] == [
        ("before-actions", "kubernetes:networkpolicy", "planned"),
        ("before-actions", "kubernetes:exec", "planned"),
        ("actions", "kubernetes:labelize", "skipped"),
        ("actions", "kubernetes:terminate", "planned"),
    ]


async def test_a_failed_action_is_recorded_and_does_not_stop_the_others(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        rule("fails", "test:fail", "  before: true\n")
        + rule("raises", "test:raise", "  before: true\n")
        + rule("has a bug", "test:crash")
        + rule("still runs", "test:record")
    )
    result = await run(rules, registry, make_event())
    # A TemporaryError is retried (test:raise declares 3 attempts); the others are not.
    assert [c[0] for c in recorder.calls] == [
        "fails",
        "raises",
        "raises",
        "raises",
        "has a bug",
        "still runs",
    ]
    outcomes = {s.rule.name: (s.outcome, s.reason) for s in result.steps}
    assert outcomes["fails"] == (Outcome.FAILED, "the pod refused")
    assert outcomes["raises"] == (Outcome.FAILED, "apiserver unreachable (after 3 attempts)")
    assert outcomes["has a bug"] == (Outcome.FAILED, "KeyError: 'missing'")
    assert outcomes["still runs"][0] is Outcome.SUCCEEDED
    assert result.stage is Stage.NOTIFIED


async def test_a_slow_action_times_out_as_a_failure(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        "- name: slow\n  action: {name: test:slow, parameters: {seconds: 5}}\n"
        + "- name: next\n  action: {name: test:record}\n"
    )
    result = await run(rules, registry, make_event(), action_timeout=0.05)
    assert [(s.rule.name, s.outcome, s.reason) for s in result.steps] == [
        ("slow", Outcome.FAILED, "timed out after 0.05s"),
        ("next", Outcome.SUCCEEDED, "recorded"),
    ]


async def test_no_match_ends_in_the_unmatched_state_without_running_anything(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules("- name: other\n  match: {rules: [Other]}\n  action: {name: test:record}\n")
    result = await run(rules, registry, make_event())
    assert result.stage is Stage.UNMATCHED
    assert recorder.calls == [] and result.steps == []


async def test_an_internal_error_ends_the_run_in_the_failed_state(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    make_event: Callable[..., FalcoEvent],
    monkeypatch: object,
) -> None:
    rules = load_rules(rule("A", "test:record"))
    pipeline = Pipeline(rules, registry)

    class Broken:
        def match(self, event: FalcoEvent) -> list[object]:
            raise RuntimeError("matcher bug")

    # Deliberately break the matcher: an engine bug must end in a state, not kill the worker.
    object.__setattr__(pipeline.compiled, "matcher", Broken())
    result = await pipeline.process(make_event())
    assert result.stage is Stage.FAILED
    assert result.error == "RuntimeError: matcher bug"


async def test_results_are_addressed_to_rule_notifiers_then_default_notifiers(
    registry: ActionnerRegistry,
    load_rules: Callable[..., RuleSet],
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        rule("A", "test:record", "  notifiers: [slack, webhook]\n")
        + rule("B", "test:stop", "  notifiers: [smtp]\n")
        + rule("C", "test:record", "  notifiers: [slack]\n")  # superseded: nothing to notify
    )
    result = await run(rules, registry, make_event(), default_notifiers=("webhook", "k8sevents"))
    assert [(d.notifier, d.step.rule.name) for d in result.deliveries] == [
        ("smtp", "B"),
        ("webhook", "B"),
        ("k8sevents", "B"),
    ]


async def test_models_are_never_attached_to_the_shared_machine(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    make_event: Callable[..., FalcoEvent],
) -> None:
    def live_runs() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, machine.EventRun))

    rules = load_rules(rule("A", "test:record"))
    pipeline = Pipeline(rules, registry)
    before = live_runs()
    for _ in range(200):
        await pipeline.process(make_event())
    assert MACHINE.models == []
    assert live_runs() == before


async def test_a_temporary_error_is_retried_under_the_actionners_policy_until_it_succeeds(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(rule("flaky", "test:flaky") + rule("after", "test:record"))
    result = await run(rules, registry, make_event())
    assert [c[0] for c in recorder.calls] == ["flaky", "flaky", "after"]
    outcomes = {s.rule.name: (s.outcome, s.reason) for s in result.steps}
    assert outcomes["flaky"] == (Outcome.SUCCEEDED, "on a retry")


async def test_an_actionners_own_timeout_fails_its_step_and_the_next_one_runs(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    # The pipeline's actionTimeout is 30 s; test:hang declares timeout=0.2.
    rules = load_rules(rule("hangs", "test:hang") + rule("after", "test:record"))
    result = await asyncio.wait_for(run(rules, registry, make_event()), 5)
    outcomes = {s.rule.name: (s.outcome, s.reason) for s in result.steps}
    assert outcomes["hangs"] == (Outcome.FAILED, "timed out after 0.2s")
    assert outcomes["after"][0] is Outcome.SUCCEEDED
