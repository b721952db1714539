"""Storm control: the identity of an event (for deduplication) and per-rule throttles.

Position in the flow: HTTP -> **deduplication** -> queue -> ... -> **throttle** -> actionners.

* :func:`identity` names an event so that the same event sent twice has one name:
  Falcosidekick's ``uuid`` when the sender gave one, else a hash of rule + output + time +
  hostname. The embedded default keeps the names seen in the last window in memory
  (:class:`DedupWindow`; in shared memory when several processes share the port,
  ``engine.shared``); with NATS the name is the message's ``Nats-Msg-Id`` and the
  stream's ``duplicate_window`` does the same across replicas.
* :class:`Throttler` decides, per rule with a ``throttle``, whether one more action on a
  target (pod / workload / node) fits in the window. The counts live in a
  :class:`CounterStore`: :class:`MemoryCounters` in one process (``engine.shared`` when
  several processes share the port), a JetStream key-value
  bucket when NATS is configured (``engine.natsqueue``), so replicas share them. Each keeps,
  per key, the times actions were allowed in the window (a sliding log): in memory as a
  list, in NATS updated with compare-and-set, in shared memory as 8 (time, count) records
  under an ``flock`` (``engine.shared``: exact for ``max`` up to 8).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections import OrderedDict
from typing import Protocol

from engine.contract.event import FalcoEvent
from engine.rules import Rule, Throttle


def identity(event: FalcoEvent) -> str:
    """The event's name for deduplication (hex, safe as a ``Nats-Msg-Id``)."""
    if event.id_given:
        text = "uuid\0" + event.id
    else:
        text = "\0".join(("event", event.rule, event.output, event.time, event.hostname))
    return hashlib.sha256(text.encode()).hexdigest()[:40]


class Dedup(Protocol):
    """Where the identities of accepted events are remembered. ``claim`` is atomic: it
    records ``key`` unless it was recorded within the window; True when it recorded (the
    event is new). ``release`` forgets ``key``: the caller claims before queueing and
    releases when the queue refuses the event, so an event refused (queue full) and sent
    again is not taken for a duplicate."""

    def claim(self, key: str) -> bool: ...

    def release(self, key: str) -> None: ...


class DedupWindow:
    """The identities seen in the last ``window`` seconds, in memory (the embedded default,
    one process; ``engine.shared.SharedDedup`` when several share the port)."""

    def __init__(self, window: float, limit: int = 200_000) -> None:
        self.window = window
        self.limit = limit
        self._expiry: OrderedDict[str, float] = OrderedDict()

    def _expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry:
            until = next(iter(expiry.values()))
            if until > now and len(expiry) <= self.limit:
                break
            expiry.popitem(last=False)

    def claim(self, key: str) -> bool:
        if self.window <= 0:
            return True
        now = time.monotonic()
        self._expire(now)
        until = self._expiry.get(key)
        if until is not None and until > now:
            return False
        self._expiry[key] = now + self.window
        self._expiry.move_to_end(key)
        return True

    def release(self, key: str) -> None:
        self._expiry.pop(key, None)


# -- throttle ------------------------------------------------------------------------------------

_REPLICASET_POD = re.compile(r"^(?P<name>.+)-[a-z0-9]{6,10}-[a-z0-9]{5}$")
_CONTROLLED_POD = re.compile(r"^(?P<name>.+)-([a-z0-9]{5}|[0-9]+)$")


def workload_of(pod: str) -> str:
    """The workload a pod's name says it belongs to: a Deployment's pod
    ``web-7d4b9c8f6d-x2k9q`` -> ``web``; a DaemonSet's/Job's ``agent-x2k9q`` or a
    StatefulSet's ``db-0`` -> ``agent``/``db``; any other name is its own workload."""
    for pattern in (_REPLICASET_POD, _CONTROLLED_POD):
        m = pattern.match(pod)
        if m:
            return m.group("name")
    return pod


def throttle_target(event: FalcoEvent, per: str) -> str | None:
    """What one counter is about (``per``: pod, workload or node); None when the event
    does not tell (then nothing is throttled)."""
    if per == "node":
        return event.hostname or None
    target = event.target
    if target.pod is None:
        return None
    ns = target.namespace or ""
    if per == "workload":
        return f"{ns}/{workload_of(target.pod)}"
    return f"{ns}/{target.pod}"


class CounterStore(Protocol):
    """Where throttle counts live. ``take`` is atomic: it records one action at ``now`` in
    ``key``'s log unless the log already holds ``limit`` times newer than ``now - window``;
    True when it recorded."""

    async def take(self, key: str, limit: int, window: float, now: float) -> bool: ...


class MemoryCounters:
    """Throttle counts in this process (the embedded default)."""

    def __init__(self, max_keys: int = 100_000) -> None:
        self.max_keys = max_keys
        self._logs: OrderedDict[str, list[float]] = OrderedDict()

    async def take(self, key: str, limit: int, window: float, now: float) -> bool:
        log = [t for t in self._logs.get(key, ()) if t > now - window]
        allowed = len(log) < limit
        if allowed:
            log.append(now)
        self._logs[key] = log
        self._logs.move_to_end(key)
        while len(self._logs) > self.max_keys:
            self._logs.popitem(last=False)
        return allowed


def throttled_reason(throttle: Throttle, target: str) -> str:
    return f"throttled: {throttle.max} actions on {target} within {throttle.within_text}"


class Throttler:
    """Applies the rules' ``throttle``: ``check`` says why an action must be skipped, or ""."""

    def __init__(self, store: CounterStore | None = None) -> None:
        self.store: CounterStore = store if store is not None else MemoryCounters()

    async def check(self, rule: Rule, event: FalcoEvent) -> str:
        throttle = rule.throttle
        if throttle is None:
            return ""
        target = throttle_target(event, throttle.per)
        if target is None:
            return ""
        key = hashlib.sha256(f"{rule.name}\0{throttle.per}\0{target}".encode()).hexdigest()[:40]
        if await self.store.take(key, throttle.max, throttle.within, time.time()):
            return ""
        return throttled_reason(throttle, f"{throttle.per} {target}")
