"""One falco-talon replica for tests/nats/: the real CLI (``falco-talon server``) in its own
process, with two test-only actionners registered first (the real registry, no mock):

* ``test:mark`` appends ``<event id>`` to the file named by ``TALON_TEST_MARKS`` (one
  ``O_APPEND`` write a line, so replicas can share the file), after sleeping ``seconds``;
* ``test:die`` kills its own process with SIGKILL: a run that can never reach a final
  state (a poison event that crashes the replica, as an OOM kill or a segfault would);
* ``test:unavailable`` fails with a ``TemporaryError`` every time (twice a delivery: its
  own retry), as an action against an API server that stays down would.

``TALON_TEST_WAIT_FOR_ONE``, ``TALON_TEST_TAKE_WHAT_IS_THERE``: seconds a consumer's pulls
wait (``engine.natsqueue``'s constants of those names).

    python -m tests.nats.replica server -c config.yaml -r rules.yaml
"""

from __future__ import annotations

import asyncio
import os
import signal

from engine.cli import main
from engine.contract.actionners import ACTIONNERS, ActionContext, actionner
from engine.contract.errors import TemporaryError
from engine.contract.results import ActionResult
from engine.contract.retry import RetryPolicy
from engine.plugins import load_plugins


def register() -> None:
    load_plugins()

    @actionner(
        "test:mark",
        description="appends the event id to $TALON_TEST_MARKS",
        registry=ACTIONNERS,
        parameters={
            "type": "object",
            "properties": {"seconds": {"type": "number"}},
            "additionalProperties": False,
        },
    )
    async def _mark(ctx: ActionContext) -> ActionResult:
        await asyncio.sleep(float(ctx.parameters.get("seconds", 0)))
        fd = os.open(os.environ["TALON_TEST_MARKS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{ctx.event.id}\n".encode())
        finally:
            os.close(fd)
        return ActionResult.succeeded("marked", target=ctx.target)

    @actionner("test:die", description="SIGKILLs its own process", registry=ACTIONNERS)
    async def _die(ctx: ActionContext) -> ActionResult:
        os.kill(os.getpid(), signal.SIGKILL)
        return ActionResult.failed("unreachable", target=ctx.target)

    @actionner(
        "test:unavailable",
        description="fails with a TemporaryError every time",
        retry=RetryPolicy(attempts=2, backoff=0.01),
        registry=ACTIONNERS,
    )
    async def _unavailable(ctx: ActionContext) -> ActionResult:
        raise TemporaryError("the API server is unavailable (503)")


if __name__ == "__main__":
    register()
    from engine import natsqueue

    for knob in ("WAIT_FOR_ONE", "TAKE_WHAT_IS_THERE"):  # how long a consumer's pulls wait
        if os.environ.get(f"TALON_TEST_{knob}"):
            setattr(natsqueue, knob, float(os.environ[f"TALON_TEST_{knob}"]))
    main()
