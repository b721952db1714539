"""The HTTP server, through a real aiohttp server and client: good events of both shapes
are accepted and processed; every kind of bad input gets a 4xx with a JSON body naming the
problem; a full queue answers 503 and loses nothing."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from engine.contract.actionners import ActionnerRegistry
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from engine.server import Service, create_app
from tests.conftest import FALCO_EVENT, sidekick_shape
from tests.recording import Recorder

RULES = """
- name: record everything
  action: {name: test:record}
"""
SLOW = """
- name: slow
  action: {name: test:slow, parameters: {seconds: 0.3}}
"""

ClientFactory = Callable[..., Awaitable[tuple[TestClient, Service]]]


@pytest.fixture
async def make_client(
    aiohttp_client: Any, registry: ActionnerRegistry, load_rules: Callable[..., RuleSet]
) -> AsyncIterator[ClientFactory]:
    services: list[Service] = []

    async def make(rules: str = RULES, **kw: Any) -> tuple[TestClient, Service]:
        service = Service(Pipeline(load_rules(rules), registry), **kw)
        await service.start()
        services.append(service)
        return await aiohttp_client(create_app(service)), service

    yield make
    for service in services:
        await service.stop()


async def test_a_falco_http_output_event_is_accepted_and_processed(
    make_client: ClientFactory, recorder: Recorder
) -> None:
    client, service = await make_client()
    resp = await client.post("/", json=FALCO_EVENT)
    body = await resp.json()
    assert resp.status == 202 and body["status"] == "accepted"
    await service.queue.join()
    assert recorder.calls == [("record everything", "test:record")]
    ctx = recorder.contexts[0]
    assert (ctx.target.pod, ctx.target.namespace) == ("web-7d4b9c7f5d-x2x8k", "demo")
    assert ctx.event.id == body["id"]
    assert ctx.event.output_fields["proc.tty"] == 34816


async def test_a_falcosidekick_event_is_accepted_with_its_uuid_as_the_id(
    make_client: ClientFactory, recorder: Recorder
) -> None:
    client, service = await make_client()
    event = sidekick_shape(FALCO_EVENT)
    resp = await client.post(
        "/",
        data=json.dumps(event).encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert resp.status == 202
    assert (await resp.json())["id"] == event["uuid"]
    await service.queue.join()
    assert recorder.contexts[0].event.id == event["uuid"]
    assert recorder.contexts[0].event.tags == tuple(sorted(FALCO_EVENT["tags"]))


@pytest.mark.parametrize("source", [None, "", "absent"])
async def test_an_empty_or_missing_source_means_syscall(
    make_client: ClientFactory, recorder: Recorder, source: str | None
) -> None:
    client, service = await make_client()
    event = copy.deepcopy(FALCO_EVENT)
    if source == "absent":
        del event["source"]
    else:
        event["source"] = source
    assert (await client.post("/", json=event)).status == 202
    await service.queue.join()
    assert recorder.contexts[0].event.source == "syscall"


def _with(**changes: Any) -> bytes:
    event = copy.deepcopy(FALCO_EVENT)
    for key, value in changes.items():
        if value is ...:
            del event[key]
        else:
            event[key] = value
    return json.dumps(event).encode()


BAD_INPUT: list[tuple[str, bytes, dict[str, Any]]] = [
    ("empty body", b"", {"error": "empty body: expected a Falco event as a JSON object"}),
    ("blank body", b"  \n", {"error": "empty body: expected a Falco event as a JSON object"}),
    (
        "not JSON",
        b"rule=x",
        {
            "error": "the body is not valid JSON: unexpected character, expected a JSON value: "
            "line 1 column 1 (char 0)"
        },
    ),
    (
        "invalid UTF-8",
        b'{"rule": "\xff\xfe", "priority": "Warning", "output_fields": {}}',
        {"error": "the body is not valid UTF-8"},
    ),
    ("a list, not an object", b"[1, 2]", {"error": "the event must be a JSON object, got array"}),
    (
        "a string, not an object",
        b'"hello"',
        {"error": "the event must be a JSON object, got string"},
    ),
    ("missing rule", _with(rule=...), {"error": "missing required field 'rule'", "field": "rule"}),
    (
        "missing priority",
        _with(priority=...),
        {"error": "missing required field 'priority'", "field": "priority"},
    ),
    (
        "missing output_fields",
        _with(output_fields=...),
        {"error": "missing required field 'output_fields'", "field": "output_fields"},
    ),
    (
        "rule of the wrong type",
        _with(rule=42),
        {"error": "field 'rule' must be string, got integer", "field": "rule"},
    ),
    ("empty rule", _with(rule=""), {"error": "field 'rule' must not be empty", "field": "rule"}),
    (
        "priority of the wrong type",
        _with(priority=["Warning"]),
        {"error": "field 'priority' must be string, got array", "field": "priority"},
    ),
    (
        "output_fields of the wrong type",
        _with(output_fields=["k8s.ns.name=demo"]),
        {"error": "field 'output_fields' must be object, got array", "field": "output_fields"},
    ),
    (
        "an output field holding an object",
        _with(output_fields={"k8s.ns.name": {"x": 1}}),
        {
            "error": "field 'output_fields.k8s.ns.name' must be string or integer or number or "
            "boolean or null or array, got object",
            "field": "output_fields.k8s.ns.name",
        },
    ),
    (
        "tags of the wrong type",
        _with(tags="shell"),
        {"error": "field 'tags' must be array or null, got string", "field": "tags"},
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT]
)
async def test_bad_input_gets_400_with_a_json_body_naming_the_problem(
    make_client: ClientFactory, recorder: Recorder, body: bytes, expected: dict[str, Any]
) -> None:
    client, service = await make_client()
    resp = await client.post("/", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert await resp.json() == expected
    # The server keeps serving, and the bad event was not processed.
    assert (await client.post("/", json=FALCO_EVENT)).status == 202
    await service.queue.join()
    assert len(recorder.calls) == 1


async def test_a_body_over_the_limit_gets_413(make_client: ClientFactory) -> None:
    client, _ = await make_client(max_body_size=2048)
    event = copy.deepcopy(FALCO_EVENT)
    event["output"] = "x" * 4096
    resp = await client.post("/", json=event)
    assert resp.status == 413
    assert await resp.json() == {
        "error": f"body of {len(json.dumps(event))} bytes exceeds the limit of 2048 bytes "
        "(maxBodySize)"
    }


async def test_a_chunked_body_over_the_limit_gets_413_too(make_client: ClientFactory) -> None:
    client, _ = await make_client(max_body_size=2048)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"x" * 512

    resp = await client.post("/", data=chunks())
    assert resp.status == 413
    assert (await resp.json())["error"] == "body exceeds the limit of 2048 bytes (maxBodySize)"


async def test_a_full_queue_answers_503_with_retry_after_and_loses_no_accepted_event(
    make_client: ClientFactory, recorder: Recorder
) -> None:
    recorder.started = asyncio.Event()
    client, service = await make_client(SLOW, workers=1, queue_size=1)
    first = await client.post("/", json=FALCO_EVENT)  # taken by the only worker
    await recorder.started.wait()
    second = await client.post("/", json=FALCO_EVENT)  # waits in the queue
    third = await client.post("/", json=FALCO_EVENT)  # no room
    assert [first.status, second.status, third.status] == [202, 202, 503]
    assert third.headers["Retry-After"] == "1"
    assert (await third.json())["error"] == "queue full, retry later"
    await service.queue.join()
    assert len(recorder.calls) == 2
    refused = 'falco_talon_events_rejected_total{reason="queue_full"} 1.0'
    assert refused in service.metrics.render().decode()


async def test_healthz_answers_200_with_a_small_json_body(make_client: ClientFactory) -> None:
    client, _ = await make_client()
    resp = await client.get("/healthz")
    body = await resp.json()
    assert resp.status == 200
    assert body["status"] == "ok" and body["rules"] == 1 and body["queue"] == 0


@pytest.mark.parametrize(
    ("method", "path", "status", "error", "allow"),
    [
        ("GET", "/", 405, "Method Not Allowed", "POST"),
        ("DELETE", "/", 405, "Method Not Allowed", "POST"),
        ("POST", "/healthz", 405, "Method Not Allowed", "GET,HEAD"),
        ("PUT", "/metrics", 405, "Method Not Allowed", "GET,HEAD"),
        ("POST", "/events", 404, "Not Found", None),
        ("GET", "/healthz/more", 404, "Not Found", None),
    ],
)
async def test_other_routes_get_json_errors(
    make_client: ClientFactory,
    method: str,
    path: str,
    status: int,
    error: str,
    allow: str | None,
) -> None:
    client, _ = await make_client()
    resp = await client.request(method, path)
    assert resp.status == status
    assert await resp.json() == {"error": error}
    assert resp.headers.get("Allow") == allow


async def test_head_on_the_probes_answers_like_get_without_a_body(
    make_client: ClientFactory,
) -> None:
    client, _ = await make_client()
    resp = await client.head("/healthz")
    assert resp.status == 200 and await resp.read() == b""


async def test_many_concurrent_events_are_all_processed(
    make_client: ClientFactory, recorder: Recorder
) -> None:
    client, service = await make_client(workers=4, queue_size=500)
    replies = await asyncio.gather(*(client.post("/", json=FALCO_EVENT) for _ in range(300)))
    assert {r.status for r in replies} == {202}
    await service.queue.join()
    assert len(recorder.calls) == 300


V03_RULES = """
- action: note it
  actionner: test:record
- rule: chain
  actions:
    - action: note it
    - action: refuse
      actionner: test:fail
    - action: never
      actionner: test:record
"""


async def test_a_v03_rule_file_runs_its_chain_for_a_posted_event(
    make_client: ClientFactory, recorder: Recorder
) -> None:
    client, service = await make_client(V03_RULES)
    resp = await client.post("/", json=FALCO_EVENT)
    assert resp.status == 202
    await service.queue.join()
    assert recorder.calls == [("chain", "test:record"), ("chain", "test:fail")]
    assert recorder.contexts[0].talon["falco-talon.action"] == "note it"
    assert recorder.contexts[0].talon["falco-talon.event.id"] == (await resp.json())["id"]
