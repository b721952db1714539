"""``make bench``: falco-talon's throughput and latency on this machine, printed as JSON.

Not a test: numbers go in notes and the README, targets are compared, nothing asserts.

* matching: events/s and p50/p99 per-event match time for 10, 100 and 1,000 rules, rules
  that name Falco rules and rules that match only on priority/tags/output_fields;
* dry-run end to end through the state machine (no HTTP);
* HTTP ingest: a load generator in another process (wrk if installed, else bench/loadgen.py)
  with 50 concurrent connections against ``falco-talon server`` in dry-run, with one server
  process and with ``--processes auto``, with examples/rules.yaml (four steps an event) and
  with one labelling rule; beside it the floor: aiohttp alone answering 202
  (bench/aiohttp_floor.py), one process and two;
* HTTP ingest with tracing on, exporting to a local Jaeger, beside the same run off;
* memory: peak RSS, and RSS after 100,000 events (growth shows a leak).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jetstream  # noqa: E402  # (bench/ is on sys.path: this script's folder)
from recording_server import DropAtEnd  # noqa: E402

from engine.contract.event import FalcoEvent, decode_event  # noqa: E402
from engine.matcher import Matcher  # noqa: E402
from engine.pipeline import Pipeline  # noqa: E402
from engine.plugins import load_plugins  # noqa: E402
from engine.rules import RuleSet, RulesLoader  # noqa: E402
from tests.env.talon import start_server  # noqa: E402

PRIORITIES = [
    "Debug",
    "Informational",
    "Notice",
    "Warning",
    "Error",
    "Critical",
    "Alert",
    "Emergency",
]
ACTIONS = ["kubernetes:labelize", "kubernetes:networkpolicy", "kubernetes:terminate"]
EXAMPLE = json.loads((ROOT / "examples" / "event.json").read_text())


def named_rules(n: int) -> str:
    out = []
    for i in range(n):
        out.append(
            f"- name: named {i}\n  match:\n    rules: ['Falco rule {i}']\n"
            f"    priority: '>={PRIORITIES[i % 4]}'\n"
            f"    output_fields: ['k8s.ns.name!=kube-system']\n"
            f"  action: {{name: {ACTIONS[i % 3]}"
            + (", parameters: {labels: {suspicious: 'true'}}}" if i % 3 == 0 else "}")
            + "\n"
        )
    return "".join(out)


def unnamed_rules(n: int) -> str:
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            match = f"output_fields: ['k8s.ns.name=ns{i % 50}, proc.name!=bash']"
        elif kind == 1:
            match = f"tags: ['tag{i % 40}, container', 'mitre_{i % 7}']"
        elif kind == 2:
            match = f"priority: '>={PRIORITIES[i % 8]}'\n    tags: ['tag{i % 40}']"
        else:
            match = (
                f"priority: '>={PRIORITIES[i % 8]}'\n"
                f"    output_fields: ['k8s.ns.name!=kube-system, container.id!=host{i}']"
            )
        out.append(
            f"- name: unnamed {i}\n  match:\n    {match}\n"
            f"  action: {{name: kubernetes:networkpolicy}}\n"
        )
    return "".join(out)


def make_events(count: int, n_rules: int, seed: int = 7) -> list[FalcoEvent]:
    rnd = random.Random(seed)
    events = []
    for _ in range(count):
        data = json.loads(json.dumps(EXAMPLE))
        data["rule"] = f"Falco rule {rnd.randrange(n_rules * 2)}"
        data["priority"] = rnd.choice(PRIORITIES)
        data["output_fields"]["k8s.ns.name"] = f"ns{rnd.randrange(60)}"
        data["tags"] = [f"tag{rnd.randrange(50)}", "container", f"mitre_{rnd.randrange(10)}"]
        data.pop("uuid", None)
        events.append(decode_event(json.dumps(data).encode()))
    return events


def load(text: str) -> RuleSet:
    actionners, notifiers = load_plugins()
    return RulesLoader(actionners, notifiers).load_texts([("bench.yaml", text)])


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def bench_matching() -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind, make in (("named", named_rules), ("unnamed", unnamed_rules)):
        for n in (10, 100, 1000):
            matcher = Matcher(load(make(n)))
            events = make_events(5000, n)
            for e in events[:500]:
                matcher.match(e)  # warm the per-event field caches like the server would not
            events = make_events(5000, n, seed=n)
            times = []
            matched = 0
            clock = time.perf_counter
            start = clock()
            for e in events:
                t0 = clock()
                matched += len(matcher.match(e))
                times.append(clock() - t0)
            total = clock() - start
            out[f"{kind}_{n}"] = {
                "events_per_s": round(len(events) / total),
                "p50_us": round(percentile(times, 0.5) * 1e6, 2),
                "p99_us": round(percentile(times, 0.99) * 1e6, 2),
                "avg_matched_rules": round(matched / len(events), 2),
            }
    return out


async def _dry_run(events: list[FalcoEvent], ruleset: RuleSet) -> float:
    actionners, _ = load_plugins()
    pipeline = Pipeline(ruleset, actionners, dry_run=True)
    start = time.perf_counter()
    for e in events:
        await pipeline.process(e)
    return time.perf_counter() - start


def bench_dry_run() -> dict[str, Any]:
    import logging

    logging.getLogger().setLevel(logging.WARNING)
    ruleset = RulesLoader(*load_plugins()).load([ROOT / "examples" / "rules.yaml"])
    events = make_events(20000, 10)
    for e in events:
        e.rule = "Terminal shell in container"
    total = asyncio.run(_dry_run(events, ruleset))
    return {
        "events_per_s": round(len(events) / total),
        "us_per_event": round(total / len(events) * 1e6, 1),
        "steps_per_event": 4,
    }


async def _traced_run(events: list[FalcoEvent], ruleset: RuleSet, tracing: Any) -> float:
    from observability.tracing import SpanKind

    actionners, _ = load_plugins()
    pipeline = Pipeline(ruleset, actionners, dry_run=True, tracing=tracing)
    tracing.start()
    await asyncio.sleep(1)  # let an export process finish starting
    start = time.perf_counter()
    for e in events:
        # What the HTTP handler adds: the trace and its root span.
        trace = tracing.begin(None)
        root = trace.start("POST /", kind=SpanKind.SERVER, http__request__method="POST")
        root.end()
        tracing.submit(trace)
        await pipeline.process(e, trace, root)
    # Until every span has left: the export work counts, wherever it runs.
    await asyncio.get_running_loop().run_in_executor(None, tracing.shutdown)
    return time.perf_counter() - start


def bench_tracing() -> dict[str, Any]:
    """Dry-run throughput (root span included, until every span has left) with tracing off;
    on with spans recorded and dropped when the event is done (recording alone, the SDK's
    no-op processor); on with a no-op sink in this process (recording, plus turning spans
    into the rows the export process receives, then dropping them: this process's whole
    share of the cost); the three alternated three times, medians reported; and on
    exporting over OTLP/gRPC to a local Jaeger (export process and Jaeger share this
    machine's two cores with the engine)."""
    import logging

    from observability.tracing import RowSink, Tracing, TracingSettings
    from tests.env.jaeger import TestJaeger

    logging.getLogger().setLevel(logging.WARNING)
    ruleset = RulesLoader(*load_plugins()).load([ROOT / "examples" / "rules.yaml"])
    events = make_events(10000, 10)
    for e in events:
        e.rule = "Terminal shell in container"

    def recording_only() -> Tracing:
        tracing = Tracing(sink=RowSink())
        tracing.processor = DropAtEnd()
        return tracing

    variants = {
        "off": Tracing,
        "recording": recording_only,
        "noop": lambda: Tracing(sink=RowSink()),
    }
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(3):  # alternated: the machine's noise hits each alike
        for name, make in variants.items():
            runs[name].append(asyncio.run(_traced_run(events, ruleset, make())))
    off, recording, noop = (statistics.median(runs[name]) for name in variants)
    out: dict[str, Any] = {
        "off_events_per_s": round(len(events) / off),
        "recording_only_events_per_s": round(len(events) / recording),
        "noop_sink_events_per_s": round(len(events) / noop),
    }
    jaeger = TestJaeger()
    info = jaeger.start()
    try:
        tracing = Tracing(TracingSettings(enabled=True, endpoint=info.otlp_grpc_endpoint))
        to_jaeger = asyncio.run(_traced_run(events, ruleset, tracing))
        out["jaeger_events_per_s"] = round(len(events) / to_jaeger)
        out["jaeger_spans_shipped"] = tracing.shipped
        out["jaeger_spans_dropped"] = tracing.dropped
    finally:
        jaeger.stop()
    out["cost_recording_pct"] = round((1 - off / recording) * 100, 1)
    out["cost_noop_pct"] = round((1 - off / noop) * 100, 1)
    out["cost_jaeger_pct"] = round((1 - off / to_jaeger) * 100, 1)
    out["spans_per_event"] = 9
    return out


def bench_tracing_sdk() -> dict[str, Any]:
    """``otel.exportWith: sdk`` (spans converted to SDK ReadableSpans, the SDK's
    BatchSpanProcessor and OTLP/gRPC exporter, all in this process) next to the builtin
    path (the export process), both to a local Jaeger, against tracing off: dry-run
    throughput until every span has left, as bench_tracing measures it. The SDK's queue is
    given the builtin's size (OTEL_BSP_MAX_QUEUE_SIZE=65536) so neither path gains by
    dropping spans; the spans each exported are reported."""
    import logging

    from observability.tracing import Tracing, TracingSettings
    from tests.env.jaeger import TestJaeger

    logging.getLogger().setLevel(logging.WARNING)
    ruleset = RulesLoader(*load_plugins()).load([ROOT / "examples" / "rules.yaml"])
    events = make_events(10000, 10)
    for e in events:
        e.rule = "Terminal shell in container"
    off = asyncio.run(_traced_run(events, ruleset, Tracing()))
    out: dict[str, Any] = {"off_events_per_s": round(len(events) / off)}
    seconds: dict[str, float] = {}
    saved = os.environ.get("OTEL_BSP_MAX_QUEUE_SIZE")
    os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = "65536"
    jaeger = TestJaeger()
    info = jaeger.start()
    try:
        for path in ("builtin", "sdk"):
            settings = TracingSettings(
                enabled=True, endpoint=info.otlp_grpc_endpoint, export_with=path
            )
            tracing = Tracing(settings)
            seconds[path] = asyncio.run(_traced_run(events, ruleset, tracing))
            out[f"{path}_events_per_s"] = round(len(events) / seconds[path])
            out[f"{path}_cost_pct"] = round((1 - off / seconds[path]) * 100, 1)
            out[f"{path}_spans"] = tracing.counts()
    finally:
        jaeger.stop()
        if saved is None:
            os.environ.pop("OTEL_BSP_MAX_QUEUE_SIZE", None)
        else:
            os.environ["OTEL_BSP_MAX_QUEUE_SIZE"] = saved
    out["sdk_time_vs_builtin"] = round(seconds["sdk"] / seconds["builtin"], 2)
    out["spans_per_event"] = 9
    return out


def _post_until_gone(core: Any, request: Any, pod: str, ns: str, limit: float) -> float:
    """Seconds from POSTing ``request`` to ``pod`` reading as 404, polling every 2 ms."""
    import urllib.request

    from kubernetes import client

    t0 = time.perf_counter()
    urllib.request.urlopen(request, timeout=10).read()
    while True:
        try:
            core.read_namespaced_pod(pod, ns, _request_timeout=5)
        except client.exceptions.ApiException as exc:
            if exc.status == 404:
                return time.perf_counter() - t0
            raise
        if time.perf_counter() - t0 > limit:
            raise RuntimeError(f"pod {pod} still there after {limit:g} s")
        time.sleep(0.002)


Servers = Callable[[Path, dict[str, str], Any], contextlib.AbstractContextManager[list[int]]]
"""Starts falco-talon server(s) on (rules, environment, log) and yields their ports, ready."""


@contextlib.contextmanager
def one_server(rules: Path, env: dict[str, str], log: Any) -> Iterator[list[int]]:
    """One ``falco-talon server`` with the embedded in-memory queue."""
    port = free_port()
    server = start_server(rules, port, env, log)
    try:
        _wait_port(port)
        yield [port]
    finally:
        server.terminate()
        server.wait(60)


def bench_kubernetes(events: int = 200, servers: Servers = one_server) -> dict[str, Any]:
    """POST to the pod's deletion being visible in the API: a real kube-apiserver (the test
    environment's, in a state directory of its own: $FALCO_TALON_TESTENV_DIR, else
    falco-talon-bench-env in the temp dir), falco-talon as server process(es) terminating
    pods (``servers``; several take the events in turn), one event at a time; p50/p99
    over ``events`` events."""
    from kubernetes import client, config

    from tests.env.testenv import TestEnv

    state_dir = os.environ.get("FALCO_TALON_TESTENV_DIR")
    env = TestEnv(state_dir or Path(tempfile.gettempdir()) / "falco-talon-bench-env")
    info = env.start()
    rules = Path(tempfile.mkdtemp()) / "rules.yaml"
    rules.write_text("- name: kill\n  action: {name: kubernetes:terminate}\n")
    configuration = client.Configuration()
    config.load_kube_config(str(info.kubeconfig), client_configuration=configuration)
    api = client.ApiClient(configuration)
    core = client.CoreV1Api(api)
    ns = f"bench-{random.randrange(1 << 30):x}"
    core.create_namespace({"metadata": {"name": ns}})
    env_vars = {
        **os.environ,
        "KUBECONFIG": str(info.kubeconfig),
        "LOGLEVEL": "warning",
        "WATCHRULES": "false",
        "DEFAULTNOTIFIERS": "",
    }
    latencies = []
    try:
        with tempfile.TemporaryFile() as log, servers(rules, env_vars, log) as ports:
            import urllib.request

            for i in range(events):
                pod = f"victim-{i}"
                core.create_namespaced_pod(
                    ns,
                    {
                        "metadata": {"name": pod},
                        "spec": {
                            "nodeName": "talon-node-1",
                            "containers": [{"name": "app", "image": "nginx"}],
                        },
                    },
                )
                event = dict(
                    EXAMPLE,
                    uuid=str(uuid.uuid4()),  # a distinct event each time: not deduplicated
                    output_fields={
                        **EXAMPLE["output_fields"],
                        "k8s.pod.name": pod,
                        "k8s.ns.name": ns,
                    },
                )
                body = json.dumps(event).encode()
                request = urllib.request.Request(
                    f"http://127.0.0.1:{ports[i % len(ports)]}/", data=body, method="POST"
                )
                latencies.append(_post_until_gone(core, request, pod, ns, limit=10))
    finally:
        api.close()
        env.stop()
    return {
        "events": events,
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "note": "includes polling the API every 2 ms until the pod reads as 404",
    }


def bench_real_node(events: int = 200, batch: int = 25) -> dict[str, Any]:
    """POST to the pod's deletion being visible in the API, on the real node of
    ``make cluster-up`` (started if needed, left running): falco-talon installed by its chart
    (2 replicas sharing its NATS server) behind its Service, pods that are real containers of
    the demo image, the rule "Terminate the pod" of examples/cluster-values.yaml; one event at
    a time."""
    import urllib.request

    from kubernetes import client, config

    envfile = (
        subprocess.run(
            [sys.executable, "-m", "tests.env.cluster", "up"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    env: dict[str, str] = {}
    for line in Path(envfile).read_text().splitlines():
        if line.startswith("export ") and "=" in line:
            key, _, value = line[len("export ") :].partition("=")
            env[key] = value.strip("'\"")
    configuration = client.Configuration()
    config.load_kube_config(env["KUBECONFIG"], client_configuration=configuration)
    api = client.ApiClient(configuration)
    core = client.CoreV1Api(api)
    ns = f"bench-{random.randrange(1 << 30):x}"
    core.create_namespace({"metadata": {"name": ns}})
    container = {
        "name": "app",
        "image": "docker.io/falcosecurity/falco-talon-demo:bookworm",
        "imagePullPolicy": "Never",
        "command": ["/bin/sleep", "infinity"],
    }
    latencies: list[float] = []
    try:
        for start in range(0, events, batch):
            names = [f"victim-{i}" for i in range(start, min(events, start + batch))]
            for pod in names:
                core.create_namespaced_pod(
                    ns,
                    {
                        "metadata": {"name": pod},
                        "spec": {"containers": [container], "terminationGracePeriodSeconds": 0},
                    },
                )
            deadline = time.time() + 300
            while True:
                pods = core.list_namespaced_pod(ns).items
                if sum(p.status.phase == "Running" for p in pods) >= len(names):
                    break
                if time.time() > deadline:
                    raise RuntimeError("bench pods did not start within 300 s")
                time.sleep(0.5)
            for pod in names:
                event = dict(
                    EXAMPLE,
                    rule="Talon e2e terminate",
                    uuid=str(uuid.uuid4()),  # a distinct event each time: not deduplicated
                    output_fields={
                        **EXAMPLE["output_fields"],
                        "k8s.pod.name": pod,
                        "k8s.ns.name": ns,
                    },
                )
                request = urllib.request.Request(
                    env["TALON_URL"].rstrip("/") + "/",
                    data=json.dumps(event).encode(),
                    method="POST",
                    headers={
                        "Content-Type": "application/json; charset=utf-8",
                        "User-Agent": "Falcosidekick",
                    },
                )
                latencies.append(_post_until_gone(core, request, pod, ns, limit=30))
    finally:
        core.delete_namespace(ns)
        api.close()
    return {
        "events": events,
        "p50_ms": round(percentile(latencies, 0.5) * 1000, 1),
        "p99_ms": round(percentile(latencies, 0.99) * 1000, 1),
        "note": "real node (containerd + kubelet), falco-talon in-cluster behind its Service; "
        "includes polling the API every 2 ms until the pod reads as 404",
    }


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def bench_shared_state(calls: int = 100_000) -> dict[str, Any]:
    """CPU µs per call of what ``processes`` > 1 adds on the per-event path: deduplication
    and throttle counts in the shared file (beside the in-memory stores of one process),
    and a metric increment (one process; multiprocess, stock and as written behind)."""
    from prometheus_client import values

    from engine.shared import SharedCounters, SharedDedup, SharedState
    from engine.storm import DedupWindow, MemoryCounters
    from observability import multiprocess

    def cpu_us(call: Any, n: int = calls) -> float:
        start = time.process_time()
        for i in range(n):
            call(i)
        return round((time.process_time() - start) / n * 1e6, 2)

    keys = [hashlib.sha256(b"%d" % i).hexdigest()[:40] for i in range(calls)]  # as storm's
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as d:
        SharedState.create(f"{d}/state")
        state = SharedState(f"{d}/state")
        for name, dedup, counters in (
            ("memory", DedupWindow(5.0), MemoryCounters()),
            ("shared", SharedDedup(state, 5.0), SharedCounters(state)),
        ):
            out[f"dedup_new_{name}"] = cpu_us(lambda i, d=dedup: d.claim(keys[i]))
            out[f"dedup_duplicate_{name}"] = cpu_us(lambda i, d=dedup: d.claim(keys[i % 100]))
            take = counters.take
            out[f"throttle_{name}"] = cpu_us(
                lambda i, t=take: _run_coroutine(t(keys[i % 1000], 1, 60.0, 1e9))
            )
        state.close()
        os.environ[multiprocess.ENV] = d
        try:
            label = ("counter", "m", "m_total", [], [], "help")
            for name, cls in (
                ("one_process", values.MutexValue),
                ("multiprocess_stock", values.MultiProcessValue()),
                ("multiprocess_written_behind", multiprocess.BufferedValue),
            ):
                value = cls(*label)
                out[f"metric_increment_{name}"] = cpu_us(lambda i, v=value: v.inc(1))
        finally:
            del os.environ[multiprocess.ENV]
    return out


def _run_coroutine(coroutine: Any) -> Any:
    """Run a coroutine that never awaits (the stores' ``take``) without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine awaited")


def bench_memory() -> dict[str, Any]:
    ruleset = RulesLoader(*load_plugins()).load([ROOT / "examples" / "rules.yaml"])
    base = make_events(1000, 10)
    for e in base:
        e.rule = "Terminal shell in container"

    async def go() -> dict[str, int]:
        actionners, _ = load_plugins()
        pipeline = Pipeline(ruleset, actionners, dry_run=True)
        marks = {}
        for i in range(100_000):
            src = base[i % len(base)]
            event = FalcoEvent(
                rule=src.rule,
                priority=src.priority,
                output_fields=dict(src.output_fields),
                tags=src.tags,
            )
            await pipeline.process(event)
            if i + 1 in (10_000, 100_000):
                marks[f"rss_kib_after_{i + 1}"] = rss_kib()
        return marks

    marks = asyncio.run(go())
    marks["growth_kib_10k_to_100k"] = marks["rss_kib_after_100000"] - marks["rss_kib_after_10000"]
    return marks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


LABEL_RULE = (
    "- name: label\n  match: {rules: [Terminal shell in container]}\n"
    "  action: {name: kubernetes:label, parameters: {labels: {suspicious: 'true'}}}\n"
)
"""One rule that labels (run dry): the kind of rule issue #13's side-by-side measured."""


def bench_ingest(
    seconds: int = 10,
    connections: int = 50,
    processes: int | str = 1,
    *,
    rules: Path = ROOT / "examples" / "rules.yaml",
    env: dict[str, str] | None = None,
    floor: bool = False,
    recording_only: bool = False,
    others: dict[str, int] | None = None,
) -> dict[str, Any]:
    """``processes``: the server's ``--processes`` (1, a number, or auto); ``rules``: the
    rules file (default: examples/rules.yaml, four rules an event matches, four steps);
    ``env``: more of the server's environment (tracing); ``floor``: measure
    bench/aiohttp_floor.py instead of falco-talon (``processes`` a number);
    ``recording_only``: run the server through bench/recording_server.py (tracing on, spans
    dropped as each event ends: ``env`` must turn tracing on); ``others``:
    more processes (name -> pid) whose cores used during the load are reported (Jaeger).
    The server's helper processes (the trace export process) are reported apart."""
    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - unread; a pipe would fill and stall the server
    server_env = {
        **os.environ,
        "LOGFORMAT": "json",
        "LOGLEVEL": "info",
        "WATCHRULES": "false",
        "QUEUESIZE": "10000",
        "DEFAULTNOTIFIERS": "",
        **(env or {}),
    }  # ingest and the machine, no cluster
    if floor:
        server = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "aiohttp_floor.py"), str(port), str(processes)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    else:
        server = start_server(
            rules,
            port,
            server_env,
            log,
            "--dry-run",
            "--processes",
            str(processes),
            entry=(str(ROOT / "bench" / "recording_server.py"),) if recording_only else None,
        )
    try:
        _wait_port(port)
        pids = _server_pids(server.pid, port)
        template = _distinct_template()
        helpers = [c for p in pids for c in _children(p) if c not in pids]
        watched = {"helper_processes": helpers, **{k: [v] for k, v in (others or {}).items()}}
        watched_before = {k: sum(_cpu_seconds(p) for p in v) for k, v in watched.items()}
        cpu_before = sum(_cpu_seconds(p) for p in pids)
        wrk = shutil.which("wrk")
        if wrk:
            # One wrk thread per server process: one thread's ~6,000 requests/s here would
            # cap the floor's two processes.
            threads = max(1, len(pids) - 1)
            result = _wrk(wrk, [port] * threads, seconds, connections, template)
        else:
            result = _loadgen(port, seconds, connections, template)
        cores = (sum(_cpu_seconds(p) for p in pids) - cpu_before) / seconds
        result["server_cores_used"] = round(cores, 2)
        for name, group in watched.items():
            used = sum(_cpu_seconds(p) for p in group) - watched_before[name]
            result[f"{name}_cores_used"] = round(used / seconds, 2)
        result["events_per_s_per_core"] = round(result["requests_per_s"] / max(cores, 0.01))
        result["server_processes"] = max(1, len(pids) - 1)
        peaks = [_status_kib(p, "VmHWM") for p in pids]  # the supervisor first, if any
        result["server_peak_rss_kib"] = peaks[0] if len(pids) == 1 else peaks[1:]
        if len(pids) > 1:
            result["supervisor_peak_rss_kib"] = peaks[0]
        if env and env.get("OTEL_ENABLED") == "true" and not recording_only:
            result["spans"] = _spans_counted(port)
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    return result


def bench_ingest_traced(pairs: int = 3) -> dict[str, Any]:
    """Ingest as ``bench_ingest`` measures it, with tracing on, exporting over OTLP/gRPC to
    a local Jaeger (builtin path: export process; Jaeger on the same two cores), and with
    spans recorded and dropped as each event ends (recording alone:
    bench/recording_server.py), beside the same run with tracing off, the three alternated
    ``pairs`` times (the machine's minute-to-minute noise hits each alike); each cost is
    the events/s lost, from the medians. The spans' outcomes are read from the server's
    /metrics after each exporting run (every span exported, none dropped)."""
    from tests.env.jaeger import TestJaeger

    offs: list[dict[str, Any]] = []
    recordings: list[dict[str, Any]] = []
    ons: list[dict[str, Any]] = []
    jaeger = TestJaeger()
    info = jaeger.start()
    try:
        env = {"OTEL_ENABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": info.otlp_grpc_endpoint}
        for _ in range(pairs):
            offs.append(bench_ingest())
            recordings.append(bench_ingest(env=env, recording_only=True))
            ons.append(bench_ingest(env=env, others={"jaeger": info.pid}))
    finally:
        jaeger.stop()

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(run[key] for run in runs))

    def us_per_event(runs: list[dict[str, Any]], cores: str) -> float:
        return round(statistics.median(r[cores] / r["requests_per_s"] * 1e6 for r in runs), 1)

    off, on = median(offs, "requests_per_s"), median(ons, "requests_per_s")
    recording = median(recordings, "requests_per_s")
    return {
        "off_events_per_s": off,
        "off_runs": [r["requests_per_s"] for r in offs],
        "off_p99_ms": median(offs, "p99_ms"),
        "recording_only_events_per_s": recording,
        "recording_only_runs": [r["requests_per_s"] for r in recordings],
        "cost_recording_pct": round((1 - recording / off) * 100, 1),
        "recording_only_server_us_per_event": us_per_event(recordings, "server_cores_used"),
        "jaeger_events_per_s": on,
        "jaeger_runs": [r["requests_per_s"] for r in ons],
        "jaeger_p99_ms": median(ons, "p99_ms"),
        "spans": [r.get("spans") for r in ons],
        "cost_jaeger_pct": round((1 - on / off) * 100, 1),
        # Where the CPU went, in µs an event: the server process, the export process (OTLP
        # encoding, sending), Jaeger (receiving, storing); off: the server alone.
        "off_server_us_per_event": us_per_event(offs, "server_cores_used"),
        "jaeger_server_us_per_event": us_per_event(ons, "server_cores_used"),
        "jaeger_export_process_us_per_event": us_per_event(ons, "helper_processes_cores_used"),
        "jaeger_collector_us_per_event": us_per_event(ons, "jaeger_cores_used"),
    }


def _spans_counted(port: int) -> dict[str, float]:
    """``falco_talon_spans_total`` by outcome, once the last batches have left."""
    import urllib.request

    counts: dict[str, float] = {}
    for _ in range(20):
        time.sleep(1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        now = {
            line.split('outcome="')[1].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("falco_talon_spans_total{")
        }
        if now == counts:
            break
        counts = now
    return counts


MARK = "__N__"
"""Replaced by a request counter in each request's body: every event is distinct."""


def bench_burst(events: int = 20000, seconds: float = 2.0) -> dict[str, Any]:
    """Issue #13's accounting rule under overload: ``events`` distinct events offered within
    ``seconds`` (open loop, bench/burst.py) to a server with the default queue size; each
    gets 202 or 503, and every 202 one reaches a final state. RSS after it, too."""
    from burst import run_burst

    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - unread; a pipe would fill and stall the server
    env = {**os.environ, "LOGFORMAT": "json", "LOGLEVEL": "info", "WATCHRULES": "false"}
    env["DEFAULTNOTIFIERS"] = ""
    server = start_server(ROOT / "examples" / "rules.yaml", port, env, log, "--dry-run")
    try:
        _wait_port(port)
        template = _distinct_template()
        bodies = [template.replace(MARK, str(i)).encode() for i in range(events)]
        result = run_burst(port, bodies, seconds=seconds)
        status = Path(f"/proc/{server.pid}/status").read_text()
        for field, key in (("VmRSS:", "server_rss_kib"), ("VmHWM:", "server_peak_rss_kib")):
            result[key] = int(
                next(ln for ln in status.splitlines() if ln.startswith(field)).split()[1]
            )
    finally:
        server.terminate()
        server.wait(60)
        log.close()
    return result


def _distinct_template() -> str:
    """examples/event.json with a counter in its output and pod name, as a user's load
    generator sends (one body repeated flatters caches and hides per-event work)."""
    event = json.loads((ROOT / "examples" / "event.json").read_text())
    event["output"] = f"{event['output']} n={MARK}"
    event["output_fields"]["k8s.pod.name"] = f"{event['output_fields']['k8s.pod.name']}-{MARK}"
    event.pop("uuid", None)
    return json.dumps(event)


def _server_pids(pid: int, port: int) -> list[int]:
    """The server's processes: ``pid``, and with ``--processes`` its server processes once
    each answers ``/healthz`` (which names its pid)."""
    import urllib.request

    deadline = time.time() + 60
    seen: set[int] = set()
    while time.time() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as resp:
            health = json.loads(resp.read())
        if "pid" not in health:
            return [pid]
        seen.add(health["pid"])
        if len(seen) == health["processes"]:
            return [pid, *sorted(seen)]
    raise RuntimeError("the server processes did not all answer")


def _status_kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln for ln in status.splitlines() if ln.startswith(field + ":")).split()[1])


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (the export process of a server)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its children so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(x) for x in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _wait_port(port: int) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("server did not start")


def _wrk(
    wrk: str, port: int | list[int], seconds: int, connections: int, template: str
) -> dict[str, Any]:
    """``port``: several spread the connections over those servers, one wrk thread each
    (each numbering its events apart from the others', so every event stays distinct)."""
    ports = port if isinstance(port, list) else [port]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n')
        f.write(f"template = {json.dumps(template)}\ncounter = 0\nprefix = ''\n")
        f.write(
            f"ports = {{{', '.join(map(str, ports))}}}\nthreads = 0\n"
            "setup = function(thread)\n  threads = threads + 1\n"
            '  thread.addr = wrk.lookup("127.0.0.1", tostring(ports[threads]))[1]\n'
            '  thread:set("prefix", threads .. "-")\nend\n'
        )
        f.write(
            "request = function()\n  counter = counter + 1\n"
            f'  local body = string.gsub(template, "{MARK}", prefix .. counter)\n'
            "  return wrk.format(nil, nil, nil, body)\nend\n"
        )
        f.write(
            "done = function(summary, latency, requests)\n"
            '  io.write(string.format(\'JSON {"requests": %d, "non2xx": %d, '
            '"p50_us": %d, "p99_us": %d, "errors": %d}\\n\', summary.requests, '
            "summary.errors.status, latency:percentile(50), latency:percentile(99), "
            "summary.errors.connect + summary.errors.read + summary.errors.write + "
            "summary.errors.timeout))\nend\n"
        )
        script = f.name
    proc = subprocess.run(
        [
            wrk,
            f"-t{len(ports)}",
            f"-c{connections}",
            f"-d{seconds}s",
            "-s",
            script,
            f"http://127.0.0.1:{ports[0]}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(script)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("JSON "))
    data = json.loads(line[5:])
    return {
        "tool": "wrk",
        "connections": connections,
        "seconds": seconds,
        "requests_per_s": round(data["requests"] / seconds),
        "p50_ms": round(data["p50_us"] / 1000, 2),
        "p99_ms": round(data["p99_us"] / 1000, 2),
        "non_2xx": data["non2xx"],
        "socket_errors": data["errors"],
    }


def _loadgen(port: int, seconds: int, connections: int, template: str) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        f.write(template)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "loadgen.py"),
            f"http://127.0.0.1:{port}/",
            str(seconds),
            str(connections),
            f.name,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    os.unlink(f.name)
    return {"tool": "bench/loadgen.py", **json.loads(proc.stdout)}


def targets(results: dict[str, Any]) -> dict[str, bool]:
    """Each target whose measurement ran: met or not."""
    out: dict[str, bool] = {}
    matching = results.get("matching")
    if matching:
        out["matching named_1000 >= 50000/s"] = matching["named_1000"]["events_per_s"] >= 50000
        out["matching unnamed_1000 >= 5000/s"] = matching["unnamed_1000"]["events_per_s"] >= 5000
    if "dry_run" in results:
        out["dry run >= 2000/s"] = results["dry_run"]["events_per_s"] >= 2000
    if "tracing" in results:
        tracing = results["tracing"]
        out["tracing on, recording alone (spans dropped) costs < 15%"] = (
            tracing["cost_recording_pct"] < 15
        )
        out["tracing on (no-op sink: recording + export rows) costs < 15%"] = (
            tracing["cost_noop_pct"] < 15
        )
        out["tracing on (to local Jaeger) costs < 25%"] = tracing["cost_jaeger_pct"] < 25
    if "ingest" in results:
        ingest = results["ingest"]
        out["ingest >= 8000/s, p99 < 15 ms"] = (
            ingest["requests_per_s"] >= 8000 and ingest["p99_ms"] < 15
        )
        out["ingest server RSS < 100 MB"] = ingest["server_peak_rss_kib"] < 100 * 1024
    if "ingest_traced" in results:
        out["ingest: tracing, recording alone (spans dropped) costs < 15%"] = (
            results["ingest_traced"]["cost_recording_pct"] < 15
        )
        out["ingest: tracing to local Jaeger costs < 25%"] = (
            results["ingest_traced"]["cost_jaeger_pct"] < 25
        )
    if "ingest_processes_auto" in results:
        auto = results["ingest_processes_auto"]
        out["ingest, processes: auto, >= 8000/s, p99 < 15 ms"] = (
            auto["requests_per_s"] >= 8000 and auto["p99_ms"] < 15
        )
        out["ingest, processes: auto, RSS < 100 MB per process"] = (
            max(auto["server_peak_rss_kib"]) < 100 * 1024
        )
    if "burst" in results:
        burst = results["burst"]
        out["burst: every event answered 202/503, every 202 reached a final state"] = (
            burst["unanswered"] == 0
            and burst["other_statuses"] == 0
            and burst["accepted_without_outcome"] == 0
        )
        out["burst: server RSS < 100 MB"] = burst["server_peak_rss_kib"] < 100 * 1024
    latency = results.get("kubernetes_terminate_latency")
    if latency and "p99_ms" in latency:
        out["POST -> pod gone p99 <= 30 ms (local control plane)"] = latency["p99_ms"] <= 30
    if "memory" in results:
        out["no RSS growth (< 1 MiB from 10k to 100k events)"] = (
            results["memory"]["growth_kib_10k_to_100k"] < 1024
        )
    out.update(jetstream.targets(results))
    return out


def main() -> None:
    which = sys.argv[1:] or [
        "matching",
        "dry_run",
        "tracing",
        "ingest",
        "ingest_traced",
        "burst",
        "ingest_jetstream",
        "memory",
        "shared_state",
        "kubernetes",
        "kubernetes_jetstream",
        "real_node",
    ]
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    }
    if "matching" in which:
        results["matching"] = bench_matching()
    if "dry_run" in which:
        results["dry_run"] = bench_dry_run()
    if "tracing" in which:
        results["tracing"] = bench_tracing()
    if "tracing" in which:
        results["tracing_sdk"] = bench_tracing_sdk()
    if "ingest" in which:
        results["ingest"] = bench_ingest()
        results["ingest_processes_auto"] = bench_ingest(processes="auto")
        with tempfile.TemporaryDirectory() as tmp:
            one_rule = Path(tmp) / "rules.yaml"
            one_rule.write_text(LABEL_RULE)
            results["ingest_one_rule"] = bench_ingest(rules=one_rule)
            results["ingest_one_rule_processes_auto"] = bench_ingest(
                processes="auto", rules=one_rule
            )
        results["aiohttp_floor"] = bench_ingest(processes=1, floor=True)
        results["aiohttp_floor_2_processes"] = bench_ingest(processes=2, floor=True)
    if "ingest_traced" in which:
        results["ingest_traced"] = bench_ingest_traced()
    if "burst" in which:
        results["burst"] = bench_burst()
    if "ingest_jetstream" in which:
        results["ingest_jetstream"] = jetstream.bench_ingest()
    if "shared_state" in which:
        results["shared_state_cpu_us_per_call"] = bench_shared_state()
    if "kubernetes" in which:
        results["kubernetes_terminate_latency"] = bench_kubernetes()
    if "kubernetes_jetstream" in which:
        results["kubernetes_jetstream_terminate_latency"] = jetstream.bench_kubernetes()
    if "real_node" in which:
        if os.geteuid() == 0:
            results["real_node_terminate_latency"] = bench_real_node()
        else:
            results["real_node_terminate_latency"] = {"skipped": "needs root (make cluster-up)"}
    if "memory" in which:
        results["memory"] = bench_memory()
        results["memory"]["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results["targets"] = targets(results)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
