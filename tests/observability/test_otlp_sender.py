"""The OTLP sender retries transient failures through the shared retry policy, and never
raises: a span export that fails is reported (the parent logs and counts it), not an error
of the event.

Stand-in: the sender's one network call (``_send_once``) is replaced by a function raising
the given errors in turn, because no real collector answers a 503, then a reset, then a
success on cue. The real transports (gRPC and HTTP, TLS, gzip, a collector that is down)
are tested against a real Jaeger in ``test_traces.py`` and ``test_otel_env.py``."""

from __future__ import annotations

import urllib.error
from email.message import Message

import pytest

from engine.contract.retry import RetryPolicy
from observability.otlp import OtlpSender
from observability.settings import TracingSettings


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
    errors: list[Exception],
    calls: int,
    delivered: bool,
) -> None:
    settings = TracingSettings(
        endpoint="http://user:pw@collector:4318?token=secret",
        protocol="http/protobuf",
        timeout=1.0,
    )
    sender = OtlpSender(settings, RetryPolicy(attempts=3, backoff=0.0))
    seen: list[bytes] = []
    pending = list(errors)

    def once(body: bytes) -> None:
        seen.append(body)
        if pending:
            raise pending.pop(0)

    monkeypatch.setattr(sender, "_send_once", once)
    why = sender.send(b"spans")
    sender.close()
    assert len(seen) == calls
    assert (why is None) is delivered
    assert why is None or why.startswith(("HTTPError: HTTP Error", "OSError"))
    assert sender.url == "http://user:pw@collector:4318/v1/traces?token=secret"
    assert settings.collector() == "collector:4318"  # where failures are logged: no secrets
