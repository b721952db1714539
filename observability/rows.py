"""Finished spans as plain tuples: what crosses to the export process (pickled), so the
export side needs none of the recording classes."""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

from observability.spans import SpanRecord

Row = tuple[Any, ...]
"""(name, span id, parent id, start ns, end ns, SDK kind value, attributes, events or None,
error): one finished span."""

TraceRows = tuple[int, int | None, list[Row]]
"""(trace id, the remote parent's span id or None, the rows of its finished spans): what
the export process receives for each event."""

row_of: Callable[[SpanRecord], Row] = operator.attrgetter(
    "name", "span_id", "parent_id", "start_ns", "end_ns", "kind", "attributes", "events", "error"
)
"""A recorded span as a :data:`Row` (one C call: it runs on the event loop's thread)."""
