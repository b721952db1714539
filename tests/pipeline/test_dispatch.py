"""The notification dispatcher, against real local HTTP receivers.

The notifier here is a test-only one (the real Slack/SMTP/webhook notifiers come with
their own tests); it POSTs each notification to a receiver that records, fails, or hangs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
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
