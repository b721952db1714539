"""The engine's small error taxonomy, shared with the plug-ins.

Actionners and notifiers raise these to tell the engine how to treat a failure:
a :class:`TemporaryError` is worth retrying (an API outage, a 429, a timeout);
a :class:`PermanentError` is not (403, 422, a missing target). Any other exception
is treated as permanent and reported with its type name.
"""

from __future__ import annotations


class TalonError(Exception):
    """Base class of every error falco-talon raises on purpose."""


class PermanentError(TalonError):
    """A failure that retrying will not fix."""


class TemporaryError(TalonError):
    """A failure that may go away: retry after ``delay`` seconds (or the caller's backoff)."""

    def __init__(self, message: str, *, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class ConfigError(TalonError):
    """The configuration is invalid; the message says which key and why."""
