"""Recording spans: the active span (``activate``/``child``) and the ids log lines carry."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from observability.spans import ACTIVE, NO_SPAN, Trace, activate, child, current_ids


def test_activate_makes_a_span_the_parent_of_children_and_restores_the_previous_one() -> None:
    trace = Trace(0xABC, sampled=True)
    outer = trace.start("outer")
    inner = trace.start("inner", outer)
    assert ACTIVE.get() is None
    with activate(trace, outer):
        assert current_ids() == (f"{0xABC:032x}", f"{outer.span_id:016x}")
        with activate(trace, inner), child("call") as span:
            assert span.parent_id == inner.span_id
        assert ACTIVE.get() == (trace, outer)
        with child("call") as span:
            assert span.parent_id == outer.span_id
            assert current_ids() == (f"{0xABC:032x}", f"{span.span_id:016x}")
        assert span.end_ns
    assert ACTIVE.get() is None
    assert current_ids() is None


def test_activate_restores_the_previous_span_when_the_block_raises() -> None:
    trace = Trace(1, sampled=True)
    span = trace.start("state")
    with pytest.raises(RuntimeError), activate(trace, span), child("call") as call:
        raise RuntimeError("boom")
    assert ACTIVE.get() is None
    assert call.error == "RuntimeError: boom"
    assert [name for name, _, _ in call.events] == ["exception"]


async def test_activate_is_per_task() -> None:
    trace = Trace(1, sampled=True)
    a, b = trace.start("a"), trace.start("b")

    async def under(span: object) -> object:
        with activate(trace, a if span == "a" else b):
            await asyncio.sleep(0)
            current = ACTIVE.get()
            return current[1] if current else None

    assert await asyncio.gather(under("a"), under("b")) == [a, b]


def test_child_outside_an_event_and_under_an_unsampled_trace_records_nothing() -> None:
    with child("call") as span:
        assert span is NO_SPAN
    trace = Trace(1, sampled=False)
    with activate(trace, NO_SPAN), child("call") as span:
        assert span is NO_SPAN
    assert trace.spans == []


def test_flushing_from_two_threads_ships_every_span_once() -> None:
    """``Tracing.flush()`` from a caller while the export thread flushes: no span is lost,
    none is sent twice, and neither flush raises (they once raced for the last items)."""
    import threading

    from observability.processor import BatchProcessor
    from observability.sinks import Sink
    from observability.spans import Trace

    received: list[int] = []

    class Collect(Sink):
        def encode(self, trace_id: int, remote: int | None, spans: list[Any]) -> Any:
            return [record.span_id for record in spans]

        def send(self, batch: list[Any], spans: int) -> None:
            received.extend(span_id for ids in batch for span_id in ids)

    processor = BatchProcessor(Collect(), max_batch=7)
    sent = 0
    for _ in range(3000):
        trace = Trace(1, sampled=True)
        trace.start("span").end()
        processor.submit(trace)
        sent += 1
    errors: list[BaseException] = []

    def flush() -> None:
        try:
            processor.flush()
        except BaseException as exc:  # the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=flush) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(received) == sent == len(set(received))
    assert processor.shipped == sent


def test_a_span_value_that_cannot_be_encoded_loses_its_spans_not_the_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Spans are pickled as their event ends, on the event's own thread: a value that cannot
    be pickled (a plug-in's object set on its span) must not raise into the request or the
    run. Those spans are counted failed and logged; the next event's spans still leave."""
    from observability.processor import BatchProcessor
    from observability.sinks import RowSink
    from observability.spans import Trace

    shipped: list[bytes] = []

    class Keep(RowSink):
        def send(self, batch: list[Any], spans: int) -> None:
            shipped.extend(batch)

    processor = BatchProcessor(Keep())
    bad = Trace(1, sampled=True)
    span = bad.start("kubernetes:label")
    span.set(talon__thing=lambda: None)  # no pickle for a lambda
    span.end()
    processor.submit(bad)  # does not raise
    good = Trace(2, sampled=True)
    good.start("received").end()
    processor.submit(good)
    processor.flush()
    assert processor.counts()["failed"] == 1
    assert processor.shipped == 1 and len(shipped) == 1
    assert "encoding 1 span(s) for export failed" in caplog.text
