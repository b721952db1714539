"""jsonschema validation errors in words a person can act on: the one place that says them.

The config loader (``engine.config``) and the rules loader (``engine.rules``) both validate
YAML against a JSON Schema and report each error at its ``FILE:LINE:COLUMN``; this module
turns one ``jsonschema.ValidationError`` into the message(s). The two keep their own
wording (pinned by tests and documented in the README): a config error names the offending
value's type and suggests the closest key; a rules error shows the value as YAML and lists
the allowed keys, preferring the schema's own ``errorMessage``.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

import jsonschema

Problem = tuple[tuple[Any, ...], str]
"""(JSON path, message)."""


def _allowed(err: jsonschema.ValidationError) -> list[str]:
    return list(err.schema.get("properties", {}) if isinstance(err.schema, dict) else ())


def _expected(err: jsonschema.ValidationError) -> str:
    expected = err.validator_value
    return " or ".join(expected) if isinstance(expected, list) else str(expected)


def show(value: Any) -> str:
    """A value as the user wrote it in YAML: ``true``, ``null``, ``'text'``, ``3``."""
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, (dict, list)):
        return "an object" if isinstance(value, dict) else "a list"
    return json.dumps(value)


def config_problems(err: jsonschema.ValidationError) -> list[Problem]:
    """A config error: (path, message) pairs; an unknown key is reported at the key, with
    the closest allowed key suggested."""
    path = tuple(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = _allowed(err)
        out = []
        for extra in sorted(set(err.instance) - set(allowed)):
            close = difflib.get_close_matches(extra, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
            out.append(((*path, extra), f"unknown key {extra!r}{hint}"))
        return out
    if err.validator == "type":
        return [
            (path, f"must be {_expected(err)}, got {type(err.instance).__name__} {err.instance!r}")
        ]
    custom = err.schema.get("errorMessage") if isinstance(err.schema, dict) else None
    if custom and err.validator == "pattern" and path:
        # Said in words (the schema's errorMessage) instead of the bare regular expression.
        return [(path, f"{path[-1]} {custom}, got {err.instance!r}")]
    return [(path, err.message)]


def rule_problems(err: jsonschema.ValidationError) -> list[tuple[tuple[Any, ...], str, bool]]:
    """A rules error as (path, message, at_key) triples: an unknown key is one error per
    key, reported at the key itself (``at_key``), not at the mapping that holds it."""
    path = tuple(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(_allowed(err))
        shown = ", ".join(allowed) or "none"
        return [
            ((*path, extra), f"unknown key {extra!r}; allowed: {shown}", True)
            for extra in sorted(set(err.instance) - set(allowed), key=str)
        ]
    return [(path, rule_message(err), False)]


def rule_message(err: jsonschema.ValidationError) -> str:
    """A rules error, preferring the schema's own ``errorMessage``."""
    custom = err.schema.get("errorMessage") if isinstance(err.schema, dict) else None
    if custom and err.validator in ("not", "anyOf"):  # a rule on the object's keys as a whole
        return str(custom)
    if custom and err.validator in ("pattern", "enum", "propertyNames", "type", "minimum"):
        return f"{show(err.instance)} {custom}"
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = sorted(_allowed(err))
        extra = sorted(set(err.instance) - set(allowed))
        return (
            f"unknown key(s) {', '.join(map(repr, extra))}; allowed: {', '.join(allowed) or 'none'}"
        )
    if err.validator == "required":
        return str(err.message).replace("is a required property", "is required")
    if err.validator == "type":
        return f"{show(err.instance)} must be {_expected(err)}"
    return str(err.message)
