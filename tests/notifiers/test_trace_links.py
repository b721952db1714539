"""``traceUrl``: every notifier links its notification to the event's trace.

An event posted to the real HTTP server with a ``traceparent`` reaches real Slack-style and
webhook receivers and an SMTP server, each carrying the link built from the configured
template; spans go to OpenTelemetry's in-memory exporter so the trace is a recorded one.
The setting is validated at load time, from the file and from the environment."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from engine.config import check_notifiers, load_settings, notifier_settings
from engine.contract.actionners import ActionnerRegistry
from engine.contract.errors import ConfigError
from engine.contract.notifiers import NOTIFIERS
from engine.contract.retry import RetryPolicy
from engine.notify import DeliveryPolicy, Dispatcher
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from engine.server import Service, create_app
from notifiers import slack, smtp, webhook
from observability.tracing import Trace, Tracing
from tests.conftest import FALCO_EVENT
from tests.notifiers.conftest import (
    TRACE_ID,
    Certs,
    MakeNote,
    MakeReceiver,
    Receiver,
    StartSmtp,
    configured,
)
from tests.notifiers.test_delivery import smtp_settings
from tests.notifiers.test_slack import texts

TEMPLATE = "https://jaeger.example.com/trace/{trace_id}?uiFind=talon&x=1"
LINK = f"https://jaeger.example.com/trace/{TRACE_ID}?uiFind=talon&x=1"


async def test_an_event_with_a_recorded_trace_links_to_it_in_every_notifier(
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
                "defaultNotifiers": ["slack", "webhook", "smtp"],
                "traceUrl": TEMPLATE,
                "notifiers": {
                    "slack": {"webhookurl": chat.url("/services/T/B/x")},
                    "webhook": {"url": hook.url("/talon")},
                    "smtp": smtp_settings(mail.port, certs),
                },
            }
        )
    )
    settings = load_settings(str(config), NOTIFIERS, env={})
    assert settings.notifications.trace_url == TEMPLATE
    rules = load_rules("- name: label\n  action: {name: test:record}\n", notifiers=NOTIFIERS)
    check_notifiers(settings, NOTIFIERS, set())
    exporter = InMemorySpanExporter()
    tracing = Tracing(exporter=exporter, flush_interval=0.05)
    dispatcher = Dispatcher(
        NOTIFIERS,
        notifier_settings(settings, NOTIFIERS),
        DeliveryPolicy(timeout=5, retry=RetryPolicy(attempts=2, backoff=0.01)),
        trace_url=settings.notifications.trace_url,
    )
    pipeline = Pipeline(
        rules,
        registry,
        dispatcher=dispatcher,
        default_notifiers=tuple(settings.notifications.default_notifiers),
    )
    service = Service(pipeline, tracing=tracing)
    await service.start()
    try:
        client = await aiohttp_client(create_app(service))
        resp = await client.post(
            "/", json=FALCO_EVENT, headers={"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
        )
        assert resp.status == 202
        await service.queue.join()
        await dispatcher.drain(10)
    finally:
        await service.stop()
    assert {f"{s.context.trace_id:032x}" for s in exporter.get_finished_spans()} == {TRACE_ID}

    [hooked] = hook.bodies
    assert hooked["trace_url"] == LINK
    assert hooked["trace_id"] == TRACE_ID
    [posted] = chat.bodies
    assert f"*Trace id*\n<{LINK.replace('&', '&amp;')}|{TRACE_ID}>" in texts(posted)
    [message] = mail.mailbox.messages
    plain, rich = message.iter_parts()
    assert f"Trace id:     {TRACE_ID} <{LINK}>\n" in plain.get_content()  # type: ignore[attr-defined]
    assert f'<a href="{LINK.replace("&", "&amp;")}">{TRACE_ID}</a>' in rich.get_content()  # type: ignore[attr-defined]


def test_the_dispatcher_links_only_recorded_traces() -> None:
    dispatcher = Dispatcher(NOTIFIERS, {}, trace_url=TEMPLATE)
    assert dispatcher.link(TRACE_ID, Trace(int(TRACE_ID, 16), sampled=True)) == LINK
    # Sampled out: nothing was exported, a link would lead nowhere.
    assert dispatcher.link(TRACE_ID, Trace(int(TRACE_ID, 16), sampled=False)) == ""
    assert Dispatcher(NOTIFIERS, {}).link(TRACE_ID, Trace(1, sampled=True)) == ""


async def test_without_a_trace_url_nothing_links(receiver: Receiver, make_note: MakeNote) -> None:
    note = make_note()
    assert note.trace_url == ""
    await webhook.send(note, configured("webhook", {"url": receiver.url("/hook")}))
    await slack.send(note, configured("slack", {"webhookurl": receiver.url("/slack")}))
    hooked, posted = receiver.bodies
    assert "trace_url" not in hooked
    assert f"*Trace id*\n{TRACE_ID}" in texts(posted)
    assert "<a " not in smtp.html_body(note)
    assert f"Trace id:     {TRACE_ID}\n" in smtp.text_body(note)


async def test_the_short_slack_format_and_a_text_email_carry_the_link(
    receiver: Receiver, make_note: MakeNote, start_smtp: StartSmtp, certs: Certs
) -> None:
    note = replace(make_note(), trace_url=LINK)
    await slack.send(
        note, configured("slack", {"webhookurl": receiver.url("/s"), "format": "short"})
    )
    [posted] = receiver.bodies
    assert texts(posted)[-1] == f"<{LINK.replace('&', '&amp;')}|trace>"
    server = start_smtp("starttls", auth=True)
    await smtp.send(note, configured("smtp", smtp_settings(server.port, certs, format="text")))
    [message] = server.mailbox.messages
    assert f"Trace id:     {TRACE_ID} <{LINK}>\n" in message.get_content()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "value",
    [
        "ftp://jaeger.example.com/trace/{trace_id}",
        "https://jaeger.example.com/trace/",
        "jaeger.example.com/trace/{trace_id}",
        "https:///{trace_id}",
    ],
)
def test_an_invalid_trace_url_is_a_config_error_naming_the_key(tmp_path: Path, value: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"traceUrl: {json.dumps(value)}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(str(config), NOTIFIERS, env={})
    assert f"{config}:1:11: traceUrl must be an http(s) URL containing {{trace_id}}" in str(
        caught.value
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(None, NOTIFIERS, env={"TRACEURL": value})
    assert "environment TRACEURL: traceUrl must be an http(s) URL containing" in str(caught.value)


def test_the_trace_url_comes_from_the_environment_too() -> None:
    settings = load_settings(None, NOTIFIERS, env={"TRACEURL": TEMPLATE})
    assert settings.notifications.trace_url == TEMPLATE
    assert load_settings(None, NOTIFIERS, env={}).notifications.trace_url == ""
