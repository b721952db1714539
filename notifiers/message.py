"""What a notification says, whatever carries it: a headline, labelled fields, one line.

Position in the flow: ... -> actionners -> **notifiers** (the last stage). The Slack and
SMTP notifiers render the same :class:`~engine.contract.notifiers.Notification` into their own
markup from what this module extracts, so both show the same facts in the same order.
Values are plain text here; each notifier escapes them for its own markup.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from engine.contract.notifiers import Notification
from engine.contract.results import Outcome

Kind = Literal["short", "text", "code"]

COLOURS = {
    Outcome.SUCCEEDED: "#2eb886",
    Outcome.FAILED: "#d50200",
    Outcome.SKIPPED: "#9e9e9e",
    Outcome.PLANNED: "#e0a100",
    Outcome.GIVEN_UP: "#7a0000",
}
"""The colour of each outcome: green, red, grey, yellow, dark red."""


@dataclass(frozen=True, slots=True)
class Field:
    """One labelled fact of a notification."""

    label: str
    value: str
    kind: Kind = "short"
    """``short``: fits a grid cell; ``text``: a paragraph; ``code``: preformatted."""
    link: str = ""
    """Where the value links to (the trace id to its trace, see ``traceUrl``); empty: nowhere."""


def headline(note: Notification) -> str:
    """``succeeded: kubernetes:terminate (Rule Terminate)``; for an event given up that no
    rule matches, ``given-up: event (Terminal shell in container)`` (the Falco rule)."""
    if not note.rule:
        return f"{note.result.outcome.value}: event ({note.event.rule})"
    return f"{note.result.outcome.value}: {note.action} ({note.rule})"


def subject(note: Notification) -> str:
    """An e-mail subject: ``[falco-talon] succeeded: kubernetes:terminate (Rule Terminate)``."""
    return f"[falco-talon] {headline(note)}"


def output_text(output: dict[str, object]) -> str:
    """The action's output dict as ``key: value`` lines (non-text values as JSON)."""
    lines = []
    for key, value in output.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        lines.append(f"{key}: {text}")
    return "\n".join(lines)


def fields(note: Notification) -> list[Field]:
    """Every fact worth showing, in display order; empty ones are left out."""
    result, event = note.result, note.event
    target = result.target
    reason_label = "Error" if result.outcome.is_failure else "Reason"
    candidates = [
        Field("Rule", note.rule),
        Field("Action", note.action),
        Field("Outcome", result.outcome.value),
        Field("Pod", target.pod or ""),
        Field("Namespace", target.namespace or ""),
        Field("Falco rule", event.rule),
        Field("Priority", event.priority),
        Field("Trace id", note.trace_id, link=note.trace_url),
        Field("Event id", event.id),
        Field("Event output", event.output, "code"),
        Field(reason_label, result.reason, "text"),
        Field("Output", output_text(result.output), "code"),
    ]
    return [f for f in candidates if f.value]


def details(note: Notification) -> str:
    """The essentials after the headline, on one line: what Falco saw, where, and why."""
    target = note.result.target
    parts = [f"{note.event.rule} ({note.event.priority})"]
    if target.pod or target.namespace:
        parts.append(f"pod {target.namespace or '-'}/{target.pod or '-'}")
    if note.result.reason:
        parts.append(note.result.reason)
    return " · ".join(p.replace("\n", " ") for p in parts)
