"""OpenTelemetry traces of every event, recorded cheaply and exported in batches.

Cross-cutting. One trace per event: the HTTP request is the root span; below it a span
per state of the event's state machine; below a state, a span per actionner call (and
below that, per Kubernetes API call) and per notifier send; skipped steps are span events
carrying the reason.

Why not ``tracer.start_span`` everywhere: on this machine an SDK span costs ~30 µs to
start and end, and an event has about ten of them, more than handling the event itself.
So spans are *recorded* as plain :class:`SpanRecord` objects while the event runs (ids
drawn up front, so children can name their parents at once) and turned into the SDK's
own :class:`~opentelemetry.sdk.trace.ReadableSpan` when the run ends, then exported by the
SDK's OTLP exporters (gRPC or HTTP/protobuf) from a background thread, in batches.
Tracing off costs a random trace id per event, which logs and notifications still carry
so people can search for it. A W3C ``traceparent`` on the incoming request is honoured.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import pickle
import random
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

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
]

log = logging.getLogger("falco_talon.tracing")

MAX_ATTRIBUTE_LENGTH = 256
"""Longer string attributes (an event's output) are cut to this many characters."""


def _bounded(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_ATTRIBUTE_LENGTH:
        return value[: MAX_ATTRIBUTE_LENGTH - 3] + "..."
    return value


def _otel_attributes(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """``talon__rule`` -> ``talon.rule``; values bounded; None values left out."""
    return {k.replace("__", "."): _bounded(v) for k, v in attributes.items() if v is not None}


@dataclass(slots=True, eq=False)
class SpanRecord:
    """A span being recorded: cheap to make, turned into an OTel span at the end."""

    name: str
    span_id: int
    parent_id: int | None
    start_ns: int
    kind: SpanKind = SpanKind.INTERNAL
    end_ns: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)
    error: str | None = None

    # Attribute names are written ``talon__rule`` (for ``talon.rule``) at the call sites and
    # translated, bounded and stripped of None values only when the span is exported, off
    # the per-event path.

    def set(self, **attributes: Any) -> None:
        self.attributes.update(attributes)

    def event(self, name: str, **attributes: Any) -> None:
        self.events.append((name, time.time_ns(), attributes))

    def fail(self, description: str, exc: BaseException | None = None) -> None:
        """Status ERROR, and the exception recorded as OTel's ``exception`` event."""
        self.error = description[:MAX_ATTRIBUTE_LENGTH]
        if exc is not None:
            self.event(
                "exception",
                exception__type=type(exc).__name__,
                exception__message=str(exc),
                exception__stacktrace="".join(traceback.format_exception(exc))[-2000:],
            )

    def end(self) -> None:
        if not self.end_ns:
            self.end_ns = time.time_ns()


class _NoSpan(SpanRecord):
    """What an unsampled trace hands out: accepts everything, records nothing."""

    def set(self, **attributes: Any) -> None:
        return None

    def event(self, name: str, **attributes: Any) -> None:
        return None

    def fail(self, description: str, exc: BaseException | None = None) -> None:
        return None

    def end(self) -> None:
        return None


NO_SPAN = _NoSpan("", 0, None, 0)


class Trace:
    """The spans of one event. ``sampled`` False: ids only, nothing recorded."""

    __slots__ = ("remote_parent", "sampled", "spans", "trace_id")

    def __init__(self, trace_id: int, sampled: bool, remote_parent: int | None = None) -> None:
        self.trace_id = trace_id
        self.sampled = sampled
        self.remote_parent = remote_parent
        self.spans: list[SpanRecord] = []

    @property
    def trace_id_hex(self) -> str:
        return f"{self.trace_id:032x}"

    def start(
        self,
        name: str,
        parent: SpanRecord | None = None,
        *,
        kind: SpanKind = SpanKind.INTERNAL,
        **attributes: Any,
    ) -> SpanRecord:
        if not self.sampled:
            return NO_SPAN
        parent_id = parent.span_id if parent is not None else self.remote_parent
        record = SpanRecord(
            name,
            random.getrandbits(64) or 1,
            parent_id,
            time.time_ns(),
            kind,
            attributes=attributes,
        )
        self.spans.append(record)
        return record


NO_TRACE = Trace(0, sampled=False)

ACTIVE: ContextVar[tuple[Trace, SpanRecord] | None] = ContextVar("talon_span", default=None)
"""The trace and span the current task works under (log lines carry their ids)."""


@contextlib.contextmanager
def activate(trace: Trace, span: SpanRecord) -> Iterator[None]:
    """Make ``span`` the parent of spans started with :func:`child` (and of log lines)."""
    token = ACTIVE.set((trace, span))
    try:
        yield
    finally:
        ACTIVE.reset(token)


@contextlib.contextmanager
def child(name: str, **attributes: Any) -> Iterator[SpanRecord]:
    """A span under the active one (a Kubernetes API call under its actionner); a no-op
    outside a traced event. Raising inside marks it ERROR and records the exception."""
    current = ACTIVE.get()
    if current is None:
        yield NO_SPAN
        return
    trace, parent = current
    span = trace.start(name, parent, **attributes)
    token = ACTIVE.set((trace, span))
    try:
        yield span
    except BaseException as exc:
        span.fail(f"{type(exc).__name__}: {exc}", exc)
        raise
    finally:
        ACTIVE.reset(token)
        span.end()


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) in hex for log lines, or None outside an event."""
    current = ACTIVE.get()
    if current is None:
        return None
    trace, span = current
    return trace.trace_id_hex, (f"{span.span_id:016x}" if span.span_id else "")


def parse_traceparent(header: str | None) -> tuple[int, int, bool] | None:
    """W3C ``00-<trace id>-<parent id>-<flags>`` -> (trace id, parent span id, sampled)."""
    if not header:
        return None
    parts = header.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or parts[0] == "ff":
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3][:2], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(flags & 1)


@dataclass(frozen=True, slots=True)
class TracingSettings:
    """How traces are exported (the ``otel`` section of the config)."""

    enabled: bool = False
    endpoint: str = ""
    """OTLP endpoint: ``host:port`` for gRPC, ``http://host:4318/v1/traces`` for HTTP."""
    protocol: str = "grpc"
    """``grpc`` or ``http/protobuf``."""
    headers: Mapping[str, str] = field(default_factory=dict)
    insecure: bool = True
    timeout: float = 10.0
    sampling_ratio: float = 1.0
    service_name: str = "falco-talon"


Item = tuple[int, int | None, SpanRecord]
"""(trace id, the remote parent's span id, the span) waiting for export."""


class Tracing:
    """The process's tracing: starts traces, ships finished spans in the background.

    Spans leave in batches from a background thread. With an OTLP endpoint configured they
    go, as plain tuples, to an export *process* that turns them into OTel spans and exports
    them with the SDK's OTLP exporter: converting and encoding spans costs more than handling
    the event, and a process of its own does it on another core instead of under this
    process's GIL. An exporter object passed in (tests, benchmarks) runs in the thread."""

    def __init__(
        self,
        settings: TracingSettings = TracingSettings(),
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
        self._sink: Sink | None = sink
        if sink is not None:
            pass
        elif exporter is not None:
            self._sink = _ThreadSink(exporter, settings.service_name)
        elif settings.enabled:
            self._sink = _ProcessSink(settings)
        self._queue: deque[Item] = deque()
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._interval = flush_interval
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.shipped = 0
        """Spans handed to the exporter (thread) or the export process."""
        self.dropped = 0
        """Spans lost: the queue overflowed, or the exporter/process failed."""

    # -- traces --------------------------------------------------------------------------------

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
        if not trace.sampled or not trace.spans:
            return
        queue = self._queue
        remaining = []
        for record in trace.spans:
            if record.end_ns:
                queue.append((trace.trace_id, trace.remote_parent, record))
            else:
                remaining.append(record)
        trace.spans = remaining
        if len(queue) > self._max_queue:
            while len(queue) > self._max_queue:
                queue.popleft()
                self.dropped += 1
        if len(queue) >= self._max_batch:
            self._wake.set()

    # -- export --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._sink is not None and self._thread is None:
            self._sink.start()
            self._thread = threading.Thread(target=self._run, name="otel-export", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Ship everything queued now (from the export thread, or at shutdown)."""
        sink = self._sink
        if sink is None:
            self._queue.clear()
            return
        while self._queue:
            batch: list[Item] = []
            while self._queue and len(batch) < self._max_batch:
                batch.append(self._queue.popleft())
            try:
                sink.send(batch)
            except Exception:  # an exporter bug or outage must not kill the thread
                log.exception("exporting %d span(s) failed", len(batch))
                self.dropped += len(batch)
            else:
                self.shipped += len(batch)

    def shutdown(self) -> None:
        """Ship what is queued and stop the thread and the export process."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        self.flush()
        if self._sink is not None:
            self._sink.close()


class Sink:
    """Where batches of finished spans go, from the export thread. Subclass to measure or
    to test (``make bench`` discards rows after the same work the export process path does).
    """

    def start(self) -> None:
        return None

    def send(self, batch: list[Item]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        return None


class _ThreadSink(Sink):
    """Converts and exports in the calling (export) thread."""

    def __init__(self, exporter: SpanExporter, service_name: str) -> None:
        self.exporter = exporter
        self.convert = _Converter(service_name)

    def send(self, batch: list[Item]) -> None:
        result = self.exporter.export([self.convert(*item) for item in batch])
        if getattr(result, "name", "SUCCESS") != "SUCCESS":
            raise RuntimeError("the trace collector refused the spans")

    def close(self) -> None:
        self.exporter.shutdown()


class RowSink(Sink):
    """Turns a batch into the plain rows the export process receives, pickled."""

    def encode(self, batch: list[Item]) -> bytes:
        return pickle.dumps([_row(*item) for item in batch], protocol=pickle.HIGHEST_PROTOCOL)

    def send(self, batch: list[Item]) -> None:
        self.encode(batch)


class _ProcessSink(RowSink):
    """Pickles batches of plain tuples to an export process (see :func:`_export_main`)."""

    def __init__(self, settings: TracingSettings) -> None:
        self.settings = settings
        self._conn: Any = None
        self._process: Any = None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_export_main,
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


def _row(trace_id: int, remote_parent: int | None, r: SpanRecord) -> tuple[Any, ...]:
    """A recorded span as a plain tuple (what crosses to the export process)."""
    return (
        trace_id,
        remote_parent,
        r.name,
        r.span_id,
        r.parent_id,
        r.start_ns,
        r.end_ns,
        r.kind.value,
        r.attributes,
        r.events,
        r.error,
    )


class _Converter:
    """Turns recorded spans into the SDK's ReadableSpans (attribute names, bounds, status)."""

    def __init__(self, service_name: str) -> None:
        self.resource = Resource.create({"service.name": service_name})
        self.scope = InstrumentationScope("falco-talon")

    def __call__(self, trace_id: int, remote_parent: int | None, r: SpanRecord) -> ReadableSpan:
        return self.row(*_row(trace_id, remote_parent, r))

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
            attributes=_otel_attributes(attributes),
            events=[Event(n, _otel_attributes(attrs), ts) for n, ts, attrs in events],
            kind=SpanKind(kind),
            status=Status(StatusCode.ERROR, error) if error is not None else Status(),
            start_time=start_ns,
            end_time=end_ns,
            instrumentation_scope=self.scope,
        )


def _export_main(conn: Any, settings: TracingSettings) -> None:  # pragma: no cover - subprocess
    """The export process: read batches until end of stream, encode OTLP, send."""
    from observability.otlp import OtlpSender, chunks, encode_request

    logging.basicConfig(level=logging.WARNING, format="falco-talon otel-export: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    sender = OtlpSender(
        settings.endpoint, settings.protocol, settings.headers, settings.insecure, settings.timeout
    )
    try:
        while True:
            try:
                data = conn.recv_bytes()
            except EOFError:
                break
            if not data:
                break
            rows = pickle.loads(data)  # our own pipe, from our own parent
            for chunk in chunks(rows, 512):
                sender.send(encode_request(chunk, settings.service_name))
    finally:
        sender.close()
