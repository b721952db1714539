"""Loading: defaults < file < environment < flags, validated against the config schema,
every problem reported at its origin (``FILE:LINE:COLUMN``, ``environment VAR``, ``flag``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import jsonschema

from engine.config.compat import normalize_env, normalize_file
from engine.config.environment import env_layer, variable_of
from engine.config.redaction import redact_message
from engine.config.settings import DEFAULT_CONFIG, GROUPS, OPTIONS, Settings, config_schema
from engine.contract.errors import ConfigError
from engine.contract.notifiers import NotifierRegistry
from engine.schema_errors import config_problems
from engine.sourcemap import Document, json_path, load_yaml, utf8_problem


def _as_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return list(value)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def _set_by(layer: Mapping[str, Any], path: tuple[Any, ...]) -> bool:
    """The layer sets the key at ``path`` (a top-level key or a section's key)."""
    if not path or path[0] not in layer:
        return False
    section = layer[path[0]]
    return len(path) < 2 or not isinstance(section, Mapping) or path[1] in section


def load_settings(
    path: str | None,
    notifiers: NotifierRegistry,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build :class:`Settings`. ``path`` None means the default file, which may be missing;
    an explicit file that is missing is an error. ``overrides`` are flags, by config key."""
    env = os.environ if env is None else env
    doc = Document(file=path or DEFAULT_CONFIG, value=None)
    file = Path(path or DEFAULT_CONFIG)
    if file.exists():
        try:
            data = file.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read config: {exc.strerror}") from None
        bad = utf8_problem(data, str(file))
        if bad is not None:
            raise ConfigError(f"{bad.position}: {bad.message}")
        doc = load_yaml(data.decode("utf-8"), str(file))
        if doc.errors:
            raise ConfigError("\n".join(str(e) for e in doc.errors))
        both = normalize_file(doc, notifiers)
        if both:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(both))
    elif path is not None:
        raise ConfigError(f"{path}: config file not found")
    raw: dict[str, Any] = {}
    if doc.value is not None:
        if not isinstance(doc.value, dict):
            raise ConfigError(f"{doc.file}:1:1: the config must be a mapping of keys to values")
        raw = dict(doc.value)
    env = normalize_env(env, notifiers)
    from_env = env_layer(env, notifiers)
    merged = _merge(_merge(raw, from_env), overrides or {})
    validator = jsonschema.Draft202012Validator(config_schema(notifiers))
    errors = []
    for err in validator.iter_errors(merged):
        for p, message in config_problems(err):
            top = str(p[0]) if p else ""
            variable = variable_of(p, env) if _set_by(from_env, p) else None
            if variable is not None:
                origin = f"environment {variable}"
            elif top == "notifiers" and len(p) > 1 and str(p[1]) in from_env.get("notifiers", {}):
                origin = "environment NOTIFIERS_" + "_".join(str(x).upper() for x in p[1:])
            elif overrides and top in overrides:
                origin = f"flag for {top}"
            else:
                origin = str(doc.position(p))
            errors.append(
                f"{origin}: {redact_message(message, notifiers, merged)} (at {json_path(p)})"
            )
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return _build(merged)


def _build(values: Mapping[str, Any]) -> Settings:
    groups: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    for key, value in values.items():
        option = OPTIONS[key]
        if option.fields:
            attrs = {f.key: f.attr for f in option.fields}
            groups[option.group] = {attrs[k]: v for k, v in (value or {}).items()}
        else:
            groups[option.group][option.attr] = _as_list(value) if option.is_list else value
    return Settings(**{name: GROUPS[name](**kw) for name, kw in groups.items()})


def with_overrides(settings: Settings, **groups: Mapping[str, Any]) -> Settings:
    """``with_overrides(s, actions={"dry_run": True})``: a copy with some fields replaced."""
    return replace(settings, **{g: replace(getattr(settings, g), **kw) for g, kw in groups.items()})


def check_notifiers(settings: Settings, notifiers: NotifierRegistry, used: set[str]) -> None:
    """Every notifier named by a rule or ``defaultNotifiers`` must exist and be configured."""
    configured = settings.notifications.notifiers
    problems = []
    for name in sorted(used | set(settings.notifications.default_notifiers)):
        spec = notifiers.get(name)
        if spec is None:
            known = ", ".join(s.name for s in notifiers) or "none installed"
            problems.append(f"notifier {name!r} does not exist; known: {known}")
        elif spec.needs_settings and name not in configured:
            problems.append(
                f"notifier {name!r} is used but not configured: add notifiers.{name} "
                f"to the config or NOTIFIERS_{name.upper()}_* variables"
            )
    if problems:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems))


def notifier_settings(settings: Settings, notifiers: NotifierRegistry) -> dict[str, dict[str, Any]]:
    """Each used notifier's settings with its defaults filled in."""
    out = {}
    for spec in notifiers:
        given = settings.notifications.notifiers.get(spec.name)
        if given is not None or not spec.needs_settings:
            out[spec.name] = {**spec.defaults(), **(given or {})}
    return out
