"""The SMTP notifier, against real aiosmtpd servers: STARTTLS, implicit TLS, AUTH, refusals."""

from __future__ import annotations

import re
from email.message import EmailMessage
from html.parser import HTMLParser
from typing import Any

import pytest

from engine.contract.errors import PermanentError, TemporaryError
from engine.contract.results import Outcome
from notifiers import smtp
from tests.notifiers.conftest import (
    SMTP_PASSWORD,
    SMTP_USER,
    TRACE_ID,
    Certs,
    MakeNote,
    SmtpServer,
    StartSmtp,
    configured,
)

VOID = {"meta", "br", "hr", "img", "link", "input"}


class StrictHTML(HTMLParser):
    """Checks that tags nest and close properly, and collects the table's rows as text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.open: list[str] = []
        self.problems: list[str] = []
        self.doctype = ""
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr":
            self.rows.append([])
        if tag in ("th", "td"):
            self._cell = []
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
            return
        self.open.pop()
        if tag in ("th", "td") and self._cell is not None:
            self.rows[-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def parse_html(text: str) -> StrictHTML:
    parser = StrictHTML()
    parser.feed(text)
    parser.close()
    assert parser.problems == [] and parser.open == [], (parser.problems, parser.open)
    return parser


def settings(server: SmtpServer, certs: Certs, **changes: Any) -> dict[str, Any]:
    return configured(
        "smtp",
        {
            "hostport": server.hostport,
            "user": SMTP_USER,
            "password": SMTP_PASSWORD,
            "from": "Falco Talon <talon@example.com>",
            "to": "oncall@example.com, sec@example.com",
            "cafile": certs.cafile,
            **changes,
        },
    )


def only(server: SmtpServer) -> EmailMessage:
    [message] = server.mailbox.messages
    return message


async def test_an_html_notification_over_starttls_with_login_has_a_text_part_and_a_valid_table(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    server = start_smtp("starttls", auth=True)
    note = make_note(
        Outcome.FAILED,
        reason='pods "web" is forbidden <RBAC> & more',
        output={"stdout": "<script>alert(1)</script>"},
    )
    await smtp.send(note, settings(server, certs))

    [envelope] = server.mailbox.envelopes
    assert envelope.mail_from == "talon@example.com"
    assert envelope.rcpt_tos == ["oncall@example.com", "sec@example.com"]
    message = only(server)
    assert message["From"] == "Falco Talon <talon@example.com>"
    assert message["To"] == "oncall@example.com, sec@example.com"
    assert message["Subject"] == "[falco-talon] failed: kubernetes:terminate (Rule Terminate)"
    assert message.get_content_type() == "multipart/alternative"
    plain, rich = message.iter_parts()
    assert isinstance(plain, EmailMessage) and isinstance(rich, EmailMessage)
    assert plain.get_content_type() == "text/plain"
    text = plain.get_content()
    assert text.startswith("failed: kubernetes:terminate (Rule Terminate)\n\nRule:")
    assert 'Error:        pods "web" is forbidden <RBAC> & more\n' in text
    assert "Output:\n    stdout: <script>alert(1)</script>\n" in text

    assert rich.get_content_type() == "text/html"
    source = rich.get_content()
    page = parse_html(source)
    assert page.doctype == "DOCTYPE html"
    assert page.rows == [
        ["Rule", "Rule Terminate"],
        ["Action", "kubernetes:terminate"],
        ["Outcome", "failed"],
        ["Pod", "web-7d4b9c7f5d-x2x8k"],
        ["Namespace", "demo"],
        ["Falco rule", "Terminal shell in container"],
        ["Priority", "Warning"],
        ["Trace id", TRACE_ID],
        ["Event id", "ev-1"],
        [
            "Event output",
            "14:02:56.119: Warning A shell was spawned in a container (user=root k8s.ns=demo)",
        ],
        ["Error", 'pods "web" is forbidden <RBAC> & more'],
        ["Output", "stdout: <script>alert(1)</script>"],
    ]
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in source and "<script>" not in source
    assert "&lt;RBAC&gt; &amp; more" in source


async def test_the_text_format_sends_a_single_plain_text_part(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    server = start_smtp("starttls", auth=True)
    await smtp.send(make_note(reason="deleted"), settings(server, certs, format="text"))
    message = only(server)
    assert message.get_content_type() == "text/plain"
    assert message["Subject"] == "[falco-talon] succeeded: kubernetes:terminate (Rule Terminate)"
    assert "Reason:       deleted\n" in message.get_content()


async def test_implicit_tls_delivers_from_the_first_byte(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    server = start_smtp("implicit", auth=True)
    await smtp.send(make_note(), settings(server, certs, tlsmode="implicit"))
    assert only(server)["Subject"].startswith("[falco-talon] succeeded")


async def test_implicit_tls_against_a_starttls_server_fails_rather_than_falling_back_to_clear(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    server = start_smtp("starttls", auth=True)
    with pytest.raises(PermanentError, match="TLS failure"):
        await smtp.send(make_note(), settings(server, certs, tlsmode="implicit"))
    assert server.mailbox.envelopes == []


def test_tlsmode_auto_means_implicit_tls_on_port_465_and_starttls_elsewhere() -> None:
    auto = {"tls": True, "tlsmode": "auto"}
    assert smtp.tls_mode(auto, 465) == "implicit"
    assert smtp.tls_mode(auto, 587) == "starttls"
    assert smtp.tls_mode({"tls": True, "tlsmode": "starttls"}, 465) == "starttls"
    assert smtp.tls_mode({"tls": False, "tlsmode": "implicit"}, 465) == "plain"


async def test_without_a_user_no_login_is_attempted(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    # This server offers no AUTH at all: trying to log in would fail.
    server = start_smtp("starttls", auth=False)
    await smtp.send(make_note(), settings(server, certs, user="", password="unused"))
    assert len(server.mailbox.envelopes) == 1


async def test_tls_false_sends_in_clear_text_to_a_local_relay(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    server = start_smtp("none", auth=False)
    await smtp.send(make_note(), settings(server, certs, user="", tls=False))
    assert len(server.mailbox.envelopes) == 1


async def test_a_server_without_starttls_is_refused_when_tls_is_on(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    server = start_smtp("none", auth=False)
    with pytest.raises(PermanentError, match="STARTTLS"):
        await smtp.send(make_note(), settings(server, certs, user=""))
    assert server.mailbox.envelopes == []


async def test_a_wrong_password_is_a_permanent_error_that_does_not_show_it(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    server = start_smtp("starttls", auth=True)
    wrong = "wr0ng-Pa55word-123"
    with pytest.raises(PermanentError) as caught:
        await smtp.send(make_note(), settings(server, certs, password=wrong))
    assert str(caught.value) == (
        f"{server.hostport} refused the login of 'talon': 535 5.7.8 Authentication credentials "
        "invalid"
    )
    assert server.mailbox.envelopes == []


async def test_an_untrusted_server_certificate_is_a_permanent_error(
    start_smtp: StartSmtp, certs: Certs, other_cafile: str, make_note: MakeNote
) -> None:
    server = start_smtp("starttls", auth=True)
    with pytest.raises(PermanentError, match=r"TLS failure: .*CERTIFICATE_VERIFY_FAILED"):
        await smtp.send(make_note(), settings(server, certs, cafile=other_cafile))
    assert server.mailbox.envelopes == []


async def test_a_refused_recipient_is_a_permanent_error(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    server = start_smtp("starttls", auth=True, refuse=("nobody@example.com",))
    with pytest.raises(PermanentError) as caught:
        await smtp.send(make_note(), settings(server, certs, to="nobody@example.com"))
    assert str(caught.value) == (
        f"{server.hostport} refused every recipient: nobody@example.com (550 5.1.1 no such "
        "user here)"
    )


async def test_a_partly_refused_delivery_is_sent_to_the_others_and_logged(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_smtp("starttls", auth=True, refuse=("nobody@example.com",))
    to = ["nobody@example.com", "oncall@example.com"]
    await smtp.send(make_note(), settings(server, certs, to=to))
    assert [e.rcpt_tos for e in server.mailbox.envelopes] == [["oncall@example.com"]]
    [record] = [r for r in caplog.records if r.name == "falco_talon.notifiers.smtp"]
    assert "refused some recipients: nobody@example.com (550" in record.getMessage()
    assert record.fields["event_id"] == "ev-1"  # type: ignore[attr-defined]


async def test_a_closed_port_is_a_temporary_error(
    closed_port: int, certs: Certs, make_note: MakeNote
) -> None:
    config = configured(
        "smtp",
        {
            "hostport": f"127.0.0.1:{closed_port}",
            "from": "talon@example.com",
            "to": "oncall@example.com",
        },
    )
    with pytest.raises(TemporaryError, match=f"^{re.escape(f'127.0.0.1:{closed_port}')}: "):
        await smtp.send(make_note(), config)


async def test_an_event_given_up_is_said_in_the_subject_and_its_reason_shown_as_the_error(
    start_smtp: StartSmtp, certs: Certs, make_note: MakeNote
) -> None:
    server = start_smtp("starttls", auth=True)
    why = "given up after 3 deliveries: moved to falco-talon.events.dead (last error: 503)"
    await smtp.send(make_note(Outcome.GIVEN_UP, why, {"deliveries": 3}), settings(server, certs))
    message = only(server)
    assert message["Subject"] == "[falco-talon] given-up: kubernetes:terminate (Rule Terminate)"
    plain, rich = message.iter_parts()
    assert isinstance(plain, EmailMessage) and isinstance(rich, EmailMessage)
    assert f"Error:        {why}\n" in plain.get_content()
    page = parse_html(rich.get_content())
    assert ["Outcome", "given-up"] in page.rows
    assert ["Error", why] in page.rows
    assert ["Output", "deliveries: 3"] in page.rows
    assert "border-left:6px solid #7a0000" in rich.get_content()
