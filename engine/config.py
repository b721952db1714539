"""Configuration: grouped settings from defaults, a YAML file, environment variables and flags.

Position in the flow: read once at start-up; the server, pipeline and dispatcher are built
from :class:`Settings`. Precedence: flags > environment > file > defaults.

The config file keeps the seed's flat keys (``listenPort``, ``notifiers.slack.webhookurl``);
each key's environment variable is the key upper-cased (``LISTENPORT``), and notifier
settings are ``NOTIFIERS_<NAME>_<SETTING>``. The JSON Schema of the file
(``schemas/config.schema.json``) is derived from the dataclasses below and the notifiers'
settings schemas, so a misspelt key or a wrong type is a clear start-up error.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import jsonschema

from engine.contract.errors import ConfigError
from engine.contract.notifiers import NotifierRegistry
from engine.sourcemap import Document, json_path, load_yaml
from observability.tracing import TracingSettings

DEFAULT_CONFIG = "/etc/falco-talon/config.yaml"
DEFAULT_RULES = "/etc/falco-talon/rules.yaml"
SCHEMA_ID = "https://falco-talon.dev/schemas/config.schema.json"
REDACTED = "********"
TRACE_URL_PATTERN = r"^$|^https?://[^\s/{}]+[^\s]*\{trace_id\}[^\s]*$"
"""``traceUrl``: empty, or an http(s) URL with a host and ``{trace_id}`` somewhere after it."""
_PATTERN_PROBLEMS = {
    "traceUrl": "must be an http(s) URL containing {trace_id}, such as "
    "https://jaeger.example.com/trace/{trace_id}",
}
"""What a key's ``pattern`` means, said instead of the bare regular expression."""


def _opt(key: str, default: Any, schema: dict[str, Any], help: str) -> Any:
    """A settings field bound to config key ``key`` (env var ``key.upper()``)."""
    factory = (lambda: type(default)(default)) if isinstance(default, (list, dict)) else None
    meta = {"key": key, "schema": {**schema, "description": help}}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The HTTP server that receives Falco events."""

    listen_address: str = _opt(
        "listenAddress", "0.0.0.0", {"type": "string"}, "Address to listen on."
    )
    listen_port: int = _opt(
        "listenPort",
        2803,
        {"type": "integer", "minimum": 0, "maximum": 65535},
        "Port to listen on.",
    )
    max_body_size: int = _opt(
        "maxBodySize",
        1 << 20,
        {"type": "integer", "minimum": 1024},
        "Largest accepted event body in bytes; larger ones get 413.",
    )
    queue_size: int = _opt(
        "queueSize",
        1000,
        {"type": "integer", "minimum": 1},
        "Events accepted but not yet processed; when full, POST gets 503.",
    )
    workers: int = _opt(
        "workers", 16, {"type": "integer", "minimum": 1}, "Events processed concurrently."
    )
    shutdown_timeout: float = _opt(
        "shutdownTimeout",
        30.0,
        {"type": "number", "minimum": 0},
        "Seconds to finish in-flight events on SIGTERM.",
    )


@dataclass(frozen=True, slots=True)
class RulesSettings:
    """Where the rules come from."""

    files: list[str] = _opt(
        "rulesFile",
        [DEFAULT_RULES],
        {"type": ["string", "array"], "items": {"type": "string"}},
        "Rules file(s) or directories, in order (a string or a list).",
    )
    watch: bool = _opt(
        "watchRules",
        True,
        {"type": "boolean"},
        "Reload the rules when a file changes (ConfigMap mounts included).",
    )


@dataclass(frozen=True, slots=True)
class ActionSettings:
    """How actions run."""

    dry_run: bool = _opt(
        "dryRun", False, {"type": "boolean"}, "Plan and record every action, run none."
    )
    timeout: float = _opt(
        "actionTimeout",
        30.0,
        {"type": "number", "exclusiveMinimum": 0},
        "Seconds one action may take before it counts as failed.",
    )
    kube_config: str = _opt(
        "kubeConfig",
        "",
        {"type": "string"},
        "Kubeconfig file; empty: in-cluster config, else ~/.kube/config.",
    )


@dataclass(frozen=True, slots=True)
class NotificationSettings:
    """Who hears about action results."""

    default_notifiers: list[str] = _opt(
        "defaultNotifiers",
        [],
        {"type": ["string", "array"], "items": {"type": "string"}},
        "Notifiers that receive every action result.",
    )
    notifiers: dict[str, dict[str, Any]] = _opt(
        "notifiers", {}, {"type": "object"}, "Settings per notifier, by notifier name."
    )
    timeout: float = _opt(
        "notifierTimeout",
        10.0,
        {"type": "number", "exclusiveMinimum": 0},
        "Seconds one notification send may take.",
    )
    attempts: int = _opt(
        "notifierAttempts",
        4,
        {"type": "integer", "minimum": 1},
        "Sends per notification before it is reported failed.",
    )
    trace_url: str = _opt(
        "traceUrl",
        "",
        {"type": "string", "pattern": TRACE_URL_PATTERN},
        "Link every notification to its trace: an http(s) URL containing {trace_id}, "
        "e.g. https://jaeger.example.com/trace/{trace_id}; empty: no link.",
    )


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    """What logs look like."""

    format: str = _opt(
        "logFormat",
        "color",
        {"type": "string", "enum": ["color", "text", "json"]},
        "color (terminal), text, or json (one object per line).",
    )
    level: str = _opt(
        "logLevel",
        "info",
        {"type": "string", "enum": ["debug", "info", "warning", "error"]},
        "Lowest level logged.",
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """All settings, grouped."""

    server: ServerSettings = field(default_factory=ServerSettings)
    rules: RulesSettings = field(default_factory=RulesSettings)
    actions: ActionSettings = field(default_factory=ActionSettings)
    notifications: NotificationSettings = field(default_factory=NotificationSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)


OTEL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "OpenTelemetry traces (OTLP). The standard OTEL_EXPORTER_OTLP_* variables "
    "and OTEL_SERVICE_NAME are honoured too.",
    "additionalProperties": False,
    "properties": {
        "enabled": {"type": "boolean", "default": False, "description": "Export traces."},
        "endpoint": {
            "type": "string",
            "description": "OTLP endpoint: host:port for grpc, http://host:4318 for http/protobuf.",
        },
        "protocol": {"type": "string", "enum": ["grpc", "http/protobuf"], "default": "grpc"},
        "headers": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Headers sent with each export (secret: never printed).",
        },
        "insecure": {"type": "boolean", "default": True, "description": "gRPC without TLS."},
        "timeout": {"type": "number", "exclusiveMinimum": 0, "default": 10},
        "samplingRatio": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "default": 1.0,
            "description": "Share of events traced (a caller's sampled "
            "traceparent is always followed).",
        },
        "serviceName": {"type": "string", "default": "falco-talon"},
    },
}
_OTEL_FIELDS = {
    "enabled": "enabled",
    "endpoint": "endpoint",
    "protocol": "protocol",
    "headers": "headers",
    "insecure": "insecure",
    "timeout": "timeout",
    "samplingRatio": "sampling_ratio",
    "serviceName": "service_name",
}


_GROUPS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "rules": RulesSettings,
    "actions": ActionSettings,
    "notifications": NotificationSettings,
    "logging": LoggingSettings,
    "tracing": TracingSettings,
}
"""Settings attribute -> its group's class (the same order as :class:`Settings`)."""


def _options() -> dict[str, tuple[str, str, dict[str, Any]]]:
    """config key -> (group attribute, field attribute, schema)."""
    out = {}
    for group_name, factory in _GROUPS.items():
        if factory is TracingSettings:
            continue
        for f in fields(factory()):
            out[f.metadata["key"]] = (group_name, f.name, f.metadata["schema"])
    out["otel"] = ("tracing", "*", OTEL_SCHEMA)
    return out


OPTIONS = _options()


def config_schema(notifiers: NotifierRegistry) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the config file, notifier settings included."""
    props = {key: dict(schema) for key, (_, _, schema) in OPTIONS.items()}
    props["notifiers"] = {
        "type": "object",
        "description": "Settings per notifier, by notifier name.",
        "additionalProperties": False,
        "properties": {spec.name: dict(spec.settings) for spec in notifiers},
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "falco-talon configuration",
        "description": "Generated from engine/config.py and the notifier registry: run "
        "`make schemas` after changing either.",
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": props,
    }


def _coerce(text: str, schema: Mapping[str, Any]) -> Any:
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


def _env_layer(env: Mapping[str, str], notifiers: NotifierRegistry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (_, _, schema) in OPTIONS.items():
        if key in ("notifiers", "otel"):
            continue
        if key.upper() in env:
            out[key] = _coerce(env[key.upper()], schema)
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
                value = _coerce(text, props.get(name, {}))
                out.setdefault("notifiers", {}).setdefault(spec.name, {})[name] = value
                break
    otel = _otel_env(env)
    if otel:
        out["otel"] = otel
    return out


def _otel_env(env: Mapping[str, str]) -> dict[str, Any]:
    """``OTEL_<KEY>`` for the ``otel`` section, plus the OpenTelemetry standard variables."""
    out: dict[str, Any] = {}
    props = OTEL_SCHEMA["properties"]
    for key in props:
        if f"OTEL_{key.upper()}" in env:
            out[key] = _coerce(env[f"OTEL_{key.upper()}"], props[key])
    standard = {
        "endpoint": env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "protocol": env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL"),
        "serviceName": env.get("OTEL_SERVICE_NAME"),
        "samplingRatio": env.get("OTEL_TRACES_SAMPLER_ARG"),
    }
    for key, text in standard.items():
        if text and key not in out:
            out[key] = _coerce(text, props[key])
    raw_headers = env.get("OTEL_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
    if raw_headers and isinstance(out.get("headers", raw_headers), str):
        pairs = (h.split("=", 1) for h in raw_headers.split(",") if "=" in h)
        out["headers"] = {k.strip(): v.strip() for k, v in pairs}
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        out["enabled"] = False
    return out


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


def _problems(err: jsonschema.ValidationError) -> list[tuple[tuple[Any, ...], str]]:
    """(path, message) pairs for one schema error; an unknown key is reported at the key."""
    path = tuple(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = list(err.schema.get("properties", {}) if isinstance(err.schema, dict) else ())
        out = []
        for extra in sorted(set(err.instance) - set(allowed)):
            close = difflib.get_close_matches(extra, allowed, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
            out.append(((*path, extra), f"unknown key {extra!r}{hint}"))
        return out
    if err.validator == "pattern" and len(path) == 1 and path[0] in _PATTERN_PROBLEMS:
        return [(path, f"{path[0]} {_PATTERN_PROBLEMS[str(path[0])]}, got {err.instance!r}")]
    if err.validator == "type":
        expected = err.validator_value
        expected = " or ".join(expected) if isinstance(expected, list) else expected
        return [(path, f"must be {expected}, got {type(err.instance).__name__} {err.instance!r}")]
    return [(path, err.message)]


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
            doc = load_yaml(file.read_text(encoding="utf-8"), str(file))
        except OSError as exc:
            raise ConfigError(f"{file}: cannot read config: {exc.strerror}") from None
        if doc.errors:
            raise ConfigError("\n".join(str(e) for e in doc.errors))
    elif path is not None:
        raise ConfigError(f"{path}: config file not found")
    raw: dict[str, Any] = {}
    if doc.value is not None:
        if not isinstance(doc.value, dict):
            raise ConfigError(f"{doc.file}:1:1: the config must be a mapping of keys to values")
        raw = dict(doc.value)
    env_layer = _env_layer(env, notifiers)
    merged = _merge(_merge(raw, env_layer), overrides or {})
    validator = jsonschema.Draft202012Validator(config_schema(notifiers))
    errors = []
    for err in validator.iter_errors(merged):
        for p, message in _problems(err):
            top = str(p[0]) if p else ""
            if top in env_layer or (
                top == "notifiers" and len(p) > 1 and str(p[1]) in env_layer.get("notifiers", {})
            ):
                origin = "environment " + (
                    top.upper()
                    if top != "notifiers"
                    else "NOTIFIERS_" + "_".join(str(x).upper() for x in p[1:])
                )
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
    groups: dict[str, dict[str, Any]] = {name: {} for name in _GROUPS}
    for key, value in values.items():
        group, attr, _ = OPTIONS[key]
        if key == "otel":
            groups[group] = {_OTEL_FIELDS[k]: v for k, v in (value or {}).items()}
            continue
        groups[group][attr] = _as_list(value) if key in ("rulesFile", "defaultNotifiers") else value
    return Settings(**{name: _GROUPS[name](**kw) for name, kw in groups.items()})


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


def secret_values(settings: Settings, notifiers: NotifierRegistry) -> list[str]:
    """The values of every secret setting (to scrub them from any message)."""
    out = []
    for name, values in settings.notifications.notifiers.items():
        spec = notifiers.get(name)
        for key in spec.secrets if spec else ():
            value = values.get(key)
            if value:
                out.append(str(value))
    return out


def redact_message(text: str, notifiers: NotifierRegistry, raw: Mapping[str, Any]) -> str:
    otel = raw.get("otel")
    headers = otel.get("headers") if isinstance(otel, Mapping) else None
    for value in headers.values() if isinstance(headers, Mapping) else ():
        if value:
            text = text.replace(str(value), REDACTED)
    for name, values in (raw.get("notifiers") or {}).items():
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
    for key, (group, attr, _) in OPTIONS.items():
        if key == "otel":
            t = settings.tracing
            out[key] = {k: getattr(t, a) for k, a in _OTEL_FIELDS.items()}
            out[key]["headers"] = {h: REDACTED for h in t.headers}
            continue
        out[key] = getattr(getattr(settings, group), attr)
    shown: dict[str, Any] = {}
    for name, values in settings.notifications.notifiers.items():
        spec = notifiers.get(name)
        secrets = set(spec.secrets) if spec else set()
        shown[name] = {k: (REDACTED if k in secrets and v else v) for k, v in values.items()}
    out["notifiers"] = shown
    return out
