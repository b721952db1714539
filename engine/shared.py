"""Storm control shared by the server processes (``processes`` > 1): deduplication and
throttle counts in one shared-memory file, behind ``engine.storm``'s interfaces.

Position in the flow: beside **deduplication** (HTTP -> queue) and the **throttle** (before
actionners), in place of the in-memory :class:`~engine.storm.DedupWindow` and
:class:`~engine.storm.MemoryCounters` when several processes serve one port, so that an
event sent twice acts once and a throttle counts every process's actions.

The supervisor (``engine.processes``) creates the file (in ``/dev/shm``) before it starts
the server processes; each opens and maps it by path. The file is a header and two
set-associative hash tables, one for event identities and one for throttle counters.
A key (20 bytes: 160 bits of the sha256 ``engine.storm`` names events and counters with,
so its first four bytes spread keys evenly) picks one bucket of :data:`WAYS` slots; a slot
is the key, an expiry (a double; a slot whose expiry has passed is free) and, for counters,
a payload of doubles. A bucket keeps its keys side by side, so finding a key is one
``bytes.find`` over the bucket's keys, and its expiries side by side, read with one
``struct`` call.

**Locking.** Every operation holds an exclusive ``flock`` on the file for a few
microseconds. Each process opens the file itself, so each has its own open file
description and the locks exclude each other; the kernel drops a lock when its holder dies
(kill -9 included), so a killed process never leaves the others blocked.

**Bounded, and what happens when full.** The tables never grow: :data:`DEDUP_BUCKETS` x
:data:`WAYS` identities (262,144 in 7 MiB; 8,000 distinct events/s within the default 5 s
window are 40,000 of them) and :data:`COUNTER_BUCKETS` x :data:`WAYS` throttle counters
(32,768 in 5 MiB); the file is sparse, pages are allocated once used. When all
slots of a key's bucket are live, the one that expires first is overwritten: an identity
forgotten early lets a later copy of that event be processed again (never dropped), a
counter forgotten early lets that target's actions run again before its window ends (as
:class:`~engine.storm.MemoryCounters` forgets its least recently used). Each table counts
its evictions in the header, and each process logs its first one.

**Throttle counts.** A counter keeps up to :data:`RECORDS` (time, count) records of the
actions it allowed in the window, exact for ``max`` up to :data:`RECORDS` (every action its
own record, as the in-memory sliding log); beyond that a new action is added to the newest
record, which then expires with its newest action: never more than ``max`` actions in any
window, at worst a few more throttled at the window's edge.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import mmap
import os
import struct
import time

log = logging.getLogger("falco_talon.shared")

MAGIC = b"FTSHARE1"
KEY = 20
"""Bytes of a key: the 40 hex digits of ``engine.storm``'s identities and counter keys."""
WAYS = 8
"""Slots in a bucket."""
RECORDS = 8
"""(time, count) records a throttle counter keeps."""
DEDUP_BUCKETS = 1 << 15
COUNTER_BUCKETS = 1 << 12

_HEADER = struct.Struct("<8sIIIIQQ")
"""Magic, then per table its buckets and payload doubles, then the two eviction counts."""
_HEADER_SIZE = 4096
_EVICTIONS = struct.calcsize("<8sIIII")
"""Offset of the eviction counts in the header."""


Slot = tuple[int, int, tuple[float, ...]]
"""Where a key lives or will live: its bucket's offset, its slot in the bucket (-1:
absent), and the bucket's expiries. (A tuple: a dataclass costs a microsecond more.)"""

_U32 = struct.Struct("<I")
_NO_RECORDS = (0.0,) * (2 * RECORDS)
_DOUBLE = struct.Struct("<d")


class Table:
    """One set-associative table of the file (see the module's docstring)."""

    def __init__(self, mm: mmap.mmap, offset: int, buckets: int, payload: int, number: int):
        self.mm, self.offset, self.mask, self.payload = mm, offset, buckets - 1, payload
        self.number = number
        """The table's place in the header (0: identities, 1: counters)."""
        self.keys_size = WAYS * KEY
        self.slot_payload = 8 * payload
        self.bucket_size = Table.bucket_bytes(payload)
        self.expiries = struct.Struct(f"<{WAYS}d")
        self.values = struct.Struct(f"<{payload}d")
        self.warned = False

    @staticmethod
    def bucket_bytes(payload: int) -> int:
        return WAYS * (KEY + 8 + 8 * payload)

    def locate(self, key: bytes) -> Slot:
        base = self.offset + (_U32.unpack_from(key)[0] & self.mask) * self.bucket_size
        keys = self.mm[base : base + self.keys_size]
        at = keys.find(key)
        while at > 0 and at % KEY:  # a match straddling two keys: look further
            at = keys.find(key, at + 1)
        expiries = self.expiries.unpack_from(self.mm, base + self.keys_size)
        return base, at // KEY if at >= 0 else -1, expiries

    def free(self, slot: Slot, now: float) -> int:
        """A slot of ``slot``'s bucket to write a new key in: an expired one, else the one
        that expires first (an eviction)."""
        expiries = slot[2]
        soonest = expiries.index(min(expiries))
        if expiries[soonest] > now:
            self._evicted()
        return soonest

    def _evicted(self) -> None:
        at = _EVICTIONS + 8 * self.number
        (count,) = struct.unpack_from("<Q", self.mm, at)
        struct.pack_into("<Q", self.mm, at, count + 1)
        if not self.warned:
            self.warned = True
            what = ("event identities", "throttle counters")[self.number]
            log.warning(
                "shared %s: a bucket was full, its entry expiring first was dropped early "
                "(counted in the shared file; logged once per process)",
                what,
            )

    def put(self, slot: Slot, index: int, key: bytes, expiry: float) -> None:
        mm, base = self.mm, slot[0]
        mm[base + index * KEY : base + (index + 1) * KEY] = key
        _DOUBLE.pack_into(mm, base + self.keys_size + 8 * index, expiry)

    def read_payload(self, slot: Slot) -> tuple[float, ...]:
        return self.values.unpack_from(self.mm, self._payload_at(slot[0], slot[1]))

    def write_payload(self, slot: Slot, index: int, values: list[float]) -> None:
        self.values.pack_into(self.mm, self._payload_at(slot[0], index), *values)

    def _payload_at(self, base: int, index: int) -> int:
        return base + WAYS * (KEY + 8) + index * self.slot_payload


class SharedState:
    """The shared file, mapped in this process; :attr:`identities` and :attr:`counters`
    are its two tables."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.mm = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        magic, dedup_buckets, dedup_payload, counter_buckets, counter_payload, _, _ = (
            _HEADER.unpack_from(self.mm, 0)
        )
        if magic != MAGIC:
            raise ValueError(f"{path}: not a falco-talon shared state file")
        self.identities = Table(self.mm, _HEADER_SIZE, dedup_buckets, dedup_payload, 0)
        self.counters = Table(
            self.mm,
            _HEADER_SIZE + dedup_buckets * Table.bucket_bytes(dedup_payload),
            counter_buckets,
            counter_payload,
            1,
        )

    @staticmethod
    def create(
        path: str, dedup_buckets: int = DEDUP_BUCKETS, counter_buckets: int = COUNTER_BUCKETS
    ) -> None:
        """Write an empty file (sparse: pages are only allocated once used)."""
        for n in (dedup_buckets, counter_buckets):
            if n < 1 or n & (n - 1):
                raise ValueError(f"buckets must be a power of two, not {n}")
        size = (
            _HEADER_SIZE
            + dedup_buckets * Table.bucket_bytes(0)
            + counter_buckets * Table.bucket_bytes(2 * RECORDS)
        )
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            header = _HEADER.pack(MAGIC, dedup_buckets, 0, counter_buckets, 2 * RECORDS, 0, 0)
            os.pwrite(fd, header, 0)
        finally:
            os.close(fd)

    def lock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def unlock(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def evictions(self) -> tuple[int, int]:
        """Identities and counters forgotten early so far, by every process."""
        out = struct.unpack_from("<QQ", self.mm, _EVICTIONS)
        return int(out[0]), int(out[1])

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


class SharedDedup:
    """:class:`~engine.storm.DedupWindow`'s job, across processes: the identities claimed
    in the last ``window`` seconds (``time.monotonic``: one clock for the whole host)."""

    def __init__(self, state: SharedState, window: float) -> None:
        self.state, self.table, self.window = state, state.identities, window

    def claim(self, key: str) -> bool:
        if self.window <= 0:
            return True
        k = bytes.fromhex(key)
        now = time.monotonic()
        table, state = self.table, self.state
        state.lock()  # (no context manager: a few µs an event count here)
        try:
            slot = table.locate(k)
            index = slot[1]
            if index >= 0 and slot[2][index] > now:
                return False
            if index < 0:
                index = table.free(slot, now)
            table.put(slot, index, k, now + self.window)
        finally:
            state.unlock()
        return True

    def release(self, key: str) -> None:
        if self.window <= 0:
            return
        k = bytes.fromhex(key)
        self.state.lock()
        try:
            slot = self.table.locate(k)
            if slot[1] >= 0:
                self.table.put(slot, slot[1], k, 0.0)
        finally:
            self.state.unlock()


class SharedCounters:
    """A :class:`~engine.storm.CounterStore` across processes (see the module's docstring).

    A counter's payload is its records newest first: :data:`RECORDS` times, negated (so
    they ascend and ``bisect`` finds the live ones, unused records being 0), then their
    counts. A new record's time is never before the newest one's (processes read their
    clocks before taking the lock), which keeps them in order."""

    def __init__(self, state: SharedState) -> None:
        self.state, self.table = state, state.counters

    async def take(self, key: str, limit: int, window: float, now: float) -> bool:
        k = bytes.fromhex(key)
        table, state = self.table, self.state
        state.lock()
        try:
            slot = table.locate(k)
            index = slot[1]
            if index < 0:
                index, values = table.free(slot, now), _NO_RECORDS
            else:
                values = table.read_payload(slot)
            times, counts = values[:RECORDS], values[RECORDS:]
            live = bisect.bisect_left(times, window - now)  # records newer than now - window
            if sum(counts[:live]) >= limit:
                return False
            at = max(now, -times[0]) if live else now
            if live < RECORDS:
                pad = [0.0] * (RECORDS - live - 1)
                record = [-at, *times[:live], *pad, 1.0, *counts[:live], *pad]
            else:  # merged into the newest record, which now expires with this action
                record = [-at, *times[1:], counts[0] + 1, *counts[1:]]
            table.write_payload(slot, index, record)
            table.put(slot, index, k, at + window)
        finally:
            state.unlock()
        return True
