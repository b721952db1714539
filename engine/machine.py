"""The per-event state machine: where the ``before``/``continue`` ordering contract lives.

Position in the flow:
HTTP -> event model -> matcher -> **state machine** -> actionners -> notifiers.

One :class:`transitions.Machine` is defined once for the whole process (:data:`MACHINE`);
each event gets an :class:`EventRun` model that is driven through it with :func:`advance`
(``engine.pipeline`` does the driving and executes the planned steps between transitions).
Models are never added to the machine, so nothing accumulates per event: creating an
``AsyncMachine`` per event is known to leak, and even ``add_model`` binds a method per
trigger to every model.

    received --advance [has_matches]--> matched --advance--> before-actions
    received --advance [no match]----> unmatched (terminal)
    before-actions --advance--> actions
    actions --advance [a v0.3 action is next]--> chain --advance [another one]--> chain
    actions / chain --advance [otherwise]--> notified (terminal)
    any non-terminal --fail--> failed (terminal)

Entering ``before-actions`` plans the matched rules whose effective ``before`` is true, in
rule order. Entering ``actions`` plans the rest: if one of them has effective
``continue: false`` the *first* such rule runs alone and every other one is skipped
("superseded by rule X, continue: false"); otherwise they all run in rule order.
Seed rules (``- name:``) run in those two stages. v0.3 rules (``- rule:``) run after them,
in the ``chain`` state, entered once per action: leaving ``actions`` queues every matched
v0.3 rule's actions (rules in rule order, actions in chain order); each time an action
has run, :meth:`EventRun.settle_chain` applies the v0.3 semantics to the queue: after a
failed action (unless ``ignore_errors``) or an action whose effective ``continue`` is
false, the rest of that rule's chain is skipped; once a rule is done, if its
``continue`` is false every later v0.3 rule is skipped. The two syntaxes do not stop each
other: a seed ``continue: false`` supersedes seed rules only, a v0.3 ``continue: false``
stops v0.3 rules only.
Entering ``notified`` addresses every action result to the rule's notifiers plus the
default notifiers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from transitions import Machine
from transitions.core import Event, EventData, MachineError, State, Transition

from engine.contract.event import FalcoEvent
from engine.contract.results import ActionResult, Outcome
from engine.matcher import Matcher
from engine.rules import ChainAction, Rule


class Stage(StrEnum):
    """The states of an event's run. Values are what logs, ``explain`` and traces show."""

    RECEIVED = "received"
    MATCHED = "matched"
    UNMATCHED = "unmatched"
    BEFORE_ACTIONS = "before-actions"
    ACTIONS = "actions"
    CHAIN = "chain"
    NOTIFIED = "notified"
    FAILED = "failed"


TERMINAL = frozenset({Stage.UNMATCHED, Stage.NOTIFIED, Stage.FAILED})
_TERMINAL_VALUES = frozenset(s.value for s in TERMINAL)


@dataclass(slots=True)
class Step:
    """One rule's action in one stage of one event: planned, then run (or skipped)."""

    stage: Stage
    rule: Rule
    outcome: Outcome = Outcome.PLANNED
    reason: str = ""
    result: ActionResult | None = None
    duration: float = 0.0
    """Seconds the actionner took."""
    action: ChainAction | None = None
    """The v0.3 chain action this step runs (None: the seed rule's one action)."""
    temporary: bool = False
    """It failed with a temporary error (``TemporaryError``) once its retries ran out: the
    same action may succeed later, so a queue that can redeliver the event does so."""

    @property
    def ran(self) -> bool:
        return self.result is not None

    @property
    def actionner(self) -> str:
        return self.action.actionner if self.action is not None else self.rule.action

    @property
    def parameters(self) -> Mapping[str, Any]:
        return self.action.parameters if self.action is not None else self.rule.parameters

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "stage": self.stage.value,
            "rule": self.rule.name,
            "action": self.actionner,
            "outcome": self.outcome.value,
            "reason": self.reason,
        }
        if self.action is not None:
            out["action_name"] = self.action.name
        if self.result is not None:
            out["duration_ms"] = round(self.duration * 1000, 3)
            if self.result.output:
                out["output"] = self.result.output
        return out


@dataclass(slots=True)
class Delivery:
    """One action result addressed to one notifier."""

    notifier: str
    step: Step


@dataclass(slots=True, eq=False)
class EventRun:
    """The run record of one event and the model the shared machine drives."""

    event: FalcoEvent
    matcher: Matcher
    default_notifiers: tuple[str, ...] = ()
    state: str = Stage.RECEIVED.value
    """The machine's state, as the :class:`Stage` value (see :attr:`stage`)."""
    matched: list[Rule] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    """Every step in execution order, skipped ones included."""
    pending: list[Step] = field(default_factory=list)
    """The steps the current stage must execute (set on entering a stage)."""
    deliveries: list[Delivery] = field(default_factory=list)
    history: list[tuple[Stage, float]] = field(default_factory=list)
    """States entered, with ``time.monotonic()`` at entry."""
    error: str = ""
    trace_id: str = ""
    chain: list[Step] = field(default_factory=list)
    """The v0.3 chain steps still to run, in order (their steps are in ``steps`` already)."""
    chain_last: Step | None = None
    """The v0.3 chain step that ran last."""
    throttled: dict[str, str] = field(default_factory=dict)
    """Per rule name: why its throttle skips its actions for this event ("" : it does not)."""

    # -- conditions and callbacks named in the machine definition ----------------------------

    def evaluate_rules(self) -> None:
        """Evaluate every rule against the event (matched rules keep rule order)."""
        self.matched = self.matcher.match(self.event)

    def has_matches(self) -> bool:
        return bool(self.matched)

    def record_state(self) -> None:
        self.history.append((Stage(self.state), time.monotonic()))
        self.pending = []

    def plan_before_actions(self) -> None:
        self.pending = [
            Step(Stage.BEFORE_ACTIONS, r) for r in self.matched if r.before and not r.is_chain
        ]
        self.steps.extend(self.pending)

    def plan_actions(self) -> None:
        remaining = [r for r in self.matched if not r.before and not r.is_chain]
        stopper = next((r for r in remaining if not r.continue_), None)
        for rule in remaining:
            step = Step(Stage.ACTIONS, rule)
            self.steps.append(step)
            if stopper is None or rule is stopper:
                self.pending.append(step)
            else:
                step.outcome = Outcome.SKIPPED
                step.reason = f"superseded by rule {stopper.name!r}, continue: false"

    def queue_chains(self) -> None:
        """Queue every action of every matched v0.3 rule: rules in rule order, each rule's
        actions in chain order."""
        self.chain = [
            Step(Stage.CHAIN, rule, action=action)
            for rule in self.matched
            if rule.is_chain
            for action in rule.chain
        ]
        self.steps.extend(self.chain)

    def has_chain_step(self) -> bool:
        return bool(self.chain)

    def settle_chain(self) -> None:
        """After a chain step ran: skip what the v0.3 semantics say must not run."""
        last = self.chain_last
        if last is None or last.action is None:
            return
        action, rule = last.action, last.rule
        stop = ""
        if last.outcome is Outcome.FAILED and not action.ignore_errors:
            stop = f"chain stopped: action {action.name!r} failed"
        elif not action.continue_:
            origin = "" if action.continue_set else f" (default of {action.actionner})"
            stop = f"chain stopped: action {action.name!r} has continue: false{origin}"
        if stop:
            self._skip_chain(lambda s: s.rule is rule, stop)
        if not rule.continue_ and not any(s.rule is rule for s in self.chain):
            self._skip_chain(lambda s: True, f"rule {rule.name!r} has continue: false")

    def _skip_chain(self, which: Callable[[Step], bool], reason: str) -> None:
        keep = []
        for step in self.chain:
            if which(step):
                step.outcome = Outcome.SKIPPED
                step.reason = reason
            else:
                keep.append(step)
        self.chain = keep

    def plan_chain_step(self) -> None:
        step = self.chain.pop(0)
        self.chain_last = step
        self.pending = [step]

    def plan_notifications(self) -> None:
        for step in self.steps:
            if not step.ran:
                continue
            names = dict.fromkeys((*step.rule.notifiers, *self.default_notifiers))
            self.deliveries.extend(Delivery(name, step) for name in names)

    # -- read-only views -----------------------------------------------------------------------

    @property
    def stage(self) -> Stage:
        return Stage(self.state)

    @property
    def finished(self) -> bool:
        return self.state in _TERMINAL_VALUES

    @property
    def failed_temporarily(self) -> list[Step]:
        """The steps that failed with a temporary error (see :attr:`Step.temporary`)."""
        return [s for s in self.steps if s.temporary]

    def summary(self) -> dict[str, Any]:
        """The run record as JSON-able data (``explain -o json``)."""
        notifiers: dict[str, list[str]] = {}
        for step in self.steps:
            if step.outcome is not Outcome.SKIPPED or step.ran:
                names = dict.fromkeys((*step.rule.notifiers, *self.default_notifiers))
                notifiers[step.rule.name] = list(names)
        out: dict[str, Any] = {
            "event": {
                "id": self.event.id,
                "rule": self.event.rule,
                "priority": self.event.priority,
            },
            "state": self.state,
            "matched": [r.name for r in self.matched],
            "steps": [s.as_dict() for s in self.steps],
            "notifiers": notifiers,
        }
        if self.error:
            out["error"] = self.error
        return out


# -- the one machine definition ---------------------------------------------------------------
# States are the Stage values (plain strings) rather than the Enum members: transitions
# resolves an Enum state's name through the enum descriptor on every callback, which costs
# about a quarter of each trigger on the per-event hot path (see bench/). The vocabulary
# is still the Enum: everything below is written with Stage members.

TRANSITIONS: list[dict[str, Any]] = [
    {
        "trigger": "advance",
        "source": Stage.RECEIVED.value,
        "dest": Stage.MATCHED.value,
        "prepare": "evaluate_rules",
        "conditions": "has_matches",
    },
    {"trigger": "advance", "source": Stage.RECEIVED.value, "dest": Stage.UNMATCHED.value},
    {"trigger": "advance", "source": Stage.MATCHED.value, "dest": Stage.BEFORE_ACTIONS.value},
    {"trigger": "advance", "source": Stage.BEFORE_ACTIONS.value, "dest": Stage.ACTIONS.value},
    {
        "trigger": "advance",
        "source": Stage.ACTIONS.value,
        "dest": Stage.CHAIN.value,
        "prepare": "queue_chains",
        "conditions": "has_chain_step",
    },
    {"trigger": "advance", "source": Stage.ACTIONS.value, "dest": Stage.NOTIFIED.value},
    {
        "trigger": "advance",
        "source": Stage.CHAIN.value,
        "dest": Stage.CHAIN.value,
        "prepare": "settle_chain",
        "conditions": "has_chain_step",
    },
    {"trigger": "advance", "source": Stage.CHAIN.value, "dest": Stage.NOTIFIED.value},
    {
        "trigger": "fail",
        "source": [s.value for s in Stage if s not in TERMINAL],
        "dest": Stage.FAILED.value,
    },
]

STATES: list[dict[str, Any]] = [
    {"name": Stage.RECEIVED.value, "on_enter": ["record_state"]},
    {"name": Stage.MATCHED.value, "on_enter": ["record_state"]},
    {"name": Stage.UNMATCHED.value, "on_enter": ["record_state"]},
    {"name": Stage.BEFORE_ACTIONS.value, "on_enter": ["record_state", "plan_before_actions"]},
    {"name": Stage.ACTIONS.value, "on_enter": ["record_state", "plan_actions"]},
    {"name": Stage.CHAIN.value, "on_enter": ["record_state", "plan_chain_step"]},
    {"name": Stage.NOTIFIED.value, "on_enter": ["record_state", "plan_notifications"]},
    {"name": Stage.FAILED.value, "on_enter": ["record_state"]},
]
"""Every state with the callbacks run on entering it, in order (``record_state`` first)."""

LABELS: dict[str, str] = {
    "has_matches": "a rule matched",
    "evaluate_rules": "evaluate every rule",
    "plan_before_actions": "plan rules with before: true, in rule order",
    "plan_actions": "plan the rest: the first continue: false rule supersedes the others",
    "queue_chains": "queue the matched v0.3 rules' actions, in rule then chain order",
    "has_chain_step": "a v0.3 action is queued",
    "settle_chain": "skip the rule's rest if the action failed (no ignore_errors) or has "
    "continue: false; skip later rules if the rule is done and has continue: false",
    "plan_chain_step": "plan the next queued v0.3 action",
    "plan_notifications": "address each result to the rule's notifiers + defaultNotifiers",
}
"""Human wording of the callbacks, for diagrams."""


# -- the hot path: transitions' own classes, minus the per-call generality ------------------
# transitions resolves each callback by name on the model, formats a debug log line per
# step and walks machine-wide hook lists on every trigger: ~15 µs per transition here, four
# or five transitions per event. The classes below are its documented extension points
# (``state_cls``, ``transition_cls``, ``event_cls``); they run the same definition in the
# same order (prepare, conditions, before, exit, set state, enter, after) with the
# callbacks resolved once, as methods of the model class. The definition above, the
# machine's validation and the diagram are transitions' own.


class _State(State):
    enter_fns: tuple[Callable[[Any], Any], ...] = ()
    exit_fns: tuple[Callable[[Any], Any], ...] = ()

    def enter(self, event_data: EventData) -> None:
        model = event_data.model
        for fn in self.enter_fns:
            fn(model)

    def exit(self, event_data: EventData) -> None:
        model = event_data.model
        for fn in self.exit_fns:
            fn(model)


class _Transition(Transition):
    prepare_fns: tuple[Callable[[Any], Any], ...] = ()
    condition_fns: tuple[tuple[Callable[[Any], Any], bool], ...] = ()
    before_fns: tuple[Callable[[Any], Any], ...] = ()
    after_fns: tuple[Callable[[Any], Any], ...] = ()
    source_state: _State
    dest_state: _State

    def execute(self, event_data: EventData) -> bool:
        model: Any = event_data.model
        for fn in self.prepare_fns:
            fn(model)
        for check, target in self.condition_fns:
            if bool(check(model)) is not target:
                return False
        for fn in self.before_fns:
            fn(model)
        self.source_state.exit(event_data)
        model.state = self.dest
        event_data.state = self.dest_state
        self.dest_state.enter(event_data)
        for fn in self.after_fns:
            fn(model)
        return True


class _Event(Event):
    def trigger(self, model: Any, *args: Any, **kwargs: Any) -> bool:
        data = EventData(None, self, self.machine, model, args, kwargs)
        state = self.machine.states[model.state]
        data.state = state
        candidates = self.transitions.get(state.name)
        if candidates is None:
            raise MachineError(f"Can't trigger event {self.name} from state {state.name}!")
        for transition in candidates:
            data.transition = transition
            if transition.execute(data):
                data.result = True
                break
        return bool(data.result)


class _Machine(Machine):
    state_cls = _State
    transition_cls = _Transition
    event_cls = _Event

    def bind_callbacks(self, model_class: type) -> None:
        """Resolve every callback name once, as a method of ``model_class``."""
        if any(
            (
                self.before_state_change,
                self.after_state_change,
                self.prepare_event,
                self.finalize_event,
                self.on_exception,
                self.on_final,
                self.has_queue,
            )
        ):
            raise ValueError("machine-wide callbacks and queued events are not supported here")

        def resolve(names: Any) -> tuple[Callable[[Any], Any], ...]:
            return tuple(getattr(model_class, n) for n in names)

        for state in self.states.values():
            assert isinstance(state, _State)
            state.enter_fns = resolve(state.on_enter)
            state.exit_fns = resolve(state.on_exit)
        for event in self.events.values():
            for transitions in event.transitions.values():
                for t in transitions:
                    assert isinstance(t, _Transition)
                    if not t.dest:
                        raise ValueError("internal transitions are not supported here")
                    t.prepare_fns = resolve(t.prepare)
                    t.before_fns = resolve(t.before)
                    t.after_fns = resolve(t.after)
                    t.condition_fns = tuple(
                        (getattr(model_class, str(c.func)), c.target) for c in t.conditions
                    )
                    source, dest = self.states[t.source], self.states[t.dest]
                    assert isinstance(source, _State) and isinstance(dest, _State)
                    t.source_state, t.dest_state = source, dest


def _build_machine() -> Machine:
    built = _Machine(
        model=None,
        states=STATES,
        initial=Stage.RECEIVED.value,
        transitions=TRANSITIONS,
        auto_transitions=False,
        ignore_invalid_triggers=False,
    )
    built.bind_callbacks(EventRun)
    return built


MACHINE = _build_machine()
_ADVANCE = MACHINE.events["advance"]
_FAIL = MACHINE.events["fail"]


def start(run: EventRun) -> EventRun:
    """Record the initial state (the machine only records states it *enters*)."""
    run.history.append((Stage.RECEIVED, time.monotonic()))
    return run


def advance(run: EventRun) -> str:
    """Move ``run`` to its next state (planning that state's steps on entry)."""
    _ADVANCE.trigger(run)
    return run.state


def fail(run: EventRun, error: str) -> str:
    """End ``run`` in the failed state with ``error``; a no-op if it already ended."""
    if not run.finished:
        run.error = error
        _FAIL.trigger(run)
    return run.state
