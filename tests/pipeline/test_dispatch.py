"""The notification dispatcher, against real local HTTP receivers, and what reaches it when
an event is given up (the NATS queue's dead letters; tests/nats runs that end to end).

The notifier here is a test-only one (the real Slack/SMTP/webhook notifiers come with
their own tests); it POSTs each notification to a receiver that records, fails, or hangs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from engine.contract.actionners import ActionnerRegistry
from engine.contract.errors import TemporaryError
from engine.contract.event import FalcoEvent
from engine.contract.notifiers import Notification, NotifierRegistry, notifier
from engine.contract.retry import RetryPolicy
from engine.notify import DeliveryPolicy, Dispatcher
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from observability.metrics import Metrics
from tests.recording import Recorder

RULES = """
- name: first
  action: {name: test:first}
  notifiers: [good, flaky]
- name: second
  action: {name: test:fail}
  notifiers: [good, hangs]
"""


class Receiver:
    """A real HTTP server that records bodies; scripted per path."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[dict[str, Any]]] = {"good": [], "flaky": [], "hangs": []}
        self.flaky_failures = 2

    async def handle(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        body = await request.json()
        if name == "flaky" and self.flaky_failures:
            self.flaky_failures -= 1
            return web.Response(status=503, headers={"Retry-After": "0"})
        if name == "hangs":
            await asyncio.sleep(30)
        self.bodies[name].append(body)
        return web.json_response({"ok": True})


@pytest.fixture
async def receiver(aiohttp_server: Any) -> tuple[Receiver, str]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/{name}", rec.handle)
    server = await aiohttp_server(app)
    return rec, str(server.make_url(""))


@pytest.fixture
def notifiers() -> NotifierRegistry:
    registry = NotifierRegistry()

    async def post(note: Notification, settings: Any) -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                settings["url"],
                json={
                    "rule": note.rule,
                    "action": note.action,
                    "outcome": note.result.outcome.value,
                    "reason": note.result.reason,
                    "output": note.result.output,
                    "event": note.event.id,
                },
            ) as resp,
        ):
            if resp.status >= 500:
                raise TemporaryError(f"HTTP {resp.status}", delay=0.01)

    for name in ("good", "flaky", "hangs"):
        notifier(name, description="posts to the receiver", registry=registry)(post)
    return registry


async def test_each_notifier_gets_one_notification_per_action_in_order_despite_failures(
    receiver: tuple[Receiver, str],
    notifiers: NotifierRegistry,
    registry: ActionnerRegistry,
    load_rules: Callable[..., RuleSet],
    make_event: Callable[..., FalcoEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec, url = receiver
    settings = {name: {"url": f"{url}/{name}"} for name in ("good", "flaky", "hangs")}
    dispatcher = Dispatcher(
        notifiers,
        settings,
        DeliveryPolicy(timeout=0.2, retry=RetryPolicy(attempts=3, backoff=0.01)),
    )
    pipeline = Pipeline(load_rules(RULES), registry, dispatcher=dispatcher)
    events = [make_event(uuid=f"ev-{i}") for i in range(3)]
    with caplog.at_level(logging.WARNING, "falco_talon.notify"):
        for event in events:
            # Handling an event never waits for its notifications.
            await asyncio.wait_for(pipeline.process(event), 0.15)
        await dispatcher.drain(10)
    await dispatcher.close()

    assert [(b["event"], b["rule"]) for b in rec.bodies["good"]] == [
        (e, r) for e in ("ev-0", "ev-1", "ev-2") for r in ("first", "second")
    ]
    assert [b["event"] for b in rec.bodies["flaky"]] == ["ev-0", "ev-1", "ev-2"]
    assert rec.bodies["good"][1]["outcome"] == "failed"
    assert rec.bodies["hangs"] == []
    assert dispatcher.stats[("good", "delivered")] == 6
    assert dispatcher.stats[("flaky", "retried")] == 2
    assert dispatcher.stats[("hangs", "failed")] == 3
    finals = [r for r in caplog.records if "failed for good" in r.getMessage()]
    assert [r.fields["event_id"] for r in finals] == ["ev-0", "ev-1", "ev-2"]  # type: ignore[attr-defined]
    assert "timed out after 0.2s" in finals[0].getMessage()


GIVEN_UP = "given up after 3 deliveries: moved to falco-talon.events.dead"


MakePipeline = Callable[..., Pipeline]


@pytest.fixture
async def make_pipeline(
    receiver: tuple[Receiver, str],
    notifiers: NotifierRegistry,
    registry: ActionnerRegistry,
    load_rules: Callable[..., RuleSet],
) -> AsyncIterator[MakePipeline]:
    """A pipeline on ``rules`` whose dispatcher posts to the receiver."""
    _, url = receiver
    settings = {name: {"url": f"{url}/{name}"} for name in ("good", "flaky", "hangs")}
    dispatcher = Dispatcher(notifiers, settings, DeliveryPolicy(retry=RetryPolicy(attempts=3)))

    def make(rules: str, **options: Any) -> Pipeline:
        return Pipeline(load_rules(rules), registry, dispatcher=dispatcher, **options)

    yield make
    await dispatcher.close()


async def delivered(pipeline: Pipeline, receiver: tuple[Receiver, str]) -> dict[str, Any]:
    """What each notifier's receiver got once every queued notification was sent."""
    assert pipeline.dispatcher is not None
    await pipeline.dispatcher.drain(10)
    return receiver[0].bodies


async def test_a_run_failing_temporarily_that_can_be_redelivered_is_notified_once_given_up(
    receiver: tuple[Receiver, str],
    make_pipeline: MakePipeline,
    make_event: Callable[..., FalcoEvent],
) -> None:
    metrics = Metrics()
    pipeline = make_pipeline(
        """
        - name: label
          action: {name: test:first}
          notifiers: [good]
        - name: terminate
          action: {name: test:raise}
          notifiers: [good]
        """,
        metrics=metrics,
    )
    event = make_event(uuid="ev-doomed")
    for _ in range(2):  # two deliveries that failed temporarily: nothing said, nothing counted
        run = await pipeline.process(event, redelivery=True)
        assert [s.rule.name for s in run.failed_temporarily] == ["terminate"]
    assert (await delivered(pipeline, receiver))["good"] == []
    assert b"falco_talon_events_processed_total{" not in metrics.render()

    pipeline.give_up(event, GIVEN_UP, run=run, deliveries=3)
    # every result of the last delivery, the one that failed temporarily as given up
    assert (await delivered(pipeline, receiver))["good"] == [
        {
            "rule": "label",
            "action": "test:first",
            "outcome": "succeeded",
            "reason": "",
            "output": {},
            "event": "ev-doomed",
        },
        {
            "rule": "terminate",
            "action": "test:raise",
            "outcome": "given-up",
            "reason": GIVEN_UP + " (last error: apiserver unreachable (after 3 attempts))",
            "output": {"deliveries": 3},
            "event": "ev-doomed",
        },
    ]


async def test_without_redelivery_a_temporary_failure_is_notified_as_failed_at_once(
    receiver: tuple[Receiver, str],
    make_pipeline: MakePipeline,
    make_event: Callable[..., FalcoEvent],
) -> None:
    pipeline = make_pipeline(
        """
        - name: terminate
          match: {rules: [Terminal shell in container]}
          action: {name: test:raise}
          notifiers: [good]
        - name: refused
          match: {rules: [Refused]}
          action: {name: test:fail}
          notifiers: [good]
        """
    )
    await pipeline.process(make_event(uuid="ev-embedded"))  # the embedded in-memory queue
    # a permanent failure is final even when the queue could redeliver
    await pipeline.process(make_event(uuid="ev-refused", rule="Refused"), redelivery=True)
    got = (await delivered(pipeline, receiver))["good"]
    assert [(b["event"], b["rule"], b["outcome"]) for b in got] == [
        ("ev-embedded", "terminate", "failed"),
        ("ev-refused", "refused", "failed"),
    ]


async def test_an_event_whose_runs_never_finished_is_given_up_for_each_step_its_rules_plan(
    receiver: tuple[Receiver, str],
    make_pipeline: MakePipeline,
    recorder: Recorder,
    make_event: Callable[..., FalcoEvent],
) -> None:
    pipeline = make_pipeline(
        """
        - name: label first
          action: {name: test:first}
          notifiers: [good]
        - name: terminate
          action: {name: test:stop}
          notifiers: [good]
        - name: superseded
          action: {name: test:record}
          notifiers: [good]
        - name: elsewhere
          match: {rules: [Something else]}
          action: {name: test:record}
          notifiers: [good]
        """,
        default_notifiers=("flaky",),
    )
    pipeline.give_up(make_event(uuid="ev-poison"), GIVEN_UP, deliveries=3)
    bodies = await delivered(pipeline, receiver)
    assert recorder.calls == []  # planned, not run again
    expected = [
        ("label first", "test:first", "given-up", GIVEN_UP, "ev-poison"),
        ("terminate", "test:stop", "given-up", GIVEN_UP, "ev-poison"),
    ]
    for name in ("good", "flaky"):  # the rule's notifiers plus the default notifiers
        got = [
            (b["rule"], b["action"], b["outcome"], b["reason"], b["event"]) for b in bodies[name]
        ]
        assert got == expected, name


async def test_an_event_given_up_that_no_rule_matches_is_reported_to_the_default_notifiers(
    receiver: tuple[Receiver, str],
    make_pipeline: MakePipeline,
    make_event: Callable[..., FalcoEvent],
) -> None:
    pipeline = make_pipeline(
        """
        - name: elsewhere
          match: {rules: [Something else]}
          action: {name: test:record}
          notifiers: [flaky]
        """,
        default_notifiers=("good",),
    )
    pipeline.give_up(make_event(uuid="ev-lost"), GIVEN_UP, deliveries=3)
    bodies = await delivered(pipeline, receiver)
    assert bodies["good"] == [
        {
            "rule": "",
            "action": "",
            "outcome": "given-up",
            "reason": GIVEN_UP,
            "output": {"deliveries": 3},
            "event": "ev-lost",
        }
    ]
    assert bodies["flaky"] == []
