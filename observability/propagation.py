"""W3C Trace Context: the incoming ``traceparent`` header a caller may send."""

from __future__ import annotations


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
