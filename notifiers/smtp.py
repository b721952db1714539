"""The SMTP notifier: each action result as an e-mail, sent with aiosmtplib.

Position in the flow: ... -> actionners -> **notifiers** (the last stage).

``format: html`` sends multipart/alternative: a plain-text part and an HTML document with
one table row per field (every value HTML-escaped); ``format: text`` the plain part only.
With ``traceUrl`` set, the trace id links to the trace (``<url>`` after it in plain text).
The connection is encrypted unless ``tls: false``: STARTTLS, or implicit TLS (on port 465
by default, see ``tlsmode``), verified against the system's CAs or ``cafile``. It logs in
only when ``user`` is set. A refused login, sender or recipient, a 5xx answer and a TLS
failure are permanent errors; a 4xx answer, a refused or dropped connection and a timeout
are temporary. No error text ever holds the password.
"""

from __future__ import annotations

import html
import logging
import ssl
from collections.abc import Mapping
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid, parseaddr
from typing import Any, Literal

import aiosmtplib

from engine.contract.errors import PermanentError, TemporaryError
from engine.contract.notifiers import Notification, notifier
from notifiers import message
from observability.eventlog import event_logger

log = logging.getLogger("falco_talon.notifiers.smtp")

SETTINGS: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["hostport", "from", "to"],
    "properties": {
        "hostport": {
            "x-v03": "host_port",
            "type": "string",
            "pattern": r"^(\[[0-9A-Fa-f:.]+\]|[^\s:\[\]]+):[0-9]{1,5}$",
            "description": "The SMTP server as host:port ([::1]:25 for IPv6).",
        },
        "user": {
            "type": "string",
            "default": "",
            "description": "Login; empty: send without authenticating.",
        },
        "password": {"type": "string", "default": "", "description": "Password (secret)."},
        "from": {
            "type": "string",
            "minLength": 1,
            "description": "Sender: talon@example.com or 'Falco Talon <talon@example.com>'.",
        },
        "to": {
            "type": ["string", "array"],
            "items": {"type": "string"},
            "minLength": 1,
            "description": "Recipients: a comma-separated list (or a list).",
        },
        "format": {
            "type": "string",
            "enum": ["html", "text"],
            "default": "html",
            "description": "html: an HTML table with a plain-text alternative; text: plain only.",
        },
        "tls": {
            "type": "boolean",
            "default": True,
            "description": "Encrypt the connection (see tlsmode); false: clear text, for a "
            "trusted local relay only.",
        },
        "tlsmode": {
            "type": "string",
            "enum": ["auto", "starttls", "implicit"],
            "default": "auto",
            "description": "auto: implicit TLS on port 465, STARTTLS on any other port.",
        },
        "cafile": {
            "type": "string",
            "default": "",
            "description": "PEM file of the CA certificates to trust instead of the system's "
            "(a private CA or a self-signed server).",
        },
    },
}

Mode = Literal["plain", "starttls", "implicit"]


def split_hostport(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host.strip("[]"), int(port)


def tls_mode(settings: Mapping[str, Any], port: int) -> Mode:
    """How to encrypt: nothing when ``tls`` is false, else ``tlsmode`` (auto by port)."""
    if not settings["tls"]:
        return "plain"
    mode = settings["tlsmode"]
    if mode == "auto":
        return "implicit" if port == 465 else "starttls"
    return "implicit" if mode == "implicit" else "starttls"


def recipients(to: str | list[str]) -> list[str]:
    items = [to] if isinstance(to, str) else to
    return [r.strip() for item in items for r in item.split(",") if r.strip()]


def text_body(note: Notification) -> str:
    fields = message.fields(note)
    width = max(len(f.label) for f in fields) + 2
    lines = [message.headline(note), ""]
    for f in fields:
        if f.kind == "code":
            lines += [f"{f.label}:", *("    " + line for line in f.value.splitlines()), ""]
        else:
            link = f" <{f.link}>" if f.link else ""
            lines.append(f"{f.label + ':':<{width}}{f.value}{link}")
    return "\n".join(lines).rstrip() + "\n"


def html_body(note: Notification) -> str:
    esc = html.escape
    rows = []
    for f in message.fields(note):
        value = esc(f.value)
        if f.kind == "code":
            value = f'<pre style="margin:0;white-space:pre-wrap">{value}</pre>'
        elif f.link:
            value = f'<a href="{esc(f.link)}">{value}</a>'
        rows.append(
            f'<tr><th style="text-align:left;vertical-align:top;padding:4px 12px 4px 0">'
            f"{esc(f.label)}</th><td>{value}</td></tr>"
        )
    colour = message.COLOURS[note.result.outcome]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(message.subject(note))}</title>\n</head>\n"
        '<body style="font-family:sans-serif">\n'
        f'<h2 style="border-left:6px solid {colour};padding-left:8px">'
        f"{esc(message.headline(note))}</h2>\n"
        '<table style="border-collapse:collapse">\n' + "\n".join(rows) + "\n</table>\n"
        '<p style="color:#888;font-size:small">Sent by falco-talon.</p>\n'
        "</body>\n</html>\n"
    )


def build(note: Notification, settings: Mapping[str, Any]) -> EmailMessage:
    """The e-mail for one notification (``settings`` with defaults filled in)."""
    mail = EmailMessage()
    sender = settings["from"]
    mail["From"] = sender
    mail["To"] = ", ".join(recipients(settings["to"]))
    mail["Subject"] = " ".join(message.subject(note).split())
    mail["Date"] = format_datetime(datetime.now(UTC))
    mail["Message-ID"] = make_msgid(domain=parseaddr(sender)[1].rpartition("@")[2] or None)
    mail.set_content(text_body(note))
    if settings["format"] == "html":
        mail.add_alternative(html_body(note), subtype="html")
    return mail


def _tls_context(cafile: str) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=cafile or None)
    except (OSError, ssl.SSLError) as exc:
        raise PermanentError(f"cafile {cafile}: {exc.strerror or exc}") from None


def _scrub(text: str, password: str) -> str:
    return text.replace(password, "********") if password else text


@notifier(
    "smtp",
    description="E-mail each action result (HTML or plain text) through an SMTP server.",
    settings=SETTINGS,
    secrets=("password",),
)
async def send(note: Notification, settings: Mapping[str, Any]) -> None:
    opts = settings
    host, port = split_hostport(opts["hostport"])
    mode = tls_mode(opts, port)
    user, password = opts["user"], opts["password"]
    where = f"{host}:{port}"
    try:
        refused, _ = await aiosmtplib.send(
            build(note, opts),
            hostname=host,
            port=port,
            username=user or None,
            password=password if user else None,
            use_tls=mode == "implicit",
            start_tls=mode == "starttls",
            tls_context=_tls_context(opts["cafile"]) if mode != "plain" else None,
        )
    except aiosmtplib.SMTPRecipientsRefused as exc:
        who = ", ".join(f"{r.recipient} ({r.code} {r.message})" for r in exc.recipients)
        raise PermanentError(f"{where} refused every recipient: {who}") from None
    except aiosmtplib.SMTPAuthenticationError as exc:
        problem = f"{where} refused the login of {user!r}: {exc.code} {exc.message}"
        raise PermanentError(_scrub(problem, password)) from None
    except aiosmtplib.SMTPResponseException as exc:
        problem = _scrub(f"{where} answered {exc.code} {exc.message}", password)
        if 400 <= exc.code < 500:
            raise TemporaryError(problem) from None
        raise PermanentError(problem) from None
    except (aiosmtplib.SMTPConnectError, aiosmtplib.SMTPServerDisconnected) as exc:
        if isinstance(exc.__cause__, ssl.SSLError):
            raise PermanentError(f"{where}: TLS failure: {exc.__cause__}") from None
        raise TemporaryError(_scrub(f"{where}: {exc.message}", password)) from None
    except aiosmtplib.SMTPTimeoutError:
        raise TemporaryError(f"{where}: timed out") from None
    except ssl.SSLError as exc:
        raise PermanentError(f"{where}: TLS failure: {exc}") from None
    except aiosmtplib.SMTPException as exc:  # STARTTLS or AUTH not offered, and the like
        raise PermanentError(_scrub(f"{where}: {exc.message}", password)) from None
    except OSError as exc:
        raise TemporaryError(f"{where}: {exc.strerror or type(exc).__name__}") from None
    if refused:
        event_logger(log, note.event.id, note.trace_id).warning(
            "%s refused some recipients: %s",
            where,
            ", ".join(f"{r} ({resp.code} {resp.message})" for r, resp in refused.items()),
            fields={"notifier": "smtp"},
        )
