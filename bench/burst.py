"""A burst of distinct events faster than the server can take them: is every one accounted for?

Issue #13's rule: "a burst of 20,000 distinct events in 2 s gets 2xx or 503 for each, and
every 2xx one reaches a final state (count them)". Open loop, unlike wrk: the sender does not
wait for answers before sending more. It spreads the events over ``connections`` keep-alive
connections and writes each connection's requests pipelined (HTTP/1.1), paced so that all
of them leave within ``seconds``; then it reads every answer and counts statuses. The
server's ``/metrics`` says how many events reached a final state once its queue is empty.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from typing import Any

_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) ")
_CONTENT_LENGTH = re.compile(rb"(?im)^content-length: *(\d+)\r$")


def _request(body: bytes) -> bytes:
    return (
        b"POST / HTTP/1.1\r\nHost: bench\r\nUser-Agent: Falcosidekick\r\n"
        b"Content-Type: application/json; charset=utf-8\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


async def _connection(
    port: int, requests: list[bytes], slices: int, seconds: float, statuses: dict[int, int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    per_slice = max(1, -(-len(requests) // slices))

    async def send() -> None:
        for i in range(0, len(requests), per_slice):
            writer.write(b"".join(requests[i : i + per_slice]))
            await writer.drain()
            due = started + seconds * (i + per_slice) / len(requests)
            await asyncio.sleep(max(0.0, due - time.monotonic()))

    async def receive() -> None:
        for _ in requests:
            head = await reader.readuntil(b"\r\n\r\n")
            status = _STATUS.match(head)
            length = _CONTENT_LENGTH.search(head)
            if status is None or length is None:
                raise RuntimeError(f"unexpected answer: {head[:200]!r}")
            await reader.readexactly(int(length.group(1)))
            code = int(status.group(1))
            statuses[code] = statuses.get(code, 0) + 1

    try:
        await asyncio.gather(send(), receive())
    finally:
        writer.close()


async def _burst(
    port: int, bodies: list[bytes], connections: int, seconds: float
) -> dict[int, int]:
    statuses: dict[int, int] = {}
    requests = [_request(b) for b in bodies]
    shares = [requests[i::connections] for i in range(connections)]
    await asyncio.gather(
        *(_connection(port, share, 20, seconds, statuses) for share in shares if share)
    )
    return statuses


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def run_burst(
    port: int, bodies: list[bytes], *, connections: int = 200, seconds: float = 2.0
) -> dict[str, Any]:
    """Send ``bodies`` as one burst; wait until the server's queue is drained; count."""
    before = scrape(port)
    processed_before = _metric_sum(before, "falco_talon_events_processed_total")
    started = time.monotonic()
    statuses = asyncio.run(_burst(port, bodies, connections, seconds))
    answered_in = time.monotonic() - started
    accepted = statuses.get(202, 0)  # 200 would be a duplicate: none here, every event differs
    deadline = time.monotonic() + 120
    while True:
        text = scrape(port)
        processed = _metric_sum(text, "falco_talon_events_processed_total") - processed_before
        busy = _metric_sum(text, "falco_talon_queue_depth") + _metric_sum(
            text, "falco_talon_events_in_flight"
        )
        if (processed >= accepted and not busy) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    drained_in = time.monotonic() - started
    return {
        "events": len(bodies),
        "connections": connections,
        "offered_within_s": seconds,
        "answered_within_s": round(answered_in, 2),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "unanswered": len(bodies) - sum(statuses.values()),
        "accepted_202": accepted,
        "refused_503": statuses.get(503, 0),
        "other_statuses": sum(n for code, n in statuses.items() if code not in (202, 503)),
        "reached_final_state": int(processed),
        "accepted_without_outcome": accepted - int(processed),
        "drained_within_s": round(drained_in, 2),
    }
