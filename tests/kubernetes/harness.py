"""Drive events through the real HTTP server against the real control plane."""

from __future__ import annotations

import copy
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from engine.contract.retry import RetryPolicy
from engine.machine import EventRun
from engine.notify import DeliveryPolicy, Dispatcher
from engine.pipeline import Pipeline
from engine.plugins import load_plugins
from engine.rules import RulesLoader
from engine.server import Service, create_app
from observability.tracing import Tracing
from tests.conftest import FALCO_EVENT


def event_for(pod: str, namespace: str, **changes: Any) -> dict[str, Any]:
    event = copy.deepcopy(FALCO_EVENT)
    event["output_fields"]["k8s.pod.name"] = pod
    event["output_fields"]["k8s.ns.name"] = namespace
    event.update(changes)
    return event


@dataclass
class Talon:
    """falco-talon's server with the built-in actionners and notifiers, recording runs."""

    client: TestClient
    service: Service
    runs: list[EventRun]

    async def send(self, event: dict[str, Any], headers: dict[str, str] | None = None) -> EventRun:
        resp = await self.client.post("/", json=event, headers=headers)
        assert resp.status == 202, await resp.text()
        await self.service.queue.join()
        dispatcher = self.service.pipeline.dispatcher
        if dispatcher is not None:
            await dispatcher.drain(30)
        return self.runs[-1]


async def start_talon(
    aiohttp_client: Any,
    tmp_path: Path,
    rules: str,
    default_notifiers: tuple[str, ...] = (),
    *,
    tracing: Tracing | None = None,
    trace_url: str = "",
    workers: int = 4,
) -> Talon:
    actionners, notifiers = load_plugins()
    path = tmp_path / "rules.yaml"
    path.write_text(textwrap.dedent(rules).lstrip("\n"))
    ruleset = RulesLoader(actionners, notifiers).load([path])
    dispatcher = Dispatcher(
        notifiers,
        {"k8sevents": {}},
        DeliveryPolicy(retry=RetryPolicy(attempts=2, backoff=0.05)),
        trace_url=trace_url,
    )
    pipeline = Pipeline(
        ruleset,
        actionners,
        dispatcher=dispatcher,
        default_notifiers=default_notifiers,
        action_timeout=60,
    )
    runs: list[EventRun] = []
    process = pipeline.process

    async def recording(event: Any, *args: Any) -> EventRun:
        run = await process(event, *args)
        runs.append(run)
        return run

    pipeline.process = recording  # type: ignore[method-assign]
    service = Service(pipeline, workers=workers, tracing=tracing)
    await service.start()
    client = await aiohttp_client(create_app(service))
    return Talon(client, service, runs)


def outcomes(run: EventRun) -> list[tuple[str, str, str]]:
    return [(s.rule.name, s.outcome.value, s.reason) for s in run.steps]
