"""Batching finished spans: a bounded queue, and a thread that hands batches to a sink.

Like the SDK's ``BatchSpanProcessor``, and separate from the transport (``observability.sinks``):
spans leave in batches of about ``max_batch`` (whole events), every ``flush_interval``
seconds or as soon as a full batch is waiting; when more than ``max_queue`` wait, the
oldest events' are dropped.

Each event's spans are encoded for the sink (:meth:`Sink.encode`: rows pickled, for the
export process) on the thread that submits them, the event loop's, as the event ends; the
background thread only moves bytes. Measured on the 2-core machine, the same rows and pickle
cost two to four times as much when the background thread did them: it ran on the other
core, reading objects made on this one, and took the GIL from the event loop to do it.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

from observability.sinks import Sink
from observability.spans import Trace

log = logging.getLogger("falco_talon.tracing")


class BatchProcessor:
    """Queues finished spans and ships them to ``sink`` in batches, from a thread of its own."""

    def __init__(
        self,
        sink: Sink | None,
        *,
        flush_interval: float = 0.5,
        max_batch: int = 512,
        max_queue: int = 65536,
    ) -> None:
        self.sink = sink
        self._queue: deque[tuple[int, Any]] = deque()
        """(spans, the sink's encoding of them): one item an event."""
        self._submitted = 0
        """Spans queued by :meth:`submit` (written by the submitting thread only)."""
        self._taken = 0
        """Spans taken off the queue by :meth:`flush` (under its lock only): the spans
        waiting are ``_submitted - _taken - dropped``, with no count two threads write."""
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._interval = flush_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flushing = threading.Lock()
        self._thread: threading.Thread | None = None
        self.shipped = 0
        """Spans handed to the sink."""
        self.dropped = 0
        """Spans lost because the queue overflowed."""
        self.failed = 0
        """Spans lost because the sink failed (a bug, or the export process is gone)."""

    def submit(self, trace: Trace) -> None:
        """Encode the trace's finished spans for the sink and queue them (the spans still
        open stay on the trace)."""
        spans = trace.take_finished()
        if not spans or self.sink is None:
            return
        try:
            encoded = self.sink.encode(trace.trace_id, trace.remote_parent, spans)
        except Exception:  # a value that cannot be pickled: lose these spans, not the event
            log.exception("encoding %d span(s) for export failed", len(spans))
            self.failed += len(spans)
            return
        queue = self._queue
        queue.append((len(spans), encoded))
        self._submitted += len(spans)
        while self._waiting() > self._max_queue and queue:
            dropped, _ = queue.popleft()
            self.dropped += dropped
        if self._waiting() >= self._max_batch and not self._wake.is_set():
            self._wake.set()

    def _waiting(self) -> int:
        """Spans in the queue."""
        return self._submitted - self._taken - self.dropped

    def start(self) -> None:
        if self.sink is not None and self._thread is None:
            self.sink.start()
            self._thread = threading.Thread(target=self._run, name="otel-export", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()
            if self.sink is not None:
                self.sink.poll()

    def flush(self) -> None:
        """Ship everything queued now (from the processor's thread, or at shutdown)."""
        sink = self.sink
        if sink is None:
            return
        queue = self._queue
        # One flush at a time: the thread's and a caller's (Tracing.flush) would otherwise
        # race for the queue's last items and interleave batches on the sink.
        with self._flushing:
            while queue:
                batch: list[Any] = []
                spans = 0
                while queue and spans < self._max_batch:
                    count, item = queue.popleft()
                    self._taken += count
                    spans += count
                    batch.append(item)
                try:
                    sink.send(batch, spans)
                except Exception:  # a sink bug or outage must not kill the thread
                    log.exception("exporting %d span(s) failed", spans)
                    self.failed += spans
                else:
                    self.shipped += spans

    def shutdown(self) -> None:
        """Ship what is queued, stop the thread, close the sink."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()
        if self.sink is not None:
            self.sink.close()
            self.sink.poll()

    def counts(self) -> dict[str, int]:
        """Spans by outcome: exported, failed, dropped (``falco_talon_spans_total``)."""
        outcomes = self.sink.outcomes if self.sink is not None else None
        return {
            "exported": outcomes.exported if outcomes else 0,
            "failed": self.failed + (outcomes.failed if outcomes else 0),
            "dropped": self.dropped,
        }
