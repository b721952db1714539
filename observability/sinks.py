"""Where batches of finished spans go (the transport side; batching is
``observability.processor``'s job).

:class:`ProcessSink` is the one production uses: it pickles each batch, as plain rows, to
the export process (``observability.export``), which encodes OTLP and sends it; encoding
costs more than handling the event, and a process of its own does it on another core
instead of under this process's GIL. :class:`ExporterSink` hands batches to an SDK
``SpanExporter`` in the processor's thread (tests); :class:`RowSink` does the same work as
:class:`ProcessSink` and discards the result (``make bench``).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import pickle
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter

from observability.rows import Item, to_row
from observability.sdk import Converter
from observability.settings import TracingSettings


class Sink:
    """Where batches of finished spans go, from the processor's thread. Subclass to measure
    or to test."""

    def start(self) -> None:
        return None

    def send(self, batch: list[Item]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class ExporterSink(Sink):
    """Converts to SDK spans and exports them with an SDK exporter, in the calling thread."""

    def __init__(self, exporter: SpanExporter, service_name: str) -> None:
        self.exporter = exporter
        self.convert = Converter(service_name)

    def send(self, batch: list[Item]) -> None:
        result = self.exporter.export([self.convert(*item) for item in batch])
        if getattr(result, "name", "SUCCESS") != "SUCCESS":
            raise RuntimeError("the trace collector refused the spans")

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

    def __init__(self, settings: TracingSettings) -> None:
        self.settings = settings
        self._conn: Any = None
        self._process: Any = None

    def start(self) -> None:
        from observability.export import export_main

        ctx = multiprocessing.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=export_main,
            args=(reader, self.settings),
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

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send_bytes(b"")  # end of stream: flush and exit
            self._conn.close()
        if self._process is not None:
            self._process.join(self.settings.timeout + 5)
            if self._process.is_alive():
                self._process.terminate()
