"""Falco Talon v0.3 rules run through the state machine: chains, ``continue`` at both
levels, ``ignore_errors``, ``dry_run``, and how they order with seed rules.

Real: rules files on disk, the loader, the shared machine, the pipeline, and the test-only
``test:*`` actionners of ``tests/recording.py`` (real actionners whose effect is a list).
"""

from __future__ import annotations

from collections.abc import Callable

from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import FalcoEvent
from engine.contract.results import Outcome
from engine.machine import EventRun, Stage
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from observability.spans import Trace
from tests.recording import Recorder

MATCH = "  match: {rules: [Terminal shell in container]}\n"


def chain(name: str, *actions: str, extra: str = "") -> str:
    """A v0.3 rule whose actions are ``name: actionner`` or ``name: actionner | extra``."""
    out = f"- rule: {name}\n{MATCH}{extra}  actions:\n"
    for a in actions:
        head, _, more = a.partition(" | ")
        action, actionner = head.split(": ")
        out += f"    - action: {action}\n      actionner: {actionner}\n"
        for kv in filter(None, more.split(";")):
            out += f"      {kv.strip()}\n"
    return out


async def run(
    rules: RuleSet, registry: ActionnerRegistry, event: FalcoEvent, **kw: object
) -> EventRun:
    return await Pipeline(rules, registry, **kw).process(event)  # type: ignore[arg-type]


def steps(result: EventRun) -> list[tuple[str, str, str, str]]:
    return [
        (s.rule.name, s.action.name if s.action else "-", s.outcome.value, s.reason)
        for s in result.steps
    ]


async def test_a_rules_actions_run_in_order_and_each_sees_talon_context(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(chain("R", "a: test:record", "b: test:record", "c: test:record"))
    event = make_event()
    result = await run(rules, registry, event)
    assert recorder.calls == [("R", "test:record")] * 3
    assert [c.talon["falco-talon.action"] for c in recorder.contexts] == ["a", "b", "c"]
    ctx = recorder.contexts[0].talon
    assert ctx["falco-talon.rule"] == "R"
    assert ctx["falco-talon.actionner"] == "test:record"
    assert ctx["falco-talon.event.id"] == event.id
    assert ctx["falco-talon.action.continue"] == "true"
    assert ctx["falco-talon.action.ignore_errors"] == "false"
    assert ctx["falco-talon.rule.dry_run"] == "false"
    assert [s for s, _ in result.history] == [
        Stage.RECEIVED,
        Stage.MATCHED,
        Stage.BEFORE_ACTIONS,
        Stage.ACTIONS,
        Stage.CHAIN,
        Stage.CHAIN,
        Stage.CHAIN,
        Stage.NOTIFIED,
    ]


async def test_a_failed_action_stops_its_chain_unless_ignore_errors(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        chain("tolerant", "try: test:fail | ignore_errors: 'true'", "next: test:record")
        + chain("strict", "try: test:fail", "never: test:record")
        + chain("later", "runs: test:record")
    )
    result = await run(rules, registry, make_event())
    assert recorder.calls == [
        ("tolerant", "test:fail"),
        ("tolerant", "test:record"),
        ("strict", "test:fail"),
        ("later", "test:record"),
    ]
    assert steps(result) == [
        ("tolerant", "try", "failed", "the pod refused"),
        ("tolerant", "next", "succeeded", "recorded"),
        ("strict", "try", "failed", "the pod refused"),
        ("strict", "never", "skipped", "chain stopped: action 'try' failed"),
        ("later", "runs", "succeeded", "recorded"),
    ]


async def test_an_action_with_continue_false_ends_its_chain_explicit_or_by_default(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        chain("explicit", "a: test:record | continue: false", "b: test:record")
        + chain("default", "stop: test:stop", "c: test:record")
        + chain("overridden", "stop: test:stop | continue: 'true'", "d: test:record")
    )
    result = await run(rules, registry, make_event())
    assert recorder.calls == [
        ("explicit", "test:record"),
        ("default", "test:stop"),
        ("overridden", "test:stop"),
        ("overridden", "test:record"),
    ]
    assert [r for *_, r in steps(result) if r.startswith("chain")] == [
        "chain stopped: action 'a' has continue: false",
        "chain stopped: action 'stop' has continue: false (default of test:stop)",
    ]


async def test_a_rule_with_continue_false_stops_the_later_v03_rules_but_no_seed_rule(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        chain("first", "a: test:record")
        + chain("stopper", "b: test:fail", "c: test:record", extra="  continue: 'false'\n")
        + chain("after", "d: test:record")
        + f"- name: seed after\n{MATCH}  action: {{name: test:record}}\n"
    )
    result = await run(rules, registry, make_event())
    assert recorder.calls == [
        ("seed after", "test:record"),
        ("first", "test:record"),
        ("stopper", "test:fail"),
    ]
    assert steps(result)[-2:] == [
        ("stopper", "c", "skipped", "chain stopped: action 'b' failed"),
        ("after", "d", "skipped", "rule 'stopper' has continue: false"),
    ]


async def test_seed_rules_run_first_and_a_seed_continue_false_does_not_stop_v03_rules(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        chain("v03 first in file", "a: test:record")
        + f"- name: seed before\n{MATCH}  action: {{name: test:first}}\n"
        + f"- name: seed stopper\n{MATCH}  action: {{name: test:stop}}\n"
        + f"- name: seed other\n{MATCH}  action: {{name: test:record}}\n"
    )
    result = await run(rules, registry, make_event())
    assert [(s.stage, s.rule.name, s.outcome) for s in result.steps] == [
        (Stage.BEFORE_ACTIONS, "seed before", Outcome.SUCCEEDED),
        (Stage.ACTIONS, "seed stopper", Outcome.SUCCEEDED),
        (Stage.ACTIONS, "seed other", Outcome.SKIPPED),
        (Stage.CHAIN, "v03 first in file", Outcome.SUCCEEDED),
    ]
    assert result.matched[0].name == "v03 first in file"  # matched keeps rules-file order


async def test_a_dry_run_rule_plans_its_chain_and_runs_nothing(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        chain("dry", "a: test:record", "b: test:stop", "c: test:record", extra="  dry_run: true\n")
        + chain("wet", "d: test:record")
    )
    result = await run(rules, registry, make_event())
    assert recorder.calls == [("wet", "test:record")]
    assert steps(result) == [
        ("dry", "a", "planned", "dry run"),
        ("dry", "b", "planned", "dry run"),
        (
            "dry",
            "c",
            "skipped",
            "chain stopped: action 'b' has continue: false (default of test:stop)",
        ),
        ("wet", "d", "succeeded", "recorded"),
    ]


async def test_traces_show_a_span_per_action_under_its_rule(
    load_rules: Callable[..., RuleSet],
    registry: ActionnerRegistry,
    make_event: Callable[..., FalcoEvent],
) -> None:
    rules = load_rules(
        chain("R1", "a: test:record", "b: test:record") + chain("R2", "c: test:record")
    )
    trace = Trace(0x1234, sampled=True)
    await Pipeline(rules, registry).process(make_event(), trace)
    by_id = {s.span_id: s for s in trace.spans}
    [chain_span] = [s for s in trace.spans if s.name == Stage.CHAIN.value]
    rule_spans = [s for s in trace.spans if s.name == "rule"]
    assert [s.attributes["talon__rule"] for s in rule_spans] == ["R1", "R2"]
    assert all(s.parent_id == chain_span.span_id for s in rule_spans)
    actions = [s for s in trace.spans if s.name == "test:record"]
    assert [
        (by_id[s.parent_id].attributes["talon__rule"], s.attributes["talon__action_name"])
        for s in actions
        if s.parent_id is not None
    ] == [("R1", "a"), ("R1", "b"), ("R2", "c")]
    assert all(s.end_ns for s in trace.spans)
