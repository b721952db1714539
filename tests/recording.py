"""A test-only actionner category, ``test:*``, that records what the engine asks of it.

Registered into a registry of the test's own (never the process-wide one), next to the
built-in declarations, so tests can watch the state machine run steps in order without a
cluster. Not a mock of anything real: it is a real actionner whose effect is a list.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from engine.contract.actionners import ACTIONNERS, ActionContext, ActionnerRegistry, actionner
from engine.contract.errors import TemporaryError
from engine.contract.results import ActionResult
from engine.contract.retry import RetryPolicy
from engine.plugins import load_plugins

FAST_RETRY = RetryPolicy(attempts=3, backoff=0.01)
"""Retries that keep tests quick: 3 runs, 10 ms then 20 ms apart."""


@dataclass
class Recorder:
    calls: list[tuple[str, str]] = field(default_factory=list)
    """(rule, actionner) in call order."""
    contexts: list[ActionContext] = field(default_factory=list)
    started: asyncio.Event | None = None


def make_registry(recorder: Recorder) -> ActionnerRegistry:
    load_plugins()
    registry = ACTIONNERS.copy()

    def record(name: str, ctx: ActionContext) -> None:
        recorder.calls.append((ctx.rule, name))
        recorder.contexts.append(ctx)

    @actionner(
        "test:record",
        description="records the call",
        registry=registry,
        parameters={
            "type": "object",
            "properties": {"note": {"type": "string"}},
            "additionalProperties": False,
        },
    )
    async def _record(ctx: ActionContext) -> ActionResult:
        record("test:record", ctx)
        return ActionResult.succeeded("recorded", target=ctx.target)

    @actionner(
        "test:stop",
        description="records; continue false by default",
        continue_=False,
        registry=registry,
    )
    async def _stop(ctx: ActionContext) -> ActionResult:
        record("test:stop", ctx)
        return ActionResult.succeeded("stopped", target=ctx.target)

    @actionner(
        "test:first", description="records; before true by default", before=True, registry=registry
    )
    async def _first(ctx: ActionContext) -> ActionResult:
        record("test:first", ctx)
        return ActionResult.succeeded(target=ctx.target)

    @actionner("test:fail", description="records, then fails", registry=registry)
    async def _fail(ctx: ActionContext) -> ActionResult:
        record("test:fail", ctx)
        return ActionResult.failed("the pod refused", target=ctx.target)

    @actionner(
        "test:raise",
        description="records, then raises a TemporaryError every time",
        retry=FAST_RETRY,
        registry=registry,
    )
    async def _raise(ctx: ActionContext) -> ActionResult:
        record("test:raise", ctx)
        raise TemporaryError("apiserver unreachable")

    @actionner(
        "test:flaky",
        description="records; a TemporaryError on the first call of each event, then succeeds",
        retry=FAST_RETRY,
        registry=registry,
    )
    async def _flaky(ctx: ActionContext) -> ActionResult:
        record("test:flaky", ctx)
        if sum(1 for c in recorder.contexts if c.event is ctx.event) == 1:
            raise TemporaryError("try again", delay=0.01)
        return ActionResult.succeeded("on a retry", target=ctx.target)

    @actionner(
        "test:hang",
        description="records, then never answers; its own timeout is 0.2 s",
        timeout=0.2,
        registry=registry,
    )
    async def _hang(ctx: ActionContext) -> ActionResult:
        record("test:hang", ctx)
        await asyncio.sleep(3600)
        return ActionResult.succeeded(target=ctx.target)

    @actionner("test:crash", description="records, then has a bug", registry=registry)
    async def _crash(ctx: ActionContext) -> ActionResult:
        record("test:crash", ctx)
        return {}["missing"]  # type: ignore[no-any-return]

    @actionner(
        "test:slow",
        description="records, then takes a while",
        registry=registry,
        parameters={
            "type": "object",
            "properties": {"seconds": {"type": "number"}},
            "additionalProperties": False,
        },
    )
    async def _slow(ctx: ActionContext) -> ActionResult:
        record("test:slow", ctx)
        if recorder.started is not None:
            recorder.started.set()
        await asyncio.sleep(float(ctx.parameters.get("seconds", 0.5)))
        return ActionResult.succeeded("slept", target=ctx.target)

    return registry
