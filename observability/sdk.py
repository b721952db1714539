"""The OpenTelemetry SDK's span processing, for ``otel.exportWith: sdk``; and recorded spans
as the SDK's ``ReadableSpan``.

falco-talon records spans itself (``observability.spans``) and, by default, encodes and
sends them itself (``observability.export``). With ``exportWith: sdk`` its finished spans
are converted to ``ReadableSpan`` (:class:`Converter`: the same names, attributes, events,
status and parents) and handed to an SDK ``TracerProvider`` whose ``BatchSpanProcessor``
feeds the SDK exporters ``otel.tracesExporter`` names: ``otlp`` is the SDK's OTLP exporter
(``opentelemetry-exporter-otlp-proto-grpc`` or ``-http``) configured from the ``otel``
section like the builtin sender; any other name is an ``opentelemetry_traces_exporter``
entry point of an installed package (``console``, or a vendor's exporter), built with no
arguments (it reads its own ``OTEL_*`` variables). The SDK encodes in this process, under
its GIL: ``make bench`` measures what that costs (``tracing_sdk``).

:class:`~observability.sinks.ExporterSink` uses :class:`Converter` too (an SDK exporter
object passed to :class:`~observability.tracing.Tracing`, in tests).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SynchronousMultiSpanProcessor,
    TracerProvider,
)
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from observability.attributes import otel_attributes
from observability.outcomes import Outcomes
from observability.rows import Row, row_of
from observability.settings import TracingSettings
from observability.spans import SpanRecord, Trace

EXPORTER_GROUP = "opentelemetry_traces_exporter"
"""The entry point group of the SDK's span exporters (``OTEL_TRACES_EXPORTER`` names)."""


class Converter:
    """Turns recorded spans into the SDK's ReadableSpans (attribute names, bounds, status)."""

    def __init__(self, resource: Mapping[str, str]) -> None:
        self.resource = Resource(dict(resource))  # as given: no detector reads the env again
        self.scope = InstrumentationScope("falco-talon")

    def __call__(self, trace_id: int, remote_parent: int | None, r: SpanRecord) -> ReadableSpan:
        return self.row(trace_id, remote_parent, row_of(r))

    def row(self, trace_id: int, remote_parent: int | None, row: Row) -> ReadableSpan:
        """A :data:`~observability.rows.Row` of the trace ``trace_id`` as a ReadableSpan."""
        name, span_id, parent_id, start_ns, end_ns, kind, attributes, events, error = row
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
            events=[Event(n, otel_attributes(attrs), ts) for n, ts, attrs in events or ()],
            kind=SpanKind(kind),
            status=Status(StatusCode.ERROR, error) if error is not None else Status(),
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=self.scope,
        )


def otlp_exporter(settings: TracingSettings) -> SpanExporter:
    """The SDK's OTLP span exporter, configured as the builtin sender would be: the same
    endpoint resolution, headers, timeout, compression and TLS files."""
    from observability.otlp import read_pem, ssl_context

    gzip = settings.compression == "gzip"
    if settings.protocol == "grpc":
        import grpc
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        target, tls = settings.grpc_target()
        return GrpcExporter(
            endpoint=f"{'https' if tls else 'http'}://{target}",
            insecure=not tls,
            credentials=grpc.ssl_channel_credentials(*read_pem(settings)) if tls else None,
            headers={k.lower(): v for k, v in settings.headers.items()},
            timeout=settings.timeout,
            compression=grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression,
        )
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    url = settings.traces_url()
    if url.startswith("https:"):
        ssl_context(settings)  # unreadable or mismatched files: a start-up error, named
    return HttpExporter(
        endpoint=url,
        certificate_file=settings.certificate or None,
        client_key_file=settings.client_key or None,
        client_certificate_file=settings.client_certificate or None,
        headers=dict(settings.headers),
        timeout=settings.timeout,
        compression=Compression.Gzip if gzip else Compression.NoCompression,
        session=_own_ca_session(),
    )


def _own_ca_session() -> Any:
    """A requests session whose own CA bundle (``otel.certificate``) is not replaced by
    ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``, as requests otherwise does on every request
    (psf/requests#3829): without it, the SDK's HTTP exporter ignores
    ``OTEL_EXPORTER_OTLP_CERTIFICATE`` wherever those variables are set."""
    import requests

    class OwnCaSession(requests.Session):
        def merge_environment_settings(
            self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any
        ) -> Any:
            merged = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if isinstance(self.verify, str):
                merged["verify"] = self.verify
            return merged

    return OwnCaSession()


def sdk_exporters(settings: TracingSettings) -> list[tuple[str, SpanExporter]]:
    """(where, exporter) for each name of ``otel.tracesExporter`` but ``none``. Raises
    ValueError for a name no installed package provides."""
    out: list[tuple[str, SpanExporter]] = []
    for name in settings.traces_exporter:
        if name == "none":
            continue
        if name == "otlp":
            out.append((settings.collector(), otlp_exporter(settings)))
            continue
        found = entry_points(group=EXPORTER_GROUP, name=name)
        if not found:
            known = sorted({"otlp", "none", *(e.name for e in entry_points(group=EXPORTER_GROUP))})
            raise ValueError(
                f"otel.tracesExporter: no SDK span exporter named {name!r} is installed; "
                f"known: {', '.join(known)}"
            )
        out.append((f"the {name} exporter", next(iter(found)).load()()))
    return out


class _Counted(SpanExporter):
    """An SDK exporter whose results are counted (and failures logged) in :class:`Outcomes`."""

    def __init__(self, exporter: SpanExporter, outcomes: Outcomes) -> None:
        self.exporter = exporter
        self.outcomes = outcomes

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = self.exporter.export(spans)
        failed = result is not SpanExportResult.SUCCESS
        self.outcomes.report(len(spans), "the SDK exporter reported a failure" if failed else None)
        return result

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class SdkProcessor:
    """Finished spans, converted, through an SDK ``TracerProvider``'s span processors: a
    ``BatchSpanProcessor`` per exporter (``OTEL_BSP_*`` tune them). The same surface as
    :class:`~observability.processor.BatchProcessor`."""

    def __init__(self, settings: TracingSettings, resource: Mapping[str, str]) -> None:
        self.convert = Converter(resource)
        self.outcomes: list[Outcomes] = []
        processors = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]
        self.provider = TracerProvider(
            resource=self.convert.resource,
            active_span_processor=processors,
            shutdown_on_exit=False,
        )
        for where, exporter in sdk_exporters(settings):
            outcomes = Outcomes(where)
            self.outcomes.append(outcomes)
            self.provider.add_span_processor(BatchSpanProcessor(_Counted(exporter, outcomes)))
        self._on_end = processors.on_end
        self.shipped = 0
        """Spans handed to the SDK's span processors."""

    def submit(self, trace: Trace) -> None:
        """Hand the trace's finished spans to the span processors (the spans still open
        stay on the trace), as the SDK does when a span ends."""
        convert, on_end = self.convert, self._on_end
        for record in trace.take_finished():
            on_end(convert(trace.trace_id, trace.remote_parent, record))
            self.shipped += 1

    def start(self) -> None:
        return None  # the BatchSpanProcessors run their threads from the start

    def flush(self) -> None:
        self.provider.force_flush()

    def shutdown(self) -> None:
        self.provider.shutdown()

    def counts(self) -> dict[str, int]:
        """Span exports by outcome (each exporter's, with several); the SDK does not say
        how many its full queue dropped."""
        return {
            "exported": sum(o.exported for o in self.outcomes),
            "failed": sum(o.failed for o in self.outcomes),
            "dropped": 0,
        }
