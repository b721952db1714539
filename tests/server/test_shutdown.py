"""SIGTERM: stop accepting (503), finish the events in flight within the timeout, exit.

The server runs in this process on a real port; the test sends itself a real SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable

import aiohttp
import pytest

from engine.contract.actionners import ActionnerRegistry
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from engine.server import Service, serve
from observability.metrics import Metrics
from tests.conftest import FALCO_EVENT
from tests.recording import Recorder

SLOW = "- name: slow\n  action: {name: test:slow, parameters: {seconds: 0.4}}\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_server(service: Service) -> tuple[asyncio.Task[None], str]:
    port = free_port()
    task = asyncio.create_task(serve(service, "127.0.0.1", port))
    url = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return task, url
            except aiohttp.ClientConnectionError:
                await asyncio.sleep(0.02)
    raise AssertionError("server did not start")


async def test_sigterm_finishes_events_in_flight_and_refuses_new_ones(
    registry: ActionnerRegistry, load_rules: Callable[..., RuleSet], recorder: Recorder
) -> None:
    recorder.started = asyncio.Event()
    metrics = Metrics()
    service = Service(
        Pipeline(load_rules(SLOW), registry, metrics=metrics), workers=2, shutdown_timeout=10
    )
    task, url = await start_server(service)
    async with aiohttp.ClientSession() as session:
        for _ in range(4):  # two in flight, two queued
            async with session.post(url + "/", json=FALCO_EVENT) as resp:
                assert resp.status == 202
        await recorder.started.wait()
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(0.05)
        async with session.post(url + "/", json=FALCO_EVENT) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "5"
            assert await resp.json() == {"error": "shutting down"}
    await asyncio.wait_for(task, 10)
    assert len(recorder.calls) == 4
    succeeded = 'falco_talon_actions_total{actionner="test:slow",outcome="succeeded"} 4.0'
    assert succeeded in metrics.render().decode()


async def test_events_not_finished_by_the_timeout_are_logged_by_id(
    registry: ActionnerRegistry,
    load_rules: Callable[..., RuleSet],
    recorder: Recorder,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder.started = asyncio.Event()
    service = Service(Pipeline(load_rules(SLOW), registry), workers=1, shutdown_timeout=0.1)
    task, url = await start_server(service)
    event = {**FALCO_EVENT, "uuid": "left-behind"}
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/", json=FALCO_EVENT) as resp:
            assert resp.status == 202
        await recorder.started.wait()
        async with session.post(url + "/", json=event) as resp:
            assert resp.status == 202
    with caplog.at_level(logging.ERROR, "falco_talon.server"):
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(task, 10)
    record = next(r for r in caplog.records if "shutdown timeout" in r.getMessage())
    assert record.fields["unprocessed_event_ids"] == "left-behind"  # type: ignore[attr-defined]
