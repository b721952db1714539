"""Falco Talon v0.3 configuration: its snake_case keys and variables, mapped onto ours.

The v0.3 spelling of each key is declared with the key itself: ``v03`` in a settings
field's metadata (``listen_port`` for ``listenPort``, ``otel.traces_enabled`` for
``otel.enabled``) and ``x-v03`` in a notifier setting's schema (``webhook_url`` for
Slack's ``webhookurl``). This module turns a config layer written with them into one
written with today's keys, before validation, so both spellings give the same settings:

* a config file: each v0.3 key is renamed (its position kept for error messages); a file
  that sets one setting under both spellings is an error naming both positions;
* the environment: ``LISTEN_PORT``, ``RULES_FILES`` (whitespace- or comma-separated),
  ``NOTIFIERS_SLACK_WEBHOOK_URL``, ``OTEL_COLLECTOR_ENDPOINT``... become the variables of
  today's keys; both spellings set to different values is an error.

Two v0.3 keys are not renames: ``otel.collector_endpoint`` + ``otel.collector_port`` make
``otel.endpoint`` (``host:port``), and ``otel.metrics_enabled`` is accepted and has no
effect (``/metrics`` is always served).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.config.environment import coerce
from engine.config.settings import aliases
from engine.contract.errors import ConfigError
from engine.contract.notifiers import NotifierRegistry
from engine.sourcemap import Document, PathKey, json_path


def _get(value: Any, path: PathKey) -> tuple[bool, Any]:
    for part in path:
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _move(doc: Document, old: PathKey, new: PathKey, value: Any) -> None:
    """Set ``new`` to ``value``, drop ``old``, and carry the positions of ``old`` over."""
    parent = doc.value
    for part in old[:-1]:
        parent = parent[part]
    del parent[old[-1]]
    parent[new[-1]] = value
    for table in (doc.positions, doc.key_positions):
        for path, pos in list(table.items()):
            if path[: len(old)] == old:
                table.setdefault((*new, *path[len(old) :]), pos)


def normalize_file(doc: Document, notifiers: NotifierRegistry) -> list[str]:
    """Rewrite the v0.3 keys of a loaded config file as today's, in place; the errors
    (a setting given under both spellings) as ``FILE:LINE:COLUMN: message`` lines."""
    if not isinstance(doc.value, dict):
        return []
    errors: list[str] = []
    for alias, canonical, schema in aliases(notifiers):
        found, value = _get(doc.value, alias)
        if not found:
            continue
        if _get(doc.value, canonical)[0]:
            errors.append(_both(doc, alias, canonical))
            continue
        if isinstance(value, str) and schema.get("type") not in ("string", None):
            value = coerce(value, schema)
        _move(doc, alias, canonical, value)
    otel = doc.value.get("otel")
    if isinstance(otel, dict):
        otel.pop("metrics_enabled", None)
        if "collector_endpoint" in otel or "collector_port" in otel:
            if "endpoint" in otel:
                errors.append(_both(doc, ("otel", "collector_endpoint"), ("otel", "endpoint")))
            else:
                host = otel.get("collector_endpoint") or "localhost"
                port = otel.get("collector_port") or 4317
                first = "collector_endpoint" if "collector_endpoint" in otel else "collector_port"
                _move(doc, ("otel", first), ("otel", "endpoint"), f"{host}:{port}")
                otel.pop("collector_endpoint", None)
                otel.pop("collector_port", None)
    return errors


def _both(doc: Document, alias: PathKey, canonical: PathKey) -> str:
    return (
        f"{doc.key_position(alias)}: {'.'.join(map(str, alias))} (Falco Talon v0.3) and "
        f"{'.'.join(map(str, canonical))} at {doc.key_position(canonical)} are the same "
        f"setting; keep one (at {json_path(alias)})"
    )


def _variable(path: PathKey) -> str:
    return "_".join(str(p).upper().replace("-", "_") for p in path)


def normalize_env(env: Mapping[str, str], notifiers: NotifierRegistry) -> dict[str, str]:
    """The environment with each v0.3 variable also set under today's name."""
    out = dict(env)
    problems = []

    def put(alias_var: str, canonical_var: str, value: str) -> None:
        if canonical_var in env and env[canonical_var] != value:
            problems.append(
                f"environment {alias_var} (Falco Talon v0.3) and {canonical_var} are the same "
                "setting with different values; keep one"
            )
        out[canonical_var] = value

    for alias, canonical, schema in aliases(notifiers):
        alias_var, canonical_var = _variable(alias), _variable(canonical)
        if alias_var == canonical_var or alias_var not in env:
            continue
        value = out.pop(alias_var)
        if schema.get("type") == ["string", "array"]:
            value = ",".join(value.replace(",", " ").split())  # v0.3 lists: space-separated
        put(alias_var, canonical_var, value)
    host, port = out.pop("OTEL_COLLECTOR_ENDPOINT", None), out.pop("OTEL_COLLECTOR_PORT", None)
    if host or port:
        put("OTEL_COLLECTOR_ENDPOINT", "OTEL_ENDPOINT", f"{host or 'localhost'}:{port or 4317}")
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))
    return out
