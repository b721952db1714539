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

UNKNOWN_FILE = "(unknown file)"
"""The source file of every record: no format prints it, and finding it costs (``logging``
writes the same when ``logging._srcfile`` is None, as ``setup_logging`` sets it)."""


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

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        """As ``LoggerAdapter.log``, without its three layers of calls for the usual line
        (``fields`` only; ``exc_info``, ``extra`` and the rest take the standard path): an
        event writes several lines, and these layers were a quarter of each one's cost."""
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        more = kwargs.pop("fields", None)
        if kwargs:
            super().log(level, msg, *args, fields=more, **kwargs)
            return
        bound = self.fields
        fields = {**bound, **more} if more else dict(bound)
        logger.handle(
            logger.makeRecord(
                logger.name, level, UNKNOWN_FILE, 0, msg, args, None, extra={"fields": fields}
            )
        )

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
