"""Configuration: grouped settings from defaults, a YAML file, environment variables and flags.

Position in the flow: read once at start-up; the server, pipeline and dispatcher are built
from :class:`Settings`. Precedence: flags > environment > file > defaults.

The config file keeps the seed's flat keys (``listenPort``, ``notifiers.slack.webhookurl``);
each key's environment variable is the key upper-cased (``LISTENPORT``), a section's keys
are ``<SECTION>_<KEY>`` (``OTEL_ENDPOINT``), and notifier settings are
``NOTIFIERS_<NAME>_<SETTING>``. The JSON Schema of the file (``schemas/config.schema.json``)
is derived from the settings dataclasses and the notifiers' settings schemas, so a misspelt
key or a wrong type is a clear start-up error.

This package's names are the public surface; the modules below it, one job each:
``settings`` (the dataclasses, the config keys, the schema), ``environment`` (reading
variables), ``compat`` (Falco Talon v0.3 keys and variables, renamed to today's before
validation), ``loading`` (layering, validation, errors), ``redaction`` (secrets).
"""

from engine.config.loading import (
    check_notifiers,
    load_settings,
    notifier_settings,
    with_overrides,
)
from engine.config.redaction import REDACTED, redact_message, redacted, secret_values
from engine.config.settings import (
    DEFAULT_CONFIG,
    DEFAULT_RULES,
    OPTIONS,
    SCHEMA_ID,
    ActionSettings,
    LoggingSettings,
    NotificationSettings,
    Option,
    RulesSettings,
    ServerSettings,
    Settings,
    config_schema,
)
from engine.contract.errors import ConfigError
from observability.settings import TracingSettings

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_RULES",
    "OPTIONS",
    "REDACTED",
    "SCHEMA_ID",
    "ActionSettings",
    "ConfigError",
    "LoggingSettings",
    "NotificationSettings",
    "Option",
    "RulesSettings",
    "ServerSettings",
    "Settings",
    "TracingSettings",
    "check_notifiers",
    "config_schema",
    "load_settings",
    "notifier_settings",
    "redact_message",
    "redacted",
    "secret_values",
    "with_overrides",
]
