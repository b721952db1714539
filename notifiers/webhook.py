"""The webhook notifier: each action result as a JSON document sent to a URL.

Position in the flow: ... -> actionners -> **notifiers** (the last stage).

:func:`post_json` is also how the Slack notifier delivers (an incoming webhook is a
webhook): a 2xx answer is success; 429 (with its ``Retry-After``), 408, 5xx, connection
errors and timeouts are temporary; other statuses, invalid URLs and TLS failures are
permanent. The URL may carry a token in its path or query and header values are often
credentials, so errors name the URL's scheme and host only and never show a header value.
Nothing is retried here: the dispatcher does that.

Each notifier that posts (``webhook``, ``slack``) keeps one :class:`HttpClient`: one aiohttp
session, so connections are reused across notifications, closed at shutdown through the
notifier's ``close``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
from multidict import CIMultiDict

from engine.contract.errors import PermanentError, TemporaryError
from engine.contract.notifiers import Notification, notifier
from engine.contract.retry import TRANSIENT_HTTP_STATUSES

REDACTED = "********"

SETTINGS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {
        "url": {
            "type": "string",
            "pattern": "^https?://",
            "description": "Where to send the JSON document (secret: it may hold a token).",
        },
        "method": {
            "x-v03": "http_method",
            "type": "string",
            "enum": ["POST", "PUT"],
            "default": "POST",
            "description": "HTTP method.",
        },
        "headers": {
            "x-v03": "custom_headers",
            "type": "object",
            "additionalProperties": {"type": "string"},
            "default": {},
            "description": "Extra HTTP headers such as Authorization (secret values).",
        },
        "timeout": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 5,
            "description": "Seconds one HTTP request may take; keep it within notifierTimeout.",
        },
    },
}


def origin(url: str) -> str:
    """What of a URL may be shown: its scheme, host and port (never user info, path, query)."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{parts.hostname or '?'}{port}"


def retry_after(value: str | None) -> float | None:
    """A ``Retry-After`` header (seconds or an HTTP date) as seconds from now, or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _secrets(url: str, headers: Mapping[str, str]) -> list[str]:
    """Whatever a receiver might echo back: the URL, its path, query, any long segment or
    value; the header values, whole or the long words in them (``Bearer <token>``)."""
    parts = urlsplit(url)
    values = list(headers.values())
    pieces = [
        parts.path,
        parts.query,
        *parts.path.split("/"),
        *(v for vs in parse_qs(parts.query).values() for v in vs),
        *(word for v in values for word in v.split()),
    ]
    return [url, *values, *(p for p in pieces if len(p) >= 8)]


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, REDACTED)
    return text


class HttpClient:
    """One notifier's HTTP session: opened on first use, reused, closed by :meth:`close`."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        # A session belongs to the loop it was opened in (tests run one loop per test).
        if session is None or session.closed or session._loop is not loop:
            session = self._session = aiohttp.ClientSession(headers={"User-Agent": "falco-talon"})
        return session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def post_json(
        self,
        url: str,
        body: Any,
        *,
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Send ``body`` as JSON; raise ``TemporaryError``/``PermanentError`` as described
        in the module's docstring."""
        where = origin(url)
        secrets = _secrets(url, headers or {})
        sent: CIMultiDict[str] = CIMultiDict({"Content-Type": "application/json"})
        sent.update(headers or {})
        try:
            async with self.session().request(
                method,
                url,
                data=orjson.dumps(body),
                headers=sent,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                if 200 <= resp.status < 300:
                    return
                text = (await resp.text(errors="replace")).strip()[:200]
                said = _scrub(
                    f"{resp.reason or ''}: {text}" if text else resp.reason or "", secrets
                )
                problem = f"{where} answered {resp.status} {said}".rstrip()
                if resp.status == 429:
                    delay = retry_after(resp.headers.get("Retry-After"))
                    raise TemporaryError(problem, delay=delay)
                if resp.status in TRANSIENT_HTTP_STATUSES or resp.status >= 500:
                    raise TemporaryError(problem)
                raise PermanentError(problem)
        except aiohttp.ClientSSLError as exc:
            cause = getattr(exc, "certificate_error", None) or exc.os_error
            raise PermanentError(f"{where}: TLS failure: {_scrub(str(cause), secrets)}") from None
        except aiohttp.ClientConnectorError as exc:
            cause = exc.os_error.strerror or type(exc.os_error).__name__
            raise TemporaryError(f"{where}: cannot connect: {cause}") from None
        except aiohttp.ClientResponseError as exc:  # too many redirects and the like
            raise PermanentError(f"{where}: {type(exc).__name__} ({exc.status})") from None
        except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
            raise PermanentError(f"{where}: invalid URL ({type(exc).__name__})") from None
        except aiohttp.ClientError as exc:
            raise TemporaryError(f"{where}: {type(exc).__name__}") from None
        except TimeoutError:
            waited = f" within {timeout:g}s" if timeout else ""
            raise TemporaryError(f"{where}: no answer{waited}") from None


def body(note: Notification) -> dict[str, Any]:
    """The JSON document: the seed's fields (pod, namespace, action, status) and the rest;
    ``trace_url`` only when ``traceUrl`` is set."""
    result, event = note.result, note.event
    failed = result.outcome.is_failure
    doc = {
        "pod": result.target.pod or "",
        "namespace": result.target.namespace or "",
        "action": note.action,
        "status": result.outcome.value,
        "rule": note.rule,
        "outcome": result.outcome.value,
        "error" if failed else "reason": result.reason,
        "output": result.output,
        "stage": note.stage,
        "falco_rule": event.rule,
        "priority": event.priority,
        "hostname": event.hostname,
        "event_output": event.output,
        "event_time": event.time,
        "event_id": event.id,
        "trace_id": note.trace_id,
    }
    if note.trace_url:
        doc["trace_url"] = note.trace_url
    return doc


CLIENT = HttpClient()


@notifier(
    "webhook",
    description="POST (or PUT) each action result as JSON to a URL.",
    settings=SETTINGS,
    secrets=("url", "headers"),
    close=CLIENT.close,
)
async def send(note: Notification, settings: Mapping[str, Any]) -> None:
    await CLIENT.post_json(
        settings["url"],
        body(note),
        method=settings["method"],
        headers=settings["headers"],
        timeout=float(settings["timeout"]),
    )
