"""Where batches of finished spans go (the transport side of the builtin path; batching is
``observability.processor``'s job).

:class:`ProcessSink` is the one production uses: it pickles each batch, as plain rows, to
the export process (``observability.export``), which encodes OTLP and sends it; encoding
costs more than handling the event, and a process of its own does it on another core
instead of under this process's GIL. The export process reports each batch back: failures
are logged here, in this process's log format, and every span is counted
(:class:`Outcomes`, ``falco_talon_spans_total``). :class:`ExporterSink` hands batches to an
SDK ``SpanExporter`` object in the processor's thread (tests); :class:`RowSink` does the
same work as :class:`ProcessSink` and discards the result (``make bench``).
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
from observability.rows import Item, to_row
from observability.sdk import Converter
from observability.settings import TracingSettings


class Sink:
    """Where batches of finished spans go, from the processor's thread. Subclass to measure
    or to test."""

    def __init__(self, where: str = "") -> None:
        self.outcomes = Outcomes(where)

    def start(self) -> None:
        return None

    def send(self, batch: list[Item]) -> None:
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

    def send(self, batch: list[Item]) -> None:
        result = self.exporter.export([self.convert(*item) for item in batch])
        failed = result is not SpanExportResult.SUCCESS
        self.outcomes.report(len(batch), "the exporter reported a failure" if failed else None)

    def close(self) -> None:
        self.exporter.shutdown()


class RowSink(Sink):
    """Turns a batch into the plain rows the export process receives, pickled."""

    def encode(self, batch: list[Item]) -> bytes:
        return pickle.dumps([to_row(*item) for item in batch], protocol=pickle.HIGHEST_PROTOCOL)

    def send(self, batch: list[Item]) -> None:
        self.encode(batch)


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

    def send(self, batch: list[Item]) -> None:
        if self._process is None or not self._process.is_alive():
            raise RuntimeError("the trace export process is not running")
        self._conn.send_bytes(self.encode(batch))
        self._sent += len(batch)

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
