"""The opt-in durable shared queue: accepted events in a NATS JetStream stream.

Position in the flow: HTTP -> **JetStream (publish, then 2xx)** -> **pull consumer** ->
pipeline -> **ack**.

With ``nats.url`` configured the HTTP handler hands each validated event to
:meth:`NatsQueue.publish`, and answers 2xx only once the stream has acknowledged it; when
NATS cannot be reached it answers 503 with ``Retry-After`` (Falcosidekick does not retry,
but nothing is acknowledged that is not stored). The message id (``Nats-Msg-Id``) is the
event's identity (``engine.storm.identity``), so the stream's ``duplicate_window`` drops
the same event sent again, to any replica.

Every replica pulls from one durable consumer, ``workers`` runs at a time. A message is
acked when its run reaches a final state; while a run goes on the replica tells NATS it is
in progress, so only a replica that died (or hung) has its events redelivered, after
``ackWait``. A run in which an action failed with a temporary error (its retries spent) is
not acked but handed back (nak) to be redelivered after a backoff (:data:`REDELIVERY`).
An event is given up after ``maxDeliver`` deliveries: when the last one fails temporarily
too, or when a delivery beyond ``maxDeliver`` comes (the earlier ones never finished). It
is then published to ``<subject>.dead`` (stream ``<stream>_DEAD``, kept), terminated,
logged with its event id, counted in ``falco_talon_events_dead_lettered_total`` and
reported to the notifiers with outcome ``given-up`` (``Pipeline.give_up``).

Throttle counts are shared through the key-value bucket ``<stream>_THROTTLE``
(:class:`KvCounters`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.kv import KeyValue

from engine.contract.errors import ConfigError
from engine.contract.event import EventError, FalcoEvent, decode_event
from engine.contract.retry import RetryPolicy, retry
from engine.machine import EventRun
from engine.pipeline import Pipeline
from engine.storm import identity
from observability.eventlog import EventLogger, event_logger
from observability.metrics import Metrics
from observability.tracing import NO_TRACE, SpanRecord, Trace, Tracing

log = logging.getLogger("falco_talon.nats")

THROTTLE_TTL = 86400.0
"""Seconds a throttle counter outlives its last action (throttle windows up to a day)."""
CONSUMER = "falco-talon"
"""The durable consumer every replica pulls from."""
PUBLISH_TIMEOUT = 2.0
WAIT_FOR_ONE = 1.0
"""Seconds a consumer's pull of one message waits for an event before pulling again (it
returns as soon as one is stored)."""
TAKE_WHAT_IS_THERE = 0.02
"""Seconds a consumer's pull for its other free workers may take: what the stream holds
now comes at once; a message stored meanwhile may wait this long in the pull."""
CONNECT_RETRY = RetryPolicy(attempts=1 << 30, backoff=0.2, max_backoff=5.0, jitter=True)
"""Connecting at start-up: forever (the HTTP side answers 503 meanwhile)."""
KV_RETRY = RetryPolicy(attempts=20, backoff=0.005, max_backoff=0.1, jitter=True)
"""A throttle counter's compare-and-set, lost to another replica's: try again at once."""
REDELIVERY = RetryPolicy(backoff=1.0, max_backoff=60.0, jitter=True)
"""The wait before an event whose action failed temporarily is delivered again: 1 s after
the first delivery, doubling up to a minute (±50%)."""


class HandOff(StrEnum):
    """What became of an accepted event handed to the queue."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    FULL = "full"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class NatsConfig:
    """The ``nats`` settings the queue needs (built from ``NatsSettings`` by the CLI)."""

    url: str
    stream: str = "FALCO_TALON"
    subject: str = "falco-talon.events"
    token: str = ""
    token_file: str = ""
    nkey_seed_file: str = ""
    tls: dict[str, str] = field(default_factory=dict)
    ack_wait: float = 30.0
    max_deliver: int = 5
    dedup_window: float = 5.0

    @property
    def dead_subject(self) -> str:
        return self.subject + ".dead"


def _ssl_context(tls: dict[str, str]) -> ssl.SSLContext | None:
    if not tls:
        return None
    ctx = ssl.create_default_context(cafile=tls.get("caFile") or None)
    if tls.get("certFile"):
        ctx.load_cert_chain(tls["certFile"], tls.get("keyFile") or None)
    return ctx


def traceparent(trace: Trace, root: SpanRecord | None) -> str | None:
    """The W3C ``traceparent`` that continues ``trace`` under ``root`` in the consumer."""
    if trace is NO_TRACE or root is None:
        return None
    return f"00-{trace.trace_id_hex}-{root.span_id:016x}-{'01' if trace.sampled else '00'}"


class KvCounters:
    """Throttle counts in a JetStream key-value bucket, shared by every replica: the same
    sliding log as ``engine.storm.MemoryCounters``, updated with compare-and-set."""

    def __init__(self, queue: NatsQueue) -> None:
        self.queue = queue

    async def take(self, key: str, limit: int, window: float, now: float) -> bool:
        kv = self.queue.kv
        if kv is None:
            raise ConnectionError("NATS is not connected: throttle counts are unavailable")

        async def attempt() -> bool:
            try:
                entry = await kv.get(key)
                times = [t for t in orjson.loads(entry.value or b"[]") if t > now - window]
                revision: int | None = entry.revision
            except nats.js.errors.KeyNotFoundError:
                times, revision = [], None
            if len(times) >= limit:
                return False
            times.append(now)
            value = orjson.dumps(times)
            if revision is None:
                await kv.create(key, value)
            else:
                await kv.update(key, value, last=revision)
            return True

        def lost_race(exc: BaseException) -> bool:
            return isinstance(exc, nats.js.errors.KeyWrongLastSequenceError)

        return await retry(KV_RETRY, attempt, lost_race)


class NatsQueue:
    """The JetStream side of one replica: publishing accepted events, consuming them."""

    def __init__(
        self,
        config: NatsConfig,
        *,
        workers: int = 16,
        metrics: Metrics | None = None,
        tracing: Tracing | None = None,
        shutdown_timeout: float = 30.0,
    ) -> None:
        self.config = config
        self.workers = workers
        self.metrics = metrics
        self.tracing = tracing
        self.shutdown_timeout = shutdown_timeout
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.kv: KeyValue | None = None
        self.in_flight = 0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        self._runs: set[asyncio.Task[None]] = set()
        self._pipeline: Pipeline | None = None
        self._said: dict[str, float] = {}

    # -- connection ------------------------------------------------------------------------------

    def _connect_options(self) -> dict[str, Any]:
        """The client's options; a token file or TLS file that cannot be read is a
        ``ConfigError`` (at start-up, not retried)."""
        c = self.config
        token = c.token
        if c.nkey_seed_file and (token or c.token_file):
            raise ConfigError("nats: nkeySeedFile and token/tokenFile are exclusive: set one")
        try:
            if not token and c.token_file:
                token = Path(c.token_file).read_text(encoding="utf-8").strip()
            if c.nkey_seed_file:
                seed = Path(c.nkey_seed_file).read_bytes().strip()
                if not seed.startswith(b"SU"):
                    raise ConfigError(
                        f"nats: {c.nkey_seed_file} holds no user NKEY seed (one starting SU)"
                    )
            context = _ssl_context(c.tls)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"nats: cannot read {exc.filename or 'a TLS file'}: {exc}") from None
        options: dict[str, Any] = {
            "servers": [u.strip() for u in c.url.split(",") if u.strip()],
            "connect_timeout": 2,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "name": "falco-talon",
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if token:
            options["token"] = token
        if c.nkey_seed_file:
            options["nkeys_seed"] = c.nkey_seed_file  # the client signs the server's nonce
        if context is not None:
            options["tls"] = context
        return options

    async def _on_error(self, exc: Exception) -> None:
        # The client retries for ever (connecting included): say each distinct error once a
        # minute, not once a reconnect attempt.
        text = f"{type(exc).__name__}: {exc}"
        now = time.monotonic()
        if now - self._said.get(text, -60.0) >= 60.0:
            self._said[text] = now
            log.warning("NATS: %s", text)

    async def _on_disconnected(self) -> None:
        if not self._stopping:
            log.warning("NATS disconnected: events are refused (503) until it is back")

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected")

    async def connect(self) -> JetStreamContext.PullSubscription:
        """Connect (retrying until it works), declare the streams, consumer and bucket, and
        subscribe to the consumer."""
        options = self._connect_options()

        def on_retry(attempt: int, exc: BaseException, delay: float) -> None:
            if attempt == 1 or attempt % 20 == 0:
                log.warning("NATS not reachable yet (%s: %s); retrying", type(exc).__name__, exc)

        async def once() -> JetStreamContext.PullSubscription:
            nc = await nats.connect(**options)
            try:
                return await self._declare(nc)
            except BaseException:
                await nc.close()
                raise

        def worth_retrying(exc: BaseException) -> bool:
            return not isinstance(exc, ValueError)  # a bad setting, not an outage

        sub = await retry(CONNECT_RETRY, once, worth_retrying, on_retry)
        log.info(
            "NATS connected",
            extra={"fields": {"stream": self.config.stream, "subject": self.config.subject}},
        )
        return sub

    async def _declare(self, nc: Client) -> JetStreamContext.PullSubscription:
        c = self.config
        js = nc.jetstream()
        await self._ensure_stream(
            js,
            StreamConfig(
                name=c.stream,
                subjects=[c.subject],
                storage=StorageType.FILE,
                retention=RetentionPolicy.WORK_QUEUE,
                duplicate_window=c.dedup_window if c.dedup_window > 0 else 0,
            ),
        )
        await self._ensure_stream(
            js,
            StreamConfig(
                name=c.stream + "_DEAD",
                subjects=[c.dead_subject],
                storage=StorageType.FILE,
                retention=RetentionPolicy.LIMITS,
            ),
        )
        self.kv = await js.create_key_value(
            KeyValueConfig(
                bucket=c.stream + "_THROTTLE",
                history=1,
                storage=StorageType.FILE,
                ttl=THROTTLE_TTL,
            )
        )
        # created or updated (a changed ackWait/maxDeliver applies), then bound to
        await js.add_consumer(
            c.stream,
            ConsumerConfig(
                durable_name=CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=c.ack_wait,
                # one delivery beyond maxDeliver: the one that moves it to the dead letters
                max_deliver=c.max_deliver + 1,
                max_ack_pending=-1,
            ),
        )
        sub = await js.pull_subscribe_bind(durable=CONSUMER, stream=c.stream)
        self.nc, self.js = nc, js
        return sub

    @staticmethod
    async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
        try:
            await js.stream_info(str(config.name))
        except nats.js.errors.NotFoundError:
            await js.add_stream(config)
        else:
            await js.update_stream(config)

    # -- producing -------------------------------------------------------------------------------

    async def publish(
        self, event: FalcoEvent, trace: Trace = NO_TRACE, root: SpanRecord | None = None
    ) -> HandOff:
        """Store ``event`` in the stream; ACCEPTED only once the stream acknowledged it."""
        nc, js = self.nc, self.js
        if nc is None or js is None or not nc.is_connected or self._stopping:
            return HandOff.UNAVAILABLE
        headers = {"Falco-Talon-Event-Id": event.id}
        if self.config.dedup_window > 0:  # (a duplicate_window of 0 is NATS's 2 min default)
            headers["Nats-Msg-Id"] = identity(event)
        parent = traceparent(trace, root)
        if parent is not None:
            headers["traceparent"] = parent
        try:
            ack = await js.publish(
                self.config.subject,
                orjson.dumps(event.to_dict()),
                timeout=PUBLISH_TIMEOUT,
                stream=self.config.stream,
                headers=headers,
            )
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            event_logger(log, event.id, trace.trace_id_hex).warning(
                "event refused: NATS did not store it (%s)", type(exc).__name__
            )
            return HandOff.UNAVAILABLE
        return HandOff.DUPLICATE if ack.duplicate else HandOff.ACCEPTED

    # -- consuming -------------------------------------------------------------------------------

    async def start(self, pipeline: Pipeline) -> None:
        """Connect in the background, then consume: one task pulling from the durable
        consumer, running at most ``workers`` events at a time; a token or TLS file that
        cannot be read fails here."""
        self._connect_options()
        self._pipeline = pipeline
        self._tasks = [asyncio.create_task(self._consume(), name="nats-consumer")]

    async def _consume(self) -> None:
        try:
            sub = await self.connect()
        except Exception:
            log.exception("NATS queue stopped: events are refused (503)")
            return
        slots = asyncio.Semaphore(self.workers)
        while not self._stopping:
            await slots.acquire()
            if self._stopping:
                break
            # Wait for one event: a pull of one returns as soon as it is stored. (A pull of
            # several that finds the stream empty waits for all of them until it expires: the
            # first event would sit in it for up to a second.)
            if not await self._pull(sub, slots, 1, WAIT_FOR_ONE):
                continue
            # Then what else is stored now, up to the free workers, in one pull (a message
            # per pull made two round trips an event besides the run itself under load).
            batch = 0
            while batch < self.workers and not slots.locked():
                await slots.acquire()
                batch += 1
            if batch:
                await self._pull(sub, slots, batch, TAKE_WHAT_IS_THERE)

    async def _pull(self, sub: Any, slots: asyncio.Semaphore, batch: int, timeout: float) -> bool:
        """Fetch up to ``batch`` messages (``batch`` slots held) and start a run for each
        (each run gives its slot back); the unused slots are given back. True when a
        message came."""
        try:
            msgs = await sub.fetch(batch, timeout=timeout)
        except TimeoutError:  # the client's own, or asyncio's (a pull that expired): none
            msgs = []
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            for _ in range(batch):
                slots.release()
            if not self._stopping:
                log.warning("NATS fetch failed (%s); retrying", type(exc).__name__)
                await asyncio.sleep(0.5)
            return False
        for _ in range(batch - len(msgs)):
            slots.release()
        for msg in msgs:
            task = asyncio.create_task(self._handle_safely(msg))
            self._runs.add(task)

            def done(t: asyncio.Task[None]) -> None:
                self._runs.discard(t)
                slots.release()

            task.add_done_callback(done)
        return bool(msgs)

    async def _handle_safely(self, msg: Msg) -> None:
        try:
            await self._handle(msg)
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            # the message is redelivered after ackWait: nothing is lost
            log.warning("NATS message handling failed (%s: %s)", type(exc).__name__, exc)

    async def _handle(self, msg: Msg) -> None:
        pipeline = self._pipeline
        assert pipeline is not None
        delivered = msg.metadata.num_delivered
        try:
            event = decode_event(msg.data)
        except EventError as exc:
            log.error("NATS message is not an event (%s): dropped", exc.message)
            await msg.term()
            return
        headers = msg.headers or {}
        trace = self.tracing.begin(headers.get("traceparent")) if self.tracing is not None else None
        elog = event_logger(log, event.id, trace.trace_id_hex if trace is not None else "")
        if delivered > self.config.max_deliver:  # the earlier deliveries never finished
            await self._dead_letter(msg, event, delivered - 1, trace)
            return
        if delivered > 1:
            elog.warning(
                "event redelivered (delivery %d of %d)", delivered, self.config.max_deliver
            )
        self.in_flight += 1
        beat = asyncio.create_task(self._keep_alive(msg))
        try:
            run = await pipeline.process(event, trace, redelivery=True)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        finally:
            beat.cancel()
            self.in_flight -= 1
        if run.failed_temporarily:
            if delivered >= self.config.max_deliver:
                await self._dead_letter(msg, event, delivered, trace, run)
            else:
                await self._redeliver(msg, run, delivered, elog)
            return
        elog.info(
            "event run finished: %s",
            run.state,
            fields={"state": run.state, "delivery": delivered},
        )
        try:
            await msg.ack_sync(timeout=PUBLISH_TIMEOUT)
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            elog.warning(
                "run finished but its ack was lost (%s): it may run again", type(exc).__name__
            )

    async def _keep_alive(self, msg: Msg) -> None:
        """Tell NATS the run goes on, so it is not redelivered while this replica lives."""
        every = max(self.config.ack_wait / 3, 0.1)
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(Exception):
                await msg.in_progress()

    async def _redeliver(self, msg: Msg, run: EventRun, delivered: int, elog: EventLogger) -> None:
        """Hand a run that failed temporarily back to NATS, to be delivered again later."""
        delay = REDELIVERY.delay(delivered)
        await msg.nak(delay=delay)
        failed = run.failed_temporarily
        elog.warning(
            "event failed temporarily (%s): delivered again in %.1fs (delivery %d of %d)",
            "; ".join(f"{s.rule.name}: {s.actionner}: {s.reason}" for s in failed),
            delay,
            delivered,
            self.config.max_deliver,
            fields={"delivery": delivered, "rule": failed[0].rule.name},
        )

    async def _dead_letter(
        self,
        msg: Msg,
        event: FalcoEvent,
        deliveries: int,
        trace: Trace | None,
        run: EventRun | None = None,
    ) -> None:
        """Give the event up: to the dead letters, then the log, the metric and the
        notifiers (``run``: the last delivery's, when it failed temporarily)."""
        js, pipeline = self.js, self._pipeline
        assert js is not None and pipeline is not None
        headers = {"Falco-Talon-Event-Id": event.id, "Falco-Talon-Deliveries": str(deliveries)}
        try:
            await js.publish(
                self.config.dead_subject, msg.data, timeout=PUBLISH_TIMEOUT, headers=headers
            )
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            log.error("dead-lettering event %s failed (%s)", event.id, type(exc).__name__)
            await msg.nak(delay=1.0)
            return
        await msg.term()
        if self.metrics is not None:
            self.metrics.dead_lettered()
        subject = self.config.dead_subject
        why = f"given up after {deliveries} deliveries: moved to {subject}"
        fields: dict[str, Any] = {"deliveries": deliveries, "dead_letter_subject": subject}
        last = "; ".join(s.reason for s in run.failed_temporarily) if run is not None else ""
        event_logger(log, event.id, trace.trace_id_hex if trace is not None else "").error(
            "event %s%s", why, f" (last error: {last})" if last else "", fields=fields
        )
        pipeline.give_up(event, why, trace or NO_TRACE, run, **fields)

    async def stop(self) -> None:
        """Stop fetching; let the runs in flight finish (bounded) and ack them; the rest are
        handed back (nak) for another replica."""
        self._stopping = True
        deadline = time.monotonic() + self.shutdown_timeout
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runs:
            _, pending = await asyncio.wait(
                set(self._runs), timeout=max(0.0, deadline - time.monotonic())
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if pending:
                log.error(
                    "shutdown timeout: %d event run(s) handed back to NATS unfinished",
                    len(pending),
                )
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.drain()
