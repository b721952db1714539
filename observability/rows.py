"""Finished spans as plain tuples: what the batching processor queues and what crosses to
the export process (pickled), so the export side needs none of the recording classes."""

from __future__ import annotations

from typing import Any

from observability.spans import SpanRecord

Item = tuple[int, int | None, SpanRecord]
"""(trace id, the remote parent's span id, the span) waiting for export."""

Row = tuple[Any, ...]
"""(trace id, remote parent, name, span id, parent id, start ns, end ns, SDK kind value,
attributes, events, error): one finished span as the export process receives it."""


def to_row(trace_id: int, remote_parent: int | None, r: SpanRecord) -> Row:
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
        r.events or (),
        r.error,
    )
