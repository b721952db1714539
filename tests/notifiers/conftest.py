"""Fixtures for the notifier tests: notifications built from the shared Falco event, and
real local receivers: HTTP servers that record each request and answer from a script,
SMTP servers (aiosmtpd) with STARTTLS, implicit TLS and AUTH, certificates from trustme,
and a port nothing listens on."""

from __future__ import annotations

import asyncio
import copy
import email
import email.policy
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from engine.contract.event import event_from_dict
from engine.contract.notifiers import Notification
from engine.contract.results import ActionResult, Outcome
from engine.plugins import load_plugins
from tests.conftest import FALCO_EVENT

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SMTP_USER = "talon"
SMTP_PASSWORD = "s3cret-Pa55word"

MakeNote = Callable[..., Notification]


def configured(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """A notifier's settings as the config hands them to ``send``: over its defaults."""
    _, notifiers = load_plugins()
    return {**notifiers[name].defaults(), **given}


@pytest.fixture
def make_note() -> MakeNote:
    def make(
        outcome: Outcome = Outcome.SUCCEEDED,
        reason: str = "",
        output: dict[str, Any] | None = None,
        rule: str = "Rule Terminate",
        action: str = "kubernetes:terminate",
        **event_changes: Any,
    ) -> Notification:
        data = {**copy.deepcopy(FALCO_EVENT), "uuid": "ev-1", **event_changes}
        event = event_from_dict(data)
        result = ActionResult(outcome, reason, dict(output or {}), event.target)
        return Notification(event, rule, action, "actions", result, TRACE_ID)

    return make


@dataclass(frozen=True)
class Reply:
    status: int = 200
    text: str = "ok"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Received:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any


class Receiver:
    """A real HTTP server that records every request and answers from ``script`` (in order,
    then 200 "ok")."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.script: list[Reply] = []
        self.base = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(
            Received(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                await request.json(),
            )
        )
        reply = self.script.pop(0) if self.script else Reply()
        if reply.delay:
            await asyncio.sleep(reply.delay)
        return web.Response(status=reply.status, text=reply.text, headers=reply.headers)

    def url(self, path: str) -> str:
        return self.base + path

    @property
    def bodies(self) -> list[Any]:
        return [r.json for r in self.requests]


MakeReceiver = Callable[..., Any]


@pytest.fixture
def make_receiver(aiohttp_server: Any) -> MakeReceiver:
    async def make(ssl_context: ssl.SSLContext | None = None) -> Receiver:
        rec = Receiver()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", rec.handle)
        server = await aiohttp_server(app, ssl=ssl_context)
        rec.base = str(server.make_url("")).rstrip("/")
        return rec

    return make


@pytest.fixture
async def receiver(make_receiver: MakeReceiver) -> Receiver:
    rec: Receiver = await make_receiver()
    return rec


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass(frozen=True)
class Certs:
    ca: trustme.CA
    cafile: str
    server: ssl.SSLContext
    """A server-side context whose certificate (127.0.0.1, localhost) ``cafile`` trusts."""


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca = trustme.CA()
    cafile = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    return Certs(ca, str(cafile), server)


@pytest.fixture
def other_cafile(tmp_path: Path) -> str:
    """A CA file that does not trust the servers' certificates."""
    path = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


class Mailbox:
    """What an SMTP server received: envelopes and the parsed messages."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.envelopes: list[Envelope] = []
        self.refuse = refuse

    async def handle_RCPT(  # aiosmtpd's hook names
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 no such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(  # aiosmtpd's hook names
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        self.envelopes.append(envelope)
        return "250 OK"

    @property
    def messages(self) -> list[EmailMessage]:
        out = []
        for env in self.envelopes:
            raw = (env.original_content or b"").replace(b"\r\n", b"\n")
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            assert isinstance(msg, EmailMessage)
            out.append(msg)
        return out


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (
        SMTP_USER.encode(),
        SMTP_PASSWORD.encode(),
    )
    return AuthResult(success=ok, handled=False)


@dataclass
class SmtpServer:
    port: int
    mailbox: Mailbox

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"


StartSmtp = Callable[..., SmtpServer]


@pytest.fixture
def start_smtp(certs: Certs) -> Iterator[StartSmtp]:
    """Start a real SMTP server on 127.0.0.1: ``tls`` is "starttls" (offered and required),
    "implicit" (TLS from the first byte) or "none"; ``auth`` requires a login (over TLS)."""
    controllers: list[Controller] = []

    def start(tls: str = "starttls", auth: bool = True, refuse: tuple[str, ...] = ()) -> SmtpServer:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mailbox = Mailbox(refuse)
        kwargs: dict[str, Any] = {}
        if tls == "starttls":
            kwargs.update(tls_context=certs.server, require_starttls=True)
        elif tls == "implicit":
            kwargs.update(ssl_context=certs.server)
        if auth:
            # aiosmtpd knows of TLS only after STARTTLS: with implicit TLS the connection is
            # encrypted from the first byte, but it would then offer no AUTH at all.
            kwargs.update(authenticator=_authenticate, auth_require_tls=tls == "starttls")
        controller = Controller(mailbox, hostname="127.0.0.1", port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        return SmtpServer(port, mailbox)

    yield start
    for controller in controllers:
        controller.stop()


@pytest.fixture(autouse=True)
async def close_http_sessions() -> AsyncIterator[None]:
    """Tests call the notifiers' ``send`` directly; close their HTTP sessions after each, as
    the dispatcher does at shutdown."""
    yield
    from notifiers import slack, webhook

    await slack.CLIENT.close()
    await webhook.CLIENT.close()
