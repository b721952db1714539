"""How traces are exported: the config file's ``otel`` section, declared once.

Each field carries its config binding in ``dataclasses.field`` metadata, the same way as
every other settings group (``engine.config.settings``), which derives the config schema,
the environment variables and the redaction from it:

``key``
    the key inside the ``otel`` section (environment variable ``OTEL_<KEY>``);
``schema``
    the key's JSON Schema;
``env``
    standard OpenTelemetry variables read when ``OTEL_<KEY>`` is not set, first set wins
    (the signal-specific ``OTEL_EXPORTER_OTLP_TRACES_*`` before the generic one, as the
    OpenTelemetry specification orders them);
``env_scale``
    the standard variables' numbers times this (``OTEL_EXPORTER_OTLP_TIMEOUT`` is in
    milliseconds, ``timeout`` in seconds);
``disabled_by``
    a variable that, set to ``true``, turns the boolean off;
``v03``
    the Falco Talon v0.3 spelling of the key, accepted beside it (``engine.config.compat``);
``secret``
    never shown: values are redacted from messages and from the effective configuration.

The methods below turn the settings into where and how spans are sent, following the
OpenTelemetry specification of the ``OTEL_EXPORTER_OTLP_*`` variables; both export paths
(``observability.export`` and ``observability.sdk``) use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
"""The ``OTEL_TRACES_SAMPLER`` values understood (the specification's built-in samplers)."""

DEFAULT_SERVICE_NAME = "falco-talon"


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
    export_with: str = field(
        default="builtin",
        metadata={
            "key": "exportWith",
            "schema": {
                "type": "string",
                "enum": ["builtin", "sdk"],
                "default": "builtin",
                "description": "builtin: falco-talon's own OTLP encoder, in an export process "
                "of its own (the cheapest); sdk: the OpenTelemetry SDK's BatchSpanProcessor "
                "and the SDK exporters named by tracesExporter (OTEL_BSP_* apply).",
            },
        },
    )
    traces_exporter: list[str] = field(
        default_factory=lambda: ["otlp"],
        metadata={
            "key": "tracesExporter",
            "schema": {
                "type": "array",
                "items": {"type": "string", "minLength": 1},
                "minItems": 1,
                "default": ["otlp"],
                "description": "Where spans go: otlp (configured by this section); with "
                "exportWith: sdk also any SDK span exporter installed, by its entry point "
                "name (console, ...); none: nowhere (tracing off).",
            },
            "env": ("OTEL_TRACES_EXPORTER",),
        },
    )
    endpoint: str = field(
        default="",
        metadata={
            "key": "endpoint",
            "schema": {
                "type": "string",
                "description": "OTLP endpoint: host:port or http(s)://host:port for grpc "
                "(default localhost:4317); the base URL for http/protobuf, /v1/traces "
                "appended (default http://localhost:4318).",
            },
            "env": ("OTEL_EXPORTER_OTLP_ENDPOINT",),
        },
    )
    traces_endpoint: str = field(
        default="",
        metadata={
            "key": "tracesEndpoint",
            "schema": {
                "type": "string",
                "description": "The traces endpoint, used as is (for http/protobuf, the "
                "full URL); set, it wins over endpoint.",
            },
            "env": ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",),
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
            "env": ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"),
            "secret": True,
        },
    )
    insecure: bool = field(
        default=True,
        metadata={
            "key": "insecure",
            "schema": {
                "type": "boolean",
                "default": True,
                "description": "grpc to an endpoint without scheme: plaintext (true) or TLS "
                "(false). An http:// or https:// scheme decides instead; certificate or "
                "clientCertificate set means TLS.",
            },
            "env": ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"),
            "v03": "collector_use_insecure_grpc",
        },
    )
    timeout: float = field(
        default=10.0,
        metadata={
            "key": "timeout",
            "schema": {
                "type": "number",
                "exclusiveMinimum": 0,
                "default": 10,
                "description": "Seconds one export request may take (the OTEL_* variables "
                "are in milliseconds).",
            },
            "env": ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"),
            "env_scale": 0.001,
        },
    )
    compression: str = field(
        default="none",
        metadata={
            "key": "compression",
            "schema": {
                "type": "string",
                "enum": ["none", "gzip"],
                "default": "none",
                "description": "gzip: grpc message compression, or Content-Encoding: gzip.",
            },
            "env": ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"),
        },
    )
    certificate: str = field(
        default="",
        metadata={
            "key": "certificate",
            "schema": {
                "type": "string",
                "description": "PEM CA bundle that signed the collector's certificate; "
                "empty: the system's CAs.",
            },
            "env": ("OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"),
        },
    )
    client_certificate: str = field(
        default="",
        metadata={
            "key": "clientCertificate",
            "schema": {
                "type": "string",
                "description": "PEM client certificate (chain) shown to the collector "
                "(mutual TLS), with clientKey.",
            },
            "env": (
                "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
                "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
            ),
        },
    )
    client_key: str = field(
        default="",
        metadata={
            "key": "clientKey",
            "schema": {"type": "string", "description": "PEM private key of clientCertificate."},
            "env": ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "OTEL_EXPORTER_OTLP_CLIENT_KEY"),
        },
    )
    sampler: str = field(
        default="parentbased_traceidratio",
        metadata={
            "key": "sampler",
            "schema": {
                "type": "string",
                "enum": list(SAMPLERS),
                "default": "parentbased_traceidratio",
                "description": "Which events are traced. parentbased_*: as the caller's "
                "traceparent says when there is one; traceidratio: samplingRatio of them. "
                "The default with samplingRatio 1 traces every event.",
            },
            "env": ("OTEL_TRACES_SAMPLER",),
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
                "description": "Share of events traced by the traceidratio samplers.",
            },
            "env": ("OTEL_TRACES_SAMPLER_ARG",),
        },
    )
    service_name: str = field(
        default="",
        metadata={
            "key": "serviceName",
            "schema": {
                "type": "string",
                "default": "",
                "description": "service.name of the traces; empty: the one in "
                "resourceAttributes, else falco-talon.",
            },
            "env": ("OTEL_SERVICE_NAME",),
        },
    )
    resource_attributes: Mapping[str, str] = field(
        default_factory=dict,
        metadata={
            "key": "resourceAttributes",
            "schema": {
                "type": "object",
                "additionalProperties": {"type": "string"},
                "description": "More attributes of the resource (k8s.pod.name, "
                "deployment.environment, ...), beside service.name, service.version and "
                "service.instance.id.",
            },
            "env": ("OTEL_RESOURCE_ATTRIBUTES",),
        },
    )

    # -- where spans go, as the OTLP exporter specification says ----------------------------

    def traces_url(self) -> str:
        """http/protobuf: the URL spans are POSTed to. ``tracesEndpoint`` as is; else
        ``endpoint`` (default ``http://localhost:4318``) with ``v1/traces`` appended."""
        if self.traces_endpoint:
            return self.traces_endpoint
        scheme, netloc, path, query, fragment = urlsplit(self.endpoint or "http://localhost:4318")
        path = (path if path.endswith("/") else path + "/") + "v1/traces"
        return urlunsplit((scheme, netloc, path, query, fragment))

    def grpc_target(self) -> tuple[str, bool]:
        """grpc: (``host:port``, TLS or not). A scheme decides TLS (``https://``) or
        plaintext (``http://``); without one, a CA or client certificate set means TLS,
        else ``insecure`` decides."""
        target = self.traces_endpoint or self.endpoint or "localhost:4317"
        scheme, sep, rest = target.partition("://")
        if sep and scheme in ("http", "https"):
            return rest.split("/", 1)[0], scheme == "https"
        tls = bool(self.certificate or self.client_certificate) or not self.insecure
        return target, tls

    def collector(self) -> str:
        """The collector's ``host:port``, for messages: never credentials or a query string."""
        if self.protocol == "grpc":
            return self.grpc_target()[0].rsplit("@", 1)[-1]
        netloc = urlsplit(self.traces_url()).netloc
        return netloc.rsplit("@", 1)[-1]

    def exporting(self) -> bool:
        """Spans leave the process: tracing on, to at least one exporter."""
        return self.enabled and any(name != "none" for name in self.traces_exporter)
