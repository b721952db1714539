"""Batching finished spans: a bounded queue, and a thread that hands batches to a sink.

Like the SDK's ``BatchSpanProcessor``, and separate from the transport (``observability.sinks``):
spans leave in batches of at most ``max_batch``, every ``flush_interval`` seconds or as soon
as a full batch is waiting; when more than ``max_queue`` wait, the oldest are dropped.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from observability.rows import Item
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
        self._queue: deque[Item] = deque()
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
        """Queue the trace's finished spans (the spans still open stay on the trace)."""
        queue = self._queue
        spans = trace.spans
        trace_id, remote = trace.trace_id, trace.remote_parent
        queue.extend([(trace_id, remote, r) for r in spans if r.end_ns])
        trace.spans = [r for r in spans if not r.end_ns]
        if len(queue) > self._max_queue:
            while len(queue) > self._max_queue:
                queue.popleft()
                self.dropped += 1
        if len(queue) >= self._max_batch and not self._wake.is_set():
            self._wake.set()

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
            self._queue.clear()
            return
        # One flush at a time: the thread's and a caller's (Tracing.flush) would otherwise
        # race for the queue's last items and interleave batches on the sink.
        with self._flushing:
            while self._queue:
                batch: list[Item] = []
                while self._queue and len(batch) < self._max_batch:
                    batch.append(self._queue.popleft())
                try:
                    sink.send(batch)
                except Exception:  # a sink bug or outage must not kill the thread
                    log.exception("exporting %d span(s) failed", len(batch))
                    self.failed += len(batch)
                else:
                    self.shipped += len(batch)

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
