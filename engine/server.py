"""The HTTP server: Falco events in, 202 out, processing in the background.

Position in the flow: **HTTP** -> event model -> matcher -> state machine -> ...

``POST /`` validates the body (``engine.contract.event``) and queues the event; a bounded pool of
workers drives each queued event through the pipeline. Every reply has a JSON body. The
request is the root span of the event's trace (a ``traceparent`` header is continued).
A full queue answers 503 with ``Retry-After`` rather than dropping the event; a body over
``maxBodySize`` answers 413. ``GET /healthz`` answers 200 with the serving rules' count and
checksum. SIGTERM stops accepting (503),
finishes the events in flight within ``shutdownTimeout``, then exits. ``GET /metrics``
serves the Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import orjson
from aiohttp import web

from engine import __version__, processes
from engine.contract.event import EventError, FalcoEvent, decode_event
from engine.listener import (
    PROTOCOL_LOG,
    Guard,
    GuardedSite,
    ListenerConfig,
    guarded_routes,
    listener_setup,
)
from engine.natsqueue import HandOff, NatsQueue
from engine.pipeline import Pipeline
from engine.reload import RulesWatcher
from engine.storm import Dedup, DedupWindow, identity
from observability.eventlog import event_logger
from observability.metrics import CONTENT_TYPE, Metrics
from observability.tracing import NO_TRACE, SpanKind, SpanRecord, Trace, Tracing

log = logging.getLogger("falco_talon.server")

Queued = tuple[FalcoEvent, Trace, SpanRecord | None]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Service:
    """The running engine: the event queue, its workers, and what they drive."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        queue_size: int = 1000,
        workers: int = 16,
        max_body_size: int = 1 << 20,
        shutdown_timeout: float = 30.0,
        watcher: RulesWatcher | None = None,
        tracing: Tracing | None = None,
        metrics: Metrics | None = None,
        dedup_window: float = 0.0,
        nats: NatsQueue | None = None,
        dedup: Dedup | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.queue: asyncio.Queue[Queued] = asyncio.Queue(queue_size)
        self.dedup: Dedup = dedup if dedup is not None else DedupWindow(dedup_window)
        """The embedded default's deduplication (with NATS, the stream's window does it);
        the CLI passes ``deduplication.timeWindowSeconds`` (default 5 s), a library user
        opts in. ``dedup``: another store (shared by the server processes)."""
        self.nats = nats
        """The durable shared queue, when ``nats.url`` is set: events go there, not to
        :attr:`queue`, and this replica's workers pull from it."""
        self.tracing = tracing if tracing is not None else pipeline.tracing or Tracing()
        self.metrics = metrics if metrics is not None else pipeline.metrics or Metrics()
        pipeline.tracing, pipeline.metrics = self.tracing, self.metrics
        if pipeline.dispatcher is not None:
            pipeline.dispatcher.tracing = self.tracing
            pipeline.dispatcher.metrics = self.metrics
        self.metrics.watch(
            self.queue.qsize, lambda: self.in_flight + (nats.in_flight if nats is not None else 0)
        )
        self.metrics.watch_rules(lambda: self.pipeline.compiled.ruleset.checksum)
        self.metrics.watch_spans(self.tracing.counts)
        if watcher is not None and watcher.metrics is None:
            watcher.metrics = self.metrics
        self.workers = workers
        self.max_body_size = max_body_size
        self.shutdown_timeout = shutdown_timeout
        self.watcher = watcher
        self.accepting = False
        self.in_flight = 0
        self.started = time.time()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self.nats is not None:
            await self.nats.start(self.pipeline)
        else:
            self._tasks = [
                asyncio.create_task(self._work(), name=f"event-worker-{i}")
                for i in range(self.workers)
            ]
        self.tracing.start()
        if self.watcher is not None:
            self.watcher.start()
        self.accepting = True

    async def _work(self) -> None:
        while True:
            event, trace, root = await self.queue.get()
            self.in_flight += 1
            try:
                await self.pipeline.process(event, trace, root)
            except Exception:  # pipeline.process already contains its errors; belt and braces
                event_logger(log, event.id, trace.trace_id_hex).exception("worker error")
            finally:
                self.in_flight -= 1
                self.queue.task_done()

    def submit(
        self, event: FalcoEvent, trace: Trace = NO_TRACE, root: SpanRecord | None = None
    ) -> bool:
        try:
            self.queue.put_nowait((event, trace, root))
        except asyncio.QueueFull:
            return False
        return True

    async def hand_off(
        self, event: FalcoEvent, trace: Trace = NO_TRACE, root: SpanRecord | None = None
    ) -> HandOff:
        """Queue an accepted event: in NATS when configured (stored before this returns),
        else in memory, once per identity within the deduplication window."""
        if self.nats is not None:
            return await self.nats.publish(event, trace, root)
        key = identity(event)
        if not self.dedup.claim(key):
            return HandOff.DUPLICATE
        if not self.submit(event, trace, root):
            self.dedup.release(key)
            return HandOff.FULL
        return HandOff.ACCEPTED

    async def stop(self) -> None:
        """Stop accepting, finish queued and in-flight events (bounded), stop the workers."""
        self.accepting = False
        if self.watcher is not None:
            await self.watcher.stop()
        if self.nats is not None:
            await self.nats.stop()
        deadline = time.monotonic() + self.shutdown_timeout
        try:
            await asyncio.wait_for(self.queue.join(), self.shutdown_timeout)
        except TimeoutError:
            lost = [self.queue.get_nowait()[0].id for _ in range(self.queue.qsize())]
            log.error(
                "shutdown timeout: %d event(s) in flight and %d queued were not finished",
                self.in_flight,
                len(lost),
                extra={"fields": {"unprocessed_event_ids": ",".join(lost)}},
            )
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        dispatcher = self.pipeline.dispatcher
        if dispatcher is not None:
            await dispatcher.drain(max(0.0, deadline - time.monotonic()))
            await dispatcher.close()
        await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.accepting else "stopping",
            "version": __version__,
            "rules": len(self.pipeline.compiled.ruleset.rules),
            "rules_checksum": self.pipeline.compiled.ruleset.checksum,
            "dry_run": self.pipeline.dry_run,
            "queue": self.queue.qsize(),
            "in_flight": self.in_flight + (self.nats.in_flight if self.nats is not None else 0),
            "uptime_s": round(time.time() - self.started, 1),
            **processes.identity(),
        }


SERVICE = web.AppKey("service", Service)


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    # orjson: a reply is on the per-event path, and json.dumps costs four times as much.
    return web.Response(
        body=orjson.dumps(body), status=status, headers=headers, content_type="application/json"
    )


def json_errors(handler: Handler) -> Handler:
    """Every error reply has a JSON body, and no exception becomes a bare 500 (a wrapper
    around each route's handler, not a middleware: see :func:`create_app`)."""

    async def answer(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _json(
                exc.status,
                {"error": exc.reason},
                headers={
                    k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")
                },
            )
        except ConnectionResetError:
            raise  # the client left mid-request: nobody to answer (aiohttp closes quietly)
        except Exception:
            log.exception("unexpected error handling %s %s", request.method, request.path)
            return _json(500, {"error": "internal error; see the server log"})

    return answer


async def post_event(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    trace = service.tracing.begin(request.headers.get("traceparent"))
    root = trace.start(
        "POST /", kind=SpanKind.SERVER, http__request__method="POST", url__path="/", http__route="/"
    )
    try:
        accepted = await _accept(request, service, trace, root)
        event: FalcoEvent | None = None
        if isinstance(accepted, web.Response):
            response = accepted
        else:
            event = accepted
            # The answer is the hand-off's (queued, duplicate, queue unavailable), and so is
            # the status on the request's span.
            handed = await service.hand_off(event, trace, root)
            response = _handed_off(service, event, trace, handed)
    finally:
        root.end()
    if trace.sampled:
        root.set(http__response__status_code=response.status)
        if event is not None:
            root.set(
                talon__event_id=event.id,
                falco__rule=event.rule,
                falco__priority=event.priority,
                falco__source=event.source,
                falco__hostname=event.hostname,
            )
        service.tracing.submit(trace)
    return response


def _handed_off(service: Service, event: FalcoEvent, trace: Trace, result: HandOff) -> web.Response:
    if result is HandOff.ACCEPTED:
        return _json(202, {"status": "accepted", "id": event.id})
    if result is HandOff.DUPLICATE:
        service.metrics.deduplicated()
        return _json(200, {"status": "duplicate", "id": event.id})
    if result is HandOff.UNAVAILABLE:
        service.metrics.rejected("queue_unavailable")
        return _json(
            503, {"error": "queue unavailable, retry later", "id": event.id}, {"Retry-After": "2"}
        )
    # Raced with a full queue between the check and the put: refuse, never drop.
    return _refuse_full(service, event, trace)


def _refuse_full(service: Service, event: FalcoEvent, trace: Trace) -> web.Response:
    service.metrics.rejected("queue_full")
    event_logger(log, event.id, trace.trace_id_hex).warning("event refused: queue full")
    return _json(503, {"error": "queue full, retry later", "id": event.id}, {"Retry-After": "1"})


async def _accept(
    request: web.Request, service: Service, trace: Trace, root: SpanRecord
) -> FalcoEvent | web.Response:
    """Validate the request: the event to hand off, or the reply refusing it."""
    metrics = service.metrics
    if not service.accepting:
        metrics.rejected("shutting_down")
        return _json(503, {"error": "shutting down"}, {"Retry-After": "5"})
    limit = service.max_body_size
    if request.content_length is not None and request.content_length > limit:
        metrics.rejected("too_large")
        return _json(
            413,
            {
                "error": f"body of {request.content_length} bytes exceeds the "
                f"limit of {limit} bytes (maxBodySize)"
            },
        )
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        metrics.rejected("too_large")
        return _json(413, {"error": f"body exceeds the limit of {limit} bytes (maxBodySize)"})
    try:
        event = decode_event(body)
    except EventError as exc:
        metrics.rejected("invalid")
        root.set(talon__error=exc.message)
        return _json(400, exc.as_json())
    if service.queue.full():
        return _refuse_full(service, event, trace)
    service.metrics.received(event.source, event.priority)
    return event


async def metrics(request: web.Request) -> web.Response:
    body = request.app[SERVICE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return _json(200, request.app[SERVICE].health())


def create_app(
    service: Service,
    listener: ListenerConfig | None = None,
    *,
    guard: Guard | None = None,
    probes: bool = True,
) -> web.Application:
    """The aiohttp application; start/stop the service around it (``run`` does).

    ``listener``: the bearer token and the body deadline (``engine.listener``; default: no
    token, 30 s);
    ``probes=False`` leaves out /healthz and /metrics (served on ``probesPort`` instead).

    No aiohttp middlewares: each route's handler is wrapped once, here (JSON errors, the
    listener's checks), and the routes answer what the router would (404, 405 with
    ``Allow``) themselves, in JSON. A middleware chain costs every request a few calls more,
    measurable on the ingest path."""
    listener = listener or ListenerConfig()
    _, token = listener_setup(listener, tls=False)
    guarded = guarded_routes(
        listener, guard or Guard(listener), token, service.metrics.rejected, service.max_body_size
    )
    app = web.Application(client_max_size=service.max_body_size)
    app[SERVICE] = service
    routes: dict[str, list[tuple[str, Handler]]] = {"/": [("POST", post_event)]}
    if probes:
        routes.update(PROBES)
    _add_routes(app, routes, guarded)
    return app


PROBES: dict[str, list[tuple[str, Handler]]] = {
    "/healthz": [("GET", healthz)],
    "/metrics": [("GET", metrics)],
}


def _add_routes(
    app: web.Application,
    routes: dict[str, list[tuple[str, Handler]]],
    guarded: Callable[[Handler], Handler],
) -> None:
    """``routes`` (path -> method, handler; GET answers HEAD too), each handler wrapped in
    ``guarded`` (the listener's checks) and :func:`json_errors`; any other method on those
    paths 405 with ``Allow``, any other path 404, both in JSON."""

    def wrap(handler: Handler) -> Handler:
        return json_errors(guarded(handler))

    for path, handlers in routes.items():
        allowed = []
        for method, handler in handlers:
            if method == "GET":
                app.router.add_get(path, wrap(handler))  # and HEAD
                allowed += [method, "HEAD"]
            else:
                app.router.add_route(method, path, wrap(handler))
                allowed.append(method)

        async def not_allowed(request: web.Request, allowed: list[str] = allowed) -> NoReturn:
            raise web.HTTPMethodNotAllowed(request.method, allowed)

        app.router.add_route("*", path, wrap(not_allowed))

    async def not_found(request: web.Request) -> NoReturn:
        raise web.HTTPNotFound()

    app.router.add_route("*", "/{path:.*}", wrap(not_found))


def create_probes_app(service: Service, guard: Guard | None = None) -> web.Application:
    """/healthz and /metrics alone: the probes port (plain HTTP, no token)."""
    listener = guard.config if guard is not None else ListenerConfig()
    guarded = guarded_routes(listener, guard or Guard(listener), None, service.metrics.rejected, 0)
    app = web.Application()
    app[SERVICE] = service
    _add_routes(app, PROBES, guarded)
    return app


async def serve(
    service: Service, host: str, port: int, listener: ListenerConfig | None = None
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. ``listener``: TLS, mutual
    TLS, bearer token, slow-client timeouts, probes port (defaults: none, 10 s, 30 s)."""
    listener = listener or ListenerConfig()
    certs, _ = listener_setup(listener)  # a bad certificate file fails here
    guard = Guard(listener)
    app = create_app(service, listener, guard=guard, probes=not listener.probes_port)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, logger=PROTOCOL_LOG)
    runners = [runner]
    await runner.setup()
    await service.start()
    site = GuardedSite(runner, host, port, guard, certs.context if certs else None)
    await site.start()
    if listener.probes_port:
        probes_guard = Guard(listener)
        probes = web.AppRunner(
            create_probes_app(service, probes_guard),
            access_log=None,
            handle_signals=False,
            logger=PROTOCOL_LOG,
        )
        runners.append(probes)
        await probes.setup()
        await GuardedSite(probes, host, listener.probes_port, probes_guard).start()
    log.info(
        "listening",
        extra={
            "fields": {
                "address": f"{host}:{port}",
                "tls": "mutual" if listener.client_ca_file else listener.tls,
                "token": bool(listener.token or listener.token_file),
                "probes_port": listener.probes_port or port,
                "rules": len(service.pipeline.compiled.ruleset.rules),
                "rules_checksum": service.pipeline.compiled.ruleset.checksum,
                "dry_run": service.pipeline.dry_run,
            }
        },
    )
    processes.ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info(
            "signal received: finishing in-flight events",
            extra={"fields": {"queued": service.queue.qsize(), "in_flight": service.in_flight}},
        )
        await service.stop()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        for r in reversed(runners):
            await r.cleanup()
    log.info("stopped")
