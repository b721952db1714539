"""What became of the spans handed to an exporter, whichever export path: counted for
``falco_talon_spans_total`` and, when they could not be delivered, logged with why."""

from __future__ import annotations

import logging

log = logging.getLogger("falco_talon.tracing")


class Outcomes:
    """What became of the spans handed to an exporter: ``exported`` (the collector took
    them) or ``failed`` (it could not be reached, or refused them, after the retries:
    logged, with why)."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.exported = 0
        self.failed = 0

    def report(self, spans: int, error: str | None) -> None:
        if error is None:
            self.exported += spans
            return
        self.failed += spans
        log.warning(
            "could not export %d span(s) to %s: %s",
            spans,
            self.where,
            error,
            extra={"fields": {"spans": spans, "collector": self.where}},
        )
