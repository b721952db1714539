"""Where batches of finished spans go (the transport side of the builtin path; batching is
``observability.processor``'s job).

A sink says how an event's finished spans are encoded for it (:meth:`Sink.encode`, called
on the event loop's thread as the event ends) and sends batches of those encodings (from
the processor's thread).

:class:`ProcessSink` is the one production uses: each event's spans as plain rows, pickled,
sent in batches to the export process (``observability.export``), which encodes OTLP and
sends it; OTLP encoding costs more than handling the event, and a process of its own does
it on another core instead of under this process's GIL. The export process reports each
batch back: failures are logged here, in this process's log format, and every span is
counted (:class:`Outcomes`, ``falco_talon_spans_total``). :class:`ExporterSink` converts
each event's spans to SDK spans and hands batches to an SDK ``SpanExporter`` object in the
processor's thread (tests); :class:`RowSink` does the same work as :class:`ProcessSink` and
discards the result (``make bench``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
import queue
from collections.abc import Mapping
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from observability.outcomes import Outcomes
from observability.rows import row_of
from observability.sdk import Converter
from observability.settings import TracingSettings
from observability.spans import SpanRecord

_PROTOCOL = pickle.HIGHEST_PROTOCOL


class Sink:
    """How an event's finished spans are encoded (:meth:`encode`, on the event's thread) and
    where batches of them go (:meth:`send`, from the processor's thread). Subclass to
    measure or to test."""

    def __init__(self, where: str = "") -> None:
        self.outcomes = Outcomes(where)

    def start(self) -> None:
        return None

    def encode(self, trace_id: int, remote_parent: int | None, spans: list[SpanRecord]) -> Any:
        """One event's finished spans as this sink sends them (on the event's thread)."""
        raise NotImplementedError

    def send(self, batch: list[Any], spans: int) -> None:
        """Send a batch of :meth:`encode` results, ``spans`` spans in all (from the
        processor's thread)."""
        raise NotImplementedError

    def poll(self) -> None:
        """Take in what the transport reported since (the export process's reports)."""
        return None

    def close(self) -> None:
        return None


class ExporterSink(Sink):
    """Converts to SDK spans and exports them with an SDK exporter, in the calling thread."""

    def __init__(self, exporter: SpanExporter, resource: Mapping[str, str]) -> None:
        super().__init__(type(exporter).__name__)
        self.exporter = exporter
        self.convert = Converter(resource)

    def encode(self, trace_id: int, remote_parent: int | None, spans: list[SpanRecord]) -> Any:
        return [self.convert(trace_id, remote_parent, r) for r in spans]

    def send(self, batch: list[Any], spans: int) -> None:
        result = self.exporter.export([span for converted in batch for span in converted])
        failed = result is not SpanExportResult.SUCCESS
        self.outcomes.report(spans, "the exporter reported a failure" if failed else None)

    def close(self) -> None:
        self.exporter.shutdown()


class RowSink(Sink):
    """Each event's spans as the plain rows the export process receives, pickled
    (:data:`~observability.rows.TraceRows`); a batch is their pickles one after the other."""

    def encode(self, trace_id: int, remote_parent: int | None, spans: list[SpanRecord]) -> bytes:
        return pickle.dumps((trace_id, remote_parent, list(map(row_of, spans))), _PROTOCOL)

    def send(self, batch: list[Any], spans: int) -> None:
        b"".join(batch)


class ProcessSink(RowSink):
    """Pickles batches of plain rows to the export process (``observability.export``)."""

    def __init__(self, settings: TracingSettings, resource: Mapping[str, str]) -> None:
        super().__init__(settings.collector())
        self.settings = settings
        self.resource = dict(resource)
        self._conn: Any = None
        self._reports: Any = None
        self._process: Any = None
        self._sent = 0

    def start(self) -> None:
        from observability.export import export_main

        ctx = multiprocessing.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        self._reports = ctx.Queue()  # the child's puts never block (a feeder thread)
        self._process = ctx.Process(
            target=export_main,
            args=(reader, self._reports, self.settings, self.resource),
            name="falco-talon-otel-export",
            daemon=True,
        )
        self._process.start()
        reader.close()
        self._conn = writer

    def send(self, batch: list[Any], spans: int) -> None:
        if self._process is None or not self._process.is_alive():
            raise RuntimeError("the trace export process is not running")
        self._conn.send_bytes(b"".join(batch))
        self._sent += spans

    def poll(self) -> None:
        while self._reports is not None:
            try:
                spans, error = self._reports.get_nowait()
            except (queue.Empty, OSError, ValueError):
                return
            self.outcomes.report(spans, error)

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send_bytes(b"")  # end of stream: flush and exit
            self._conn.close()
        if self._process is not None:
            self._process.join(self.settings.timeout + 5)
            if self._process.is_alive():
                self._process.terminate()
        if self._reports is not None:
            with contextlib.suppress(queue.Empty, OSError, ValueError):
                while True:  # the reports of the last batches, flushed as the child exited
                    spans, error = self._reports.get(timeout=0.2)
                    self.outcomes.report(spans, error)
            self._reports.close()
            self._reports = None
        lost = self._sent - self.outcomes.exported - self.outcomes.failed
        if lost > 0:
            self.outcomes.report(lost, "the export process stopped before sending them")
