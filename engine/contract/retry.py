"""Retrying with backoff: the one policy and the one loop every caller shares.

The Kubernetes client (``engine.contract.kubeapi``), the notification dispatcher
(``engine.notify``), the pipeline (an actionner's :class:`TemporaryError`) and the span exporter
(``observability.otlp``) all retry through :func:`retry` with a :class:`RetryPolicy` of
their own. Which failures are worth retrying is the caller's to say (``temporary``); which
HTTP statuses mean "try again later" is said once, in :data:`TRANSIENT_HTTP_STATUSES`.

This module imports nothing of falco-talon, so every layer may use it.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

TRANSIENT_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
"""HTTP statuses that mean "the same request may succeed later": timeout, throttled, server
errors and outages. Everything else in 4xx/5xx is permanent."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard a caller tries: attempts, and the backoff between them."""

    attempts: int = 4
    """Calls in all, the first included (1: never retry)."""
    backoff: float = 0.5
    """Seconds before the first retry; doubled after each, up to ``max_backoff``."""
    max_backoff: float = 30.0
    """The longest wait between two attempts (a delay the callee asks for is capped too)."""
    jitter: bool = False
    """Spread each wait over 0.5x-1.5x, so many clients do not retry in lockstep."""

    def delay(self, attempt: int, asked: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based); ``asked`` is a
        delay the callee asked for (``Retry-After``), used instead of the backoff."""
        if asked:
            return min(asked, self.max_backoff)
        wait: float = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
        return wait * (0.5 + random.random()) if self.jitter else wait


class Retried(Exception):
    """How a retried call failed in the end: the last error, and how many attempts it took."""

    def __init__(self, error: BaseException, attempts: int, temporary: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
        self.temporary = temporary
        """True when the last error was a temporary one (the attempts ran out)."""


OnRetry = Callable[[int, BaseException, float], None]
"""Told ``(attempt, error, delay)`` before each wait: log it, put it on a span, count it."""


async def retry(
    policy: RetryPolicy,
    call: Callable[[], Awaitable[T]],
    temporary: Callable[[BaseException], float | bool | None],
    on_retry: OnRetry | None = None,
) -> T:
    """Await ``call()`` until it succeeds, a permanent error, or ``policy.attempts`` calls.

    ``temporary(exc)`` says whether ``exc`` is worth retrying: falsy (permanent), True, or a
    delay in seconds the callee asked for. Failures are raised as :class:`Retried` wrapping
    the last error; ``asyncio.CancelledError`` is never caught."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return await call()
        except Exception as exc:
            verdict = temporary(exc)
            if verdict is None or verdict is False or attempt >= policy.attempts:
                raise Retried(exc, attempt, verdict is not None and verdict is not False) from exc
            asked = None if verdict is True else float(verdict)
            wait = policy.delay(attempt, asked)
            if on_retry is not None:
                on_retry(attempt, exc, wait)
            await asyncio.sleep(wait)
    raise AssertionError("unreachable: RetryPolicy.attempts must be >= 1")
