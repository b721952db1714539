"""The environment layer: config keys read from environment variables.

A top-level key's variable is the key upper-cased (``LISTENPORT``); a section's key is
``<SECTION>_<KEY>`` (``OTEL_SAMPLINGRATIO``), falling back to the standard variables the
field names (``OTEL_EXPORTER_OTLP_ENDPOINT``); notifier settings are
``NOTIFIERS_<NAME>_<SETTING>``. Text is coerced to the type the key's schema wants.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.config.settings import OPTIONS, Option
from engine.contract.notifiers import NotifierRegistry


def coerce(text: str, schema: Mapping[str, Any]) -> Any:
    """An environment variable's text as the type the schema wants (left as is if unsure)."""
    types = schema.get("type", "string")
    types = types if isinstance(types, list) else [types]
    raw = text.strip()
    if "boolean" in types and raw.lower() in ("true", "false", "1", "0", "yes", "no"):
        return raw.lower() in ("true", "1", "yes")
    if "integer" in types:
        try:
            return int(raw)
        except ValueError:
            pass
    if "number" in types:
        try:
            return float(raw)
        except ValueError:
            pass
    if "array" in types and "string" not in types:
        return [p.strip() for p in raw.split(",") if p.strip()]
    return text


def env_layer(env: Mapping[str, str], notifiers: NotifierRegistry) -> dict[str, Any]:
    """The config keys the environment sets, as a config mapping."""
    out: dict[str, Any] = {}
    for key, option in OPTIONS.items():
        if key == "notifiers" or option.fields:
            continue
        if key.upper() in env:
            out[key] = coerce(env[key.upper()], option.schema)
    notifier_values = _notifiers_env(env, notifiers)
    if notifier_values:
        out["notifiers"] = notifier_values
    for key, option in OPTIONS.items():
        if option.fields:
            values = _section_env(env, key.upper() + "_", option.fields)
            if values:
                out[key] = values
    return out


def _notifiers_env(env: Mapping[str, str], notifiers: NotifierRegistry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for var, text in env.items():
        if not var.startswith("NOTIFIERS_"):
            continue
        rest = var[len("NOTIFIERS_") :].lower()
        for spec in notifiers:
            prefix = spec.name.lower().replace("-", "_") + "_"
            if rest.startswith(prefix):
                setting = rest[len(prefix) :]
                props = spec.settings.get("properties", {})
                name = next((p for p in props if p.lower() == setting), setting)
                out.setdefault(spec.name, {})[name] = coerce(text, props.get(name, {}))
                break
    return out


def _section_env(
    env: Mapping[str, str], prefix: str, options: tuple[Option, ...]
) -> dict[str, Any]:
    """``<PREFIX><KEY>`` for each key of a section, else the key's standard variables.

    An object-valued key (``headers``) is written ``name=value,name=value``."""
    out: dict[str, Any] = {}
    for option in options:
        own = prefix + option.key.upper()
        standard = next((env[v] for v in option.env if env.get(v)), None)
        if option.schema.get("type") == "object":
            text = env.get(own) or standard
            if text:
                pairs = (h.split("=", 1) for h in text.split(",") if "=" in h)
                out[option.key] = {k.strip(): v.strip() for k, v in pairs}
            elif own in env:
                out[option.key] = env[own]
        elif own in env:
            out[option.key] = coerce(env[own], option.schema)
        elif standard:
            out[option.key] = coerce(standard, option.schema)
        if option.disabled_by and env.get(option.disabled_by, "").lower() == "true":
            out[option.key] = False
    return out
