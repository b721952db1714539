"""The Slack notifier: each action result as a message to an incoming webhook.

Position in the flow: ... -> actionners -> **notifiers** (the last stage).

The message's top-level ``text`` is the headline (``succeeded: kubernetes:terminate (Rule
Terminate)``): Slack shows it first and phones use it for the notification. Below it, one
attachment, there only for the colour bar of the outcome, holds Block Kit blocks: with
``format: long`` a grid of fields, the event output and the reason or output in code
blocks, and the footer; with ``format: short`` one line of details. With ``traceUrl`` set,
the trace id (long) or a ``trace`` link (short) opens the event's trace. Text from events and
actions is escaped for Slack mrkdwn (``&``, ``<``, ``>``), so an event cannot mention
``@channel`` or forge a link. Delivery and its errors are
:meth:`notifiers.webhook.HttpClient.post_json`'s: a 429 becomes a ``TemporaryError`` with
Slack's ``Retry-After`` as the delay.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.contract.notifiers import Notification, notifier
from notifiers import message
from notifiers.webhook import HttpClient

SETTINGS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["webhookurl"],
    "properties": {
        "webhookurl": {
            "x-v03": "webhook_url",
            "type": "string",
            "pattern": "^https?://",
            "description": "The incoming webhook URL (secret).",
        },
        "icon": {
            "type": "string",
            "default": "https://upload.wikimedia.org/wikipedia/commons/2/26/Circaetus_gallicus_claw.png",
            "description": "URL of the avatar shown with the message; empty: the app's own.",
        },
        "username": {
            "type": "string",
            "default": "Falco Talon",
            "description": "Name shown as the sender; empty: the app's own.",
        },
        "footer": {
            "type": "string",
            "default": "https://github.com/falco-talon/falco-talon",
            "description": "Small text under long messages; empty: none.",
        },
        "format": {
            "type": "string",
            "enum": ["long", "short"],
            "default": "long",
            "description": "long: headline, fields and event output; short: headline and one line.",
        },
    },
}

FIELD_LIMIT = 2000
"""Characters of one section field; a section's text may hold 3000."""
TEXT_LIMIT = 2900


def escape(text: str) -> str:
    """Text safe inside Slack mrkdwn: the three control characters as entities."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def link(url: str, text: str) -> str:
    """A Slack mrkdwn link ``<url|text>``, both parts escaped (``|`` would end the URL)."""
    return f"<{escape(url).replace('|', '%7C')}|{escape(text)}>"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _mrkdwn(text: str) -> dict[str, str]:
    return {"type": "mrkdwn", "text": text}


def _section(field: message.Field) -> dict[str, Any]:
    value = _clip(field.value, TEXT_LIMIT - len(field.label) - 16)
    if field.kind == "code":
        # Three backticks would close the block early: break them with a zero-width space.
        value = "```" + escape(value).replace("```", "``\u200b`") + "```"
    else:
        value = escape(value)
    return {"type": "section", "text": _mrkdwn(f"*{field.label}*\n{value}")}


def _grid_value(field: message.Field) -> str:
    if field.link:
        return link(field.link, field.value)
    return escape(_clip(field.value, FIELD_LIMIT - len(field.label) - 4))


def _long_blocks(note: Notification, footer: str) -> list[dict[str, Any]]:
    fields = message.fields(note)
    grid = [_mrkdwn(f"*{f.label}*\n{_grid_value(f)}") for f in fields if f.kind == "short"]
    blocks: list[dict[str, Any]] = [
        {"type": "section", "fields": grid[i : i + 10]} for i in range(0, len(grid), 10)
    ]
    blocks += [_section(f) for f in fields if f.kind != "short"]
    if footer:
        blocks.append({"type": "context", "elements": [_mrkdwn(escape(footer))]})
    return blocks


def payload(note: Notification, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body posted to the webhook."""
    opts = settings
    if opts["format"] == "short":
        elements = [_mrkdwn(escape(_clip(message.details(note), TEXT_LIMIT)))]
        if note.trace_url:
            elements.append(_mrkdwn(link(note.trace_url, "trace")))
        blocks = [{"type": "context", "elements": elements}]
    else:
        blocks = _long_blocks(note, opts["footer"])
    body: dict[str, Any] = {
        "text": escape(message.headline(note)),
        "attachments": [{"color": message.COLOURS[note.result.outcome], "blocks": blocks}],
    }
    if opts["username"]:
        body["username"] = opts["username"]
    if opts["icon"]:
        body["icon_url"] = opts["icon"]
    return body


CLIENT = HttpClient()


@notifier(
    "slack",
    description="Post each action result to a Slack incoming webhook.",
    settings=SETTINGS,
    secrets=("webhookurl",),
    close=CLIENT.close,
)
async def send(note: Notification, settings: Mapping[str, Any]) -> None:
    await CLIENT.post_json(settings["webhookurl"], payload(note, settings))
