"""Traces, metrics and the OTLP encoding.

Real: a Jaeger v2 all-in-one built from the Go module proxy (``tests/env/jaeger.py``),
receiving our OTLP over gRPC and HTTP and queried through its API, plain and with TLS on its
OTLP receivers (a throw-away CA from trustme signs its certificate and ours); the official
opentelemetry-proto classes decode what our encoder writes, the SDK's samplers judge ours;
Prometheus text parsed back.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp.test_utils import TestClient

from engine.config import load_settings
from engine.contract.actionners import ActionnerRegistry
from engine.contract.errors import PermanentError
from engine.contract.notifiers import Notification, NotifierRegistry, notifier
from engine.contract.retry import RetryPolicy
from engine.notify import DeliveryPolicy, Dispatcher
from engine.pipeline import Pipeline
from engine.rules import RulesLoader
from engine.server import Service, create_app
from observability.tracing import Tracing, TracingSettings
from tests.env.jaeger import JaegerTls, TestJaeger

RULES = """
- name: forensics first
  action: {name: test:first}
  notifiers: [chat, pager]
- name: label (superseded)
  action: {name: test:record}
- name: kill
  action: {name: test:stop}
  notifiers: [chat]
"""

SPANS_PER_EVENT = 11
"""The spans of one FALCO_EVENT under RULES (the tree test_traces.py checks)."""


def notifiers() -> tuple[NotifierRegistry, list[str]]:
    registry = NotifierRegistry()
    delivered: list[str] = []

    @notifier("chat", description="delivers", registry=registry)
    async def chat(note: Notification, settings: Any) -> None:
        delivered.append(note.rule)

    @notifier("pager", description="always refuses", registry=registry)
    async def pager(note: Notification, settings: Any) -> None:
        raise PermanentError("pager service rejected the token")

    return registry, delivered


async def talon(
    aiohttp_client: Any, tmp_path: Path, registry: ActionnerRegistry, settings: TracingSettings
) -> tuple[TestClient, Service]:
    """A service running RULES, tracing with ``settings``, behind a test client."""
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(RULES))
    notes, _ = notifiers()
    tracing = Tracing(settings, flush_interval=0.05)
    dispatcher = Dispatcher(
        notes,
        {"chat": {}, "pager": {}},
        DeliveryPolicy(retry=RetryPolicy(attempts=2, backoff=0.01)),
    )
    pipeline = Pipeline(
        RulesLoader(registry, notes).load([path]), registry, dispatcher=dispatcher, tracing=tracing
    )
    service = Service(pipeline, tracing=tracing)
    await service.start()
    return await aiohttp_client(create_app(service)), service


def from_env(env: dict[str, str]) -> TracingSettings:
    """The ``otel`` settings the server would build from these variables alone."""
    return load_settings(None, NotifierRegistry(), env=env).tracing


@dataclass(frozen=True)
class Pki:
    """A throw-away CA, the collector's certificate and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("falco-talon.falco.svc")
    files = Pki(*(d / n for n in ("ca.pem", "srv.pem", "srv.key", "cli.pem", "cli.key")))
    ca.cert_pem.write_to_path(str(files.ca))
    for cert, pem, key in (
        (server, files.server_cert, files.server_key),
        (client, files.client_cert, files.client_key),
    ):
        cert.private_key_pem.write_to_path(str(key))
        for i, blob in enumerate(cert.cert_chain_pems):
            blob.write_to_path(str(pem), append=i > 0)
    return files


def _jaeger(state: Path, tls: JaegerTls | None = None) -> Iterator[TestJaeger]:
    instance = TestJaeger(state, tls=tls)
    instance.start()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def jaeger(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestJaeger]:
    """Jaeger, plaintext OTLP."""
    yield from _jaeger(tmp_path_factory.mktemp("jaeger"))


@pytest.fixture(scope="session")
def jaeger_tls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TestJaeger]:
    """Jaeger, OTLP over TLS with a certificate of the test CA."""
    tls = JaegerTls(pki.server_cert, pki.server_key)
    yield from _jaeger(tmp_path_factory.mktemp("jaeger-tls"), tls)


@pytest.fixture(scope="session")
def jaeger_mtls(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TestJaeger]:
    """Jaeger, OTLP over mutual TLS: a client certificate of the test CA required."""
    tls = JaegerTls(pki.server_cert, pki.server_key, client_ca_file=pki.ca)
    yield from _jaeger(tmp_path_factory.mktemp("jaeger-mtls"), tls)
