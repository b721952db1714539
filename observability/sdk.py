"""Recorded spans as the OpenTelemetry SDK's ``ReadableSpan``: for an SDK exporter object.

Only :class:`~observability.sinks.ExporterSink` uses this (tests and benchmarks that pass
an SDK ``SpanExporter`` to :class:`~observability.tracing.Tracing`); the export process
encodes OTLP itself (``observability.otlp``).
"""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from observability.attributes import otel_attributes
from observability.rows import to_row
from observability.spans import SpanRecord


class Converter:
    """Turns recorded spans into the SDK's ReadableSpans (attribute names, bounds, status)."""

    def __init__(self, service_name: str) -> None:
        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("falco-talon")

    def __call__(self, trace_id: int, remote_parent: int | None, r: SpanRecord) -> ReadableSpan:
        return self.row(*to_row(trace_id, remote_parent, r))

    def row(
        self,
        trace_id: int,
        remote_parent: int | None,
        name: str,
        span_id: int,
        parent_id: int | None,
        start_ns: int,
        end_ns: int,
        kind: int,
        attributes: dict[str, Any],
        events: list[tuple[str, int, dict[str, Any]]],
        error: str | None,
    ) -> ReadableSpan:
        flags = TraceFlags(TraceFlags.SAMPLED)
        return ReadableSpan(
            name=name,
            context=SpanContext(trace_id, span_id, False, flags),
            parent=(
                SpanContext(trace_id, parent_id, parent_id == remote_parent, flags)
                if parent_id
                else None
            ),
            resource=self.resource,
            attributes=otel_attributes(attributes),
            events=[Event(n, otel_attributes(attrs), ts) for n, ts, attrs in events],
            kind=SpanKind(kind),
            status=Status(StatusCode.ERROR, error) if error is not None else Status(),
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=self.scope,
        )
