"""The floor under ``make bench``'s ingest: aiohttp alone, at the same load.

``python bench/aiohttp_floor.py PORT PROCESSES``: an aiohttp server whose ``POST /`` reads
the body and answers 202 with a small JSON body (what falco-talon answers), nothing else
(no decoding, no validation, no queue, no state machine, no log line); ``PROCESSES``
processes share the port (SO_REUSEPORT), as ``--processes`` does. ``GET /healthz`` names
the process, as falco-talon's does, so ``make bench`` finds and measures them the same way.
Whatever falco-talon does per event comes on top of what this costs: its ingest can reach
this figure only by doing nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

import orjson
from aiohttp import web

ACCEPTED = orjson.dumps({"status": "accepted", "id": "00000000-0000-0000-0000-000000000000"})


async def post(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=ACCEPTED, status=202, content_type="application/json")


def main() -> None:
    port, processes = int(sys.argv[1]), int(sys.argv[2])

    async def healthz(request: web.Request) -> web.Response:
        body = orjson.dumps({"pid": os.getpid(), "processes": processes})
        return web.Response(body=body, content_type="application/json")

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/", post)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_port=True).start()
        await asyncio.Event().wait()

    children = []
    for _ in range(processes):
        pid = os.fork()
        if pid == 0:
            asyncio.run(serve())
            os._exit(0)
        children.append(pid)
    # SIGTERM (make bench is done) stops the children too, not only this process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        for pid in children:
            os.waitpid(pid, 0)
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


if __name__ == "__main__":
    main()
