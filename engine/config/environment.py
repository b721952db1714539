"""The environment layer: config keys read from environment variables.

A top-level key's variable is the key upper-cased (``LISTENPORT``); a section's key is
``<SECTION>_<KEY>`` (``OTEL_SAMPLINGRATIO``), falling back to the standard variables the
field names (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, ``OTEL_EXPORTER_OTLP_ENDPOINT``: first
set wins), whose numbers are scaled by the field's ``env_scale`` (milliseconds to seconds);
notifier settings are ``NOTIFIERS_<NAME>_<SETTING>``. Text is coerced to the type the key's
schema wants; an object (``otel.headers``) is written ``name=value,name=value``, each name
and value URL-decoded (the W3C Baggage form of ``OTEL_EXPORTER_OTLP_HEADERS`` and
``OTEL_RESOURCE_ATTRIBUTES``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

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
    """``<PREFIX><KEY>`` for each key of a section, else the key's standard variables."""
    out: dict[str, Any] = {}
    for option in options:
        own = prefix + option.key.upper()
        var = _variable(env, own, option)
        if var is not None and option.schema.get("type") == "object":
            if env[var].strip():
                out[option.key] = _pairs(env[var])
        elif var is not None:
            value = coerce(env[var], option.schema)
            if var != own and option.env_scale != 1 and type(value) in (int, float):
                value *= option.env_scale
            out[option.key] = value
        if option.disabled_by and env.get(option.disabled_by, "").lower() == "true":
            out[option.key] = False
    return out


def _variable(env: Mapping[str, str], own: str, option: Option) -> str | None:
    """The variable that sets ``option``: its own if set, else the first standard one set
    (and not empty); None if none is."""
    if own in env:
        return own
    return next((v for v in option.env if env.get(v)), None)


def _pairs(text: str) -> dict[str, str]:
    """``name=value,name=value`` (W3C Baggage form: each part URL-decoded, blanks around
    it ignored) as a mapping; an entry without ``=`` is ignored."""
    out = {}
    for entry in text.split(","):
        name, sep, value = entry.partition("=")
        if sep and name.strip():
            out[unquote(name.strip())] = unquote(value.strip())
    return out


def variable_of(path: tuple[Any, ...], env: Mapping[str, str]) -> str | None:
    """The environment variable that set the config key at ``path`` (a top-level key, or
    a key of a section), if one did: for error messages."""
    if not path:
        return None
    option = OPTIONS.get(str(path[0]))
    if option is None or option.key == "notifiers":
        return None
    if not option.fields:
        return option.key.upper() if option.key.upper() in env else None
    if len(path) < 2:
        return None
    for f in option.fields:
        if f.key == path[1]:
            return _variable(env, option.key.upper() + "_" + f.key.upper(), f)
    return None
