"""Log formats: ``color`` (a terminal), ``text``, ``json`` (one object per line).

Cross-cutting. Code logs with ``extra={"fields": {...}}`` (event_id, rule, action, outcome,
...); every format prints those fields. Secrets never reach here: settings are redacted
before they are logged (``engine.config.redacted``).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from observability.eventlog import UNKNOWN_FILE
from observability.spans import current_ids

FORMATS = ("color", "text", "json")

_COLORS = {
    logging.DEBUG: "\033[2m",
    logging.INFO: "\033[32m",
    logging.WARNING: "\033[33m",
    logging.ERROR: "\033[31m",
    logging.CRITICAL: "\033[1;31m",
}
_RESET = "\033[0m"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    out = dict(fields) if isinstance(fields, dict) else {}
    ids = getattr(record, "trace_ids", None)
    if ids:
        out["trace_id"], span_id = ids
        if span_id:
            out["span_id"] = span_id
    return out


class _Record(logging.LogRecord):
    """A log record made without what no format here prints: ``logging.LogRecord`` works
    out the file name and module of a source file that is never looked up
    (``logging._srcfile`` is None), and the thread and process names that are switched off.
    Everything a formatter or a caller's handler reads is set, as ``LogRecord`` sets it."""

    def __init__(
        self,
        name: str,
        level: int,
        pathname: str,
        lineno: int,
        msg: object,
        args: Any,
        exc_info: Any,
        func: str | None = None,
        sinfo: str | None = None,
        **kwargs: Any,
    ) -> None:
        if pathname != UNKNOWN_FILE or logging.logThreads or logging.logProcesses:
            super().__init__(name, level, pathname, lineno, msg, args, exc_info, func, sinfo)
            return
        now = time.time_ns()
        self.name = name
        self.msg = msg
        if args and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            args = args[0]
        self.args = args
        self.levelname = logging.getLevelName(level)
        self.levelno = level
        self.pathname = self.filename = pathname
        self.module = "Unknown module"
        self.exc_info = exc_info
        self.exc_text = None
        self.stack_info = sinfo
        self.lineno = lineno
        self.funcName = func  # type: ignore[assignment]  # None, as LogRecord leaves it
        self.created = now / 1e9
        self.msecs = float((now % 1_000_000_000) // 1_000_000)
        self.relativeCreated = (self.created - logging._startTime) * 1000  # type: ignore[attr-defined]
        self.thread = self.threadName = None
        self.processName = self.process = None
        self.taskName = None


class _Lines(logging.StreamHandler):  # type: ignore[type-arg]
    """One line per record on the stream, written at once (logs are the audit trail: a
    line is on its way out before the next event is taken, even if the process is killed
    right after), with the trace and span ids of the task that logs
    (:class:`TraceIds`, inline: ``Handler.handle``'s filter, lock and flush layers cost
    more than the write)."""

    def handle(self, record: logging.LogRecord) -> bool:
        record.trace_ids = current_ids()
        if self.filters and not self.filter(record):  # a caller's own filters, if any
            return False
        try:
            line = self.format(record) + self.terminator
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(line)
                self.stream.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
        return True


class TraceIds(logging.Filter):
    """Stamps each record made while an event is handled with its trace and span ids.

    A filter on the handler runs in the task that logs, so the ids are the right ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.trace_ids = current_ids()
        return True


_second: list[tuple[int, str]] = [(-1, "")]
"""The last whole second formatted, and its text up to the milliseconds (replaced as one
tuple, so threads logging at once never pair a second with another's text)."""


def _timestamp(record: logging.LogRecord) -> str:
    """``2026-01-01T00:00:00.000+00:00`` (UTC); the date part is formatted once a second."""
    created = record.created
    second = int(created)
    cached = _second[0]
    if cached[0] != second:
        cached = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        _second[0] = cached
    return f"{cached[1]}.{int((created - second) * 1000):03d}+00:00"


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000+00:00 INFO  message key=value ...``"""

    def __init__(self, color: bool = False) -> None:
        super().__init__()
        self.color = color

    def format(self, record: logging.LogRecord) -> str:
        level = record.levelname
        if self.color:
            level = f"{_COLORS.get(record.levelno, '')}{level:<7}{_RESET}"
        else:
            level = f"{level:<7}"
        parts = [_timestamp(record), level, record.getMessage()]
        parts.extend(f"{k}={_quote(v)}" for k, v in _fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def setup_logging(fmt: str = "color", level: int | str = logging.INFO) -> None:
    """Configure the root logger once for the process."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {', '.join(FORMATS)}")
    handler = _Lines(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(color=fmt == "color" and sys.stderr.isatty()))
    # No format prints the caller, the thread or the process: not computing them per record
    # saves a quarter of each line's cost (the logging HOWTO's "Optimization" settings).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.setLogRecordFactory(_Record)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # transitions logs every callback at INFO: far too chatty at one event per millisecond.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    # watchfiles logs every batch of changes at INFO; engine.reload logs what matters.
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
