"""The real notifiers driven by the engine's dispatcher: retries honour Slack's Retry-After;
a receiver that is down or hangs fails for good (logged with the event id) without delaying
events or the other notifiers; no secret ever reaches a log or an error; and an event
posted to the HTTP server reaches every receiver once per action, in the order the actions
ran."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from engine.config import check_notifiers, load_settings, notifier_settings
from engine.contract.actionners import ActionnerRegistry
from engine.contract.errors import TalonError
from engine.contract.event import FalcoEvent
from engine.contract.notifiers import NOTIFIERS
from engine.contract.retry import RetryPolicy
from engine.notify import DeliveryPolicy, Dispatcher
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from engine.server import Service, create_app
from notifiers import slack, smtp, webhook
from tests.conftest import FALCO_EVENT
from tests.notifiers.conftest import (
    SMTP_PASSWORD,
    SMTP_USER,
    Certs,
    MakeNote,
    MakeReceiver,
    Receiver,
    Reply,
    StartSmtp,
    configured,
)

SLACK_PATH = "/services/T0000/B0000/slackSECRETslack"


def smtp_settings(port: int, certs: Certs, **changes: Any) -> dict[str, Any]:
    """Only what the user writes in the config (defaults are the config's to fill)."""
    return {
        "hostport": f"127.0.0.1:{port}",
        "user": SMTP_USER,
        "password": SMTP_PASSWORD,
        "from": "talon@example.com",
        "to": "oncall@example.com",
        "cafile": certs.cafile,
        **changes,
    }


async def test_a_429_is_retried_after_slacks_retry_after_then_delivered(
    receiver: Receiver, make_note: MakeNote
) -> None:
    receiver.script = [Reply(429, "rate_limited", {"Retry-After": "1"})]
    dispatcher = Dispatcher(
        NOTIFIERS,
        {"slack": configured("slack", {"webhookurl": receiver.url(SLACK_PATH)})},
        DeliveryPolicy(timeout=5, retry=RetryPolicy(attempts=3, backoff=0.01)),
    )
    started = time.monotonic()
    assert await dispatcher.deliver("slack", make_note())
    waited = time.monotonic() - started

    assert len(receiver.requests) == 2
    assert receiver.bodies[0] == receiver.bodies[1]
    assert 0.9 <= waited < 3  # Slack's 1 s, not the policy's 0.01 s
    assert dispatcher.stats == {("slack", "retried"): 1, ("slack", "delivered"): 1}


async def test_a_down_and_a_hanging_receiver_fail_for_good_without_delaying_anything_else(
    make_receiver: MakeReceiver,
    closed_port: int,
    start_smtp: StartSmtp,
    certs: Certs,
    registry: ActionnerRegistry,
    load_rules: Callable[..., RuleSet],
    make_event: Callable[..., FalcoEvent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    hanging: Receiver = await make_receiver()
    hanging.script = [Reply(delay=30) for _ in range(10)]
    mail = start_smtp("starttls", auth=True)
    rules = """
    - name: isolate
      action: {name: test:first}
      notifiers: [slack, webhook, smtp]
    - name: label
      action: {name: test:record}
      notifiers: [slack, webhook, smtp]
    """
    settings = {
        "slack": configured("slack", {"webhookurl": hanging.url(SLACK_PATH)}),
        "webhook": configured("webhook", {"url": f"http://127.0.0.1:{closed_port}/hook"}),
        "smtp": configured("smtp", smtp_settings(mail.port, certs)),
    }
    dispatcher = Dispatcher(
        NOTIFIERS,
        # 0.5 s: long enough for a TLS handshake on a loaded 2-core machine, far below the
        # receivers' 30 s hang.
        settings,
        DeliveryPolicy(timeout=0.5, retry=RetryPolicy(attempts=2, backoff=0.01)),
    )
    pipeline = Pipeline(load_rules(rules, notifiers=NOTIFIERS), registry, dispatcher=dispatcher)
    with caplog.at_level(logging.WARNING, "falco_talon.notify"):
        for i in range(2):
            # Handling an event never waits for its notifications.
            await asyncio.wait_for(pipeline.process(make_event(uuid=f"ev-{i}")), 0.15)
        await dispatcher.drain(10)
    await dispatcher.close()

    bodies = [m.get_body(("plain",)) for m in mail.mailbox.messages]
    texts = [b.get_content() for b in bodies if b is not None]
    assert [(t.split("\n")[0], t.split("Event id:")[1].split()[0]) for t in texts] == [
        ("succeeded: test:first (isolate)", "ev-0"),
        ("succeeded: test:record (label)", "ev-0"),
        ("succeeded: test:first (isolate)", "ev-1"),
        ("succeeded: test:record (label)", "ev-1"),
    ]
    assert len(hanging.requests) == 8  # 4 notifications, 2 attempts each
    assert dispatcher.stats[("smtp", "delivered")] == 4
    assert dispatcher.stats[("slack", "failed")] == dispatcher.stats[("webhook", "failed")] == 4
    finals = [r for r in caplog.records if "failed for good" in r.getMessage()]
    by_notifier: dict[str, list[tuple[str, str]]] = {}
    for r in finals:
        f = r.fields  # type: ignore[attr-defined]
        by_notifier.setdefault(f["notifier"], []).append((f["event_id"], f["rule"]))
    expected = [("ev-0", "isolate"), ("ev-0", "label"), ("ev-1", "isolate"), ("ev-1", "label")]
    assert by_notifier == {"slack": expected, "webhook": expected}
    assert {r.getMessage().split(": ", 1)[1] for r in finals} == {
        "timed out after 0.5s",
        f"http://127.0.0.1:{closed_port}: cannot connect: Connect call failed "
        f"('127.0.0.1', {closed_port})",
    }


async def test_secret_settings_never_appear_in_logs_or_errors_when_sends_fail(
    make_receiver: MakeReceiver,
    start_smtp: StartSmtp,
    certs: Certs,
    make_note: MakeNote,
    caplog: pytest.LogCaptureFixture,
) -> None:
    token, header, wrong_password = "qTOKENq1234", "hEADERh5678", "pASSWORDp9012"
    echo: Receiver = await make_receiver()
    # Receivers that echo what they got: every secret is in the answers' bodies.
    echo.script = [
        Reply(500, f"no luck for {SLACK_PATH}"),
        Reply(404, f"no_service {SLACK_PATH}"),
        Reply(503, f"token={token} auth={header}"),
        Reply(401, f"bad token {token}, bad header Bearer {header}"),
    ]
    mail = start_smtp("starttls", auth=True)
    settings: dict[str, dict[str, Any]] = {
        "slack": configured("slack", {"webhookurl": echo.url(SLACK_PATH)}),
        "webhook": configured(
            "webhook",
            {
                "url": echo.url(f"/hook?token={token}"),
                "headers": {"Authorization": f"Bearer {header}"},
            },
        ),
        "smtp": configured("smtp", smtp_settings(mail.port, certs, password=wrong_password)),
    }
    secrets = [SLACK_PATH.rsplit("/", 1)[1], token, header, wrong_password]
    dispatcher = Dispatcher(
        NOTIFIERS, settings, DeliveryPolicy(timeout=2, retry=RetryPolicy(attempts=2, backoff=0.01))
    )
    errors: list[str] = []
    with caplog.at_level(logging.DEBUG):
        for name in ("slack", "webhook", "smtp"):
            assert not await dispatcher.deliver(name, make_note())
        own = {"slack": SLACK_PATH, "webhook": f"{token} {header}", "smtp": ""}
        for name, module in (("slack", slack), ("webhook", webhook), ("smtp", smtp)):
            echo.script = [Reply(500, own[name])]
            with pytest.raises(TalonError) as caught:
                await module.send(make_note(), settings[name])
            errors.append(str(caught.value))

    receivers = ("mail.log", "aiohttp.access", "aiohttp.server", "aiohttp.web")  # the tests'
    ours = [r for r in caplog.records if r.name not in receivers]
    assert {name: dispatcher.stats[(name, "failed")] for name in settings} == {
        "slack": 1,
        "webhook": 1,
        "smtp": 1,
    }
    assert len([r for r in ours if "failed for good" in r.getMessage()]) == 3
    formatter = logging.Formatter("%(message)s %(fields)s", defaults={"fields": ""})
    shown = [formatter.format(r) + repr(r.__dict__) for r in ours] + errors
    leaks = [(s, text) for text in shown for s in secrets if s in text]
    assert leaks == []


async def test_an_event_through_the_server_reaches_every_receiver_once_per_action_in_order(
    aiohttp_client: Any,
    make_receiver: MakeReceiver,
    start_smtp: StartSmtp,
    certs: Certs,
    registry: ActionnerRegistry,
    load_rules: Callable[..., RuleSet],
    tmp_path: Path,
) -> None:
    chat: Receiver = await make_receiver()
    hook: Receiver = await make_receiver()
    mail = start_smtp("starttls", auth=True)
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            {
                "defaultNotifiers": ["webhook", "smtp"],
                "notifiers": {
                    "slack": {"webhookurl": chat.url(SLACK_PATH), "format": "short"},
                    "webhook": {"url": hook.url("/talon")},
                    "smtp": smtp_settings(mail.port, certs, format="text"),
                },
            }
        )
    )
    settings = load_settings(str(config), NOTIFIERS, env={})
    # File order is not run order: "isolate" runs first because test:first is before: true.
    rules = load_rules(
        """
        - name: label
          action: {name: test:record}
          notifiers: [slack, webhook]
        - name: refuse
          action: {name: test:fail}
          notifiers: [slack]
        - name: isolate
          action: {name: test:first}
          notifiers: [slack, webhook]
        """,
        notifiers=NOTIFIERS,
    )
    check_notifiers(settings, NOTIFIERS, {n for r in rules.rules for n in r.notifiers})
    dispatcher = Dispatcher(
        NOTIFIERS,
        notifier_settings(settings, NOTIFIERS),
        DeliveryPolicy(timeout=5, retry=RetryPolicy(attempts=2, backoff=0.01)),
    )
    pipeline = Pipeline(
        rules,
        registry,
        dispatcher=dispatcher,
        default_notifiers=tuple(settings.notifications.default_notifiers),
    )
    service = Service(pipeline)
    await service.start()
    try:
        client = await aiohttp_client(create_app(service))
        resp = await client.post("/", json=FALCO_EVENT)
        assert resp.status == 202
        event_id = (await resp.json())["id"]
        await service.queue.join()
        await dispatcher.drain(10)
    finally:
        await service.stop()

    runs = [
        "succeeded: test:first (isolate)",
        "succeeded: test:record (label)",
        "failed: test:fail (refuse)",
    ]
    assert [b["text"] for b in chat.bodies] == runs
    assert [f"{b['status']}: {b['action']} ({b['rule']})" for b in hook.bodies] == runs
    assert {b["event_id"] for b in hook.bodies} == {event_id}
    assert [m["Subject"] for m in mail.mailbox.messages] == [f"[falco-talon] {r}" for r in runs]
    assert dispatcher.stats == {(name, "delivered"): 3 for name in ("slack", "webhook", "smtp")}
