"""The Slack notifier, posting to a real local HTTP receiver in place of Slack's webhook."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.config import load_settings, notifier_settings, redacted
from engine.contract.errors import ConfigError, PermanentError, TemporaryError
from engine.contract.notifiers import NOTIFIERS
from engine.contract.results import Outcome
from notifiers import slack
from tests.notifiers.conftest import TRACE_ID, MakeNote, Receiver, Reply, configured

SECRET_PATH = "/services/T0000/B0000/XXXXsecretXXXX"
EVENT_OUTPUT = "14:02:56.119: Warning A shell was spawned in a container (user=root k8s.ns=demo)"


def settings(receiver: Receiver, **changes: Any) -> dict[str, Any]:
    return configured("slack", {"webhookurl": receiver.url(SECRET_PATH), **changes})


def texts(body: dict[str, Any]) -> list[str]:
    """Every mrkdwn text of the attachment's blocks, in order."""
    out = []
    for block in body["attachments"][0]["blocks"]:
        out += [f["text"] for f in block.get("fields", [])]
        if "text" in block:
            out.append(block["text"]["text"])
        out += [e["text"] for e in block.get("elements", [])]
    return out


async def test_the_long_format_posts_the_headline_and_the_fields_in_a_coloured_attachment(
    receiver: Receiver, make_note: MakeNote
) -> None:
    note = make_note(output={"stdout": "uid=0(root)", "exit": 0})
    await slack.send(note, settings(receiver))

    [request] = receiver.requests
    assert (request.method, request.path) == ("POST", SECRET_PATH)
    assert request.headers["Content-Type"] == "application/json"
    body = request.json
    assert body["text"] == "succeeded: kubernetes:terminate (Rule Terminate)"
    assert body["username"] == "Falco Talon"
    assert body["icon_url"].endswith("/Circaetus_gallicus_claw.png")
    [attachment] = body["attachments"]
    assert attachment["color"] == "#2eb886"
    assert texts(body) == [
        "*Rule*\nRule Terminate",
        "*Action*\nkubernetes:terminate",
        "*Outcome*\nsucceeded",
        "*Pod*\nweb-7d4b9c7f5d-x2x8k",
        "*Namespace*\ndemo",
        "*Falco rule*\nTerminal shell in container",
        "*Priority*\nWarning",
        f"*Trace id*\n{TRACE_ID}",
        "*Event id*\nev-1",
        f"*Event output*\n```{EVENT_OUTPUT}```",
        "*Output*\n```stdout: uid=0(root)\nexit: 0```",
        "https://github.com/falco-talon/falco-talon",
    ]
    assert attachment["blocks"][-1]["type"] == "context"


@pytest.mark.parametrize(
    ("outcome", "colour", "reason_label"),
    [
        (Outcome.SUCCEEDED, "#2eb886", "Reason"),
        (Outcome.FAILED, "#d50200", "Error"),
        (Outcome.SKIPPED, "#9e9e9e", "Reason"),
        (Outcome.PLANNED, "#e0a100", "Reason"),
        (Outcome.GIVEN_UP, "#7a0000", "Error"),
    ],
)
async def test_each_outcome_has_its_colour_and_a_failure_shows_its_reason_as_the_error(
    receiver: Receiver, make_note: MakeNote, outcome: Outcome, colour: str, reason_label: str
) -> None:
    await slack.send(make_note(outcome, reason="the pod refused"), settings(receiver))
    body = receiver.bodies[0]
    assert body["text"].startswith(f"{outcome.value}: kubernetes:terminate")
    assert body["attachments"][0]["color"] == colour
    assert f"*{reason_label}*\nthe pod refused" in texts(body)


async def test_the_short_format_is_the_headline_and_one_line_of_details(
    receiver: Receiver, make_note: MakeNote
) -> None:
    note = make_note(Outcome.FAILED, reason="pods is forbidden")
    await slack.send(note, settings(receiver, format="short", username="", icon=""))
    body = receiver.bodies[0]
    assert body == {
        "text": "failed: kubernetes:terminate (Rule Terminate)",
        "attachments": [
            {
                "color": "#d50200",
                "blocks": [
                    {
                        "type": "context",
                        "elements": [
                            {
                                "type": "mrkdwn",
                                "text": "Terminal shell in container (Warning) · "
                                "pod demo/web-7d4b9c7f5d-x2x8k · pods is forbidden",
                            }
                        ],
                    }
                ],
            }
        ],
    }


async def test_text_from_events_and_actions_is_escaped_for_slack_mrkdwn(
    receiver: Receiver, make_note: MakeNote
) -> None:
    note = make_note(
        Outcome.FAILED,
        reason="<!channel> & <https://evil.example|click>",
        output={"stdout": "<@U123> ran ``` here"},
        rule="Rule <b>",
    )
    await slack.send(note, settings(receiver))
    body = receiver.bodies[0]
    assert body["text"] == "failed: kubernetes:terminate (Rule &lt;b&gt;)"
    assert "*Error*\n&lt;!channel&gt; &amp; &lt;https://evil.example|click&gt;" in texts(body)
    assert "*Output*\n```stdout: &lt;@U123&gt; ran ``\u200b` here```" in texts(body)
    raw = json.dumps(body)
    assert "<!channel>" not in raw and "<@U123>" not in raw and "<https" not in raw


async def test_values_longer_than_slack_allows_are_clipped(
    receiver: Receiver, make_note: MakeNote
) -> None:
    await slack.send(make_note(reason="y" * 5000), settings(receiver))
    error = next(t for t in texts(receiver.bodies[0]) if t.startswith("*Reason*"))
    assert len(error) <= 3000 and error.endswith("y…")


async def test_a_429_is_a_temporary_error_with_slacks_retry_after_as_the_delay(
    receiver: Receiver, make_note: MakeNote
) -> None:
    receiver.script = [Reply(429, "rate_limited", {"Retry-After": "7"})]
    with pytest.raises(TemporaryError) as caught:
        await slack.send(make_note(), settings(receiver))
    assert caught.value.delay == 7.0
    assert str(caught.value) == f"{receiver.base} answered 429 Too Many Requests: rate_limited"


async def test_a_rejected_payload_is_a_permanent_error_naming_only_the_host(
    receiver: Receiver, make_note: MakeNote
) -> None:
    receiver.script = [Reply(400, "invalid_payload")]
    with pytest.raises(PermanentError) as caught:
        await slack.send(make_note(), settings(receiver))
    assert str(caught.value) == f"{receiver.base} answered 400 Bad Request: invalid_payload"
    assert "XXXXsecretXXXX" not in str(caught.value)


async def test_a_slack_outage_is_a_temporary_error(receiver: Receiver, make_note: MakeNote) -> None:
    receiver.script = [Reply(503, "")]
    with pytest.raises(TemporaryError, match=r"answered 503 Service Unavailable$"):
        await slack.send(make_note(), settings(receiver))


def test_settings_come_from_the_environment_with_defaults_and_the_url_kept_secret(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("notifiers:\n  slack:\n    format: short\n")
    url = "https://hooks.slack.com" + SECRET_PATH
    loaded = load_settings(str(config), NOTIFIERS, env={"NOTIFIERS_SLACK_WEBHOOKURL": url})
    assert notifier_settings(loaded, NOTIFIERS)["slack"] == {
        "webhookurl": url,
        "icon": "https://upload.wikimedia.org/wikipedia/commons/2/26/Circaetus_gallicus_claw.png",
        "username": "Falco Talon",
        "footer": "https://github.com/falco-talon/falco-talon",
        "format": "short",
    }
    assert redacted(loaded, NOTIFIERS)["notifiers"]["slack"]["webhookurl"] == "********"
    with pytest.raises(ConfigError, match="'webhookurl' is a required property"):
        load_settings(str(config), NOTIFIERS, env={})
    with pytest.raises(ConfigError, match="'medium' is not one of"):
        load_settings(str(config), NOTIFIERS, env={"NOTIFIERS_SLACK_FORMAT": "medium"})


async def test_an_event_given_up_that_no_rule_matched_is_headed_by_its_falco_rule(
    receiver: Receiver, make_note: MakeNote
) -> None:
    why = "given up after 3 deliveries: moved to falco-talon.events.dead"
    note = make_note(Outcome.GIVEN_UP, why, {"deliveries": 3}, rule="", action="")
    await slack.send(note, settings(receiver, format="short"))
    await slack.send(note, settings(receiver))
    short, long = receiver.bodies
    assert short["text"] == long["text"] == "given-up: event (Terminal shell in container)"
    assert (
        texts(short)[0]
        == f"Terminal shell in container (Warning) · pod demo/web-7d4b9c7f5d-x2x8k · {why}"
    )
    shown = texts(long)
    assert "*Outcome*\ngiven-up" in shown and f"*Error*\n{why}" in shown
    assert not any(t.startswith(("*Rule*", "*Action*")) for t in shown)
