"""``make bench`` with the JetStream queue on: two replicas sharing one nats-server.

Called from ``bench/bench.py``'s ``main()``, whose helpers it reuses (the server process,
wrk, percentiles, POST-to-pod-gone). A real nats-server (built by ``tests/env/build.sh
nats``, run by ``tests/env/natsserver.py``) with a store of its own, and two ``falco-talon
server`` processes with the same ``NATS_URL``, so every accepted event is stored in the
stream before its 202 and run by whichever replica pulls it:

* :func:`bench_ingest`: wrk for 10 s, 50 connections split over the two replicas (one wrk
  thread each), a distinct event per request, dry run, one labelling rule, info-level JSON
  logs; events/s, p50/p99 of the answers (each one waits for JetStream's store), non-2xx;
  then the time until every stored event reached a final state, counted from each
  replica's ``/metrics`` (and, from their logs, that each finished exactly once);
* :func:`bench_kubernetes`: POST to the terminated pod being gone from the API, as
  ``bench.bench_kubernetes`` measures it, with the events taking turns between the two
  replicas.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# bench/ is on sys.path (bench.py's folder): run as ``python bench/bench.py`` this loads
# bench.py once more as the module ``bench`` (its main() does not run), for its helpers.
import bench

REPLICAS = 2


@contextlib.contextmanager
def _replicas(
    rules: Path, env: dict[str, str], log: Any, *flags: str
) -> Iterator[tuple[subprocess.Popen[bytes], list[tuple[int, subprocess.Popen[bytes]]]]]:
    """A nats-server of its own and :data:`REPLICAS` servers sharing it; yields the
    nats-server process and each replica's (port, process) once each has stored an event."""
    from tests.env.natsserver import TestNats
    from tests.env.talon import start_server

    state = Path(tempfile.mkdtemp(prefix="falco-talon-bench-nats-"))
    nats = TestNats(state)
    url = nats.start()
    servers: list[tuple[int, subprocess.Popen[bytes]]] = []
    try:
        for _ in range(REPLICAS):
            port = bench.free_port()
            proc = start_server(rules, port, {**env, "NATS_URL": url}, log, *flags)
            servers.append((port, proc))
        for port, _ in servers:
            bench._wait_port(port)
            _until_stored(port)
        assert nats.proc is not None
        yield nats.proc, servers
    finally:
        for _, proc in servers:
            proc.terminate()
        for _, proc in servers:
            proc.wait(60)
        nats.stop()
        shutil.rmtree(state, ignore_errors=True)


@contextlib.contextmanager
def nats_replicas(rules: Path, env: dict[str, str], log: Any) -> Iterator[list[int]]:
    """``bench.Servers`` for :data:`REPLICAS` NATS-backed servers: their ports."""
    with _replicas(rules, env, log) as (_, servers):
        yield [port for port, _ in servers]


def _until_stored(port: int, limit: float = 60.0) -> None:
    """POST one event until it is answered 202: the replica has connected to NATS (it
    answers 503 until then). The event names a pod that does not exist."""
    event = dict(
        bench.EXAMPLE,
        uuid=str(uuid.uuid4()),
        output_fields={**bench.EXAMPLE["output_fields"], "k8s.pod.name": "bench-warm-up"},
    )
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/", data=json.dumps(event).encode(), method="POST"
    )
    deadline = time.monotonic() + limit
    while True:
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                if resp.status == 202:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
        if time.monotonic() > deadline:
            raise RuntimeError(f"the replica on port {port} did not connect to NATS")
        time.sleep(0.1)


def _samples(port: int) -> dict[str, float]:
    """``name{labels}`` -> value, from one replica's ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _counts(ports: list[int]) -> tuple[float, float]:
    """(events stored, events that reached a final state) over every replica: stored is
    accepted less duplicates and refusals (each one a 202); final is processed in any state
    plus given up (dead letters)."""
    stored = final = 0.0
    for port in ports:
        for key, value in _samples(port).items():
            name = key.split("{", 1)[0]
            if name == "falco_talon_events_received_total":
                stored += value
            elif name == "falco_talon_events_deduplicated_total" or key in (
                'falco_talon_events_rejected_total{reason="queue_unavailable"}',
                'falco_talon_events_rejected_total{reason="queue_full"}',
            ):
                stored -= value
            elif name in (
                "falco_talon_events_processed_total",
                "falco_talon_events_dead_lettered_total",
            ):
                final += value
    return stored, final


def _finished_runs(log: Path) -> Counter[str]:
    """Event id -> runs logged ``event run finished`` (acked), over every replica's log."""
    runs: Counter[str] = Counter()
    with log.open("rb") as lines:
        for line in lines:
            if b"event run finished" in line:
                runs[json.loads(line).get("event_id", "")] += 1
    return runs


def bench_ingest(seconds: int = 10, connections: int = 50, limit: float = 600.0) -> dict[str, Any]:
    """Ingest through JetStream with two replicas (see the module's docstring)."""
    wrk = shutil.which("wrk")
    if wrk is None:
        return {"skipped": "needs wrk (make tools): the fallback load generator has one target"}
    workdir = Path(tempfile.mkdtemp(prefix="falco-talon-bench-js-"))
    rules = workdir / "rules.yaml"
    rules.write_text(bench.LABEL_RULE)
    env = {
        **os.environ,
        "LOGFORMAT": "json",
        "LOGLEVEL": "info",
        "WATCHRULES": "false",
        "DEFAULTNOTIFIERS": "",
    }  # ingest, the queue and the machine, no cluster
    log_path = workdir / "replicas.log"
    try:
        with log_path.open("wb") as log, _replicas(rules, env, log, "--dry-run") as (nats, servers):
            ports = [port for port, _ in servers]
            pids = [proc.pid for _, proc in servers] + [nats.pid]
            load_before = os.getloadavg()
            cpu_before = [bench._cpu_seconds(pid) for pid in pids]
            result = bench._wrk(wrk, ports, seconds, connections, bench._distinct_template())
            loaded = time.monotonic()
            cpu_loaded = [bench._cpu_seconds(pid) for pid in pids]
            load_after = os.getloadavg()
            stored, final = _counts(ports)
            while final < stored and time.monotonic() - loaded < limit:
                time.sleep(0.25)
                stored, final = _counts(ports)
            drain = time.monotonic() - loaded
            cpu_drained = [bench._cpu_seconds(pid) for pid in pids]
        runs = _finished_runs(log_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        **result,
        "replicas": REPLICAS,
        "queue": "NATS JetStream (file store), one nats-server",
        "stored_events": int(stored),
        "final_events": int(final),
        "every_stored_event_final": final >= stored,
        "events_finished_more_than_once": sum(1 for n in runs.values() if n > 1),
        "all_final_after_load_s": round(drain, 2),
        "consumed_events_per_s": round(stored / (seconds + drain)),
        "cores_used_under_load": _cores(cpu_before, cpu_loaded, seconds),
        "cores_used_after_load": _cores(cpu_loaded, cpu_drained, drain),
        "load_average_1m": {"before": load_before[0], "after": load_after[0]},
    }


def _cores(before: list[float], after: list[float], seconds: float) -> dict[str, float]:
    """Cores each process used between two readings (replicas, then the nats-server)."""
    used = [round((a - b) / max(seconds, 0.01), 2) for b, a in zip(before, after, strict=True)]
    names = [f"replica_{i + 1}" for i in range(len(used) - 1)] + ["nats_server"]
    return dict(zip(names, used, strict=True))


def bench_kubernetes(events: int = 200) -> dict[str, Any]:
    """POST to the terminated pod gone from the API, through two NATS-backed replicas."""
    return {
        **bench.bench_kubernetes(events, servers=nats_replicas),
        "replicas": REPLICAS,
        "queue": "NATS JetStream (file store), one nats-server; events alternate replicas",
    }


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """Each JetStream check whose measurement ran: met or not."""
    ingest = results.get("ingest_jetstream", {})
    if "every_stored_event_final" not in ingest:
        return {}
    return {
        "jetstream: every stored (2xx) event reached a final state, once": (
            ingest["every_stored_event_final"] and ingest["events_finished_more_than_once"] == 0
        )
    }
