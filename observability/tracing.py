"""OpenTelemetry traces of every event, recorded cheaply and exported in batches.

Cross-cutting. One trace per event: the HTTP request is the root span; below it a span
per state of the event's state machine; below a state, a span per actionner call (and
below that, per Kubernetes API call) and per notifier send; skipped steps are span events
carrying the reason.

This module is the public surface; the layers below it, each with one job:

- ``observability.spans``: recording (:class:`SpanRecord`, :class:`Trace`, the active span);
- ``observability.propagation``: the incoming W3C ``traceparent``;
- ``observability.settings``: :class:`TracingSettings`, the ``otel`` config section;
- ``observability.processor``: batching, in a background thread;
- ``observability.sinks``: where batches go; in production, to the export process;
- ``observability.export`` and ``observability.otlp``: the export process, which encodes
  OTLP/protobuf itself and sends it over gRPC or HTTP (the SDK's exporters are not used);
- ``observability.attributes``: attribute naming and length limits, for both encoders.

Spans are recorded as plain objects while the event runs and encoded only in the export
process. Tracing off costs a random trace id per event, which logs and notifications still
carry so people can search for it. A W3C ``traceparent`` on the incoming request is honoured.
"""

from __future__ import annotations

import random

from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.trace import SpanKind

from observability.processor import BatchProcessor
from observability.propagation import parse_traceparent
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


class Tracing:
    """The process's tracing: starts (and samples) traces, ships finished spans.

    Finished spans are batched by a :class:`~observability.processor.BatchProcessor` and,
    with tracing enabled, go as plain rows to the export process. An SDK exporter object
    passed in (tests) or a :class:`Sink` (benchmarks) takes the export process's place."""

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
        self.enabled = settings.enabled or exporter is not None or sink is not None
        self.ratio = settings.sampling_ratio
        self._bound = int(self.ratio * (1 << 64))
        if sink is None and exporter is not None:
            sink = ExporterSink(exporter, settings.service_name)
        elif sink is None and settings.enabled:
            sink = ProcessSink(settings)
        self.processor = BatchProcessor(
            sink, flush_interval=flush_interval, max_batch=max_batch, max_queue=max_queue
        )

    @property
    def shipped(self) -> int:
        """Spans handed to the exporter (thread) or the export process."""
        return self.processor.shipped

    @property
    def dropped(self) -> int:
        """Spans lost: the queue overflowed, or the exporter/process failed."""
        return self.processor.dropped

    def begin(self, traceparent: str | None = None) -> Trace:
        """A trace for a new event, continuing the caller's trace when it sent one."""
        remote = parse_traceparent(traceparent)
        if remote is not None:
            trace_id, parent_id, sampled = remote
            return Trace(trace_id, self.enabled and sampled, parent_id)
        trace_id = random.getrandbits(128) or 1
        sampled = self.enabled and (self.ratio >= 1.0 or (trace_id & ((1 << 64) - 1)) < self._bound)
        return Trace(trace_id, sampled)

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
