"""Recording spans: cheap plain records while an event runs, the task's active span.

Why not ``tracer.start_span`` everywhere: on this machine an SDK span costs ~30 µs to
start and end, and an event has about ten of them, more than handling the event itself.
So spans are *recorded* as plain :class:`SpanRecord` objects (ids drawn up front, so
children can name their parents at once) and encoded only when they are exported.
"""

from __future__ import annotations

import contextlib
import random
import time
import traceback
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from opentelemetry.trace import SpanKind

from observability.attributes import MAX_ATTRIBUTE_LENGTH

_bits = random.getrandbits
_now = time.time_ns
_INTERNAL = SpanKind.INTERNAL.value


class SpanRecord:
    """A span being recorded: cheap to make, encoded only when exported. (A plain slotted
    class: a dataclass's default factories cost a quarter of a span's recording.)"""

    __slots__ = (
        "attributes",
        "end_ns",
        "error",
        "events",
        "kind",
        "name",
        "parent_id",
        "span_id",
        "start_ns",
    )

    def __init__(
        self,
        name: str,
        span_id: int,
        parent_id: int | None,
        start_ns: int,
        kind: int = _INTERNAL,
        end_ns: int = 0,
        attributes: dict[str, Any] | None = None,
        events: list[tuple[str, int, dict[str, Any]]] | None = None,
        error: str | None = None,
    ) -> None:
        self.name = name
        self.span_id = span_id
        self.parent_id = parent_id
        self.start_ns = start_ns
        self.kind = kind
        """The SDK's ``SpanKind`` value (an int: rows carry it as is)."""
        self.end_ns = end_ns
        self.attributes: dict[str, Any] = {} if attributes is None else attributes
        self.events: list[tuple[str, int, dict[str, Any]]] | None = events
        """None until the first event (most spans have none)."""
        self.error = error

    def __repr__(self) -> str:
        return f"SpanRecord({self.name!r}, {self.span_id:016x}, parent {self.parent_id})"

    # Attribute names are written ``talon__rule`` (for ``talon.rule``) at the call sites and
    # translated, bounded and stripped of None values only when the span is exported, off
    # the per-event path (``observability.attributes``).

    def set(self, **attributes: Any) -> None:
        self.attributes.update(attributes)

    def event(self, name: str, **attributes: Any) -> None:
        if self.events is None:
            self.events = []
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

    __slots__ = ("_hex", "remote_parent", "sampled", "spans", "trace_id")

    def __init__(self, trace_id: int, sampled: bool, remote_parent: int | None = None) -> None:
        self.trace_id = trace_id
        self.sampled = sampled
        self.remote_parent = remote_parent
        self.spans: list[SpanRecord] = []
        self._hex = ""

    @property
    def trace_id_hex(self) -> str:
        """The id in hex, as log lines and links print it (formatted once: every log line
        of the event reads it)."""
        if not self._hex:
            self._hex = f"{self.trace_id:032x}"
        return self._hex

    def start(
        self,
        name: str,
        parent: SpanRecord | None = None,
        *,
        kind: SpanKind | None = None,
        **attributes: Any,
    ) -> SpanRecord:
        if not self.sampled:
            return NO_SPAN
        record = SpanRecord(
            name,
            _bits(64) or 1,
            parent.span_id if parent is not None else self.remote_parent,
            _now(),
            _INTERNAL if kind is None else kind.value,
            0,
            attributes,
        )
        self.spans.append(record)
        return record

    def take_finished(self) -> list[SpanRecord]:
        """The spans that have ended, taken off the trace (those still open stay)."""
        spans = self.spans
        done = [r for r in spans if r.end_ns]
        self.spans = [r for r in spans if not r.end_ns] if len(done) < len(spans) else []
        return done


NO_TRACE = Trace(0, sampled=False)

ACTIVE: ContextVar[tuple[Trace, SpanRecord] | None] = ContextVar("talon_span", default=None)
"""The trace and span the current task works under (log lines carry their ids)."""


class _Activation:
    """The context manager :func:`activate` returns (a class: it is entered once per state
    of every event, and a generator-based one costs twice as much)."""

    __slots__ = ("_token", "_value")

    def __init__(self, value: tuple[Trace, SpanRecord]) -> None:
        self._value = value

    def __enter__(self) -> None:
        self._token = ACTIVE.set(self._value)

    def __exit__(self, *exc: object) -> None:
        ACTIVE.reset(self._token)


def activate(trace: Trace, span: SpanRecord) -> _Activation:
    """Make ``span`` the active span for the block: the parent of spans started with
    :func:`child`, and the ids log lines carry. The previous one is restored on exit, even
    when the block raises."""
    return _Activation((trace, span))


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
