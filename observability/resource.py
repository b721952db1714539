"""The resource of every span: who sent it.

Built once, when tracing starts, and shared by both export paths, so a span says the same
about its sender whichever path it leaves by. From lowest to highest precedence:

- ``service.name`` ``falco-talon``, ``service.version`` (the installed falco-talon),
  ``service.instance.id`` (a random UUID per process, as the semantic conventions
  recommend), ``telemetry.sdk.*``;
- ``otel.resourceAttributes`` / ``OTEL_RESOURCE_ATTRIBUTES`` (in a cluster, the chart sets
  ``k8s.pod.name``, ``k8s.namespace.name``, ... there from the downward API);
- ``otel.serviceName`` / ``OTEL_SERVICE_NAME``.
"""

from __future__ import annotations

import uuid
from importlib.metadata import PackageNotFoundError, version

from observability.settings import DEFAULT_SERVICE_NAME, TracingSettings


def falco_talon_version() -> str:
    """The installed falco-talon's version (``unknown`` when run from a bare checkout)."""
    try:
        return version("falco-talon")
    except PackageNotFoundError:
        return "unknown"


def resource_attributes(settings: TracingSettings) -> dict[str, str]:
    """The resource attributes of this process's spans."""
    release = falco_talon_version()
    attributes = {
        "service.name": DEFAULT_SERVICE_NAME,
        "service.version": release,
        "service.instance.id": str(uuid.uuid4()),
        "telemetry.sdk.language": "python",
        "telemetry.sdk.name": "falco-talon",
        "telemetry.sdk.version": release,
    }
    attributes.update(settings.resource_attributes)
    if settings.service_name:
        attributes["service.name"] = settings.service_name
    return attributes
