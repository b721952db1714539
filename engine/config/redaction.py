"""Secrets: notifier settings a notifier declares secret, and keys marked ``secret``
(``otel.headers``, ``auth.token``, ``nats.token``). They are never printed: not in error
messages, not in the effective configuration logged at start-up, not in logs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from engine.config.settings import OPTIONS, Option, Settings
from engine.contract.notifiers import NotifierRegistry

REDACTED = "********"


def _secret_options() -> Iterator[tuple[str, Option]]:
    """(section key, option) of every secret key inside a section."""
    for section in OPTIONS.values():
        for option in section.fields:
            if option.secret:
                yield section.key, option


def secret_values(settings: Settings, notifiers: NotifierRegistry) -> list[str]:
    """The values of every secret notifier setting (to scrub them from any message)."""
    out = []
    for name, values in settings.notifications.notifiers.items():
        spec = notifiers.get(name)
        for key in spec.secrets if spec else ():
            value = values.get(key)
            if value:
                out.append(str(value))
    return out


def redact_message(text: str, notifiers: NotifierRegistry, raw: Mapping[str, Any]) -> str:
    """``text`` with every secret value found in the config mapping ``raw`` replaced."""
    for section, option in _secret_options():
        values = raw.get(section)
        value = values.get(option.key) if isinstance(values, Mapping) else None
        if isinstance(value, Mapping):
            found: Iterable[Any] = value.values()
        else:  # an object-valued secret given as something else is not a secret yet
            found = () if option.schema.get("type") == "object" else (value,)
        for secret in found:
            if secret:
                text = text.replace(str(secret), REDACTED)
    configured = raw.get("notifiers")
    for name, values in (configured if isinstance(configured, Mapping) else {}).items():
        spec = notifiers.get(name)
        if spec is None or not isinstance(values, Mapping):
            continue
        for key in spec.secrets:
            secret = values.get(key)
            if secret:
                text = text.replace(str(secret), REDACTED)
    return text


def redacted(settings: Settings, notifiers: NotifierRegistry) -> dict[str, Any]:
    """The effective config as the file's keys, with every secret replaced by ``********``."""
    out: dict[str, Any] = {}
    for key, option in OPTIONS.items():
        group = getattr(settings, option.group)
        if not option.fields:
            out[key] = getattr(group, option.attr)
            continue
        section: dict[str, Any] = {}
        for f in option.fields:
            value = getattr(group, f.attr)
            if f.secret:
                value = {k: REDACTED for k in value} if isinstance(value, Mapping) else REDACTED
            section[f.key] = value
        out[key] = section
    shown: dict[str, Any] = {}
    for name, values in settings.notifications.notifiers.items():
        spec = notifiers.get(name)
        secrets = set(spec.secrets) if spec else set()
        shown[name] = {k: (REDACTED if k in secrets and v else v) for k, v in values.items()}
    out["notifiers"] = shown
    return out
