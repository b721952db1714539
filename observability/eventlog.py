"""A logger bound to one event: every line it writes names the event (and its trace).

As kopf's object loggers: the HTTP handler binds the event id and the trace id once, the
pipeline binds the rule and action of each step, and nobody writes ``event_id`` by hand.
Fields given per call (``fields={...}``) are added to the bound ones. The log formats
(``observability.logging``) print them all.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any


class EventLogger(logging.LoggerAdapter[logging.Logger]):
    """``logger`` with ``fields`` (event_id, trace_id, rule, action, ...) on every record."""

    def __init__(self, logger: logging.Logger, fields: Mapping[str, Any]) -> None:
        super().__init__(logger, dict(fields))

    def bind(self, **fields: Any) -> EventLogger:
        """The same logger with more fields (a step's rule and action)."""
        return EventLogger(self.logger, {**self.fields, **fields})

    @property
    def fields(self) -> Mapping[str, Any]:
        extra: Mapping[str, Any] = self.extra or {}
        return extra

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        more = kwargs.pop("fields", None)
        fields = {**self.fields, **more} if more else dict(self.fields)
        kwargs["extra"] = {"fields": fields}
        return msg, kwargs


def event_logger(logger: logging.Logger, event_id: str, trace_id: str = "") -> EventLogger:
    """A logger for one event; ``trace_id`` when the event is traced (lines written outside
    its spans, as the HTTP handler's, still name the trace)."""
    fields = {"event_id": event_id, "trace_id": trace_id} if trace_id else {"event_id": event_id}
    return EventLogger(logger, fields)
