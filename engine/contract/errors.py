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
    """A failure that may go away: retry after ``delay`` seconds (or the caller's backoff).

    ``attempts`` > 1 says the layer that raised it already retried that many times (the
    Kubernetes client does, for every API call): the layers above then report it instead of
    retrying again, so retries never multiply."""

    def __init__(self, message: str, *, delay: float | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.delay = delay
        self.attempts = attempts


def worth_retrying(exc: BaseException) -> float | bool:
    """The verdict :func:`engine.contract.retry.retry` asks for: a ``TemporaryError`` not
    yet retried below is worth it (at the delay it asks for, if any); nothing else is."""
    if isinstance(exc, TemporaryError) and exc.attempts <= 1:
        return exc.delay if exc.delay else True
    return False


class ConfigError(TalonError):
    """The configuration is invalid; the message says which key and why."""
