"""``GET /metrics``: Prometheus counters a person can alert on, with low-cardinality labels."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from engine.contract.actionners import ActionnerRegistry
from engine.pipeline import Pipeline
from engine.rules import RuleSet
from engine.server import Service, create_app
from tests.conftest import FALCO_EVENT

RULES = """
- name: kill
  match: {priority: ">=Error"}
  action: {name: test:stop}
- name: mark
  action: {name: test:fail}
  before: true
"""


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_events_rejections_rules_actions_and_timings(
    aiohttp_client: Any, registry: ActionnerRegistry, load_rules: Callable[..., RuleSet]
) -> None:
    service = Service(Pipeline(load_rules(RULES), registry))
    await service.start()
    client = await aiohttp_client(create_app(service))
    events = [
        FALCO_EVENT,
        {**FALCO_EVENT, "priority": "Critical"},
        {**FALCO_EVENT, "priority": "LOUD", "source": "k8s_audit"},
    ]
    replies = await asyncio.gather(*(client.post("/", json=e) for e in events))
    assert [r.status for r in replies] == [202, 202, 202]
    assert (await client.post("/", data=b"nope")).status == 400
    await service.queue.join()
    resp = await client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    m = samples(await resp.text())
    await service.stop()

    assert (
        m[("falco_talon_events_received_total", (("priority", "warning"), ("source", "syscall")))]
        == 1
    )
    assert (
        m[("falco_talon_events_received_total", (("priority", "critical"), ("source", "syscall")))]
        == 1
    )
    assert (
        m[("falco_talon_events_received_total", (("priority", "unknown"), ("source", "k8s_audit")))]
        == 1
    )
    assert m[("falco_talon_events_rejected_total", (("reason", "invalid"),))] == 1
    assert m[("falco_talon_rules_matched_total", (("rule", "mark"),))] == 3
    assert m[("falco_talon_rules_matched_total", (("rule", "kill"),))] == 1
    assert (
        m[("falco_talon_actions_total", (("actionner", "test:fail"), ("outcome", "failed")))] == 3
    )
    assert (
        m[("falco_talon_actions_total", (("actionner", "test:stop"), ("outcome", "succeeded")))]
        == 1
    )
    assert m[("falco_talon_events_processed_total", (("state", "notified"),))] == 3
    assert m[("falco_talon_event_processing_seconds_count", ())] == 3
    assert m[("falco_talon_action_duration_seconds_count", (("actionner", "test:fail"),))] == 3
    assert m[("falco_talon_queue_depth", ())] == 0
    assert m[("falco_talon_events_in_flight", ())] == 0
    names = {name for name, _ in m}
    assert all(n.startswith("falco_talon_") for n in names)
    assert not any("pod" in k for _, labels in m for k, _ in labels)
