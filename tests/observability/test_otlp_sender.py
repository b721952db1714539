"""The OTLP sender retries transient failures through the shared retry policy, and never
raises: a span export that fails is a warning, not an error of the event."""

from __future__ import annotations

import logging
import urllib.error
from email.message import Message

import pytest

from engine.contract.retry import RetryPolicy
from observability.otlp import OtlpSender


def http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("http://collector/v1/traces", code, "no", Message(), None)


@pytest.mark.parametrize(
    ("errors", "calls", "delivered"),
    [
        ([], 1, True),
        ([http_error(503), OSError("reset")], 3, True),
        ([http_error(400)], 1, False),
        ([http_error(429)] * 5, 3, False),
    ],
)
def test_transient_failures_are_retried_permanent_ones_are_not(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    errors: list[Exception],
    calls: int,
    delivered: bool,
) -> None:
    sender = OtlpSender(
        "http://user:pw@collector:4318?token=secret",
        "http/protobuf",
        {},
        True,
        1.0,
        RetryPolicy(attempts=3, backoff=0.0),
    )
    seen: list[bytes] = []
    pending = list(errors)

    def once(body: bytes) -> None:
        seen.append(body)
        if pending:
            raise pending.pop(0)

    monkeypatch.setattr(sender, "_send_once", once)
    with caplog.at_level(logging.WARNING, "falco_talon.otlp"):
        assert sender.send(b"spans") is delivered
    sender.close()
    assert len(seen) == calls
    assert ("could not export spans to collector:4318" in caplog.text) is not delivered
    assert "secret" not in caplog.text
