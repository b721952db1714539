"""How traces are exported: the config file's ``otel`` section, declared once.

Each field carries its config binding in ``dataclasses.field`` metadata, the same way as
every other settings group (``engine.config.settings``), which derives the config schema,
the environment variables and the redaction from it:

``key``
    the key inside the ``otel`` section (environment variable ``OTEL_<KEY>``);
``schema``
    the key's JSON Schema;
``env``
    standard OpenTelemetry variables read when ``OTEL_<KEY>`` is not set, first set wins;
``disabled_by``
    a variable that, set to ``true``, turns the boolean off;
``v03``
    the Falco Talon v0.3 spelling of the key, accepted beside it (``engine.config.compat``);
``secret``
    never shown: values are redacted from messages and from ``falco-talon config``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """How traces are exported (the ``otel`` section of the config)."""

    enabled: bool = field(
        default=False,
        metadata={
            "key": "enabled",
            "schema": {"type": "boolean", "default": False, "description": "Export traces."},
            "disabled_by": "OTEL_SDK_DISABLED",
            "v03": "traces_enabled",
        },
    )
    endpoint: str = field(
        default="",
        metadata={
            "key": "endpoint",
            "schema": {
                "type": "string",
                "description": "OTLP endpoint: host:port for grpc, http://host:4318 for "
                "http/protobuf.",
            },
            "env": ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        },
    )
    protocol: str = field(
        default="grpc",
        metadata={
            "key": "protocol",
            "schema": {"type": "string", "enum": ["grpc", "http/protobuf"], "default": "grpc"},
            "env": ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
        },
    )
    headers: Mapping[str, str] = field(
        default_factory=dict,
        metadata={
            "key": "headers",
            "schema": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "Headers sent with each export (secret: never printed).",
            },
            "env": ("OTEL_EXPORTER_OTLP_HEADERS",),
            "secret": True,
        },
    )
    insecure: bool = field(
        default=True,
        metadata={
            "key": "insecure",
            "schema": {"type": "boolean", "default": True, "description": "gRPC without TLS."},
            "v03": "collector_use_insecure_grpc",
        },
    )
    timeout: float = field(
        default=10.0,
        metadata={
            "key": "timeout",
            "schema": {"type": "number", "exclusiveMinimum": 0, "default": 10},
        },
    )
    sampling_ratio: float = field(
        default=1.0,
        metadata={
            "key": "samplingRatio",
            "schema": {
                "type": "number",
                "minimum": 0,
                "maximum": 1,
                "default": 1.0,
                "description": "Share of events traced (a caller's sampled "
                "traceparent is always followed).",
            },
            "env": ("OTEL_TRACES_SAMPLER_ARG",),
        },
    )
    service_name: str = field(
        default="falco-talon",
        metadata={
            "key": "serviceName",
            "schema": {"type": "string", "default": "falco-talon"},
            "env": ("OTEL_SERVICE_NAME",),
        },
    )
