"""The OpenTelemetry variables users set on every other service, honoured: where spans go
(``OTEL_EXPORTER_OTLP_*`` and their ``_TRACES_`` forms), who sent them
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``, ``service.version``,
``service.instance.id``), which events are traced (``OTEL_TRACES_SAMPLER``), gzip, and TLS
with a custom CA and client certificates. Every test reads the settings from variables as
the server does, sends through both export paths (builtin, ``exportWith: sdk``) and looks
at what a real Jaeger (plain, TLS, mutual TLS) received."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.contract.actionners import ActionnerRegistry
from observability.resource import falco_talon_version
from observability.tracing import Tracing
from tests.conftest import FALCO_EVENT
from tests.env.jaeger import TestJaeger
from tests.env.testenv import free_port
from tests.observability.conftest import SPANS_PER_EVENT, Pki, from_env, talon
from tests.observability.test_metrics import samples

FALCO_TALON = Path(sys.executable).parent / "falco-talon"
BOTH_PATHS = pytest.mark.parametrize("export_with", ["builtin", "sdk"])
BOTH_PROTOCOLS = pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])


def base_env(jaeger: TestJaeger, protocol: str, export_with: str, **more: str) -> dict[str, str]:
    """Tracing on, to ``jaeger`` through the generic endpoint variable, under a service
    name of its own (returned as OTEL_SERVICE_NAME)."""
    info = jaeger.info
    endpoint = info.otlp_grpc_endpoint if protocol == "grpc" else info.otlp_http_endpoint
    return {
        "OTEL_ENABLED": "true",
        "OTEL_EXPORTWITH": export_with,
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
        "OTEL_SERVICE_NAME": f"talon-{uuid.uuid4().hex[:8]}",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "3000",
        **more,
    }


async def send_events(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    env: dict[str, str],
    events: int = 1,
    headers: list[dict[str, str]] | None = None,
) -> Tracing:
    """Run ``events`` events through a service configured by ``env``; stop it (every span
    sent, or given up on) and return its tracing."""
    client, service = await talon(aiohttp_client, tmp_path, registry, from_env(env))
    for i in range(events):
        extra = headers[i] if headers else {}
        resp = await client.post("/", json={**FALCO_EVENT, "uuid": uuid.uuid4().hex}, headers=extra)
        assert resp.status == 202
    await service.queue.join()
    await service.pipeline.dispatcher.drain(10)  # type: ignore[union-attr]
    await service.stop()
    return service.tracing


def process_tags(trace: dict[str, Any]) -> dict[str, Any]:
    [process] = {p["serviceName"]: p for p in trace["processes"].values()}.values()
    return {
        "service.name": process["serviceName"],
        **{t["key"]: t["value"] for t in process["tags"]},
    }


def full(trace: dict[str, Any]) -> bool:
    return len(trace["spans"]) == SPANS_PER_EVENT


# ---------------------------------------------------------------- where, and who


@BOTH_PATHS
@BOTH_PROTOCOLS
async def test_the_standard_variables_send_the_spans_and_name_who_sent_them(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    jaeger: TestJaeger,
    protocol: str,
    export_with: str,
) -> None:
    env = base_env(
        jaeger,
        protocol,
        export_with,
        OTEL_RESOURCE_ATTRIBUTES="k8s.pod.name=falco-talon-5f7d-x2x8k,k8s.namespace.name=falco,"
        "deployment.environment=prod%2Ceu, service.name=ignored-as-OTEL_SERVICE_NAME-wins",
        OTEL_EXPORTER_OTLP_HEADERS="x-tenant=sec%20ops",
        OTEL_TRACES_EXPORTER="otlp",
    )
    tracing = await send_events(aiohttp_client, tmp_path, registry, env)
    trace = jaeger.wait_for_trace(env["OTEL_SERVICE_NAME"], full, timeout=20)
    tags = process_tags(trace)
    assert tags["service.name"] == env["OTEL_SERVICE_NAME"]
    assert tags["service.version"] == falco_talon_version() != "unknown"
    assert uuid.UUID(tags["service.instance.id"]) == uuid.UUID(
        tracing.resource["service.instance.id"]
    )
    assert (tags["k8s.pod.name"], tags["k8s.namespace.name"]) == ("falco-talon-5f7d-x2x8k", "falco")
    assert tags["deployment.environment"] == "prod,eu"
    assert tracing.counts() == {"exported": SPANS_PER_EVENT, "failed": 0, "dropped": 0}
    assert tracing.settings.headers == {"x-tenant": "sec ops"}
    assert tracing.settings.timeout == 3.0


def test_a_service_name_in_the_resource_attributes_is_used_when_no_service_name_is_set() -> None:
    named = Tracing(from_env({"OTEL_RESOURCE_ATTRIBUTES": "service.name=talon-eu"}))
    assert named.resource["service.name"] == "talon-eu"
    assert Tracing().resource["service.name"] == "falco-talon"
    assert Tracing().resource["service.instance.id"] != Tracing().resource["service.instance.id"]


@BOTH_PATHS
async def test_the_traces_endpoint_is_used_as_is_and_the_generic_one_gets_v1_traces(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    jaeger: TestJaeger,
    export_with: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    info = jaeger.info
    # The signal-specific variable wins over the generic one, and is not appended to.
    env = base_env(
        jaeger,
        "http/protobuf",
        export_with,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=info.otlp_http_traces_url,
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    tracing = await send_events(aiohttp_client, tmp_path, registry, env)
    jaeger.wait_for_trace(env["OTEL_SERVICE_NAME"], full, timeout=20)
    assert tracing.counts()["exported"] == SPANS_PER_EVENT

    # The generic one is a base URL: given the full URL, spans go to .../v1/traces/v1/traces,
    # which Jaeger answers 404: reported, not silently lost.
    env = base_env(jaeger, "http/protobuf", export_with)
    env["OTEL_EXPORTER_OTLP_ENDPOINT"] = info.otlp_http_traces_url
    with caplog.at_level(logging.WARNING, "falco_talon.tracing"):
        tracing = await send_events(aiohttp_client, tmp_path, registry, env)
    assert tracing.counts() == {"exported": 0, "failed": SPANS_PER_EVENT, "dropped": 0}
    host = info.otlp_http_endpoint.split("://")[1]
    assert f"could not export {SPANS_PER_EVENT} span(s) to {host}" in caplog.text
    assert env["OTEL_SERVICE_NAME"] not in jaeger.services()


# ---------------------------------------------------------------- sampling


@BOTH_PATHS
async def test_parentbased_traceidratio_keeps_a_sampled_callers_trace_and_samples_the_rest(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    jaeger: TestJaeger,
    export_with: str,
) -> None:
    sampled, unsampled = uuid.uuid4().hex, uuid.uuid4().hex
    env = base_env(
        jaeger,
        "grpc",
        export_with,
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0",
    )
    tracing = await send_events(
        aiohttp_client,
        tmp_path,
        registry,
        env,
        events=3,
        headers=[
            {},  # no caller: the ratio, 0, decides
            {"traceparent": f"00-{sampled}-00f067aa0ba902b7-01"},
            {"traceparent": f"00-{unsampled}-00f067aa0ba902b7-00"},
        ],
    )
    trace = jaeger.wait_for_trace(env["OTEL_SERVICE_NAME"], full, timeout=20)
    assert trace["traceID"] == sampled
    assert [t["traceID"] for t in jaeger.traces(env["OTEL_SERVICE_NAME"])] == [sampled]
    assert tracing.counts()["exported"] == SPANS_PER_EVENT


# ---------------------------------------------------------------- gzip


class ByteCounter:
    """A TCP relay in front of a real Jaeger port, counting the bytes clients send."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.sent = 0
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(65536):
                if count:
                    with self._lock:
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def relay(jaeger: TestJaeger, request: pytest.FixtureRequest) -> Iterator[ByteCounter]:
    info = jaeger.info
    target = info.otlp_grpc_endpoint
    if request.node.callspec.params["protocol"] != "grpc":
        target = info.otlp_http_endpoint.split("://")[1]
    counter = ByteCounter(target)
    yield counter
    counter.close()


@BOTH_PATHS
@BOTH_PROTOCOLS
async def test_gzip_compression_shrinks_what_goes_over_the_wire_and_jaeger_reads_it(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    jaeger: TestJaeger,
    relay: ByteCounter,
    protocol: str,
    export_with: str,
) -> None:
    endpoint = f"127.0.0.1:{relay.port}" if protocol == "grpc" else f"http://127.0.0.1:{relay.port}"
    sizes = {}
    for compression in ("none", "gzip"):
        env = base_env(
            jaeger,
            protocol,
            export_with,
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_EXPORTER_OTLP_TRACES_COMPRESSION=compression,
        )
        before = relay.sent
        tracing = await send_events(aiohttp_client, tmp_path, registry, env, events=10)
        sizes[compression] = relay.sent - before
        name = env["OTEL_SERVICE_NAME"]
        jaeger.wait_for_trace(name, lambda t, n=name: len(jaeger.traces(n)) == 10, timeout=20)
        assert tracing.counts()["exported"] == 10 * SPANS_PER_EVENT
    assert sizes["gzip"] < sizes["none"] / 2, sizes


# ---------------------------------------------------------------- TLS


def tls_endpoint(jaeger: TestJaeger, protocol: str) -> str:
    info = jaeger.info
    return f"https://{info.otlp_grpc_endpoint}" if protocol == "grpc" else info.otlp_http_endpoint


@BOTH_PATHS
@BOTH_PROTOCOLS
async def test_spans_reach_a_tls_collector_whose_certificate_a_custom_ca_signed(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    jaeger_tls: TestJaeger,
    pki: Pki,
    protocol: str,
    export_with: str,
) -> None:
    env = base_env(
        jaeger_tls,
        protocol,
        export_with,
        OTEL_EXPORTER_OTLP_ENDPOINT=tls_endpoint(jaeger_tls, protocol),
        OTEL_EXPORTER_OTLP_CERTIFICATE=str(pki.ca),
    )
    tracing = await send_events(aiohttp_client, tmp_path, registry, env)
    jaeger_tls.wait_for_trace(env["OTEL_SERVICE_NAME"], full, timeout=20)
    assert tracing.counts()["exported"] == SPANS_PER_EVENT


@BOTH_PATHS
@BOTH_PROTOCOLS
async def test_a_client_certificate_opens_a_mutual_tls_collector(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    jaeger_mtls: TestJaeger,
    pki: Pki,
    protocol: str,
    export_with: str,
) -> None:
    env = base_env(
        jaeger_mtls,
        protocol,
        export_with,
        # No scheme on grpc: the certificates alone mean TLS.
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=(
            jaeger_mtls.info.otlp_grpc_endpoint
            if protocol == "grpc"
            else jaeger_mtls.info.otlp_http_traces_url
        ),
        OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE=str(pki.ca),
        OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE=str(pki.client_cert),
        OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY=str(pki.client_key),
    )
    tracing = await send_events(aiohttp_client, tmp_path, registry, env)
    jaeger_mtls.wait_for_trace(env["OTEL_SERVICE_NAME"], full, timeout=20)
    assert tracing.counts()["exported"] == SPANS_PER_EVENT


@BOTH_PATHS
@BOTH_PROTOCOLS
async def test_without_a_client_certificate_the_refusal_is_logged_and_counted(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    jaeger_mtls: TestJaeger,
    pki: Pki,
    protocol: str,
    export_with: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = base_env(
        jaeger_mtls,
        protocol,
        export_with,
        OTEL_EXPORTER_OTLP_ENDPOINT=tls_endpoint(jaeger_mtls, protocol),
        OTEL_EXPORTER_OTLP_CERTIFICATE=str(pki.ca),
        OTEL_EXPORTER_OTLP_TIMEOUT="1000",
    )
    client, service = await talon(aiohttp_client, tmp_path, registry, from_env(env))
    with caplog.at_level(logging.WARNING, "falco_talon.tracing"):
        assert (await client.post("/", json=FALCO_EVENT)).status == 202
        await service.queue.join()
        await service.pipeline.dispatcher.drain(10)  # type: ignore[union-attr]
        await asyncio.get_running_loop().run_in_executor(None, service.tracing.flush)
        failed: dict[Any, float] = {}
        for _ in range(200):  # the export process reports back; /metrics shows it
            metrics = samples(await (await client.get("/metrics")).text())
            failed = {k: v for k, v in metrics.items() if k[0] == "falco_talon_spans_total"}
            if failed[("falco_talon_spans_total", (("outcome", "failed"),))] >= SPANS_PER_EVENT:
                break
            await asyncio.sleep(0.1)
        await service.stop()
    assert failed == {
        ("falco_talon_spans_total", (("outcome", "exported"),)): 0,
        ("falco_talon_spans_total", (("outcome", "failed"),)): SPANS_PER_EVENT,
        ("falco_talon_spans_total", (("outcome", "dropped"),)): 0,
    }
    host = jaeger_mtls.info.otlp_grpc_endpoint
    if protocol != "grpc":
        host = jaeger_mtls.info.otlp_http_endpoint.split("://")[1]
    logged = re.findall(rf"could not export (\d+) span\(s\) to {host}: \w", caplog.text)
    assert sum(map(int, logged)) == SPANS_PER_EVENT, caplog.text
    assert env["OTEL_SERVICE_NAME"] not in jaeger_mtls.services()


# ---------------------------------------------------------------- other SDK exporters


def test_the_server_sends_to_every_sdk_exporter_named_and_never_prints_the_headers(
    tmp_path: Path, jaeger: TestJaeger
) -> None:
    """``falco-talon server`` itself, configured by variables only: with ``exportWith: sdk``
    the console exporter prints the spans Jaeger also receives; the effective configuration
    it logs shows the headers' names, never their values."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "- name: label\n  match: {rules: [Terminal shell in container]}\n"
        "  action: {name: kubernetes:label, parameters: {labels: {suspicious: 'true'}}}\n"
    )
    port = free_port()
    env = {
        **os.environ,
        **base_env(jaeger, "grpc", "sdk"),
        "OTEL_TRACES_EXPORTER": "otlp,console",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20s3cr3t-t0ken",
        "DRYRUN": "true",
        "LOGFORMAT": "json",
        "LISTENADDRESS": "127.0.0.1",
        "LISTENPORT": str(port),
    }
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(FALCO_TALON), "server", "-r", str(rules)], stdout=stdout, stderr=stderr, env=env
        )
    try:
        trace_id = uuid.uuid4().hex
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/",
            data=json.dumps(FALCO_EVENT).encode(),
            headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"},
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(request, timeout=1) as resp:
                    assert resp.status == 202
                break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None, err.read_text()
                time.sleep(0.1)
        trace = jaeger.wait_for_trace(
            env["OTEL_SERVICE_NAME"], lambda t: t["traceID"] == trace_id, timeout=20
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    printed = out.read_text()
    names = {s["operationName"] for s in trace["spans"]}
    assert {"POST /", "received", "kubernetes:label"} <= names
    for name in names:  # the console exporter's JSON, one object per span
        assert f'"name": "{name}"' in printed
    assert f'"trace_id": "0x{trace_id}"' in printed
    logs = err.read_text()
    assert '\\"authorization\\": \\"********\\"' in logs, logs
    assert "s3cr3t" not in logs + printed


def test_exporters_that_cannot_work_stop_the_start_up_with_the_reason(pki: Pki) -> None:
    with pytest.raises(ValueError, match=r"console: SDK exporters need otel.exportWith: sdk"):
        Tracing(from_env({"OTEL_ENABLED": "true", "OTEL_TRACES_EXPORTER": "console"}))
    with pytest.raises(ValueError, match=r"no SDK span exporter named 'zipkin'.*known: console"):
        Tracing(
            from_env(
                {"OTEL_ENABLED": "true", "OTEL_EXPORTWITH": "sdk", "OTEL_TRACES_EXPORTER": "zipkin"}
            )
        )
    for export_with in ("builtin", "sdk"):
        for protocol, endpoint in (("grpc", "collector:4317"), ("http/protobuf", "https://c")):
            env = {
                "OTEL_ENABLED": "true",
                "OTEL_EXPORTWITH": export_with,
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
                "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                "OTEL_EXPORTER_OTLP_CERTIFICATE": "/nonexistent/ca.pem",
            }
            with pytest.raises(ValueError, match=r"otel.certificate: cannot read /nonexistent"):
                Tracing(from_env(env))
            env["OTEL_EXPORTER_OTLP_CERTIFICATE"] = str(pki.ca)
            env["OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE"] = str(pki.client_cert)
            with pytest.raises(ValueError, match=r"clientCertificate and otel.clientKey go"):
                Tracing(from_env(env))
    # OTEL_TRACES_EXPORTER=none: nothing leaves, whichever path.
    assert not Tracing(from_env({"OTEL_ENABLED": "true", "OTEL_TRACES_EXPORTER": "none"})).enabled
