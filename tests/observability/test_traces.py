"""Traces in a real Jaeger: one trace per event whose span tree answers "why did my actions
run in this order?". Jaeger v2 runs from ``tests/env/jaeger.py``; spans leave the way they do
in production, by either export path: builtin (batched, piped to the export process, encoded
by ``observability.otlp``) or ``exportWith: sdk`` (the SDK's BatchSpanProcessor and OTLP
exporter), over OTLP/gRPC or OTLP/HTTP. The same tree is asserted for all four."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from engine.contract.actionners import ActionnerRegistry
from observability.logging import JsonFormatter, TraceIds
from observability.tracing import TracingSettings
from tests.conftest import FALCO_EVENT
from tests.env.jaeger import JaegerInfo, TestJaeger, parent_span_id, span_tags
from tests.observability.conftest import SPANS_PER_EVENT, talon


def by_name(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["operationName"]: s for s in trace["spans"]}


@pytest.mark.parametrize("export_with", ["builtin", "sdk"])
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
async def test_an_event_trace_shows_states_actions_skips_and_notifications_in_jaeger(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    jaeger: TestJaeger,
    protocol: str,
    export_with: str,
) -> None:
    info: JaegerInfo = jaeger.info
    endpoint = info.otlp_grpc_endpoint if protocol == "grpc" else info.otlp_http_endpoint
    service_name = f"falco-talon-{protocol.split('/', maxsplit=1)[0]}-{export_with}"
    event_id = f"ev-{protocol}-{export_with}"
    client, service = await talon(
        aiohttp_client,
        tmp_path,
        registry,
        TracingSettings(
            enabled=True,
            endpoint=endpoint,
            protocol=protocol,
            service_name=service_name,
            export_with=export_with,
        ),
    )
    resp = await client.post("/", json={**FALCO_EVENT, "uuid": event_id})
    assert resp.status == 202
    await service.queue.join()
    await service.pipeline.dispatcher.drain(10)  # type: ignore[union-attr]
    await service.stop()  # flushes the batches and ends the export process (or the SDK's)

    trace = jaeger.wait_for_trace(
        service_name, lambda t: len(t["spans"]) == SPANS_PER_EVENT, timeout=20
    )
    assert service.tracing.counts() == {"exported": SPANS_PER_EVENT, "failed": 0, "dropped": 0}
    spans = by_name(trace)
    root = spans["POST /"]
    assert parent_span_id(root) is None
    assert span_tags(root)["span.kind"] == "server"
    assert span_tags(root)["talon.event_id"] == event_id

    states = sorted(
        (s for s in trace["spans"] if parent_span_id(s) == root["spanID"]),
        key=lambda s: s["startTime"],
    )
    assert [s["operationName"] for s in states] == [
        "received",
        "matched",
        "before-actions",
        "actions",
        "notified",
    ]
    received = span_tags(spans["received"])
    assert (
        received["falco.rule"],
        received["falco.priority"],
        received["falco.source"],
        received["falco.hostname"],
    ) == ("Terminal shell in container", "Warning", "syscall", "node-1")
    assert received["k8s.pod.name"] == "web-7d4b9c7f5d-x2x8k"

    first, kill = spans["test:first"], spans["test:stop"]
    assert parent_span_id(first) == spans["before-actions"]["spanID"]
    assert parent_span_id(kill) == spans["actions"]["spanID"]
    assert span_tags(kill)["talon.rule"] == "kill"
    assert span_tags(kill)["talon.outcome"] == "succeeded"
    assert (span_tags(kill)["talon.before"], span_tags(kill)["talon.continue"]) == (False, False)
    assert "test:record" not in spans  # superseded: never ran...
    [skip] = spans["actions"]["logs"]  # ...but the reason is on the actions span
    fields = {f["key"]: f["value"] for f in skip["fields"]}
    assert fields["event"] == "step skipped"
    assert fields["talon.rule"] == "label (superseded)"
    assert fields["talon.reason"] == "superseded by rule 'kill', continue: false"

    sends = [s for s in trace["spans"] if s["operationName"].startswith("notify ")]
    assert {parent_span_id(s) for s in sends} == {spans["notified"]["spanID"]}
    pager = next(s for s in sends if s["operationName"] == "notify pager")
    assert span_tags(pager)["otel.status_code"] == "ERROR"
    assert span_tags(pager)["error"] is True
    assert "pager service rejected the token" in span_tags(pager)["otel.status_description"]
    assert all(
        span_tags(s).get("otel.status_code") != "ERROR"
        for s in sends
        if s["operationName"] == "notify chat"
    )
    assert len(sends) == 3  # chat x2 (first, kill) + pager x1 (first)


async def test_a_traceparent_sent_with_the_event_continues_the_callers_trace(
    aiohttp_client: Any, tmp_path: Path, registry: ActionnerRegistry, jaeger: TestJaeger
) -> None:
    client, service = await talon(
        aiohttp_client,
        tmp_path,
        registry,
        TracingSettings(
            enabled=True, endpoint=jaeger.info.otlp_grpc_endpoint, service_name="falco-talon-tp"
        ),
    )
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    resp = await client.post(
        "/", json=FALCO_EVENT, headers={"traceparent": f"00-{trace_id}-{parent}-01"}
    )
    assert resp.status == 202
    await service.queue.join()
    await service.stop()
    trace = jaeger.wait_for_trace("falco-talon-tp", lambda t: t["traceID"] == trace_id, timeout=20)
    assert parent_span_id(by_name(trace)["POST /"]) == parent


async def test_logs_about_an_event_carry_its_trace_and_span_ids(
    aiohttp_client: Any,
    tmp_path: Path,
    registry: ActionnerRegistry,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Tracing off: the trace id is still there, so people can search for it.
    client, service = await talon(aiohttp_client, tmp_path, registry, TracingSettings())
    caplog.handler.addFilter(TraceIds())
    with caplog.at_level(logging.INFO, "falco_talon"):
        assert (await client.post("/", json=FALCO_EVENT)).status == 202
        await service.queue.join()
    await service.stop()
    lines = [
        json.loads(JsonFormatter().format(r))
        for r in caplog.records
        if r.name == "falco_talon.pipeline"
    ]
    assert lines and all(len(line["trace_id"]) == 32 for line in lines)
    assert len({line["trace_id"] for line in lines}) == 1


async def test_tracing_on_without_a_reachable_collector_never_blocks_events(
    aiohttp_client: Any, tmp_path: Path, registry: ActionnerRegistry
) -> None:
    client, service = await talon(
        aiohttp_client,
        tmp_path,
        registry,
        TracingSettings(enabled=True, endpoint="127.0.0.1:9", timeout=0.5),
    )
    replies = await asyncio.gather(*(client.post("/", json=FALCO_EVENT) for _ in range(20)))
    assert {r.status for r in replies} == {202}
    await asyncio.wait_for(service.queue.join(), 5)
    await service.stop()
