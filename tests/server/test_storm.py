"""Storm control in the embedded default (no NATS): the same event sent twice acts once; a
rule's throttle lets N actions per target through per window and skips the rest with its
reason, while the server keeps answering. Each behaviour holds for both stores: in memory
(one process) and in the shared-memory file several server processes share
(``engine.shared``, a real file in /dev/shm or the tmp dir). Real aiohttp server and
client, the test-only ``test:*`` actionners."""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from engine.contract.actionners import ActionnerRegistry
from engine.contract.event import event_from_dict
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from engine.server import Service, create_app
from engine.shared import RECORDS, SharedCounters, SharedDedup, SharedState
from engine.storm import Dedup, DedupWindow, MemoryCounters, Throttler
from observability.metrics import Metrics
from tests.conftest import FALCO_EVENT
from tests.recording import Recorder

THROTTLED = """
- name: terminate once a minute
  action: {name: test:record}
  throttle: {max: 1, per: pod, within: 60s}
"""


def event(**over: Any) -> dict[str, Any]:
    out = copy.deepcopy(FALCO_EVENT)
    out["uuid"] = str(uuid.uuid4())
    out.update(over)
    return out


@dataclass
class Stores:
    """Where identities and throttle counts live."""

    dedup: Callable[[float], Dedup]
    throttler: Callable[[], Throttler]


@pytest.fixture(params=["memory", "shared"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    if request.param == "memory":
        yield Stores(DedupWindow, lambda: Throttler(MemoryCounters()))
        return
    SharedState.create(str(tmp_path / "state"))
    state = SharedState(str(tmp_path / "state"))
    yield Stores(
        lambda window: SharedDedup(state, window), lambda: Throttler(SharedCounters(state))
    )
    state.close()


async def client_for(
    aiohttp_client: Any, pipeline: Pipeline, **kw: Any
) -> tuple[TestClient, Service]:
    service = Service(pipeline, **kw)
    await service.start()
    return await aiohttp_client(create_app(service)), service


async def test_the_same_event_twice_within_the_window_is_processed_once(
    aiohttp_client: Any,
    registry: ActionnerRegistry,
    load_rules: Callable[..., RuleSet],
    recorder: Recorder,
    stores: Stores,
) -> None:
    pipeline = Pipeline(load_rules("- name: r\n  action: {name: test:record}\n"), registry)
    client, service = await client_for(aiohttp_client, pipeline, dedup=stores.dedup(5.0))
    try:
        sidekick = event()
        plain = {k: v for k, v in FALCO_EVENT.items()}  # no uuid: rule+output+time+hostname
        first = await client.post("/", json=sidekick)
        again = await client.post("/", json=sidekick)
        assert (first.status, again.status) == (202, 200)
        assert await again.json() == {"status": "duplicate", "id": sidekick["uuid"]}
        assert [(await client.post("/", json=plain)).status for _ in range(2)] == [202, 200]
        other_time = await client.post("/", json={**plain, "time": "2026-11-29T14:03:00Z"})
        assert other_time.status == 202  # a different event: it happened at another time
        await service.queue.join()
        assert len(recorder.calls) == 3
    finally:
        await service.stop()


async def test_a_storm_of_5000_events_for_one_pod_acts_once_and_the_server_keeps_answering(
    aiohttp_client: Any,
    registry: ActionnerRegistry,
    load_rules: Callable[..., RuleSet],
    recorder: Recorder,
    stores: Stores,
) -> None:
    metrics = Metrics()
    pipeline = Pipeline(
        load_rules(THROTTLED), registry, metrics=metrics, throttler=stores.throttler()
    )
    client, service = await client_for(
        aiohttp_client, pipeline, dedup=stores.dedup(5.0), queue_size=10_000
    )
    try:
        started = time.monotonic()
        statuses: list[int] = []
        health: list[float] = []
        for _ in range(100):
            batch = [client.post("/", json=event()) for _ in range(50)]
            statuses += [r.status for r in await asyncio.gather(*batch)]
            t = time.monotonic()
            assert (await client.get("/healthz")).status == 200
            health.append(time.monotonic() - t)
        await service.queue.join()
        elapsed = time.monotonic() - started
    finally:
        await service.stop()
    assert statuses == [202] * 5000
    assert recorder.calls == [("terminate once a minute", "test:record")]
    text = metrics.render().decode()
    assert 'falco_talon_actions_total{actionner="test:record",outcome="skipped"} 4999.0' in text
    assert max(health) < 2.0, max(health)
    assert elapsed < 50, elapsed


async def test_a_throttled_step_is_skipped_with_its_reason_and_addressed_to_notifiers(
    registry: ActionnerRegistry,
    load_rules: Callable[..., RuleSet],
    recorder: Recorder,
    stores: Stores,
) -> None:
    rules = """
- rule: isolate then label
  throttle: {max: 2, per: node, within: 1m}
  actions:
    - {action: label, actionner: test:record}
    - {action: again, actionner: test:record}
"""
    pipeline = Pipeline(
        load_rules(rules), registry, default_notifiers=("webhook",), throttler=stores.throttler()
    )
    runs = [await pipeline.process(event_from_dict(event())) for _ in range(3)]
    assert len(recorder.calls) == 4  # the chain of 2 actions ran for 2 events
    steps = runs[2].summary()["steps"]
    reason = "throttled: 2 actions on node node-1 within 1m"
    assert [(s["outcome"], s["reason"]) for s in steps] == [("skipped", reason)] * 2
    assert [d.step.reason for d in runs[2].deliveries] == [reason] * 2


async def test_explain_names_the_throttle_and_the_counter_the_event_counts_in(
    registry: ActionnerRegistry, load_rules: Callable[..., RuleSet]
) -> None:
    from engine.explain import explain, explain_text

    rules = load_rules(THROTTLED.replace("per: pod", "per: workload"))
    text = explain_text(await explain(event_from_dict(event()), rules, registry))
    assert "throttle: at most 1 per workload within 60s (workload demo/web)" in text


async def test_a_throttle_above_what_a_shared_counter_records_never_lets_more_through_a_window(
    stores: Stores,
) -> None:
    store = stores.throttler().store
    limit, window = 3 * RECORDS, 10.0
    times = [i * 0.25 for i in range(400)]  # four a second for 100 s, against 24 per 10 s
    allowed = [t for t in times if await store.take("ab" * 20, limit, window, 1000.0 + t)]
    for t in allowed:  # every sliding window holds at most `limit`
        assert sum(1 for u in allowed if t <= u < t + window) <= limit
    assert len(allowed) >= 8 * limit  # and it lets (nearly) the limit through each window


def test_a_shared_table_s_full_bucket_forgets_the_identity_expiring_first(tmp_path: Path) -> None:
    path = str(tmp_path / "state")
    SharedState.create(path, dedup_buckets=1, counter_buckets=1)  # one bucket of 8 slots
    state = SharedState(path)
    dedup = SharedDedup(state, 60.0)
    keys = [f"{i:040x}" for i in range(9)]
    assert [dedup.claim(k) for k in keys] == [True] * 9  # the ninth took the first's slot
    assert state.evictions() == (1, 0)
    assert [dedup.claim(k) for k in keys[1:]] == [False] * 8
    assert dedup.claim(keys[0])  # forgotten early: taken for new (processed, never dropped)
    dedup.release(keys[0])
    assert dedup.claim(keys[0])  # released (its queue was full): new again
