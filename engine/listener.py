"""The listener: who may send events, and how long they may take to send them.

Position in the flow: in front of **HTTP** (``engine.server``), below nothing.

- **TLS** on the event port (``tls.certFile``, ``tls.keyFile``), re-read when the files
  change: every handshake picks the newest good pair (checked at most once a second), so
  rotating a mounted Secret needs no restart; a pair that does not load (half written) keeps
  the previous one in use and is retried.
- **Mutual TLS** (``tls.clientCAFile``): a client without a certificate signed by that CA is
  refused during the handshake, before any HTTP.
- **Bearer token** (``auth.tokenFile``, re-read when it changes, or ``auth.token``):
  ``POST /`` without ``Authorization: Bearer <token>`` gets 401 with a JSON body naming the
  problem; the comparison is constant-time and the token is never logged nor echoed.
- **Slow clients**: a connection must deliver its request line and headers within
  ``headerTimeout`` seconds of its first byte (of the connection, for the first request, and
  of the TLS handshake), and its body within ``bodyTimeout``; otherwise it gets 408 and is
  closed. A connection is a coroutine, not a worker, so the others are served meanwhile.
- **Probes port** (``probesPort``): when set, ``/healthz`` and ``/metrics`` are served there
  in plain HTTP without a token, and the event port serves ``POST /`` only.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from engine.contract.errors import ConfigError

log = logging.getLogger("falco_talon.listener")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _MalformedRequests(logging.Filter):
    """aiohttp logs each malformed request (a bad request line, header or chunk: 400 before
    any handler) as an ERROR with a traceback quoting the client's bytes; hostile clients
    would flood the log. One info line, without their bytes, says enough. The rest of a body
    that failed to decode, which aiohttp drains after the handler answered 400, is a debug
    line, not an "Unhandled exception"."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError):
            # the rest of a body that failed to decode, drained by aiohttp after the reply
            # (the handler already answered 400): nothing unhandled, nothing to add
            record.msg = "unread rest of a request body dropped (%s)"
            record.args = (str(exc).splitlines()[-1].strip()[:200] or type(exc).__name__,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        if isinstance(exc, HttpProcessingError):
            peer = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "malformed request from %s refused with %d (%s)"
            record.args = (peer, exc.code, type(exc).__name__)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


PROTOCOL_LOG = logging.getLogger("falco_talon.http")
"""The HTTP protocol's logger (aiohttp's ``logger``): malformed requests, one line each."""
PROTOCOL_LOG.addFilter(_MalformedRequests())

CHECK_INTERVAL = 1.0
"""Seconds between two looks at the certificate and token files."""


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """How the event port listens (built from ``Settings`` by the CLI)."""

    cert_file: str = ""
    key_file: str = ""
    client_ca_file: str = ""
    token: str = field(default="", repr=False)
    token_file: str = ""
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    probes_port: int = 0
    reuse_port: bool = False
    """Bind with SO_REUSEPORT: several server processes share the ports, the kernel
    spreads connections over them (``processes`` > 1)."""

    def __post_init__(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ConfigError("tls.certFile and tls.keyFile go together: set both or neither")
        if self.client_ca_file and not self.cert_file:
            raise ConfigError("tls.clientCAFile needs tls.certFile and tls.keyFile (mutual TLS)")
        if self.token and self.token_file:
            raise ConfigError("set auth.token or auth.tokenFile, not both")

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)


def _stamp(*paths: str) -> tuple[tuple[int, int, int], ...]:
    """What changes when a file is replaced: inode, mtime, size (symlinks followed, so a
    Kubernetes ``..data`` swap counts); a missing file stamps as zeros."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append((0, 0, 0))
        else:
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class CertReloader:
    """The event port's TLS context; each handshake switches to the newest loadable pair."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str = "") -> None:
        self.files = tuple(f for f in (cert_file, key_file, client_ca_file) if f)
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self.current = self._load()  # a bad pair at start-up is a ConfigError
        self.stamp = _stamp(*self.files)
        self.checked = time.monotonic()
        self.context = self._load()
        self.context.sni_callback = self._on_hello
        self.reloads = 0

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"tls.certFile {self.cert_file} / tls.keyFile {self.key_file}: "
                f"cannot load the certificate and key: {_reason(exc)}"
            ) from None
        if self.client_ca_file:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"tls.clientCAFile {self.client_ca_file}: cannot load the CA: {_reason(exc)}"
                ) from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def refresh(self) -> None:
        """Load the files again if they changed (at most once per ``CHECK_INTERVAL``)."""
        now = time.monotonic()
        if now - self.checked < CHECK_INTERVAL:
            return
        self.checked = now
        stamp = _stamp(*self.files)
        if stamp == self.stamp:
            return
        try:
            fresh = self._load()
        except ConfigError as exc:  # half-written: keep serving the previous pair, retry later
            log.warning("TLS files changed but do not load yet; keeping the previous: %s", exc)
            return
        self.current, self.stamp = fresh, stamp
        self.reloads += 1
        log.info("TLS certificate reloaded", extra={"fields": {"cert_file": self.cert_file}})

    def _on_hello(self, conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        # Called for every ClientHello, with or without SNI: switch this connection to the
        # newest context (certificate, key and client CA store).
        self.refresh()
        conn.context = self.current


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


class TokenSource:
    """The bearer token, from ``auth.token`` or ``auth.tokenFile`` (re-read when it changes)."""

    def __init__(self, token: str = "", token_file: str = "") -> None:
        self.file = token_file
        self.value = token.strip().encode() if token else self._read()
        self.stamp = _stamp(token_file) if token_file else ()
        self.checked = time.monotonic()

    def _read(self) -> bytes:
        try:
            with open(self.file, "rb") as f:
                value = f.read(64 * 1024).strip()
        except OSError as exc:
            raise ConfigError(f"auth.tokenFile {self.file}: cannot read: {_reason(exc)}") from None
        if not value:
            raise ConfigError(f"auth.tokenFile {self.file}: the file is empty")
        return value

    def current(self) -> bytes:
        if self.file:
            now = time.monotonic()
            if now - self.checked >= CHECK_INTERVAL:
                self.checked = now
                stamp = _stamp(self.file)
                if stamp != self.stamp:
                    try:
                        self.value = self._read()
                    except ConfigError as exc:
                        log.warning(
                            "token file changed but cannot be used; keeping the previous: %s", exc
                        )
                    else:
                        self.stamp = stamp
                        log.info("bearer token reloaded from auth.tokenFile")
        return self.value

    def check(self, header: str | None) -> str | None:
        """None when ``header`` carries the token, else what is wrong (never the token)."""
        if not header:
            return "missing Authorization header: send 'Authorization: Bearer <token>'"
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "the Authorization header must be 'Bearer <token>'"
        # aiohttp keeps undecodable header bytes as surrogates: give them back as bytes.
        if not hmac.compare_digest(
            given.strip().encode("utf-8", "surrogateescape"), self.current()
        ):
            return "invalid bearer token"
        return None


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


class Guard:
    """The per-connection head timer: armed at connect and at the first byte of each request,
    disarmed when the blank line ending the headers arrives."""

    def __init__(self, config: ListenerConfig) -> None:
        self.config = config
        self.handlers: dict[RequestHandler, _Guarded] = {}
        self.timeouts = 0

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            try:  # aiohttp's own Server.__call__, with the JSON error replies below
                inner: RequestHandler = _JsonProtocolErrors(
                    server,
                    loop=server._loop,
                    **server._kwargs,
                )
            except (AttributeError, TypeError):  # another aiohttp: its plain-text 400s
                inner = server()
            return _Guarded(inner, self)

        return make

    def request_done(self, request: web.Request) -> None:
        guarded = self.handlers.get(request.protocol)
        if guarded is None:
            return
        if request.content.is_eof():
            guarded.awaiting_head, guarded.tail = True, b""
        else:  # the rest of an unread body (a 401) is still coming: not the next head
            guarded.pending_body = request.content


class _JsonProtocolErrors(RequestHandler):
    """aiohttp's protocol, whose replies to malformed requests (400 before any handler: a
    bad request line, header, chunk or Content-Encoding) have a JSON body like every other
    reply, naming the problem without quoting the client's bytes."""

    open_body: Any = None
    """The body of the last request parsed, which may still be arriving."""

    def data_received(self, data: bytes) -> None:
        queued = len(self._messages)
        super().data_received(data)
        messages = self._messages
        for n in range(queued - len(messages), 0):  # what this call queued, in order
            message, payload = messages[n]
            if not isinstance(message, _ErrInfo):
                self.open_body = payload
                continue
            body, self.open_body = self.open_body, None
            if body is not None and not body.is_eof():
                # The body's bytes did not decode (a Content-Encoding it is not in), after
                # its head had been parsed: aiohttp queues a 400 for *after* that request and
                # leaves its body open, so the handler would wait for the rest until
                # bodyTimeout (found by the fuzzer). Fail the body instead, whether or not
                # the handler has started reading it (with ``Expect: 100-continue`` it may
                # not have yet).
                body.set_exception(
                    RequestPayloadError("it does not decode as its Content-Encoding says")
                )

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, message)
        if status >= 500:
            return response
        reason = type(exc).__name__ if exc is not None else "malformed request"
        if isinstance(exc, HttpProcessingError) and exc.message:
            reason = exc.message.splitlines()[0].rstrip(":")[:200]
        out = _json(status, {"error": f"malformed HTTP request: {reason}"})
        out.force_close()
        return out


_TIMEOUT_BODY = orjson.dumps(
    {"error": "request headers not received within headerTimeout; connection closed"}
)
_TIMEOUT_REPLY = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: " + str(len(_TIMEOUT_BODY)).encode() + b"\r\n\r\n" + _TIMEOUT_BODY
)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol with a deadline on the request head."""

    def __init__(self, inner: RequestHandler, guard: Guard) -> None:
        self.inner, self.guard = inner, guard
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.awaiting_head = True
        self.tail = b""
        self.pending_body: Any = None

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.guard.config.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expired(self) -> None:
        self.timer = None
        self.guard.timeouts += 1
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        peer = transport.get_extra_info("peername")
        log.info(
            "slow client: request headers not received in time; closing",
            extra={
                "fields": {"peer": str(peer), "header_timeout": self.guard.config.header_timeout}
            },
        )
        transport.write(_TIMEOUT_REPLY)
        transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport (uvloop's does not subclass asyncio.Transport)
        self.transport = cast(asyncio.Transport, transport)
        self.guard.handlers[self.inner] = self
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.awaiting_head:
            if self.timer is None:
                self._arm()
            window = self.tail + data
            if b"\r\n\r\n" in window or b"\n\n" in window:
                self._disarm()
                self.awaiting_head, self.tail = False, b""
            else:
                self.tail = window[-3:]
        self.inner.data_received(data)
        if self.pending_body is not None and self.pending_body.is_eof():
            self.pending_body, self.awaiting_head, self.tail = None, True, b""

    def eof_received(self) -> bool | None:
        self.inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.handlers.pop(self.inner, None)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections carry the head deadline (and TLS, if configured)."""

    __slots__ = ("_guard", "_handshake_timeout")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: Guard,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context, reuse_address=True)
        self._guard = guard

    async def start(self) -> None:
        self._runner._reg_site(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.factory(server),
            self._host,
            self._port,
            ssl=self._ssl_context,
            ssl_handshake_timeout=self._guard.config.header_timeout if self._ssl_context else None,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._guard.config.reuse_port or None,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


def guarded_routes(
    config: ListenerConfig,
    guard: Guard,
    token: TokenSource | None,
    on_reject: Callable[[str], None],
    max_body_size: int,
) -> Callable[[Handler], Handler]:
    """What wraps each route's handler: for ``POST``, the bearer token and the body deadline;
    for every request, the end of its head timer. A wrapper, not an aiohttp middleware: a
    middleware chain costs a few calls more on every request (the ingest path)."""

    def wrap(handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            try:
                if request.method == "POST":
                    refused = await _admit(request)
                    if refused is not None:
                        return refused
                return await handler(request)
            finally:
                guard.request_done(request)

        return guarded

    async def _admit(request: web.Request) -> web.StreamResponse | None:
        """None when the request may go on, its body read; else the reply refusing it."""
        if token is not None:
            problem = token.check(request.headers.get("Authorization"))
            if problem is not None:
                on_reject("unauthorized")
                log.warning(
                    "request refused: %s", problem, extra={"fields": {"peer": str(request.remote)}}
                )
                return _json(
                    401, {"error": problem}, {"WWW-Authenticate": 'Bearer realm="falco-talon"'}
                )
        length = request.content_length
        if not request.can_read_body or (length is not None and length > max_body_size):
            return None  # the handler answers (413 names the limit)
        try:
            if request.content.is_eof():
                # the whole body came with the head: nothing to wait for, no timer
                await request.read()  # cached: the handler's read() returns it
            else:
                async with asyncio.timeout(config.body_timeout):
                    await request.read()
        except TimeoutError:
            on_reject("body_timeout")
            log.info(
                "slow client: body not received in time; closing",
                extra={"fields": {"peer": str(request.remote)}},
            )
            response = _json(
                408,
                {
                    "error": f"body not received within {config.body_timeout:g} "
                    "seconds (bodyTimeout); connection closed"
                },
            )
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()  # now: no lingering on a slow body
            return response
        except (RequestPayloadError, HttpProcessingError) as exc:
            # a Content-Encoding the body is not in, a broken chunk: not a 500
            on_reject("invalid")
            reason = (str(exc).splitlines() or [""])[0][:200]
            response = _json(400, {"error": f"the body cannot be read: {reason}"})
            response.force_close()
            return response
        except web.HTTPRequestEntityTooLarge:
            on_reject("too_large")
            return _json(
                413, {"error": f"body exceeds the limit of {max_body_size} bytes (maxBodySize)"}
            )
        return None

    return wrap


def listener_setup(
    config: ListenerConfig, *, tls: bool = True
) -> tuple[CertReloader | None, TokenSource | None]:
    """Load the TLS files (``tls``) and the token; a problem is a ``ConfigError``."""
    certs = (
        CertReloader(config.cert_file, config.key_file, config.client_ca_file)
        if config.tls and tls
        else None
    )
    token = (
        TokenSource(config.token, config.token_file)
        if (config.token or config.token_file)
        else None
    )
    return certs, token
