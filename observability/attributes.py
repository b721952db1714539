"""Span attribute names and sizes: the one rule both export paths apply.

Call sites write attribute names with ``__`` for dots (``talon__rule=...`` for
``talon.rule``, so they can be keyword arguments); string values longer than
:data:`MAX_ATTRIBUTE_LENGTH` are cut. Both the OTLP encoder (``observability.otlp``) and
the SDK conversion (``observability.sdk``) apply these two rules, at export time, off the
per-event path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_ATTRIBUTE_LENGTH = 256
"""Longer string attributes (an event's output) are cut to this many characters."""


def attribute_name(key: str) -> str:
    """``talon__rule`` -> ``talon.rule``."""
    return key.replace("__", ".")


def bounded(text: str) -> str:
    """``text`` cut to :data:`MAX_ATTRIBUTE_LENGTH` characters, ``...`` marking the cut."""
    if len(text) > MAX_ATTRIBUTE_LENGTH:
        return text[: MAX_ATTRIBUTE_LENGTH - 3] + "..."
    return text


def otel_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """Recorded attributes as OTel attributes: names renamed, strings bounded, None left out."""
    return {
        attribute_name(k): bounded(v) if isinstance(v, str) else v
        for k, v in attributes.items()
        if v is not None
    }
