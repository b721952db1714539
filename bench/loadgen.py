"""A fallback HTTP load generator for ``make bench`` when wrk is not installed.

Usage: ``python bench/loadgen.py URL SECONDS CONNECTIONS BODY_FILE``; prints JSON.
Every ``__N__`` in the body is replaced by a request counter, so each event is distinct.
Runs in its own process so it does not share the server's core.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

import aiohttp


async def main(url: str, seconds: float, connections: int, body: bytes) -> dict[str, object]:
    parts = body.split(b"__N__")
    counter = 0
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    deadline = time.perf_counter() + seconds
    conn = aiohttp.TCPConnector(limit=connections)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=conn) as session:

        async def worker() -> None:
            nonlocal counter
            while time.perf_counter() < deadline:
                counter += 1
                data = str(counter).encode().join(parts)
                t0 = time.perf_counter()
                async with session.post(url, data=data, headers=headers) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(connections)))
    latencies.sort()
    n = len(latencies)
    return {
        "connections": connections,
        "seconds": seconds,
        "requests_per_s": round(n / seconds),
        "p50_ms": round(latencies[n // 2] * 1000, 2),
        "p99_ms": round(latencies[min(n - 1, int(n * 0.99))] * 1000, 2),
        "non_2xx": sum(c for s, c in statuses.items() if not 200 <= s < 300),
    }


if __name__ == "__main__":
    url, seconds, connections, path = sys.argv[1:5]
    with open(path, "rb") as f:
        data = f.read()
    print(json.dumps(asyncio.run(main(url, float(seconds), int(connections), data))))
