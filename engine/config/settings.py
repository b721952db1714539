"""The settings: grouped frozen dataclasses, each field bound to its config key.

A field's config binding is ``dataclasses.field`` metadata: ``key`` (the config key, whose
environment variable is the key upper-cased) and ``schema`` (its JSON Schema, description
included). A group is either *flat* (its fields are top-level keys: ``listenPort``) or a
*section*: the :class:`Settings` field that holds it carries a ``key`` of its own and its
fields are keys inside that section (``otel.samplingRatio``, environment
``OTEL_SAMPLINGRATIO``). :data:`OPTIONS` lists every key; the schema, the environment
layer, the build and the redaction are all derived from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

from engine.contract.notifiers import NotifierRegistry
from observability.settings import TracingSettings

DEFAULT_CONFIG = "/etc/falco-talon/config.yaml"
DEFAULT_RULES = "/etc/falco-talon/rules.yaml"
SCHEMA_ID = "https://falco-talon.dev/schemas/config.schema.json"
TRACE_URL_PATTERN = r"^$|^https?://[^\s/{}]+[^\s]*\{trace_id\}[^\s]*$"
"""``traceUrl``: empty, or an http(s) URL with a host and ``{trace_id}`` somewhere after it."""


def _opt(
    key: str, default: Any, schema: dict[str, Any], help: str, v03: str = "", secret: bool = False
) -> Any:
    """A settings field bound to config key ``key`` (env var ``key.upper()``); ``v03``: the
    Falco Talon v0.3 spelling of the key, accepted too (env var ``v03.upper()``); ``secret``:
    never shown (redacted from messages and the effective config)."""
    factory = (lambda: type(default)(default)) if isinstance(default, (list, dict)) else None
    meta: dict[str, Any] = {"key": key, "schema": {**schema, "description": help}}
    if v03:
        meta["v03"] = v03
    if secret:
        meta["secret"] = True
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """The HTTP server that receives Falco events."""

    listen_address: str = _opt(
        "listenAddress", "0.0.0.0", {"type": "string"}, "Address to listen on.", "listen_address"
    )
    listen_port: int = _opt(
        "listenPort",
        2803,
        {"type": "integer", "minimum": 0, "maximum": 65535},
        "Port to listen on.",
        "listen_port",
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
    processes: int | str = _opt(
        "processes",
        1,
        {
            "type": ["integer", "string"],
            "minimum": 1,
            "pattern": "^auto$",
            "errorMessage": "must be a number of processes (1 or more) or auto",
        },
        "Server processes sharing listenPort (SO_REUSEPORT), each with its own queue and "
        "workers, started and restarted by a supervisor; deduplication, throttles and "
        "/metrics hold across them. auto: one per CPU this process may use (CPU affinity "
        "and cgroup CPU quota, rounded up).",
    )
    shutdown_timeout: float = _opt(
        "shutdownTimeout",
        30.0,
        {"type": "number", "minimum": 0},
        "Seconds to finish in-flight events on SIGTERM.",
    )
    header_timeout: float = _opt(
        "headerTimeout",
        10.0,
        {"type": "number", "exclusiveMinimum": 0},
        "Seconds a client has to send a request's headers (and the TLS handshake), from "
        "its first byte; a slower one gets 408 and is closed.",
    )
    body_timeout: float = _opt(
        "bodyTimeout",
        30.0,
        {"type": "number", "exclusiveMinimum": 0},
        "Seconds a client has to send a request's body once its headers are in; a slower "
        "one gets 408 and is closed.",
    )
    probes_port: int = _opt(
        "probesPort",
        0,
        {"type": "integer", "minimum": 0, "maximum": 65535},
        "Serve /healthz and /metrics on this port, plain HTTP without token, and only "
        "POST / on listenPort; 0: all on listenPort.",
    )


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """TLS on the event port (the ``tls`` section)."""

    cert_file: str = _opt(
        "certFile",
        "",
        {"type": "string"},
        "PEM certificate (chain) served on listenPort; empty: plain HTTP. Reloaded when the "
        "file changes.",
    )
    key_file: str = _opt(
        "keyFile", "", {"type": "string"}, "PEM private key of certFile (reloaded with it)."
    )
    client_ca_file: str = _opt(
        "clientCAFile",
        "",
        {"type": "string"},
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS), else the "
        "handshake fails; empty: no client certificate asked.",
    )


@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Bearer token on ``POST /`` (the ``auth`` section)."""

    token_file: str = _opt(
        "tokenFile",
        "",
        {"type": "string"},
        "File holding the bearer token POST / requires (Authorization: Bearer <token>); "
        "re-read when it changes. Empty: no token (unless auth.token).",
    )
    token: str = field(
        default="",
        repr=False,
        metadata={
            "key": "token",
            "schema": {
                "type": "string",
                "description": "The bearer token itself (secret: never printed); prefer "
                "tokenFile, or the AUTH_TOKEN variable.",
            },
            "secret": True,
        },
    )


@dataclass(frozen=True, slots=True)
class RulesSettings:
    """Where the rules come from."""

    files: list[str] = _opt(
        "rulesFile",
        [DEFAULT_RULES],
        {"type": ["string", "array"], "items": {"type": "string"}},
        "Rules file(s) or directories, in order (a string or a list).",
        "rules_files",
    )
    watch: bool = _opt(
        "watchRules",
        True,
        {"type": "boolean"},
        "Reload the rules when a file changes (ConfigMap mounts included).",
        "watch_rules",
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
        "kubeconfig",
    )


@dataclass(frozen=True, slots=True)
class NotificationSettings:
    """Who hears about action results."""

    default_notifiers: list[str] = _opt(
        "defaultNotifiers",
        [],
        {"type": ["string", "array"], "items": {"type": "string"}},
        "Notifiers that receive every action result.",
        "default_notifiers",
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
        {
            "type": "string",
            "pattern": TRACE_URL_PATTERN,
            "errorMessage": "must be an http(s) URL containing {trace_id}, such as "
            "https://jaeger.example.com/trace/{trace_id}",
        },
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
        "log_format",
    )
    level: str = _opt(
        "logLevel",
        "info",
        {"type": "string", "enum": ["debug", "info", "warning", "error"]},
        "Lowest level logged.",
    )
    print_all_events: bool = _opt(
        "printAllEvents",
        False,
        {"type": "boolean"},
        "Log every event received at info level, also those no rule matches.",
        "print_all_events",
    )


@dataclass(frozen=True, slots=True)
class DeduplicationSettings:
    """Falco Talon v0.3's ``deduplication`` section: the window in which the same event
    sent again is answered ``duplicate`` and not processed (README "Scaling out")."""

    leader_election: bool = _opt(
        "leaderElection",
        True,
        {"type": "boolean"},
        "Accepted for Falco Talon v0.3 configs, no effect: no leader is needed, every "
        'replica consumes the shared NATS stream (README "Scaling out").',
        "leader_election",
    )
    time_window_seconds: int = _opt(
        "timeWindowSeconds",
        5,
        {"type": "integer", "minimum": 0},
        "The same event (same uuid, else same rule, output, time and hostname) received "
        "again within this many seconds is answered duplicate and not processed; with NATS "
        "the stream's duplicate window, across replicas. 0: no deduplication.",
        "time_window_seconds",
    )


TLS_FILES_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "caFile": {"type": "string", "description": "CA bundle that signed the server's cert."},
        "certFile": {"type": "string", "description": "Client certificate (mutual TLS)."},
        "keyFile": {"type": "string", "description": "The client certificate's key."},
    },
}


@dataclass(frozen=True, slots=True)
class NatsSettings:
    """The opt-in durable shared queue: NATS JetStream (README "Scaling out")."""

    url: str = _opt(
        "url",
        "",
        {"type": "string", "pattern": r"^$|^(nats|tls)://\S+$"},
        "NATS server(s), comma-separated (nats://host:4222); empty: the embedded in-memory "
        "queue of one process.",
    )
    stream: str = _opt(
        "stream",
        "FALCO_TALON",
        {"type": "string", "pattern": r"^[A-Za-z0-9_-]+$"},
        "JetStream stream holding accepted events (created if missing: file storage, "
        "work-queue retention).",
    )
    subject: str = _opt(
        "subject",
        "falco-talon.events",
        {"type": "string", "pattern": r"^[A-Za-z0-9_.-]+$"},
        "Subject events are published on; dead letters go to <subject>.dead.",
    )
    token: str = _opt(
        "token",
        "",
        {"type": "string"},
        "Token to authenticate with (secret: never printed).",
        secret=True,
    )
    token_file: str = _opt(
        "tokenFile", "", {"type": "string"}, "File holding the token (instead of token)."
    )
    nkey_seed_file: str = _opt(
        "nkeySeedFile",
        "",
        {"type": "string"},
        "File holding the NKEY seed (SU...) to authenticate with, instead of a token: NATS "
        "knows the user by its public key (U...); the seed never leaves this file.",
    )
    tls: dict[str, str] = _opt(
        "tls", {}, TLS_FILES_SCHEMA, "TLS to NATS: caFile, certFile, keyFile."
    )
    ack_wait: float = _opt(
        "ackWait",
        30.0,
        {"type": "number", "exclusiveMinimum": 0},
        "Seconds without a sign of life from the replica running an event before NATS "
        "hands the event to another (a live run keeps telling it is in progress).",
    )
    max_deliver: int = _opt(
        "maxDeliver",
        5,
        {"type": "integer", "minimum": 1},
        "Deliveries of one event before it is given up (its action failing temporarily "
        "each time, or its replica dying or hanging): moved to <subject>.dead, logged with "
        "its id, counted in falco_talon_events_dead_lettered_total and notified (outcome "
        "given-up).",
    )


def _section(factory: Any, key: str, description: str) -> Any:
    """A group of settings written as one config section ``key:`` (an object with its own
    keys), rather than as top-level keys."""
    schema = {"type": "object", "description": description, "additionalProperties": False}
    return field(default_factory=factory, metadata={"key": key, "schema": schema})


@dataclass(frozen=True, slots=True)
class Settings:
    """All settings, grouped."""

    server: ServerSettings = field(default_factory=ServerSettings)
    rules: RulesSettings = field(default_factory=RulesSettings)
    actions: ActionSettings = field(default_factory=ActionSettings)
    notifications: NotificationSettings = field(default_factory=NotificationSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    tls: TlsSettings = _section(TlsSettings, "tls", "TLS and mutual TLS on listenPort.")
    auth: AuthSettings = _section(AuthSettings, "auth", "Bearer token required on POST /.")
    deduplication: DeduplicationSettings = _section(
        DeduplicationSettings,
        "deduplication",
        "Identical events within a window are processed once.",
    )
    nats: NatsSettings = _section(
        NatsSettings,
        "nats",
        "Opt-in: a durable queue shared by replicas (NATS JetStream). "
        "Without url, one process and its in-memory queue.",
    )
    tracing: TracingSettings = _section(
        TracingSettings,
        "otel",
        "OpenTelemetry traces (OTLP). The standard OTEL_EXPORTER_OTLP_*, OTEL_TRACES_*, "
        "OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES variables are honoured too.",
    )


@dataclass(frozen=True, slots=True)
class Option:
    """One config key: where its value goes in :class:`Settings`, and how it is read."""

    key: str
    """The key in the config file (inside its section, for a section's field)."""
    group: str
    """The :class:`Settings` attribute of the group that holds the value."""
    attr: str
    """The group's attribute; empty for a section (its ``fields`` hold the values)."""
    schema: dict[str, Any]
    """The key's JSON Schema (a section's: without its ``properties``)."""
    env: tuple[str, ...] = ()
    """Standard variables read when the key's own variable is not set, first set wins."""
    env_scale: float = 1.0
    """The standard variables' numbers times this (milliseconds to seconds: 0.001)."""
    disabled_by: str = ""
    """A variable that, set to ``true``, turns this boolean off."""
    secret: bool = False
    """Never shown: redacted from messages and from the effective config."""
    v03: str = ""
    """The Falco Talon v0.3 spelling of the key (``listen_port``), accepted beside it."""
    fields: tuple[Option, ...] = ()
    """A section's keys."""

    @property
    def is_list(self) -> bool:
        """A string or a list of strings (``rulesFile``): a comma-separated string is split."""
        return self.schema.get("type") == ["string", "array"]

    def full_schema(self) -> dict[str, Any]:
        """The key's JSON Schema, a section's keys included."""
        if not self.fields:
            return dict(self.schema)
        return {**self.schema, "properties": {f.key: dict(f.schema) for f in self.fields}}


def _option(group: str, f: Any, fields_: tuple[Option, ...] = ()) -> Option:
    meta = f.metadata
    return Option(
        key=meta["key"],
        group=group,
        attr="" if fields_ else f.name,
        schema=meta["schema"],
        env=tuple(meta.get("env", ())),
        env_scale=float(meta.get("env_scale", 1.0)),
        disabled_by=meta.get("disabled_by", ""),
        secret=bool(meta.get("secret", False)),
        v03=meta.get("v03", ""),
        fields=fields_,
    )


GROUPS: dict[str, type[Any]] = {f.name: f.default_factory for f in fields(Settings)}  # type: ignore[misc]
"""Settings attribute -> its group's class (the same order as :class:`Settings`)."""


def _options() -> dict[str, Option]:
    out = {}
    for group in fields(Settings):
        members = fields(GROUPS[group.name])
        if "key" in group.metadata:
            option = _option(group.name, group, tuple(_option(group.name, f) for f in members))
            out[option.key] = option
            continue
        for f in members:
            out[f.metadata["key"]] = _option(group.name, f)
    return out


OPTIONS: dict[str, Option] = _options()
"""Every top-level config key, in :class:`Settings` order."""


NOTIFIER_ALIAS = "x-v03"
"""The keyword of a notifier setting's schema that names its v0.3 spelling."""

OTEL_EXTRA: dict[str, dict[str, Any]] = {
    "collector_endpoint": {
        "type": "string",
        "description": "Falco Talon v0.3: the collector's host; with collector_port, "
        "sets endpoint.",
    },
    "collector_port": {
        "type": ["integer", "string"],
        "description": "Falco Talon v0.3: the collector's port (default 4317), with "
        "collector_endpoint.",
    },
    "metrics_enabled": {
        "type": "boolean",
        "description": "Falco Talon v0.3: accepted, no effect (/metrics is always served).",
    },
}
"""v0.3 ``otel`` keys that are not a rename of one of ours."""


def aliases(
    notifiers: NotifierRegistry,
) -> Iterator[tuple[tuple[str, ...], tuple[str, ...], dict[str, Any]]]:
    """(v0.3 path, today's path, today's schema) of every renamed key."""
    for key, option in OPTIONS.items():
        if option.v03:
            yield (option.v03,), (key,), option.schema
        for f in option.fields:
            if f.v03:
                yield (key, f.v03), (key, f.key), f.schema
    for spec in notifiers:
        for name, schema in spec.settings.get("properties", {}).items():
            alias = schema.get(NOTIFIER_ALIAS)
            if alias:
                yield ("notifiers", spec.name, alias), ("notifiers", spec.name, name), schema


def v03_properties(notifiers: NotifierRegistry) -> dict[tuple[str, ...], dict[str, Any]]:
    """The v0.3 keys as config-schema properties, by the path of the mapping holding them
    (so editors complete both spellings)."""
    out: dict[tuple[str, ...], dict[str, Any]] = {}
    for alias, canonical, schema in aliases(notifiers):
        props = out.setdefault(alias[:-1], {})
        props[str(alias[-1])] = {
            **schema,
            "description": f"Falco Talon v0.3 spelling of {'.'.join(map(str, canonical))}.",
        }
    out.setdefault(("otel",), {}).update(OTEL_EXTRA)
    return out


def config_schema(notifiers: NotifierRegistry) -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of the config file, notifier settings included."""
    props = {key: option.full_schema() for key, option in OPTIONS.items()}
    props["notifiers"] = {
        "type": "object",
        "description": "Settings per notifier, by notifier name.",
        "additionalProperties": False,
        "properties": {
            spec.name: {**spec.settings, "properties": dict(spec.settings.get("properties", {}))}
            for spec in notifiers
        },
    }
    root: dict[str, Any] = {"properties": props}
    for where, extra in v03_properties(notifiers).items():
        holder = root
        for part in where:
            holder = holder["properties"][part]
        holder["properties"].update(extra)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "falco-talon configuration",
        "description": "Generated from engine/config/settings.py and the notifier registry: run "
        "`make schemas` after changing either.",
        "type": ["object", "null"],
        "additionalProperties": False,
        "properties": props,
    }
