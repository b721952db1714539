"""The webhook notifier, against real local HTTP(S) receivers."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from engine.contract.errors import PermanentError, TemporaryError
from engine.contract.results import Outcome
from notifiers import webhook
from tests.notifiers.conftest import (
    TRACE_ID,
    Certs,
    MakeNote,
    MakeReceiver,
    Receiver,
    Reply,
    configured,
)

TOKEN = "tok-9f8e7d6c5b4a"


async def test_the_body_keeps_the_seed_fields_and_adds_the_details(
    receiver: Receiver, make_note: MakeNote
) -> None:
    note = make_note(reason="deleted", output={"gracePeriodSeconds": 0})
    await webhook.send(note, configured("webhook", {"url": receiver.url(f"/hook?token={TOKEN}")}))

    [request] = receiver.requests
    assert (request.method, request.path, request.query) == ("POST", "/hook", {"token": TOKEN})
    assert request.headers["Content-Type"] == "application/json"
    assert request.json == {
        "pod": "web-7d4b9c7f5d-x2x8k",
        "namespace": "demo",
        "action": "kubernetes:terminate",
        "status": "succeeded",
        "rule": "Rule Terminate",
        "outcome": "succeeded",
        "reason": "deleted",
        "output": {"gracePeriodSeconds": 0},
        "stage": "actions",
        "falco_rule": "Terminal shell in container",
        "priority": "Warning",
        "hostname": "node-1",
        "event_output": "14:02:56.119: Warning A shell was spawned in a container "
        "(user=root k8s.ns=demo)",
        "event_time": "2026-11-29T14:02:56.119485478Z",
        "event_id": "ev-1",
        "trace_id": TRACE_ID,
    }


async def test_a_failed_action_reports_its_reason_as_error(
    receiver: Receiver, make_note: MakeNote
) -> None:
    await webhook.send(
        make_note(Outcome.FAILED, "the pod refused"),
        configured("webhook", {"url": receiver.url("/")}),
    )
    body = receiver.bodies[0]
    assert (body["status"], body["error"]) == ("failed", "the pod refused")
    assert "reason" not in body


async def test_put_and_extra_headers_are_used_when_configured(
    receiver: Receiver, make_note: MakeNote
) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "content-type": "application/json+talon"}
    await webhook.send(
        make_note(),
        configured("webhook", {"url": receiver.url("/put"), "method": "PUT", "headers": headers}),
    )
    [request] = receiver.requests
    assert request.method == "PUT"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.headers["Content-Type"] == "application/json+talon"


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (201, None),
        (204, None),
        (302, PermanentError),
        (404, PermanentError),
        (408, TemporaryError),
        (500, TemporaryError),
        (502, TemporaryError),
    ],
)
async def test_only_a_2xx_answer_is_success_and_only_5xx_408_and_429_are_worth_retrying(
    receiver: Receiver, make_note: MakeNote, status: int, error: type[Exception] | None
) -> None:
    # 302 without a Location header: nothing to follow, so it stays a 302.
    receiver.script = [Reply(status, "")]
    settings = configured("webhook", {"url": receiver.url(f"/hook?token={TOKEN}")})
    if error is None:
        await webhook.send(make_note(), settings)
    else:
        with pytest.raises(error, match=f"^{re.escape(receiver.base)} answered {status}"):
            await webhook.send(make_note(), settings)


async def test_a_429_with_an_http_date_retry_after_gives_the_seconds_until_then(
    receiver: Receiver, make_note: MakeNote
) -> None:
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    receiver.script = [Reply(429, "slow down", {"Retry-After": when})]
    with pytest.raises(TemporaryError) as caught:
        await webhook.send(make_note(), configured("webhook", {"url": receiver.url("/")}))
    assert caught.value.delay is not None and 28 <= caught.value.delay <= 30


def test_retry_after_is_read_as_seconds_or_a_date_and_ignored_when_unreadable() -> None:
    assert webhook.retry_after("12") == 12.0
    assert webhook.retry_after("Thu, 01 Jan 1970 00:00:00 GMT") == 0.0
    assert webhook.retry_after("soon") is None
    assert webhook.retry_after(None) is None


async def test_a_hanging_receiver_is_a_temporary_error_after_the_client_timeout(
    receiver: Receiver, make_note: MakeNote
) -> None:
    receiver.script = [Reply(delay=5)]
    with pytest.raises(TemporaryError) as caught:
        await webhook.send(
            make_note(), configured("webhook", {"url": receiver.url("/"), "timeout": 0.2})
        )
    assert str(caught.value) == f"{receiver.base}: no answer within 0.2s"


async def test_a_closed_port_is_a_temporary_error_naming_only_the_host(
    closed_port: int, make_note: MakeNote
) -> None:
    url = f"http://user:pw-{TOKEN}@127.0.0.1:{closed_port}/hook/{TOKEN}?token={TOKEN}"
    with pytest.raises(TemporaryError) as caught:
        await webhook.send(make_note(), configured("webhook", {"url": url}))
    assert str(caught.value).startswith(f"http://127.0.0.1:{closed_port}: cannot connect: ")
    assert TOKEN not in str(caught.value)


async def test_an_untrusted_certificate_is_a_permanent_error(
    make_receiver: MakeReceiver, certs: Certs, make_note: MakeNote
) -> None:
    receiver: Receiver = await make_receiver(certs.server)
    assert receiver.base.startswith("https://")
    with pytest.raises(PermanentError) as caught:
        await webhook.send(
            make_note(), configured("webhook", {"url": receiver.url(f"/?token={TOKEN}")})
        )
    assert str(caught.value).startswith(f"{receiver.base}: TLS failure: ")
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert TOKEN not in str(caught.value)
    assert receiver.requests == []


async def test_an_error_body_echoing_a_secret_is_scrubbed(
    receiver: Receiver, make_note: MakeNote
) -> None:
    receiver.script = [Reply(401, f"bad token {TOKEN} or key key-0a1b2c3d for /hook/{TOKEN}")]
    settings = configured(
        "webhook",
        {
            "url": receiver.url(f"/hook/{TOKEN}?token={TOKEN}"),
            "headers": {"X-Api-Key": "key-0a1b2c3d"},
        },
    )
    with pytest.raises(PermanentError) as caught:
        await webhook.send(make_note(), settings)
    assert str(caught.value) == (
        f"{receiver.base} answered 401 Unauthorized: bad token ******** or key ******** "
        "for ********"
    )


async def test_an_event_given_up_reports_why_as_error_with_its_deliveries_in_the_output(
    receiver: Receiver, make_note: MakeNote
) -> None:
    why = "given up after 3 deliveries: moved to falco-talon.events.dead (last error: 503)"
    output = {"deliveries": 3, "dead_letter_subject": "falco-talon.events.dead"}
    await webhook.send(
        make_note(Outcome.GIVEN_UP, why, output), configured("webhook", {"url": receiver.url("/")})
    )
    body = receiver.bodies[0]
    assert (body["status"], body["outcome"], body["error"]) == ("given-up", "given-up", why)
    assert body["output"] == output
    assert (body["rule"], body["action"], body["event_id"]) == (
        "Rule Terminate",
        "kubernetes:terminate",
        "ev-1",
    )
    assert "reason" not in body
