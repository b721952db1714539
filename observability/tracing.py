"""OpenTelemetry traces of every event, recorded cheaply and exported in batches.

Cross-cutting. One trace per event: the HTTP request is the root span; below it a span
per state of the event's state machine; below a state, a span per actionner call (and
below that, per Kubernetes API call) and per notifier send; skipped steps are span events
carrying the reason.

This module is the public surface; the layers below it, each with one job:

- ``observability.spans``: recording (:class:`SpanRecord`, :class:`Trace`, the active span);
- ``observability.propagation``: the incoming W3C ``traceparent``;
- ``observability.sampling``: which events are traced (``OTEL_TRACES_SAMPLER``);
- ``observability.settings``: :class:`TracingSettings`, the ``otel`` config section, and
  where spans go (the ``OTEL_EXPORTER_OTLP_*`` rules);
- ``observability.resource``: who sent the spans (``service.*``, ``OTEL_RESOURCE_ATTRIBUTES``);
- the builtin export path (``otel.exportWith: builtin``, the default):
  ``observability.processor`` (batching, in a background thread), ``observability.sinks``
  (where batches go: the export process), ``observability.export`` and
  ``observability.otlp`` (the export process, which encodes OTLP/protobuf itself and sends
  it over gRPC or HTTP; no SDK exporter involved);
- the SDK path (``otel.exportWith: sdk``): ``observability.sdk``, the SDK's
  ``TracerProvider``, ``BatchSpanProcessor`` and exporters (OTLP or any other installed);
- ``observability.outcomes``: spans exported or failed, whichever path (logged, counted);
- ``observability.attributes``: attribute naming and length limits, for both encoders.

Spans are recorded as plain objects while the event runs and only converted or encoded on
their way out. Tracing off costs a random trace id per event, which logs and notifications
still carry so people can search for it. A W3C ``traceparent`` on the incoming request is
continued (and, with a ``parentbased_`` sampler, its sampled flag followed).
"""

from __future__ import annotations

import random
from typing import Protocol

from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind

from observability.processor import BatchProcessor
from observability.propagation import parse_traceparent
from observability.resource import resource_attributes
from observability.sampling import Sampler
from observability.settings import TracingSettings
from observability.sinks import ExporterSink, ProcessSink, RowSink, Sink
from observability.spans import (
    ACTIVE,
    NO_SPAN,
    NO_TRACE,
    SpanRecord,
    Trace,
    activate,
    child,
    current_ids,
)

__all__ = [
    "ACTIVE",
    "NO_SPAN",
    "NO_TRACE",
    "RowSink",
    "Sink",
    "SpanKind",
    "SpanRecord",
    "Trace",
    "Tracing",
    "TracingSettings",
    "activate",
    "child",
    "current_ids",
    "parse_traceparent",
]

_OFF = TracingSettings()


class Processor(Protocol):
    """What takes finished spans: the builtin :class:`BatchProcessor` or the SDK's
    (:class:`observability.sdk.SdkProcessor`)."""

    shipped: int

    def submit(self, trace: Trace) -> None: ...
    def start(self) -> None: ...
    def flush(self) -> None: ...
    def shutdown(self) -> None: ...
    def counts(self) -> dict[str, int]: ...


class Tracing:
    """The process's tracing: starts (and samples) traces, ships finished spans.

    With tracing on, finished spans take the builtin path (batched by a
    :class:`~observability.processor.BatchProcessor`, sent as plain rows to the export
    process) or, with ``exportWith: sdk``, the SDK's (``observability.sdk``). An SDK
    exporter object passed in (tests) or a :class:`Sink` (benchmarks) takes the export
    process's place.

    Raises ValueError for settings that cannot work (an unknown exporter, an unreadable
    certificate file): a start-up error."""

    def __init__(
        self,
        settings: TracingSettings = _OFF,
        exporter: SpanExporter | None = None,
        *,
        sink: Sink | None = None,
        flush_interval: float = 0.5,
        max_batch: int = 512,
        max_queue: int = 65536,
    ) -> None:
        self.settings = settings
        exporting = settings.exporting()
        self.enabled = exporting or exporter is not None or sink is not None
        self.sampler = Sampler(settings.sampler, settings.sampling_ratio)
        self.resource = resource_attributes(settings)
        self.processor: Processor
        if sink is None and exporter is None and exporting and settings.export_with == "sdk":
            from observability.sdk import SdkProcessor

            self.processor = SdkProcessor(settings, self.resource)
            return
        if sink is None and exporter is not None:
            sink = ExporterSink(exporter, self.resource)
        elif sink is None and exporting:
            _check_builtin(settings)
            sink = ProcessSink(settings, self.resource)
        self.processor = BatchProcessor(
            sink, flush_interval=flush_interval, max_batch=max_batch, max_queue=max_queue
        )

    @property
    def shipped(self) -> int:
        """Spans handed to the exporter (thread), the export process or the SDK."""
        return self.processor.shipped

    def counts(self) -> dict[str, int]:
        """Spans by outcome, for ``falco_talon_spans_total``: ``exported`` (the collector
        took them), ``failed`` (it could not be reached or refused them: logged),
        ``dropped`` (the export queue overflowed)."""
        return self.processor.counts()

    @property
    def dropped(self) -> int:
        """Spans lost: the queue overflowed, or the export failed."""
        counts = self.counts()
        return counts["dropped"] + counts["failed"]

    def begin(self, traceparent: str | None = None) -> Trace:
        """A trace for a new event, continuing the caller's trace when it sent one."""
        remote = parse_traceparent(traceparent)
        if remote is not None:
            trace_id, parent_id, parent_sampled = remote
            return Trace(
                trace_id, self.enabled and self.sampler(trace_id, parent_sampled), parent_id
            )
        trace_id = random.getrandbits(128) or 1
        return Trace(trace_id, self.enabled and self.sampler(trace_id))

    def submit(self, trace: Trace) -> None:
        """Queue the trace's finished spans for export (the spans still open stay)."""
        if trace.sampled and trace.spans:
            self.processor.submit(trace)

    def start(self) -> None:
        self.processor.start()

    def flush(self) -> None:
        """Ship everything queued now."""
        self.processor.flush()

    def shutdown(self) -> None:
        """Ship what is queued and stop the thread and the export process."""
        self.processor.shutdown()


def _check_builtin(settings: TracingSettings) -> None:
    """The builtin path sends OTLP, and needs readable TLS files: else a start-up error."""
    from observability.otlp import read_pem, ssl_context

    others = [name for name in settings.traces_exporter if name not in ("otlp", "none")]
    if others:
        raise ValueError(
            f"otel.tracesExporter {', '.join(others)}: SDK exporters need "
            "otel.exportWith: sdk (the builtin exporter sends OTLP only)"
        )
    if settings.protocol == "grpc":
        if settings.grpc_target()[1]:
            read_pem(settings)
    elif settings.traces_url().startswith("https:"):
        ssl_context(settings)
